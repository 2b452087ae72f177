"""Smoke test for bench.py: it runs and prints each ratio with its target. Timings are not tested
here (they depend on the machine and its load); correctness of the fast paths is in test_crosscoder.py."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_bench_tiny_prints_ratio_lines():
    r = run_bench("--tiny", "--only", "step,scale,cache,data,ig,shards", "--threads", "1", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for section in ("step:", "scale:", "cache:", "data:", "ig:", "shards:"):
        assert re.search(rf"^{section}", out, re.M), out
    lines = [l for l in out.splitlines() if "target" in l]
    assert len(lines) >= 6, out
    for l in lines:
        assert re.search(r"\d", l) and re.search(r"\b(PASS|FAIL)\b", l), l
    assert re.search(r"d=64 l1 trained: peer \d+\.\d ms / ours \d+\.\d ms +\d+\.\d\dx", out), out
    assert re.search(r"d=64 batchtopk trained: .* +\d+\.\d\dx", out), out
    assert re.search(r"^done in \d+ s: \d+ PASS, \d+ FAIL", out, re.M), out


def test_bench_rejects_unknown_section():
    r = run_bench("--only", "nope")
    assert r.returncode == 2 and "unknown section" in r.stderr
