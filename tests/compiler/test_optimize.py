"""``sparse_compile.optimize``: exactness of every mode on the issue's model list, the report, "auto",
the structured propagation, fallbacks and errors."""
import copy
import json
import warnings

import pytest
import torch
import torchvision
from torch import nn

import sparse_compile
from sparse_compile.compiler import forms as form_registry, whole_model
from sparse_compile.compiler import modules as L
from sparse_compile.compiler import FORMS, FormHandler, OptimizeConfig, optimize, register_form, relative_error
from sparse_models import srigl_init

MODES = ["dense", "ablated_dense", "condensed", "csr", "auto"]
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_COMPILE_CACHE", str(tmp_path / "cache"))


def mlp():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.GELU(), nn.Dropout(0.1),
                         nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


def small_torchvision_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                hidden_dim=64, mlp_dim=256, num_classes=10).eval()


def check(model, x, mode, **kw):
    with torch.no_grad():
        ref = model(x)
        assert ref.std() > 0  # a constant output (e.g. a zero-initialised head) would prove nothing
        opt = optimize(model, (x,), mode=mode, repeats=1, warmup=0, **kw)
        err = relative_error(opt(x), ref)
    assert err <= RTOL, f"mode {mode}: relative error {err:.2e}"
    return opt


def forms(opt):
    return opt.sparse_compile_report.forms()


# ----------------------------------------------------------------------------------------------
# Exactness on the model list
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sparse_mlp():
    return srigl_init(mlp())


@pytest.mark.parametrize("mode", MODES)
def test_mlp_every_mode_exact(sparse_mlp, mode):
    x = torch.randn(5, 64)
    opt = check(sparse_mlp, x, mode)
    f = forms(opt)
    if mode in ("ablated_dense", "condensed", "csr"):
        assert f["0"] == mode and f["2"] == mode  # big sparse layers really take the form
    if mode == "dense":
        assert set(f.values()) == {"dense"}


ZOO = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (1, 3, 32, 32)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (2, 3, 32, 32)),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(num_classes=10, image_size=32), (1, 3, 32, 32)),
    "timm_resnet18": (lambda: __import__("timm").create_model("resnet18", num_classes=10), (2, 3, 32, 32)),
    "timm_vit": (lambda: __import__("timm").create_model("vit_tiny_patch16_224", num_classes=10, img_size=32,
                                                          patch_size=8), (2, 3, 32, 32)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_model_zoo_every_mode_exact(name):
    build, shape = ZOO[name]
    model = srigl_init(build())
    x = torch.randn(shape)
    for mode in MODES:
        opt = check(model, x, mode)
        rep = opt.sparse_compile_report
        if mode in ("condensed", "csr"):
            # Every big sparse groups=1 layer with constant fan-in really got the sparse form.
            want = [r.name for r in rep if r.sparsity > 0.5 and r.bytes_before >= 4 * 2048 and
                    "grouped" not in r.reason]
            assert want and all(rep.forms()[n] == mode for n in want), [(r.name, r.form, r.reason) for r in rep]


@pytest.mark.slow
def test_vit_b_16_at_224_condensed():
    model = srigl_init(torchvision.models.vit_b_16(num_classes=10))
    x = torch.randn(1, 3, 224, 224)
    opt = check(model, x, "condensed")
    rep = opt.sparse_compile_report
    outs = [r for r in rep if r.name.endswith("self_attention.out_proj")]
    assert len(outs) == 12 and all(r.form == "condensed" for r in outs)
    assert all(isinstance(m, L.ExplicitMultiheadAttention) for n, m in opt.named_modules() if "self_attention" in n
               and n.endswith("self_attention"))
    fc2 = [r for r in rep if r.name.endswith("mlp.3")]
    # fc1's ablated neurons are removed from fc2's inputs (GELU of a constant is folded into its bias).
    assert all(int(r.inputs_kept.split("/")[0]) < 3072 for r in fc2)


# ----------------------------------------------------------------------------------------------
# Properties of the pass
# ----------------------------------------------------------------------------------------------
def test_input_model_unchanged(sparse_mlp):
    before = copy.deepcopy(sparse_mlp.state_dict())
    types = [type(m) for m in sparse_mlp.modules()]
    x = torch.randn(3, 64)
    optimize(sparse_mlp, (x,), mode="condensed")
    optimize(sparse_mlp, (x,), mode="auto", repeats=1, warmup=0)
    after = sparse_mlp.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in sparse_mlp.modules()] == types


