"""The optimize report as printed: one summary line, a table within 100 columns, timing outliers flagged."""
from sparse_compile.compiler.report import LayerReport, OptimizeReport


def _layer(name, form="condensed", times=None, shape=(3072, 768), sparsity=0.9):
    n = shape[0] * shape[1]
    return LayerReport(name=name, kind="linear", shape=shape, sparsity=sparsity, fan_in="77", active=shape[0],
                       ablated=0, inputs_kept=f"{shape[1]}/{shape[1]}", form=form, output="full",
                       reason="fastest: 2.00x faster than dense (csr: a long reason " + "x" * 80 + ")",
                       times_us=times if times is not None else {"dense": 200.0, "condensed": 100.0},
                       rel_err=0.0, bytes_before=4 * n, bytes_after=4 * n // 5 if form != "dense" else 4 * n)


def _report(layers, whole_model=None):
    return OptimizeReport(layers, mode="auto", whole_model=whole_model, verify_rel_err=1e-7,
                          notes=["a note " + "y" * 150])


def test_summary_line_counts_forms_bytes_and_the_measured_speedup():
    rep = _report([_layer("a"), _layer("b"), _layer("c", form="dense", times={"dense": 5.0, "condensed": 9.0})],
                  whole_model={"median_ms": {"optimized": 10.0, "original": 25.0}, "chosen": "optimized"})
    first = str(rep).splitlines()[0]
    assert first.startswith("auto: 3 layer(s) (2 condensed, 1 dense); weights ")
    assert "MiB -> " in first and "x smaller" in first
    assert first.endswith("measured speedup 2.50x (whole model)")
    assert rep.speedup() == 2.5
    kept = _report([_layer("a")], whole_model={"median_ms": {"optimized": 30.0, "original": 25.0},
                                               "chosen": "original layers"})
    assert kept.speedup() == 1.0
    assert _report([_layer("a")]).speedup() is None and "speedup" not in _report([_layer("a")]).summary()


def test_table_fits_100_columns_even_with_long_names():
    names = [f"encoder.layers.encoder_layer_{i}.mlp.linear_with_a_long_name_{i}" for i in range(3)]
    text = str(_report([_layer(n) for n in names]))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    assert lines[1].split()[:3] == ["layer", "shape", "sparse"]
    rows = lines[3:6]
    assert all("~" in r.split()[0] and r.split()[0].endswith(n[-8:]) for r, n in zip(rows, names))
    assert all(r.split()[-2] == "2.00x" and r.split()[-1] == "9216->1843" for r in rows)  # condensed against dense, from the timings
    assert any(line.startswith(f"  {names[0]}: dense 200.0, condensed* 100.0;") for line in lines)


def test_timing_outliers_among_same_shape_layers_are_flagged():
    layers = [_layer(f"l{i}") for i in range(4)] + [_layer("slow", times={"dense": 900.0, "condensed": 100.0})]
    layers.append(_layer("alone", shape=(10, 10), times={"dense": 1.0, "condensed": 99.0}))  # no group: never flagged
    rep = _report(layers)
    assert set(rep.outliers()) == {"slow"} and "dense 900.0 us vs 200.0 us median of 5" in rep.outliers()["slow"]
    text = str(rep)
    assert "! timing outlier" in text and "slow: dense 900.0" in text
    assert _report([_layer(f"l{i}") for i in range(4)]).outliers() == {}
