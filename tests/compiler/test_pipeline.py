"""The pipeline's structure: plan -> propagate (one pass) -> choose (decisions only) -> rewrite.

These pin what a refactoring could silently undo: choose changing the model, propagation running a
second pass, the whole-model check re-tracing the model for each candidate.
"""
import pytest
import torch
from torch import nn

import sparse_compile.fx as sc_fx
from sparse_compile.compiler import OptimizeConfig, optimize, relative_error, whole_model
from sparse_compile.compiler import propagate as P
from sparse_compile.compiler.cache import DecisionCache
from sparse_compile.compiler import choose as choose_mod
from sparse_compile.compiler.choose import Decision, choose
from sparse_compile.compiler.plan import make_plan
from sparse_compile.compiler.rewrite import rewrite
from sparse_models import srigl_init


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_COMPILE_CACHE", str(tmp_path / "cache"))


def mlp():
    return srigl_init(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.GELU(),
                                    nn.Linear(256, 10)).eval())


def _planned(model, x, cfg):
    plan = make_plan(model, cfg, (x,))
    P.propagate_plan(plan, torch.float32, torch.device("cpu"))
    return plan


def _state(gm):
    """What choose must leave alone: the generated code, the module objects, their hooks."""
    mods = dict(gm.named_modules())
    return (gm.code, {k: id(m) for k, m in mods.items()},
            {k: (len(m._forward_hooks), len(m._forward_pre_hooks)) for k, m in mods.items()})


@pytest.mark.parametrize("mode", ["condensed", "auto"])
def test_choose_installs_nothing(mode):
    model, x = mlp(), torch.randn(3, 64)
    cfg = OptimizeConfig(mode=mode, repeats=1, warmup=0)
    plan = _planned(model, x, cfg)
    assert any(s.changed for s in plan.slots)  # the propagation did reduce something: a real test
    before = _state(plan.gm)
    decisions = choose(plan.gm, plan.slots, cfg, (x,), torch.device("cpu"), torch.float32,
                       DecisionCache(None, enabled=False))
    assert _state(plan.gm) == before
    assert set(decisions) == {s.name for s in plan.slots}
    assert all(isinstance(d, Decision) for d in decisions.values())
    assert all(s.form == "dense" and s.new_module is None for s in plan.slots)  # nothing recorded yet
    if mode == "auto":  # timings, candidates and why-nots are fields of the decision
        timed = [d for d in decisions.values() if d.times_us]
        assert timed and all(d.form in d.times_us and d.form in d.candidates for d in timed)
    else:
        assert {d.form for d in decisions.values()} >= {"condensed"}
    gm = rewrite(plan.gm, plan.slots, decisions, cfg)
    assert _state(gm)[1] != before[1]  # the rewrite, not choose, installs
    with torch.no_grad():
        assert relative_error(gm(x), model(x)) <= 1e-5
    assert {s.name: s.form for s in plan.slots} == {k: d.form for k, d in decisions.items()}


def _count_calls(monkeypatch, module, name) -> list:
    """Patch ``module.name`` to record each call (then call through); returns the record."""
    calls = []
    real = getattr(module, name)

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, counting)
    return calls


def test_propagation_analyses_the_graph_once(monkeypatch):
    calls = _count_calls(monkeypatch, P, "analyse")
    model, x = mlp(), torch.randn(3, 64)
    opt = optimize(model, (x,), mode="ablated_dense")
    assert len(calls) == 1
    rep = {r.name: r for r in opt.sparse_compile_report}
    # Layer 0's and 2's removals are absorbed by their consumers; the head has nothing to remove.
    assert rep["0"].output == "reduced" and rep["2"].output == "reduced"
    kept, total = map(int, rep["4"].inputs_kept.split("/"))
    assert kept < total
    with torch.no_grad():
        assert relative_error(opt(x), model(x)) <= 1e-5


