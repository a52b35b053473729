"""bench/peers.py: peers that are not installed are skipped with the reason; the error measure."""
import sys

import pytest
import torch

from bench import peers


def test_missing_peers_are_skipped_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    fns, why = peers.openvino_runners("unused.onnx", 1)
    assert fns == {} and "OpenVINO not installed" in why and ".[peers]" in why
    fn, why = peers.ort_runner("unused.onnx", 1)
    assert fn is None and "ONNX Runtime not installed" in why


def test_rel_err_is_max_abs_over_max_ref():
    ref = torch.tensor([1.0, -4.0, 2.0])
    y = torch.tensor([1.5, -4.0, 2.0])
    assert peers.rel_err(y, ref) == pytest.approx(0.125)
    assert peers.rel_err(y.numpy(), ref) == pytest.approx(0.125)  # peers return numpy arrays


def test_interleaved_reports_every_function():
    calls = []
    res = peers.interleaved({"a": lambda x: calls.append("a"), "b": lambda x: calls.append("b")},
                            torch.zeros(1), rounds=3, timer=peers.TIMERS["process"])
    assert set(res) == {"a", "b"} and all(r["median_ms"] >= 0 for r in res.values())
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then round-robin
