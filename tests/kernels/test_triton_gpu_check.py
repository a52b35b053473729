"""``python -m bench.gpu_check --dry-run`` runs on CPU and prints every row the GPU run measures.

The GPU run happens on a lent machine with a few minutes of budget: a script that breaks there
wastes the lease, so its whole flow is exercised here (Triton interpreter, tiny shapes).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_prints_every_row(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "FAIL" not in out and "errors / skips" not in out, out[-3000:]
    m = re.search(r"plan: (\d+) rows", out)
    assert m, out[:2000]
    plan = re.findall(r"^  (fp32|bf16) (\d\.\d\d) B=(\d+)\s+(kernel|eager|compiled)\s*:", out, re.M)
    table = re.findall(r"^  (fp32|bf16) (\d\.\d\d) B=(\d+)\s+(kernel|eager|compiled)\s+[-\d]", out, re.M)
    assert len(plan) == int(m.group(1)) > 0
    assert sorted(table) == sorted(plan), "a planned row was not measured (or vice versa)"
    assert {row[3] for row in plan} == {"kernel", "eager", "compiled"}
    # Every target is judged on at least one way, and nothing is judged PASS/MISS on CPU.
    assert "not measured" not in out and "PASS" not in out and "MISS" not in out
    import json

    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(c["ok"] for c in res["correctness"]) and res["correctness"]