def test_ablated_neurons_propagate_into_next_layer(sparse_mlp):
    x = torch.randn(3, 64)
    opt = check(sparse_mlp, x, "ablated_dense")
    rep = {r.name: r for r in opt.sparse_compile_report}
    assert rep["0"].output == "reduced" and rep["0"].ablated > 0
    kept, total = map(int, rep["2"].inputs_kept.split("/"))
    assert total == 256 and kept == rep["0"].active
    # The only full-width restore is none at all: the head is never ablated.
    assert opt.sparse_compile_report.restores == []
    assert opt.get_submodule("2").weight.shape == (rep["2"].active, kept)


def test_conv_bn_pool_flatten_propagation():
    model = srigl_init(nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(),  # no padding: constants stay constant
        nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 3 * 3, 10),
    ))
    x = torch.randn(2, 3, 8, 8)
    opt = check(model, x, "ablated_dense")
    rep = {r.name: r for r in opt.sparse_compile_report}
    assert opt.sparse_compile_report.restores == []
    assert rep["3"].inputs_kept == f"{rep['0'].active}/32"
    # Flatten turns each of the 3x3 channel maps into 9 features.
    assert rep["8"].inputs_kept == f"{rep['3'].active * 9}/288"
    # The BatchNorms right after the convs were folded into them (compiler/fold.py).
    assert not any(isinstance(m, nn.BatchNorm2d) for m in opt.modules())
    # A BatchNorm that is not right after a conv stays, and the removal is propagated through it.
    model = srigl_init(nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.BatchNorm2d(32), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 3 * 3, 10),
    ))
    opt = check(model, x, "ablated_dense")
    rep = {r.name: r for r in opt.sparse_compile_report}
    assert rep["5"].inputs_kept == f"{rep['0'].active * 9}/288"
    assert isinstance(opt.get_submodule("2"), nn.BatchNorm2d) and opt.get_submodule("2").num_features == rep["0"].active


def test_padded_conv_with_nonzero_constant_keeps_full_width():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    mask = torch.ones_like(model[0].weight, dtype=torch.bool)
    mask[[2, 7]] = False  # two ablated channels
    with torch.no_grad():
        model[0].weight.mul_(mask)
        model[0].bias.fill_(1.0)  # ablated channels output relu(1) = 1: the zero border would differ
    model[0].register_buffer("weight_mask", mask)
    x = torch.randn(1, 3, 6, 6)
    # Nothing can absorb the reduction, so layer 0 is not reduced at all: structured computes its
    # active channels and scatters them back, the sparse forms compute the constant channels too.
    rep = {r.name: r for r in check(model, x, "ablated_dense").sparse_compile_report}
    assert rep["0"].output == "scatter" and rep["2"].inputs_kept == "16/16"
    rep = {r.name: r for r in check(model, x, "condensed", min_numel=0).sparse_compile_report}
    assert rep["0"].output == "computed" and rep["2"].inputs_kept == "16/16"
    # With a zero constant the border is the same everywhere: the channels are dropped for good.
    with torch.no_grad():
        model[0].bias.fill_(-1.0)
    opt = check(model, x, "ablated_dense")
    assert opt.sparse_compile_report.restores == []
    assert opt.get_submodule("2").weight.shape[1] == 14


def test_report_is_printable_and_json(sparse_mlp):
    # The per-layer choice only: the whole-model check may keep this tiny model's original layers.
    opt = optimize(sparse_mlp, (torch.randn(1, 64),), mode="auto", repeats=2, warmup=0, whole_model_check=False)
    rep = opt.sparse_compile_report
    text = str(rep)
    for name in ("0", "2", "5", "7"):
        assert any(line.split()[0] == name for line in text.splitlines()[2:])
    d = json.loads(rep.to_json())
    assert len(d["layers"]) == 4
    for layer in d["layers"]:
        assert layer["form"] in FORMS
        assert layer["reason"]
        assert layer["bytes_before"] > 0 and layer["bytes_after"] > 0
        # every applicable form of a big layer was measured, and the chosen one is the fastest
        if layer["times_us"]:
            assert layer["form"] in layer["times_us"]
            assert layer["times_us"][layer["form"]] == min(layer["times_us"].values())
    big = [lay for lay in d["layers"] if lay["name"] == "2"][0]
    assert set(big["times_us"]) == {"ablated_dense", "condensed", "csr"}
    assert d["bytes_after"] < d["bytes_before"]
    assert d["verify_rel_err"] <= RTOL