def test_a_reduction_nobody_absorbs_is_not_applied():
    """A producer whose removal only reaches a residual add is not reduced (no scatter to restore it)."""

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32)
            self.b = nn.Linear(32, 32)

        def forward(self, x):
            return x + torch.relu(self.a(x)) + self.b(x)

    model = Res().eval()
    with torch.no_grad():  # neurons 0-3 of `a` ablated: weights zero, bias non-zero
        model.a.weight[:4] = 0
        model.a.bias[:4] = 0.5
    x = torch.randn(4, 32)
    plan = make_plan(model, OptimizeConfig(mode="ablated_dense"), (x,))
    producers = {s.node: P._producer_state(s) for s in plan.slots if s.out_reduce}
    assert producers
    found = P.analyse(plan.gm, producers, lambda n, st: "test: nobody absorbs")
    assert found.useful == set() and any(e.kind == "restore" for e in found.edits)
    code = plan.gm.code
    P.propagate_plan(plan, torch.float32, torch.device("cpu"))
    assert plan.gm.code == code and not any(s.out_reduce for s in plan.slots) and plan.restores == []


def _stub_times(monkeypatch, *answers):
    calls = []

    def fake(models, inputs, dev, repeats, budget_s):
        ans = answers[len(calls)]
        calls.append(sorted(models))
        return {k: ans.get(k, 1e6) / 1e3 for k in models}

    monkeypatch.setattr(whole_model, "time_models", fake)
    return calls


def test_whole_model_check_traces_once_when_the_result_wins(monkeypatch):
    traces = _count_calls(monkeypatch, sc_fx, "trace")
    # Every form times alike, so per layer "auto" keeps the first candidate (the dense baseline) and
    # "condensed everywhere" is a real, different candidate.
    monkeypatch.setattr(choose_mod, "time_form", lambda *a: 1e-3)
    calls = _stub_times(monkeypatch, {"optimized": 2.0, "condensed everywhere": 1.0, "original": 3.0})
    model, x = mlp(), torch.randn(3, 64)
    opt = optimize(model, (x,), mode="auto", repeats=1, warmup=0)
    assert "condensed everywhere" in calls[0]  # a candidate over the same plan, not a rebuild
    assert opt.sparse_compile_report.whole_model["chosen"] == "condensed everywhere"
    assert len(traces) == 1
    with torch.no_grad():
        assert relative_error(opt(x), model(x)) <= 1e-5


def test_whole_model_check_traces_a_second_plan_only_without_structural_changes(monkeypatch):
    traces = _count_calls(monkeypatch, sc_fx, "trace")
    _stub_times(monkeypatch, {"optimized": 3.0, "original": 2.0}, {"flat": 2.5, "original": 2.0})
    model, x = mlp(), torch.randn(3, 64)
    opt = optimize(model, (x,), mode="auto", repeats=1, warmup=0)
    rep = opt.sparse_compile_report
    assert rep.whole_model["chosen"] == "original layers"
    assert set(rep.forms().values()) == {"dense"}
    assert len(traces) == 2  # the plan, and the plan without propagation (original layers reuse it)
    with torch.no_grad():
        assert relative_error(opt(x), model(x)) <= 1e-5


def test_a_useful_reduction_meeting_a_dropped_one_is_restored_as_if_alone():
    """Where a kept and a dropped reduction meet, the kept one's restore says why it alone needs
    the full width (what a second propagation pass over the kept producers would have said)."""

    class Meet(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Linear(16, 32)
            self.q = nn.Linear(16, 32)
            self.c = nn.Linear(32, 8)

        def forward(self, x):
            h = self.p(x)
            return self.c(torch.relu(h)), h + self.q(x)

    model = Meet().eval()
    with torch.no_grad():
        for m in (model.p, model.q):
            m.weight[:4] = 0
            m.bias[:4] = 0.5
    x = torch.randn(4, 16)
    opt = optimize(model, (x,), mode="ablated_dense")
    rep = opt.sparse_compile_report
    out = {r.name: r.output for r in rep}
    assert out["p"] == "reduced" and out["q"] != "reduced"  # q's removal reaches only the add
    assert [(r["node"], r["user"]) for r in rep.restores] == [("p", "add")]
    assert "combines it with another tensor" in rep.restores[0]["reason"]
    with torch.no_grad():
        assert relative_error(opt(x), model(x)) <= 1e-5
