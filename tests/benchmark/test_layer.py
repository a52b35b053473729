"""Smoke tests of the benchmarks: tiny shapes, one measurement each, structure and correctness only.

No timing is asserted (speed belongs in bench/); what is checked is that every form ran, matched its
reference, and that the JSON / CSV / table / plot outputs have the promised structure.
"""
import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from sparse_compile import benchmark as B
from sparse_compile.benchmark import layer as bench_layer
from sparse_compile.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
CPU_FORMS = ("dense", "ablated_dense", "structured_only", "condensed", "csr")


def _load_script(name):
    """A bench/ script as a module (bench/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _has_deepsparse():
    return importlib.util.find_spec("deepsparse") is not None


def _tiny(**kw):
    cfg = dict(layers=("48x96",), sparsities=(0.9,), batches=(1, 3), threads=(1,), compile="none", quick=True,
               forms=CPU_FORMS + ("semi_structured", "deepsparse"))
    cfg.update(kw)
    return B.LayerBenchConfig(**cfg)


@pytest.fixture(scope="module")
def tiny_result():
    return B.run_layer_bench(_tiny(), progress=False)


def test_every_cpu_form_matches_dense_and_is_timed(tiny_result):
    rows = tiny_result["rows"]
    assert len(rows) == 7 * 2  # forms x batches, one thread, eager only
    for r in rows:
        if r["form"] in CPU_FORMS:
            assert r["status"] == "ok", r
            assert r["rel_err"] <= B.tolerance(torch.float32)
            assert r["q25_us"] <= r["median_us"] <= r["q75_us"] and r["n_measurements"] >= 1
    by = {(r["form"], r["batch"]): r for r in rows}
    assert by[("dense", 1)]["speedup_vs_dense"] == 1.0
    assert by[("condensed", 3)]["speedup_vs_dense"] == pytest.approx(
        by[("dense", 3)]["median_us"] / by[("condensed", 3)]["median_us"], rel=1e-2)
    # the layer really is ablated and constant fan-in, as the structure columns say
    d = by[("dense", 1)]
    assert d["n_ablated"] == round(0.1 * 48) and d["n_active"] == 48 - d["n_ablated"] and d["k"] > 0
    assert d["actual_sparsity"] == pytest.approx(1 - d["n_active"] * d["k"] / (48 * 96))


def test_unavailable_forms_are_skipped_with_a_reason(tiny_result):
    rows = {r["form"]: r for r in tiny_result["rows"] if r["batch"] == 1}
    if not torch.cuda.is_available():
        assert rows["semi_structured"]["status"] == "skipped"
        assert "CUDA" in rows["semi_structured"]["note"]
    if not _has_deepsparse():
        assert rows["deepsparse"]["status"] == "skipped"
        assert "deepsparse is not installed" in rows["deepsparse"]["note"]
    else:
        assert rows["deepsparse"]["status"] == "ok"


def test_results_json_and_csv(tiny_result, tmp_path):
    jpath, cpath = B.write_results(tmp_path, "t", tiny_result["meta"], tiny_result["rows"])
    d = B.read_results(jpath)
    m = d["meta"]["machine"]
    for k in ("date", "cpu_model", "gpu_name", "torch", "triton", "torch_threads", "cpu_count", "condensed_impl"):
        assert k in m
    assert m["cpu_model"] == B.cpu_model() and m["torch"] == torch.__version__
    assert d["meta"]["config"]["batches"] == [1, 3]
    assert len(d["rows"]) == len(tiny_result["rows"])
    with open(cpath) as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(d["rows"])
    for col in ("layer", "sparsity", "batch", "threads", "form", "compiled", "status", "median_us", "q25_us",
                "q75_us", "speedup_vs_dense", "rel_err", "date", "cpu_model"):
        assert col in lines[0], col
    ok = [r for r in lines if r["status"] == "ok"]
    assert ok and all(float(r["median_us"]) > 0 for r in ok)


def test_markdown_table(tiny_result):
    t = B.markdown_table(tiny_result)
    lines = t.strip().splitlines()
    assert lines[0].startswith("| layer | sparsity | batch | threads | dtype | dense | ablated-dense")
    assert "condensed vs dense" in lines[0] and "condensed vs CSR" in lines[0]
    assert len(lines) == 2 + 2  # header, rule, one line per batch
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_a_wrong_form_is_reported_not_timed(monkeypatch):
    real = B.build_form

    def broken(form, lw, *a, **kw):
        f = real(form, lw, *a, **kw)
        if form == "condensed":
            fn = f.fn
            f.fn = lambda x: fn(x) * 1.01
        return f

    monkeypatch.setattr(bench_layer, "build_form", broken)  # the module run_layer_bench reads it from
    rows = B.run_layer_bench(_tiny(forms=("dense", "condensed"), batches=(2,)), progress=False)["rows"]
    bad = [r for r in rows if r["form"] == "condensed"]
    assert [r["status"] for r in bad] == ["wrong"] and "median_us" not in bad[0] and bad[0]["rel_err"] > 1e-3
    assert [r["status"] for r in rows if r["form"] == "dense"] == ["ok"]


@pytest.mark.slow
def test_compiled_forms_match_and_really_compile():
    rows = B.run_layer_bench(_tiny(forms=("dense", "condensed", "csr"), batches=(2,), compile="default"),
                             progress=False)["rows"]
    comp = {r["form"]: r for r in rows if r["compiled"]}
    for f in ("dense", "condensed"):
        assert comp[f]["status"] == "ok", comp[f]
        assert comp[f]["graphs"] >= 1 and comp[f]["rel_err"] <= B.tolerance(torch.float32)
        assert comp[f]["compile_s"] > 0
    # dynamo cannot capture sparse CSR tensors: said so, not passed off as a compiled timing
    assert comp["csr"]["status"] == "skipped" and "captured no graph" in comp["csr"]["note"]


def test_random_layer_has_srigl_statistics():
    lw = B.random_layer(200, 400, 0.9, ablated_fraction=0.25, seed=3)
    a = lw.analysis()
    assert a.n_ablated == 50 and a.constant_fan_in
    assert a.k == (200 * 40) // 150  # the ablated neurons' budget went to the active ones
    live = lw.weight[lw.mask]
    assert (lw.weight[~lw.mask] == 0).all()
    assert live.std().item() == pytest.approx(math.sqrt(2 / a.k), rel=0.1)


def test_srigl_like_mask_spreads_the_budget_over_active_neurons():
    from sparse_compile.benchmark.weights import srigl_like_mask
    from sparse_compile.formats import analyze

    shape = (12, 4, 3, 3)  # a conv weight: fan-in 36
    mask = srigl_like_mask(shape, budget=12 * 5, n_ablated=4, generator=torch.Generator().manual_seed(0))
    assert mask.shape == shape and mask.dtype == torch.bool
    a = analyze(torch.ones(shape), mask)
    assert a.n_ablated == 4 and a.constant_fan_in and a.k == (12 * 5) // 8
    again = srigl_like_mask(shape, budget=12 * 5, n_ablated=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    full = srigl_like_mask((3, 4), budget=100)  # more budget than the layer holds: dense rows
    assert full.all()
    with pytest.raises(ValueError, match="n_ablated"):
        srigl_like_mask((3, 4), budget=6, n_ablated=3)


def test_checkpoint_layer(tmp_path):
    from safetensors.torch import save_file

    lw = B.random_layer(32, 64, 0.8, ablated_fraction=0.25, seed=1)
    other = B.random_layer(16, 32, 0.5, seed=2)
    sd = {"blocks.0.fc2.weight": lw.weight, "blocks.0.fc2.weight_mask": lw.mask, "blocks.0.fc2.bias": lw.bias,
          "head.weight": other.weight, "head.weight_mask": other.mask}
    path = tmp_path / "ck.safetensors"
    save_file(sd, str(path))
    with pytest.raises(KeyError, match="blocks.0.fc2"):
        B.checkpoint_layer(path)  # two sparse layers: must name one
    with pytest.raises(KeyError, match="no weight"):
        B.checkpoint_layer(path, "blocks.0.fc9")
    got = B.checkpoint_layer(path, "blocks.0.fc2")
    assert torch.equal(got.mask, lw.mask) and got.analysis().n_ablated == 8
    res = B.run_layer_bench(_tiny(checkpoint=str(path), checkpoint_layer="blocks.0.fc2", forms=CPU_FORMS, batches=(2,)),
                            progress=False)
    assert {r["status"] for r in res["rows"]} == {"ok"}
    assert {r["layer"] for r in res["rows"]} == {"blocks.0.fc2"}
    assert res["rows"][0]["n_ablated"] == 8 and res["rows"][0]["weights"].startswith("checkpoint")


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="OUTxIN"):
        B.parse_shape("768")
    with pytest.raises(ValueError, match="unknown form"):
        _tiny(forms=("dense", "nope")).resolved()
    with pytest.raises(ValueError, match="sparsities"):
        _tiny(sparsities=(1.0,)).resolved()
    with pytest.raises(ValueError, match="batch"):
        _tiny(batches=(0,)).resolved()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            _tiny(device="cuda").resolved()


def test_cli_bench_layer(tmp_path, capsys):
    rc = cli_main(["bench", "layer", "--layers", "24x40", "--sparsities", "0.8", "--batches", "2", "--threads", "1",
                   "--forms", "dense", "condensed", "--compile", "none", "--quick", "--no-progress",
                   "--out", str(tmp_path), "--name", "cli"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| 24x40 | 80% | 2 | 1 | fp32 |" in out
    d = json.loads((tmp_path / "cli.json").read_text())
    assert [r["form"] for r in d["rows"]] == ["dense", "condensed"] and all(r["status"] == "ok" for r in d["rows"])
    assert (tmp_path / "cli.csv").exists()
    assert cli_main(["bench", "layer", "--layers", "24", "--out", str(tmp_path)]) == 1  # bad shape: error exit


def test_plot_writes_one_png_per_group(tiny_result, tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the demo/test extra)")
    plot = _load_script("plot")
    paths = plot.plot_layer_results(tiny_result, tmp_path, prefix="t")
    assert [p.name for p in paths] == ["t-48x96-cpu-fp32-t1.png"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_sparsify_ablates_all_but_the_head():
    model_bench = _load_script("model")
    from sparse_compile.formats import analyze, get_mask
    from sparse_compile.models import create_model

    m = create_model("mobilenet_v3_large")
    n = model_bench.sparsify(m, "mobilenet_v3_large", 0.9, 0.1)
    masked = [(name, mod) for name, mod in m.named_modules() if get_mask(mod) is not None]
    assert n == len(masked) > 10
    for name, mod in masked:
        a = analyze(mod.weight, get_mask(mod), name)
        assert a.constant_fan_in, name
        assert (mod.weight.detach()[~get_mask(mod)] == 0).all(), name
        if name == "classifier.3":
            assert a.n_ablated == 0
        else:
            assert a.n_ablated == min(a.out_features - 1, round(0.1 * a.out_features)), name