def test_auto_keeps_only_exact_forms(sparse_mlp, monkeypatch):
    from sparse_compile.compiler import choose

    # "wrong" must time fastest, or auto never has to check it (timings at repeats=1 are noise).
    monkeypatch.setattr(choose, "time_form", lambda form, *a: 1e-4 if form == "wrong" else 1e-3)

    def build_wrong(slot, cfg):
        m = FORMS["ablated_dense"].build(slot, cfg)
        with torch.no_grad():
            m.weight.mul_(1.01)
        return m

    register_form(FormHandler("wrong", lambda s, c: None, build_wrong, "deliberately inexact"))
    try:
        opt = check(sparse_mlp, torch.randn(2, 64), "auto", auto_forms=("ablated_dense", "condensed", "wrong"),
                    cache=False)
    finally:
        FORMS.pop("wrong")
    for r in opt.sparse_compile_report:
        assert r.form != "wrong"
        if r.name in ("0", "2"):
            assert "wrong: not exact" in r.reason


def test_auto_cache_makes_second_run_skip_timing(sparse_mlp, tmp_path):
    # Per-layer timings only: the whole-model check times afresh each run (and may pick another
    # candidate on a noisy machine), which is not what the cache is for.
    x = torch.randn(1, 64)
    kw = dict(mode="auto", repeats=1, warmup=0, whole_model_check=False)
    first = optimize(sparse_mlp, (x,), **kw).sparse_compile_report
    assert first.cache["misses"] > 0 and first.cache["hits"] == 0
    assert (tmp_path / "cache" / "autotune.json").exists()
    second = optimize(sparse_mlp, (x,), **kw).sparse_compile_report
    assert second.cache["misses"] == 0 and second.cache["hits"] == first.cache["misses"]
    assert second.forms() == first.forms()
    # A different batch size is a different key.
    third = optimize(sparse_mlp, (torch.randn(7, 64),), **kw).sparse_compile_report
    assert third.cache["misses"] > 0


def test_mask_wins_over_zero_testing():
    model = srigl_init(mlp())
    with torch.no_grad():  # a live weight that happens to be exactly 0.0 (SRigL regrows at 0)
        live = model[2].weight_mask.nonzero()[0]
        model[2].weight[live[0], live[1]] = 0.0
    opt = check(model, torch.randn(2, 64), "condensed")
    assert forms(opt)["2"] == "condensed"


def test_non_constant_fan_in():
    model = mlp()
    with torch.no_grad():
        w = model[2].weight
        # Random, not constant fan-in; seeded so the fan-in spread (max/mean ~1.5) always exceeds
        # auto's padding limit (1.25) and padding is never the pick.
        w.mul_(torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.1)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"layer '2': fan-in is not constant .*\(fan-in \d+-\d+\)"):
        optimize(model, (x,), mode="condensed")
    # Per-layer choice only: the whole-model check may legitimately time "condensed everywhere"
    # (padded) faster, which is not what this test is about.
    opt = check(model, x, "auto", whole_model_check=False)
    r = {r.name: r for r in opt.sparse_compile_report}["2"]
    assert r.form in ("csr", "dense") and "not constant" in r.reason
    # Padding is offered, and exact.
    opt = check(model, x, "condensed", pad_condensed=True)
    assert forms(opt)["2"] == "condensed"


