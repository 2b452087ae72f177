"""Faults, in real subprocesses: SIGKILL cache_acts.py and train.py at three points each (early,
in the middle of writing a checkpoint, late); a rerun (--resume for train) must end with outputs
identical to an uninterrupted run, and no killed stage may leave a file a later stage reads as
complete. A disk-full error gives one line and exit 1, and the previous checkpoint still loads.
Two trainers on one folder: the second refuses; a stale lock is taken over.

The kill points are failpoints (common.fault_point, CCT_FAULT="name:n"): deterministic, so each
test kills exactly where it says."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from crosscoding import activations, analysis
from crosscoding.common import UsageError, is_done

pytestmark = pytest.mark.slow   # real subprocesses of whole stages: `-m 'not slow'` skips them

CACHE_ARGS = ["--model", "toy", "--tokens", "12000"]      # 388 blocks of 32: 13 chunks per revision
TRAIN_ARGS = ["--dict-size", "128", "--batch-size", "256", "--tokens", str(256 * 60), "--ckpt-every", "15",
              "--log-every", "10"]


def sh(script, args, cwd, fault=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CCT_FAULT", None)
    if fault:
        env["CCT_FAULT"] = fault
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs to compare against: a cache, and a training run on the toy's cache."""
    cwd = tmp_path_factory.mktemp("ref")
    r = sh("cache_acts.py", CACHE_ARGS + ["--out", "c"], cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    r = sh("train.py", TRAIN_ARGS + ["--cache", "c", "--out", "run"], cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    return cwd


def _same_cache(a, b):
    meta = json.loads((a / "meta.json").read_text())
    for name in [f"{r}.bin" for r in meta["revisions"]] + ["tokens.npy"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((b / "meta.json").read_text()) == meta and is_done(b)


@pytest.mark.parametrize("fault", ["cache_chunk:1", "cache_chunk:20", "cache_done:1"],
                         ids=["early", "mid-chunk-write", "late"])
def test_cache_killed_then_rerun_is_byte_equal(reference, tmp_path, fault):
    r = sh("cache_acts.py", CACHE_ARGS + ["--out", "c"], tmp_path, fault)
    assert r.returncode == -9, r.stderr[-2000:]
    assert not is_done(tmp_path / "c")
    with pytest.raises(UsageError, match="unfinished"):
        activations.open_cache(tmp_path / "c")
    r = sh("cache_acts.py", CACHE_ARGS + ["--out", "c"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    _same_cache(reference / "c", tmp_path / "c")


def _weights(folder):
    return load_file(folder / "crosscoder.safetensors")


@pytest.mark.parametrize("fault", ["train_step:3", "ckpt_write:2", "ckpt_prune:2", "train_final:1"],
                         ids=["early", "mid-checkpoint-write", "two-checkpoints-on-disk", "late"])
def test_train_killed_then_resumed_equals_uninterrupted(reference, tmp_path, fault):
    args = TRAIN_ARGS + ["--cache", str(reference / "c"), "--out", "run"]
    r = sh("train.py", args, tmp_path, fault)
    assert r.returncode == -9, r.stderr[-2000:]
    run = tmp_path / "run"
    assert not (run / "DONE").exists()
    with pytest.raises(UsageError, match="training run .* is unfinished|holds no trained crosscoder"):
        analysis.open_run(run)
    r = sh("train.py", args + ["--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _weights(reference / "run"), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 61, 10))


def test_disk_full_while_checkpointing(reference, tmp_path):
    args = TRAIN_ARGS + ["--cache", str(reference / "c"), "--out", "run"]
    r = sh("train.py", args, tmp_path, "ckpt_write:2:enospc")
    assert r.returncode == 1
    lines = [l.split("\r")[-1] for l in r.stderr.strip().split("\n") if l.split("\r")[-1].strip()]
    assert lines[-1].startswith("error: disk full") and "Traceback" not in r.stderr, r.stderr[-2000:]
    run = tmp_path / "run"
    done = list(run.glob("ckpt/*/DONE"))
    assert [json.loads(p.read_text())["step"] for p in done] == [15]  # the previous checkpoint, intact
    assert load_file(done[0].parent / "state.safetensors")
    r = sh("train.py", args + ["--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _weights(reference / "run"), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_while_caching(tmp_path):
    r = sh("cache_acts.py", CACHE_ARGS + ["--out", "c"], tmp_path, "cache_chunk:2:enospc")
    assert r.returncode == 1 and "disk full" in r.stderr
    assert not is_done(tmp_path / "c")


def test_second_trainer_refused_and_stale_lock_taken_over(reference, tmp_path):
    args = TRAIN_ARGS[:-4] + ["--tokens", str(256 * 4000), "--cache", str(reference / "c"), "--out", "run"]
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "run" / ".lock"
        deadline = time.time() + 120
        while time.time() < deadline and not lock.exists():
            time.sleep(0.05)
        r = sh("train.py", args + ["--resume"], tmp_path)
        assert r.returncode == 2 and f"in use by process {first.pid}" in r.stderr, r.stderr[-2000:]
    finally:
        first.kill()
        first.wait()
    # the killed trainer left its lock behind: a dead pid's lock is taken over
    assert lock.exists() and int(lock.read_text()) == first.pid
    r = sh("train.py", TRAIN_ARGS + ["--cache", str(reference / "c"), "--out", "run", "--overwrite"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not lock.exists()


def test_folder_lock_holds_one_process_at_a_time(tmp_path):
    """Three processes take one folder's lock 30 times each (waiting for it): no two ever hold it at
    once, and nothing is left behind. (The race this guards, a lock seen empty between its creation
    and its pid being written and taken for a dead process's, is microseconds wide: this checks the
    exclusion, it cannot force that window.)"""
    code = (f"import os, sys, time; sys.path.insert(0, {str(ROOT)!r}); from crosscoding.common import folder_lock\n"
            f"for _ in range(30):\n"
            f"    with folder_lock({str(tmp_path)!r}, wait=True):\n"
            f"        open({str(tmp_path / 'log')!r}, 'a').write(f'in {{os.getpid()}}\\n'); time.sleep(0.005)\n"
            f"        open({str(tmp_path / 'log')!r}, 'a').write(f'out {{os.getpid()}}\\n')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    events = [line.split() for line in (tmp_path / "log").read_text().splitlines()]
    assert len(events) == 180
    for enter, leave in zip(events[::2], events[1::2]):
        assert enter[0] == "in" and leave == ["out", enter[1]], (enter, leave)
    assert not list(tmp_path.glob(".lock*"))
