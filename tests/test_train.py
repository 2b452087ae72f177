"""train.py: resume after a SIGKILL ends with the weights of an uninterrupted run; DDP with two gloo
processes matches one process (weights and dead-latent counters); a live-buffer run; refusals
(mismatched cache, occupied output folder, bad flags)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import cache_acts
from conftest import ROOT


@pytest.fixture(scope="module")
def cache(local_model, tmp_path_factory):
    root, text, _ = local_model
    out = tmp_path_factory.mktemp("cache") / "c"
    return cache_acts.make_cache(str(root), 1, ["step0", "step100"], out, n_tokens=6000, seq_len=16, text=str(text))


def _cmd(local_model, cache, out, *extra, steps=60):
    root = local_model[0]
    return [sys.executable, str(ROOT / "train.py"), "--model", str(root), "--layer", "1",
            "--revisions", "step0,step100", "--cache", str(cache), "--dict-size", "64", "--batch-size", "64",
            "--tokens", str(64 * steps), "--lr", "3e-3", "--out", str(out), "--log-every", "10",
            "--ckpt-every", "10", *extra]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _weights(folder):
    return load_file(folder / "crosscoder.safetensors")


def test_resume_after_kill_equals_uninterrupted(local_model, cache, tmp_path):
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(local_model, cache, ref, steps=400), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "killed"
    p = subprocess.Popen(_cmd(local_model, cache, out, steps=400), env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "ckpt" / "COMPLETE").exists():
        time.sleep(0.02)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "crosscoder.safetensors").exists(), "the run finished before it could be killed"
    ckpt_step = int((out / "ckpt" / "COMPLETE").read_text())
    assert 0 < ckpt_step < 400
    r = subprocess.run(_cmd(local_model, cache, out, "--resume", steps=400), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _weights(ref), _weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 400


def test_ddp_two_processes_match_one(local_model, cache, tmp_path):
    sparse = ("--l1-coeff", "20")   # some latents go quiet for a while: dead-latent counters differ
    one = tmp_path / "one"
    r = subprocess.run(_cmd(local_model, cache, one, *sparse), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    two = tmp_path / "two"
    cmd = _cmd(local_model, cache, two, *sparse)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517"] + cmd[1:]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _weights(one), _weights(two)
    for k in ("W_enc_MdF", "W_dec_FMd", "b_enc_F", "b_dec_Md"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # dead-latent counters count the whole batch's tokens, as in one process (train.sync_buffers)
    since = a["tokens_since_active_F"]
    assert since.max() > 64 and (since == 0).any(), since
    assert torch.equal(since, b["tokens_since_active_F"])
    assert not torch.equal(a["W_dec_FMd"], load_file(one / "crosscoder.safetensors")["W_dec_FMd"] * 0)


def test_run_folder_outputs(local_model, cache, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(_cmd(local_model, cache, out), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["revisions"] == ["step0", "step100"] and cfg["layer"] == 1 and len(cfg["scales"]) == 2
    assert cfg["data"]["fingerprint"] == json.loads((cache / "meta.json").read_text())["fingerprint"]
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert {"val_fvu", "val_l0", "val_dead_frac", "tokens_per_s", "fvu"} <= set(log[-1])
    assert len(log[-1]["val_fvu"]) == 2
    # the saved crosscoder acts on RAW activations: its FVU on raw validation rows matches the log
    from crosscoder import CrossCoder
    cc = CrossCoder.load(out)
    c = cache_acts.open_cache(cache)
    lo, hi = c.rows("val")
    import numpy as np
    x = c.get(np.linspace(lo, hi - 1, min(8192, hi - lo)).astype(np.int64))
    with torch.no_grad():
        x_hat, _ = cc(x)
    fvu = ((x_hat - x).pow(2).sum((0, 2)) / (x - x.mean(0)).pow(2).sum((0, 2))).tolist()
    assert fvu == pytest.approx(log[-1]["val_fvu"], rel=1e-3)


@pytest.mark.parametrize("extra,msg", [
    (["--resume", "--overwrite"], "contradict"),
    (["--dict-size", "0"], "--dict-size must be a positive integer, got 0"),
    (["--batch-size", "-5"], "--batch-size must be a positive integer"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--revisions", "step0"], "needs at least 2 revisions"),
    (["--revisions", "step0,step10"], "not "),
    (["--dict-size", "4000000000"], "GiB"),
])
def test_bad_flags(local_model, cache, tmp_path, extra, msg):
    cmd = _cmd(local_model, cache, tmp_path / "r")
    # later flags override earlier ones in argparse
    r = subprocess.run(cmd + extra, env=ENV, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert msg in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "r" / "crosscoder.safetensors").exists()


def test_occupied_output_folder_refused(local_model, cache, tmp_path):
    out = tmp_path / "run"
    assert subprocess.run(_cmd(local_model, cache, out, steps=10), env=ENV, capture_output=True).returncode == 0
    r = subprocess.run(_cmd(local_model, cache, out, steps=10), env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "already holds a run" in r.stderr
    r = subprocess.run(_cmd(local_model, cache, out, "--overwrite", steps=10), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_incomplete_cache_refused(local_model, cache, tmp_path):
    import shutil
    bad = tmp_path / "c"
    shutil.copytree(cache, bad)
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps(dict(meta, complete=False)))
    r = subprocess.run(_cmd(local_model, bad, tmp_path / "r"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "incomplete" in r.stderr


def test_nan_activations_named(local_model, cache, tmp_path):
    import shutil
    import numpy as np
    bad = tmp_path / "c"
    shutil.copytree(cache, bad)
    mm = np.memmap(bad / "step100.bin", dtype=np.uint16, mode="r+")
    mm[:] = 0x7FC0  # bf16 NaN everywhere
    mm.flush()
    r = subprocess.run(_cmd(local_model, bad, tmp_path / "r"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "revision step100" in r.stderr, r.stderr[-1000:]


def test_live_buffer_run(local_model, tmp_path):
    """Without --cache, train.py runs the revisions itself (the paper's pipeline): it finishes, and its
    normalisation scales give held-out block-L outputs (from output_hidden_states) a mean norm of √d."""
    import lm
    import tasks
    root, text, _ = local_model
    out = tmp_path / "live"
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", str(root), "--layer", "1",
           "--revisions", "step0,step100", "--text", str(text), "--seq-len", "16", "--dict-size", "64",
           "--batch-size", "64", "--tokens", str(64 * 30), "--buffer-tokens", "2048", "--out", str(out)]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "DONE").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["cache"] is None and len(cfg["scales"]) == 2
    for rev, s in zip(["step0", "step100"], cfg["scales"]):
        model, tok = lm.load(str(root), rev)
        ids = tasks.text_blocks(str(text), tok, 64, 16, seed=7)
        with torch.no_grad():
            x = lm.forward(model, ids, output_hidden_states=True).hidden_states[2][:, 1:]
        assert s * x.norm(dim=-1).mean().item() == pytest.approx(32 ** 0.5, rel=0.05)   # raw: ~0.16