def test_dense_and_small_layers_are_reported():
    model = srigl_init(mlp())
    with torch.no_grad():
        model[5].weight.normal_()
        del model[5].weight_mask  # a dense layer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dense and tiny layers are kept by design: reported, no warning
        opt = check(model, torch.randn(2, 64), "condensed", min_numel=4096)
    r = {r.name: r for r in opt.sparse_compile_report}
    assert r["5"].form in ("dense", "ablated_dense") and "dense weight" in r["5"].reason
    assert r["7"].form in ("dense", "ablated_dense") and "too small" in r["7"].reason  # 1280 weights


def test_mode_patterns():
    model = srigl_init(mlp())
    opt = check(model, torch.randn(2, 64), {"0": "csr", "[25]": "condensed"})
    assert forms(opt) == {"0": "csr", "2": "condensed", "5": "condensed", "7": "dense"}
    with pytest.raises(ValueError, match="mode"):
        optimize(model, (torch.randn(2, 64),), mode="fastest")


def test_weights_outside_mask_is_an_error():
    model = srigl_init(mlp())
    with torch.no_grad():
        off = (~model[2].weight_mask).nonzero()[0]
        model[2].weight[off[0], off[1]] = 1.0
    with pytest.raises(ValueError, match=r"layer '2': 1 non-zero weights lie outside its weight_mask"):
        optimize(model, (torch.randn(2, 64),), mode="condensed")


def test_auto_needs_example_inputs(sparse_mlp):
    with pytest.raises(ValueError, match="example_inputs"):
        optimize(sparse_mlp, mode="auto")
    # Other modes work without them (no end-to-end check then).
    opt = optimize(sparse_mlp, mode="condensed")
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert relative_error(opt(x), sparse_mlp(x)) <= RTOL


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:  # data-dependent control flow: FX cannot trace it
            h = h * 2
        return self.fc2(h)


def test_untraceable_model_falls_back_with_warning():
    with pytest.warns(UserWarning, match="torch.fx could not trace Untraceable"):  # the trainer says it too
        model = srigl_init(Untraceable(), ablate=0.1)
    x = torch.randn(3, 64)
    with pytest.warns(UserWarning, match="FX cannot trace Untraceable .*swapping modules in place"):
        opt = check(model, x, "condensed")
    assert not opt.sparse_compile_report.traced
    # Swapped in place; with no graph to propagate through, it computes its ablated (constant) rows too.
    assert isinstance(opt.fc1, L.CondensedLinear) and opt.fc1.out_features == 128
    rep = {r.name: r for r in opt.sparse_compile_report}
    assert rep["fc1"].ablated > 0 and rep["fc1"].output == "computed"


def test_torchvision_vit_multihead_attention_out_proj_is_rewritten():
    model = srigl_init(small_torchvision_vit())
    opt = check(model, torch.randn(2, 3, 32, 32), "condensed")
    f = forms(opt)
    assert f["encoder.layers.encoder_layer_0.self_attention.out_proj"] == "condensed"


def test_config_roundtrip_and_validation():
    cfg = OptimizeConfig(mode={"a*": "csr"}, repeats=3)
    assert OptimizeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="version"):
        OptimizeConfig(version=99)
    with pytest.raises(ValueError, match="auto_forms"):
        OptimizeConfig(auto_forms=("condensed", "nope"))
    with pytest.raises(TypeError, match="unknown option"):
        optimize(mlp(), mode="dense", repeat=3)


def test_package_attribute_is_the_function(sparse_mlp):
    assert sparse_compile.optimize is optimize
    opt = sparse_compile.optimize(sparse_mlp, (torch.randn(1, 64),), mode="ablated_dense")
    assert hasattr(opt, "sparse_compile_report")


# ----------------------------------------------------------------------------------------------
# torch.compile / torch.export of the result
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("which", ["mlp", "vit"])
def test_compile_max_autotune_fullgraph(which):
    if which == "mlp":
        model, x = srigl_init(mlp()), torch.randn(4, 64)
    else:
        model, x = srigl_init(small_torchvision_vit()), torch.randn(1, 3, 32, 32)
    opt = check(model, x, "condensed")
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(opt, mode="max-autotune", fullgraph=True)(x)
        assert relative_error(y, model(x)) <= RTOL


