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


# ---------------------------------------------------------------------------------------------
# Revision-parallel training against one process, for every variant of the table

M, d, F, B, STEPS = 4, 16, 64, 64, 20


def _config(arch):
    from crosscoding.crosscoder import CrossCoderConfig
    return CrossCoderConfig(n_models=M, d_model=d, dict_size=F, arch=arch, k=8, total_steps=STEPS, batch_size=B,
                            threshold_start_step=2, dead_tokens=2 * B, aux_k=8, l1_warmup_frac=0.1)


def _batch(step):
    return torch.randn(B, M, d, generator=torch.Generator().manual_seed(step), dtype=torch.float64)


def _train(arch, grid=None):
    """STEPS steps of the public training step in fp64 (one process: grid None); returns the whole batch's
    losses, the codes of a held-out batch, the whole state (gathered on rank 0) and this rank's element counts."""
    import torch.distributed as dist
    revs = grid.revisions(M) if grid else range(M)
    cc = (shards.ShardedCrossCoder(_config(arch), grid) if grid else CrossCoder(_config(arch))).double()
    if grid:
        cc.group = grid.data_group if grid.replicas > 1 else None
    opt = cc.make_optimizer()
    sched = cc.make_scheduler(opt)
    losses = []
    for step in range(STEPS):
        x = _batch(step)[:, revs.start:revs.stop]
        x = x[grid.replica::grid.replicas] if grid else x
        loss = cc.train_step(opt, sched, x, step)["loss"].detach().clone()
        if grid:
            if grid.replicas > 1:
                cc.sync_buffers(grid.replicas, len(x), grid.data_group)
                dist.all_reduce(loss, group=grid.data_group)
                loss /= grid.replicas
            dist.all_reduce(loss, group=grid.shard_group)
        losses.append(loss.item())
    with torch.no_grad():
        codes = cc.encode(_batch(10_000)[:, revs.start:revs.stop])
    state = shards.gather_state(cc, grid) if grid else cc.state_dict()
    return losses, codes, state, shards.per_rank_elements(cc, opt)


def _grid_rank(rank, world, R, port, out):
    import os

    import numpy as np
    import torch.distributed as dist

    from crosscoding.crosscoder import ARCHS
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for arch in ARCHS:
        losses, codes, state, counts = _train(arch, shards.make_grid(R, world, rank, M))
        if rank == 0:   # numpy files: tensors do not cross process boundaries once their process is gone
            np.savez(f"{out}/{arch}.npz", losses=np.array(losses), codes=codes.numpy(), counts=np.array(counts),
                     **{f"state.{k}": v.numpy() for k, v in state.items()})
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world,R", [(2, 2), (4, 4), (4, 2)], ids=["2 shards", "4 shards", "2 shards x 2 replicas"])
def test_revision_shards_train_what_one_process_does(world, R, tmp_path):
    """2 and 4 gloo processes splitting the revisions (and 2 × 2 with data replicas) give one process's losses,
    codes and weights over 20 steps to 1e-5 relative, for every variant of the table; each rank holds 1/R of
    the sliced parameters and of their Adam moments."""
    import numpy as np

    from crosscoding.crosscoder import ARCHS
    torch.multiprocessing.start_processes(_grid_rank, args=(world, R, 29640 + world + R, str(tmp_path)),
                                          nprocs=world, start_method="spawn")
    for arch in ARCHS:
        losses, codes, state, (n_par, n_opt) = _train(arch)
        got = np.load(tmp_path / f"{arch}.npz")
        np.testing.assert_allclose(got["losses"], losses, rtol=1e-5, err_msg=arch)
        np.testing.assert_allclose(got["codes"], codes.numpy(), rtol=1e-5, atol=1e-8, err_msg=arch)
        assert np.array_equal(got["codes"] > 0, codes.numpy() > 0), arch          # the same latents selected
        for k, v in state.items():
            np.testing.assert_allclose(got[f"state.{k}"], v.numpy(), rtol=1e-5, atol=1e-7 * float(v.abs().max()),
                                       err_msg=f"{arch} {k}")
        whole = 2 * M * d * F + M * d                  # the sliced parameters; b_enc (and θ) are whole on every rank
        assert got["counts"][0] == n_par - whole + whole // R, (arch, got["counts"], n_par)
        assert got["counts"][1] == 2 * got["counts"][0] and n_opt == 2 * n_par, arch   # Adam: 2 moments each


# ---------------------------------------------------------------------------------------------
# train.py with --revision-shards: the saved run, kill and resume, evaluate.py on it

def _train_py_rank(rank, world, argv, port, fault):
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **({"CCT_FAULT": fault} if fault else {}))
    torch.set_num_threads(1)
    import train
    train.main(argv)


def _run(argv, world=1, port=29660, fault=None):
    if world == 1:
        import train
        return train.main(argv)
    torch.multiprocessing.start_processes(_train_py_rank, args=(world, argv, port, fault), nprocs=world,
                                          start_method="spawn")


def _argv(local_model, cache, out, *extra):
    return ["--model", str(local_model[0]), "--layer", "1", "--revisions", "step0,step100", "--cache", str(cache),
            "--dict-size", "32", "--batch-size", "64", "--tokens", str(64 * 24), "--lr", "3e-3", "--out", str(out),
            "--log-every", "4", "--ckpt-every", "8", "--arch", "batchtopk", "--k", "4", *extra]


@pytest.mark.slow
def test_train_py_revision_shards_save_resume_and_evaluate(local_model, small_cache, tmp_path):
    from safetensors.torch import load_file
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    _run(_argv(local_model, small_cache, one))
    _run(_argv(local_model, small_cache, two, "--revision-shards", "2"), world=2)
    a, b = load_file(one / "crosscoder.safetensors"), load_file(two / "crosscoder.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}   # the one-process layout
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # killed after step 13 on both ranks (a checkpoint of both slices at step 8), resumed: bit for bit
    with pytest.raises(torch.multiprocessing.ProcessExitedException):
        _run(_argv(local_model, small_cache, killed, "--revision-shards", "2"), world=2, port=29661,
             fault="train_step:13")
    ckpt = next((killed / "ckpt").iterdir())
    assert sorted(p.name for p in ckpt.iterdir()) == ["DONE", "state-0of2.safetensors", "state-1of2.safetensors",
                                                       "state.json"]
    _run(_argv(local_model, small_cache, killed, "--revision-shards", "2", "--resume"), world=2, port=29662)
    c = load_file(killed / "crosscoder.safetensors")
    for k in b:
        assert torch.equal(b[k], c[k]), k
    import evaluate  # every analysis stage reads the assembled run unchanged
    evaluate.main(["--run", str(two), "--blocks", "8"])
    assert (two / "eval.json").exists()


def test_a_sharded_checkpoint_resumes_only_with_its_shards(tmp_path):
    from crosscoding.common import UsageError, mark_done
    ckpt = tmp_path / "ckpt" / "000000008"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text('{"step": 8, "shards": 2}')
    mark_done(ckpt, step=8)
    cc = CrossCoder(CrossCoderConfig(n_models=2, d_model=8, dict_size=16, total_steps=10))
    opt = cc.make_optimizer()
    with pytest.raises(UsageError, match="written by 2 revision shard\\(s\\), this command runs 1; resume with "
                                         "--revision-shards 2"):
        training.load_checkpoint(tmp_path, cc, opt, cc.make_scheduler(opt), "cpu")
