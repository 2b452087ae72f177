"""Smoke test for bench.py: it runs and prints each ratio with its target. Timings are not tested
here (they depend on the machine and its load); correctness of the fast paths is in test_crosscoder.py."""
import re
import subprocess
import sys
from itertools import chain
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402
from crosscoding.crosscoder import CrossCoder, CrossCoderConfig  # noqa: E402


def run_bench(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_bench_tiny_prints_ratio_lines():
    r = run_bench("--tiny", "--only", "step,scale,cache,data,ig,shards,live", "--threads", "1", timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for section in ("step:", "scale:", "cache:", "data:", "ig:", "shards:", "live:"):
        assert re.search(rf"^{section}", out, re.M), out
    lines = [l for l in out.splitlines() if "target" in l]
    assert len(lines) >= 6, out
    for l in lines:     # timings are not tested; that each verdict follows from its own numbers is
        m = re.search(r"(-?[\d.]+)(x|%| ms| s| h)?\s+target ([≥≤]) (-?[\d.]+)\S*\s+(PASS|FAIL)", l)
        assert m, l
        value, target = float(m.group(1)), float(m.group(4))
        if abs(value - target) > 0.011 * max(1.0, abs(target)):      # printed values are rounded
            assert (m.group(5) == "PASS") == (value >= target if m.group(3) == "≥" else value <= target), l
    n_pass = sum(l.rstrip().endswith("PASS") or " PASS " in l for l in lines)
    assert re.search(rf"^done in \d+ s: {n_pass} PASS, {len(lines) - n_pass} FAIL", out, re.M), out
    assert re.search(r"d=64 l1 trained: peer \d+\.\d ms / ours \d+\.\d ms +\d+\.\d\dx", out), out
    assert re.search(r"d=64 batchtopk trained: .* +\d+\.\d\dx", out), out
    assert re.search(r"^done in \d+ s: \d+ PASS, \d+ FAIL", out, re.M), out


@pytest.mark.slow
def test_bench_live_quick_prints_the_steps_share_and_the_wait():
    """`bench.py --only live --quick` on a CPU: both refills' tokens/s, the step's share of the wall time and the
    fraction spent waiting on the buffer, their ratio and that both served the same batches."""
    r = run_bench("--only", "live", "--quick", timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for mode in ("sync", "overlap"):
        assert re.search(rf"live {mode}: tokens/s \(\d+ steps\) +\d+ +\(of [\d.]+ s: LM forward", out), out
        for what in ("crosscoder step's share of the wall time", "wall time waiting on the buffer"):
            m = re.search(rf"live {mode}: {what} +([\d.]+)%", out)
            assert m and 0 <= float(m.group(1)) <= 100, out
    ratio = r"live: overlapped refill / synchronous, tokens/s +\d+\.\d\dx +\(the same batches: yes\)"
    assert re.search(ratio, out), out
    assert re.search(r"live: 400M tokens, overlapped, projected +[\d.]+ h", out), out


def test_paper_check_goes_on_past_a_failed_part(monkeypatch, capsys):
    """--paper runs its parts in turn: one that raises prints its error, the others still run and report, and the
    RESULTS.md section it writes names the failure beside the numbers that were measured."""
    from types import SimpleNamespace

    def boom(args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench, "LINES", [])
    monkeypatch.setattr(bench, "paper_step", boom)
    monkeypatch.setattr(bench, "bench_live", lambda args: bench.report("live overlap: tokens/s", 123.0, fmt="{:.0f}"))
    monkeypatch.setattr(bench, "paper_stages", lambda args: bench.report("paper stages: evaluate.py", 9.0,
                                                                         fmt="{:.0f} s"))
    args = SimpleNamespace(device="cpu", tiny=True)
    failed = bench.paper_check(args)
    out = capsys.readouterr().out
    assert failed == ["step: RuntimeError: CUDA error: an illegal memory access was encountered"], failed
    assert "step: FAILED, the other parts go on" in out and "live overlap: tokens/s" in out and "evaluate.py" in out
    md = bench.paper_markdown(args, 12.0, failed)
    assert "**failed** step: RuntimeError" in md and "| live overlap: tokens/s | 123 |" in md
    assert "| paper stages: evaluate.py | 9 s |" in md


@pytest.mark.slow
def test_paper_check_runs_on_a_cpu():
    """`bench.py --paper` on a CPU, at its tiny shape: every part runs (the step against its roofline, both refills
    of the live path, train / evaluate / relie / ablate as processes on pythia-70m's shape with random weights),
    so the GPU box meets no crash the CPU could have shown."""
    r = run_bench("--paper", "--device", "cpu", timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "FAILED" not in out, out + r.stderr[-3000:]
    for arch in ("l1", "batchtopk"):
        assert re.search(rf"paper step {arch}: [\d.]+ ms / roofline [\d.]+ ms +\d+\.\d\dx", out), out
    assert re.search(r"live overlap: wall time waiting on the buffer +[\d.]+%", out), out
    for script in ("train.py", "evaluate.py", "relie.py", "ablate.py"):
        assert re.search(rf"paper stages: {script}.* +\d+ s", out), out
    assert re.search(r"^done in \d+ s$", out, re.M), out


def test_bench_rejects_unknown_section():
    r = run_bench("--only", "nope")
    assert r.returncode == 2 and "unknown section" in r.stderr


def _devices(module):
    return {name: t.device.type for name, t in chain(module.named_parameters(), module.named_buffers())}


def test_bench_tensors_follow_the_device():
    """Every parameter and buffer of what the step section times (our crosscoder, the peer built from it, for every
    case of STEP_CASES) and its inputs lie on the bench's device: here the meta device, where a tensor made
    without the device stays on the CPU and fails the check (on a GPU it stopped `bench.py --device cuda`)."""
    M, d, F = 3, 16, 64
    for state, arch, fire in bench.STEP_CASES:
        if fire is None:
            cc = CrossCoder(CrossCoderConfig(n_models=M, d_model=d, dict_size=F)).to("meta")
        else:
            cc = bench.trained_state(arch, M, d, F, "meta", fire=fire, calib=64)
        for name, module in (("ours", cc), ("peer", bench.Peer(cc))):
            where = _devices(module)
            assert where and set(where.values()) == {"meta"}, (state, arch, name, where)
    assert bench.randn(8, M, d, seed=0, device="meta").device.type == "meta"
    # the same numbers on every device: drawn on the CPU, then moved
    assert torch.equal(bench.randn(8, M, d, seed=0, device="cpu"), bench.randn(8, M, d, seed=0, device="cpu"))


def test_peer_refuses_a_variant_it_has_no_reference_for(monkeypatch):
    """bench.Peer times a variant against the trainer its class names (`peer`); one that names none it writes out
    is refused in one line, never timed against another variant's reference."""
    from crosscoding import variants
    from crosscoding.common import UsageError

    class Plain(variants.Variant):
        pass
    monkeypatch.setitem(variants.VARIANTS, "plain", Plain)
    cc = CrossCoder(CrossCoderConfig(n_models=2, d_model=4, dict_size=8, arch="plain"))
    with pytest.raises(UsageError, match="bench.py has no reference step for variant 'plain'"):
        bench.Peer(cc)
    for arch, cls in variants.VARIANTS.items():     # every built-in variant names one
        if arch != "plain":
            cc = CrossCoder(CrossCoderConfig(n_models=2, d_model=4, dict_size=32, arch=arch, k=2))
            assert bench.Peer(cc).trainer == cls.peer