@pytest.mark.parametrize("mode", ["condensed", "ablated_dense", "csr"])
def test_export(sparse_mlp, mode):
    x = torch.randn(3, 64)
    opt = optimize(sparse_mlp, (x,), mode=mode)
    ep = torch.export.export(opt, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    if mode == "condensed":
        assert any("sparse_compile.condensed_linear" in t for t in targets), targets
    with torch.no_grad():
        assert relative_error(ep.module()(x), sparse_mlp(x)) <= RTOL


def test_export_vit():
    model = srigl_init(small_torchvision_vit())
    x = torch.randn(1, 3, 32, 32)
    opt = optimize(model, (x,), mode="condensed")
    ep = torch.export.export(opt, (x,))
    with torch.no_grad():
        assert relative_error(ep.module()(x), model(x)) <= RTOL


def test_bf16(sparse_mlp):
    model = copy.deepcopy(sparse_mlp).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        for mode in ("condensed", "auto"):
            opt = optimize(model, (x,), mode=mode, repeats=1, warmup=0)
            assert relative_error(opt(x), ref) <= 1e-2
        # CPU torch has no bf16 CSR matmul: kept, with the reason (and a warning naming the layers)
        with pytest.warns(UserWarning, match=r"not converted to the requested form .*: 0, 2, 5"):
            opt = optimize(model, (x,), mode="csr")
    r = {r.name: r for r in opt.sparse_compile_report}["2"]
    assert r.form == "ablated_dense" and "no sparse CSR matmul for bfloat16" in r.reason


def test_corrupt_cache_is_ignored_with_a_warning(sparse_mlp, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "autotune.json").write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring unreadable autotune cache"):
        opt = optimize(sparse_mlp, (torch.randn(1, 64),), mode="auto", repeats=1, warmup=0)
    assert opt.sparse_compile_report.cache["misses"] > 0
    json.loads((tmp_path / "cache" / "autotune.json").read_text())  # rewritten, valid


class InplaceShared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 8), nn.Linear(64, 8)

    def forward(self, x):
        h = self.fc1(x)
        a = self.fc2(h)
        torch.relu_(h)  # mutates h: fc3 (after it) must see the mutated, full-width h
        return a + self.fc3(h)


def test_inplace_op_on_a_shared_reduced_tensor():
    model = InplaceShared().eval()
    mask = torch.rand(64, 32) < 0.3
    mask[[3, 9]] = False
    with torch.no_grad():
        model.fc1.weight.mul_(mask)
        model.fc1.bias[[3, 9]] = torch.tensor([0.7, -0.4])
    model.fc1.register_buffer("weight_mask", mask)
    # strict: the rewrite itself must be exact (no layer kept by the verification's bisection);
    # fc3 reads h after relu_ mutated it, so it must get the restored full-width tensor.
    check(model, torch.randn(4, 32), "ablated_dense", min_numel=0, strict=True)


# ----------------------------------------------------------------------------------------------
# "auto"'s whole-model check (timings stubbed: the decision, not the machine, is under test)
# ----------------------------------------------------------------------------------------------
def _stub_times(monkeypatch, *answers):
    """Make the check's timer return ``answers`` in turn (ms per candidate name)."""
    calls = []

    def fake(models, inputs, dev, repeats, budget_s):
        ans = answers[len(calls)]
        calls.append(sorted(models))
        assert set(ans) <= set(models), (sorted(models), ans)
        return {k: ans.get(k, 1e6) / 1e3 for k in models}  # unlisted candidates: never the fastest

    monkeypatch.setattr(whole_model, "time_models", fake)
    return calls


def test_whole_model_check_keeps_a_faster_result(sparse_mlp, monkeypatch):
    calls = _stub_times(monkeypatch, {"optimized": 1.0, "original": 2.0})
    x = torch.randn(3, 64)
    opt = check(sparse_mlp, x, "auto")
    rep = opt.sparse_compile_report
    assert len(calls) == 1  # faster at once: no second build
    assert rep.whole_model["chosen"] == "optimized"
    assert rep.whole_model["median_ms"]["optimized"] == 1.0 and rep.whole_model["median_ms"]["original"] == 2.0
    assert set(forms(opt).values()) != {"dense"}
    assert json.loads(rep.to_json())["whole_model"]["chosen"] == "optimized"


