"""A reduced ``sparse-compile demo``: every step runs and every reported number is real."""
import json
import math

from sparse_compile.cli import main


def test_reduced_demo_writes_report_and_plots(tmp_path, capsys):
    out = tmp_path / "demo-out"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--rounds", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    # the condensed timings and forms below mean something only with the C++ kernels (no silent fallback)
    assert rep["kernels"]["loaded"], rep["kernels"]["error"]
    assert rep["model"] == "64-1024-1024-10" and "MLP 64-1024-1024-10" in printed

    # 1. three trainings, real accuracies, the sparse ones at the requested sparsity
    assert set(rep["accuracy"]) == {"dense", "rigl", "srigl"}
    for method, acc in rep["accuracy"].items():
        assert 0.3 < acc <= 1.0, method  # 2 epochs on digits are far above chance (0.1)
        assert f"{100 * acc:.2f}%" in printed
    for method in ("rigl", "srigl"):
        assert abs(rep["training"]["runs"][method]["sparsifier"]["sparsity"] - 0.9) < 0.01
    assert len(rep["training"]["runs"]["dense"]["history"]) == 2

    # SRigL's fan-in is constant per layer (ablated neurons aside); RigL's is not
    for layer, fans in rep["fan_in"]["srigl"].items():
        assert len({f for f in fans if f > 0}) == 1, layer
    assert any(len(set(f)) > 1 for f in rep["fan_in"]["rigl"].values())

    # 2. optimize: a form per layer, identical predictions for "auto" and forced "condensed"
    opt = rep["optimize"]
    assert set(opt["forms"]) == {"fc1", "fc2", "fc3"}
    # The demo's point: auto, timing on this CPU, runs the 1024x1024 layer (~94% sparse under ERK)
    # condensed (about 2-3x faster than dense at batch 1), and the optimized model really holds a
    # CondensedLinear there; the classifier (dense under ERK) stays a plain Linear.
    assert opt["forms"]["fc2"] == "condensed", opt["optimize"]
    assert opt["modules"]["fc2"] == "CondensedLinear" and opt["modules"]["fc3"] == "Linear", opt["modules"]
    assert opt["inspect"]["layers"][1]["sparsity"] > 0.9
    assert opt["identical_predictions"] and opt["max_rel_diff"] < 1e-5
    assert opt["condensed_identical_predictions"]
    assert opt["condensed_forms"]["fc1"] == opt["condensed_forms"]["fc2"] == "condensed"
    assert opt["inspect"]["layers"][0]["constant_fan_in"]
    assert "optimize(model, mode='auto')" in printed
    # the measured whole-model speedup is printed beside the accuracy, from the report's medians
    wm = opt["optimize"]["whole_model"]["median_ms"]
    chosen = wm.get(opt["optimize"]["whole_model"]["chosen"], wm["original"])
    assert math.isclose(opt["whole_model_speedup"], wm["original"] / chosen)
    assert opt["optimize"]["whole_model"]["chosen"] != "original layers"  # the condensed fc2 was kept
    assert f"at {opt['whole_model_speedup']:.2f}x the original's speed" in printed

    # 3. layer timings: positive, finite, and the printed ratios are the ratios of the medians
    t = rep["vit_layer"]
    assert t["shape"] == [768, 3072] and t["k"] == 307 and t["rounds"] == 3
    assert {"dense", "csr", "condensed"} <= set(t["median_us"])
    for form, us in t["median_us"].items():
        assert math.isfinite(us) and us > 0, form
        assert math.isclose(t["speedup_vs_dense"][form], t["median_us"]["dense"] / us)
        assert t["max_rel_err"][form] < 1e-4, form
        assert f"{us:.1f} us" in printed

    # 4. plots are real PNG images
    assert rep["plots"] == ["accuracy.png", "layer_timing.png", "fan_in_hist.png"]
    for name in rep["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert rep["seconds_after_setup"] > 0
