"""Closed forms of the output-norm variance (Appendices A-B) against a simulation of the layer."""
import json

import pytest

from sparse_compile.analysis import theory
from sparse_compile.analysis.theory import (
    KINDS,
    output_norm_variance,
    printed_output_norm_variance,
    simulate_output_norm_variance,
)

# k = 1, k small against n, k = n, and a middle case; n = 2 is the smallest width.
CASES = [(2, 1), (8, 1), (16, 2), (32, 1), (32, 4), (24, 24), (12, 12)]
TRIALS = 20000


@pytest.mark.parametrize("n,k", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_matches_simulation(kind, n, k):
    seed = 1 + 97 * KINDS.index(kind) + 7 * n + k  # a distinct, fixed stream per case
    s = simulate_output_norm_variance(kind, n, k, trials=TRIALS, seed=seed)
    cf = output_norm_variance(kind, n, k)
    assert abs(s.variance - cf) < 4 * s.variance_se, (kind, n, k, s.variance, cf, s.variance_se)
    # E||z||^2 = 1 (Eqs. 13, 20, 24).
    assert abs(s.mean - 1.0) < 4 * s.mean_se, (kind, n, k, s.mean, s.mean_se)


@pytest.mark.parametrize("kind", KINDS)
def test_simulation_rejects_the_printed_k_over_n_term(kind):
    # Eqs. (1)-(3) print 18 k/n where the tables give 18 n/k: at k = 1 the simulation must tell
    # them apart by far more than the 4 standard errors the closed form is held to.
    n, k = 16, 1
    s = simulate_output_norm_variance(kind, n, k, trials=TRIALS, seed=5)
    printed = printed_output_norm_variance(kind, n, k, equation="A")
    assert abs(s.variance - printed) > 20 * s.variance_se


def test_simulation_resolves_the_kinds():
    # The test above would be weak if the simulation could not even separate the sparsity kinds:
    # at n = 8, k = 1 the constant fan-in estimate must exclude the Bernoulli closed form.
    s = simulate_output_norm_variance("constant_fan_in", 8, 1, trials=40000, seed=11)
    assert abs(s.variance - output_norm_variance("bernoulli", 8, 1)) > 4 * s.variance_se
    assert abs(s.variance - output_norm_variance("constant_fan_in", 8, 1)) < 4 * s.variance_se


def test_appendix_b_prints_the_derived_bernoulli_and_fan_in_forms():
    for n, k in [(10, 1), (64, 7), (100, 100)]:
        for kind in ("bernoulli", "constant_fan_in"):
            assert printed_output_norm_variance(kind, n, k, "B") == pytest.approx(output_norm_variance(kind, n, k))


@pytest.mark.parametrize("n", [2, 3, 7, 50, 1000])
def test_orderings_and_gaps_stated_in_the_docstring(n):
    for k in sorted({1, 2, max(1, n // 3), n}):
        b, p, f = (output_norm_variance(kind, n, k) for kind in KINDS)
        assert p - f == pytest.approx((n - k) * (2 * n - 5) / (k * n * (n + 1) * (n + 2)), rel=1e-9, abs=1e-15)
        assert b - p == pytest.approx((n - k) * (n + 8) / (k * n * (n + 1) * (n + 2)), rel=1e-9, abs=1e-15)
        if k == n:
            assert b == pytest.approx(5 / n) and p == pytest.approx(5 / n) and f == pytest.approx(5 / n)
        elif n >= 3:
            assert f < p < b
    if n == 2:  # the one width where constant fan-in is not the smallest
        assert output_norm_variance("constant_fan_in", 2, 1) > output_norm_variance("constant_per_layer", 2, 1)


def test_simulation_is_deterministic_and_seed_dependent():
    a = simulate_output_norm_variance("constant_fan_in", 8, 3, trials=500, seed=3)
    b = simulate_output_norm_variance("constant_fan_in", 8, 3, trials=500, seed=3)
    c = simulate_output_norm_variance("constant_fan_in", 8, 3, trials=500, seed=4)
    assert a == b
    assert a.variance != c.variance


def test_chunking_does_not_change_the_result():
    a = simulate_output_norm_variance("constant_per_layer", 6, 2, trials=600, seed=9)
    b = simulate_output_norm_variance("constant_per_layer", 6, 2, trials=600, seed=9, chunk_elems=10 * 36)
    # Chunks draw the same streams in a different grouping, so only the distribution must agree.
    assert a.trials == b.trials == 600
    assert abs(a.variance - b.variance) < 4 * (a.variance_se + b.variance_se)


def test_patterns_have_the_promised_structure():
    import numpy as np

    rng = np.random.default_rng(0)
    p = theory._pattern(rng, "constant_fan_in", 50, 9, 4)
    assert (p.sum(axis=2) == 4).all()
    p = theory._pattern(rng, "constant_per_layer", 50, 9, 4)
    assert (p.sum(axis=(1, 2)) == 36).all()
    assert not (p.sum(axis=2) == 4).all()  # rows are free to vary
    p = theory._pattern(rng, "bernoulli", 2000, 9, 4)
    assert abs(p.mean() - 4 / 9) < 0.01


@pytest.mark.parametrize(
    "args,match",
    [(("dense", 8, 2), "kind"), (("bernoulli", 1, 1), "n must"), (("bernoulli", 8, 0), "k must"),
     (("bernoulli", 8, 9), "k must"), (("bernoulli", 8, 2.5), "integers")],
)
def test_bad_arguments_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        output_norm_variance(*args)
    with pytest.raises(ValueError, match=match):
        simulate_output_norm_variance(*args, trials=100)


def test_lazy_export():
    import sparse_compile

    assert sparse_compile.analysis.theory is theory


def test_cli_writes_plot_and_json(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (extra 'demo')")
    from sparse_compile.cli import main

    png, js = tmp_path / "v.png", tmp_path / "v.json"
    assert main(["theory", "--n", "12", "--trials", "300", "--plot", str(png), "--json", str(js)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data["n"] == 12 and set(data["closed_form"]) == set(KINDS)
    for kind in KINDS:
        cf = data["closed_form"][kind]
        assert [p["k"] for p in cf] == list(range(1, 13))
        assert all(p["variance"] == pytest.approx(output_norm_variance(kind, 12, p["k"])) for p in cf)
        sims = data["simulated"][kind]
        assert sims and all(p["se"] > 0 and 1 <= p["k"] <= 12 for p in sims)


def _itop_report(path, history):
    path.write_text(json.dumps({"history": history, "sparsity": 0.9}))
    return str(path)


def test_plot_itop_from_a_synthetic_report(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (extra 'demo')")
    from sparse_compile.cli import main
    from sparse_compile.commands.plot_itop import load_history

    hist = [{"step": s, "itop": 0.1 + s / 1000, "layers": {"fc1": 0.1 + s / 900, "fc2": 0.1 + s / 1200}}
            for s in range(0, 500, 100)]
    rep = _itop_report(tmp_path / "r.json", hist)
    steps, rates, layers = load_history(rep)
    assert steps == [0, 100, 200, 300, 400] and rates[-1] == pytest.approx(0.5)
    assert layers["fc2"][-1] == (400, pytest.approx(0.1 + 400 / 1200))
    png = tmp_path / "itop.png"
    assert main(["plot-itop", rep, "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "final global ITOP 0.5000" in capsys.readouterr().out


@pytest.mark.parametrize(
    "history,match",
    [([], "non-empty"), ([{"step": 0}], '"itop"'), ([{"step": 0, "itop": 1.5}], r"history\[0\].*\[0, 1\]"),
     ([{"step": 5, "itop": 0.1}, {"step": 5, "itop": 0.2}], r"history\[1\].*increase"),
     ([{"step": 0, "itop": 0.1, "layers": {"fc": -0.1}}], "fc")],
)
def test_plot_itop_names_the_bad_entry(tmp_path, history, match):
    from sparse_compile.commands.plot_itop import load_history

    with pytest.raises(ValueError, match=match):
        load_history(_itop_report(tmp_path / "r.json", history))


def test_plot_itop_cli_reports_errors(tmp_path, capsys):
    from sparse_compile.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["plot-itop", str(bad), "-o", str(tmp_path / "x.png")]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