def test_whole_model_check_drops_structural_changes_when_they_cost(sparse_mlp, monkeypatch):
    calls = _stub_times(monkeypatch, {"optimized": 3.0, "original": 2.0}, {"flat": 1.0, "original": 2.0})
    x = torch.randn(3, 64)
    opt = check(sparse_mlp, x, "auto")
    rep = opt.sparse_compile_report
    assert len(calls) == 2
    assert rep.whole_model["chosen"] == "without structural changes"
    assert all(r.output != "reduced" and r.inputs_kept.split("/")[0] == r.inputs_kept.split("/")[1] for r in rep)
    assert any("kept: without structural changes" in n for n in rep.notes)


def test_whole_model_check_falls_back_to_the_original_layers(sparse_mlp, monkeypatch):
    _stub_times(monkeypatch, {"optimized": 3.0, "original": 2.0}, {"flat": 2.5, "original": 2.0})
    x = torch.randn(3, 64)
    opt = check(sparse_mlp, x, "auto")
    rep = opt.sparse_compile_report
    assert rep.whole_model["chosen"] == "original layers"
    assert set(forms(opt).values()) == {"dense"}
    assert rep.mode == "auto" and rep.cache["misses"] + rep.cache["hits"] > 0
    big = [r for r in rep if r.name == "2"][0]
    assert big.times_us and "whole model ran faster" in big.reason  # the per-layer timings stay reported
    assert big.coverage == "auto: the whole model ran faster with its original layers"  # not "mode 'dense'"
    # the second pair is rescaled to the first pair's original: 2.5 * 2.0 / 2.0
    ms = rep.whole_model["median_ms"]
    assert (ms["optimized"], ms["without structural changes"], ms["original"]) == (3.0, 2.5, 2.0)


def test_whole_model_check_can_condense_every_sparse_layer(sparse_mlp, monkeypatch):
    calls = _stub_times(monkeypatch, {"optimized": 2.0, "condensed everywhere": 1.0, "original": 3.0})
    x = torch.randn(3, 64)
    opt = check(sparse_mlp, x, "auto")
    rep = opt.sparse_compile_report
    assert "condensed everywhere" in calls[0]
    assert rep.whole_model["chosen"] == "condensed everywhere"
    assert forms(opt)["0"] == "condensed" and forms(opt)["2"] == "condensed"
    assert rep.mode == "auto" and all("whole model ran fastest" in r.reason for r in rep)


def test_whole_model_check_off_keeps_per_layer_choices(sparse_mlp, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("whole-model timing ran although whole_model_check=False")

    monkeypatch.setattr(whole_model, "time_models", boom)
    opt = check(sparse_mlp, torch.randn(3, 64), "auto", whole_model_check=False)
    assert opt.sparse_compile_report.whole_model is None


def test_whole_model_check_leaves_pattern_modes_alone(sparse_mlp, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("whole-model timing ran for a dict mode")

    monkeypatch.setattr(whole_model, "time_models", boom)
    opt = check(sparse_mlp, torch.randn(3, 64), {"0": "condensed", "*": "auto"})
    assert forms(opt)["0"] == "condensed" and opt.sparse_compile_report.whole_model is None


def test_auto_on_a_clean_model_warns_nothing(sparse_mlp):
    form_registry._csr_supported.cache_clear()  # its probe (torch's CSR "beta" warning) runs once per process
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimize(sparse_mlp, (torch.randn(2, 64),), mode="auto", repeats=1, warmup=0)


def test_structured_is_a_deprecated_name_of_ablated_dense(sparse_mlp):
    x = torch.randn(2, 64)
    with pytest.warns(FutureWarning, match="'structured' is now called 'ablated_dense'"):
        old = optimize(sparse_mlp, (x,), mode="structured")
    new = optimize(sparse_mlp, (x,), mode="ablated_dense")
    assert old.sparse_compile_report.forms() == new.sparse_compile_report.forms()
    assert "ablated_dense" in old.sparse_compile_report.forms().values()
    with pytest.warns(FutureWarning):
        cfg = OptimizeConfig(mode={"0": "structured"}, auto_forms=("structured", "csr"))
    assert cfg.mode == {"0": "ablated_dense"} and cfg.auto_forms == ("ablated_dense", "csr")
