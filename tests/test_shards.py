"""Past one GPU: the memory plan's arithmetic (--plan), the revision shards' pieces, and revision-parallel
training on gloo processes against one process (losses, codes, weights), kill and resume, the saved layout."""
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from crosscoding import lm, shards, training
from crosscoding.crosscoder import CrossCoder, CrossCoderConfig


def test_plan_is_predict_memorys_arithmetic(monkeypatch):
    cfg = CrossCoderConfig(n_models=8, d_model=64, dict_size=256, total_steps=10)
    # the crosscoder's part counts its real parameters, 16 bytes each (weights, grads, two Adam moments)
    assert training.crosscoder_bytes(8, 64, 256, 0) == 16 * sum(p.numel() for p in CrossCoder(cfg).parameters())
    monkeypatch.setattr(training, "_rss", lambda: 0)
    assert training.predict_memory(cfg, 512, "cpu", resident=7) == 7 + training.crosscoder_bytes(8, 64, 256, 512)
    # a rank of 4 shards × 2 replicas: 2 revisions' LMs, slices, buffer; the whole code on half the batch
    lay = training.layout(lm_params=1000, d=64, M=8, F=256, batch=512, buffer_tokens=100, shards=4, replicas=2)
    assert (lay.lms, lay.buffer, lay.crosscoder) == (2 * 1000 * 2, 100 * 2 * 64 * 2,
                                                     training.crosscoder_bytes(2, 64, 256, 256))
    assert [(x.shards, x.replicas) for x in training.layouts(1000, 64, 8, 256, 512, 100, 8)] == [
        (1, 8), (2, 4), (4, 2), (8, 1)]


def test_the_lms_are_counted_as_training_holds_them():
    """params_through on the meta device equals a real (random-weights) model's count after keep_through."""
    spec = lm.MODELS["pythia-70m"]
    with torch.device("meta"):
        meta = lm.architecture(spec)
    real = lm.keep_through(lm.random_model(spec, "step0"), 3)
    assert lm.params_through(meta, 3) == sum(p.numel() for p in real.parameters())


def _smallest(text):
    m = re.search(r"smallest that fits: (\d+) GPU\(s\) as (\d+) revision shard\(s\) × (\d+) data", text)
    return tuple(map(int, m.groups())) if m else None


def test_plan_the_issue_rows():
    """The three runs of the planning table: the paper's fits one card; 32 revisions of pythia-1b do not
    under plain data parallelism; pythia-6.9b × 32 needs revision shards on 80 GB cards."""
    revs = ",".join(f"step{1000 * i}" for i in range(1, 33))
    paper = training.plan(lm.MODELS["pythia-1b"], 8, 3, 16384, 4096, 524288, 8, 80)
    assert _smallest(paper) == (1, 1, 1), paper
    wide = training.plan(lm.MODELS["pythia-1b"], 8, 32, 16384, 4096, 524288, 8, 80)
    assert re.search(r"\n\s+1 × 8 .* no\n", wide) and _smallest(wide)[1] > 1, wide
    big = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "pythia-6.9b", "--layer", "16",
                          "--revisions", revs, "--dict-size", "32768", "--plan", "--gpus", "16", "--gpu-gb", "80"],
                         capture_output=True, text=True, timeout=300)
    assert big.returncode == 0, big.stderr[-2000:]
    fit = _smallest(big.stdout)
    assert fit and fit[1] >= 8 and fit[0] <= 16, big.stdout
    assert "16 × 1" in big.stdout and not list(ROOT.glob("runs/pythia-6.9b*")), "--plan must write nothing"


def test_revision_axis_and_slices():
    assert [shards.revision_axis(n) for n in ("W_enc_FMd", "W_dec_FMd", "b_dec_Md", "scales_M", "b_enc_F",
                                              "tokens_since_active_F", "threshold", "log_threshold_F")] == [
        1, 1, 0, 0, None, None, None, None]
    grid = shards.Grid(shards=2, replicas=3, rank=5)
    assert (grid.shard, grid.replica, list(grid.revisions(6))) == (1, 2, [3, 4, 5])
    cc = CrossCoder(CrossCoderConfig(n_models=4, d_model=8, dict_size=16, total_steps=10))
    part = shards.take(cc.state_dict(), range(2, 4))
    assert torch.equal(part["W_dec_FMd"], cc.W_dec_FMd[:, 2:4]) and torch.equal(part["b_enc_F"], cc.b_enc_F)


@pytest.mark.parametrize("shards_, world, M, msg", [(3, 4, 6, "does not divide the 4 processes"),
                                                     (2, 2, 3, "does not divide the 3 revisions")])
def test_grid_refuses_what_does_not_divide(shards_, world, M, msg):
    from crosscoding.common import UsageError
    with pytest.raises(UsageError, match=msg):
        shards.make_grid(shards_, world, 0, M)
