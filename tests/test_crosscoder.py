"""
Tests for crosscoder.py: the model against a naive per-revision loop, gradients against finite
differences, init, units (fold/unfold), files, schedules, AuxK, and recovery of planted features.
The training step's fast path (sparse kernels on the active entries) and its dense fallback are
each checked against the naive loop: the `kernels` fixture forces one or the other.
"""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from crosscoding import sparse  # noqa: E402
from crosscoding.crosscoder import CrossCoder, CrossCoderConfig, k_at, l1_coeff_at, lr_factor  # noqa: E402
from crosscoding.sparse import ActiveSet  # noqa: E402
from crosscoding.variants import VARIANTS  # noqa: E402


@pytest.fixture(params=["sparse", "dense", "predense", "reference"])
def kernels(request, monkeypatch):
    """The active-set path with its sparse kernels forced (any density) or its dense ones (any active set
    but an empty one); the dense branch on pre-activations computed for the choice (a CPU batch too dense
    for the active set); or loss()'s plain dense branch (the one GPUs, half precision and autocast take)."""
    monkeypatch.setattr(sparse, "SPARSE_MAX_DENSITY", 1.0 if request.param == "sparse" else 0.0)
    monkeypatch.setattr(sparse, "ACTIVE_MAX_DENSITY", 0.0 if request.param == "predense" else 1.0)
    if request.param == "reference":
        monkeypatch.setattr(sparse, "ACTIVE_SET_DEVICES", ())
    return request.param


def small_cc(arch="l1", M=3, d=8, F=32, dtype=torch.float32, **kw):
    """A crosscoder with non-trivial biases, so no test passes because something is zero."""
    cfg = CrossCoderConfig(n_models=M, d_model=d, dict_size=F, arch=arch, **kw)
    cc = CrossCoder(cfg).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        cc.b_enc_F.copy_(0.05 * torch.randn(F, generator=g))
        cc.b_dec_Md.copy_(0.1 * torch.randn(M, d, generator=g))
        cc.W_dec_FMd.mul_(1 + torch.rand(F, M, 1, generator=g))  # uneven decoder norms
    return cc


def rand_x(B=16, M=3, d=8, seed=2, dtype=torch.float32):
    return torch.randn(B, M, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)

# -----------------------------------------------------------------------------
# naive reference: one revision at a time, straight from the formulas (METHOD.md)

def naive(cc, x_BMd, step=None, threshold=None):
    cfg = cc.cfg
    M, B = cfg.n_models, x_BMd.shape[0]
    pre_BF = cc.b_enc_F.clone()
    for m in range(M):
        pre_BF = pre_BF + x_BMd[:, m] @ cc.W_enc[m]
    f_BF = torch.relu(pre_BF)
    norms_F = sum(cc.W_dec_FMd[:, m].norm(dim=-1) for m in range(M))
    keep_BF = None
    if cfg.arch == "batchtopk":
        score_BF = (f_BF * norms_F).detach()
        if threshold is not None:
            keep_BF = score_BF > threshold
        else:
            kth = score_BF.flatten().sort(descending=True).values[k_at(cfg, step) * B - 1]
            keep_BF = score_BF >= kth
        f_BF = f_BF * keep_BF
    x_hat = torch.stack([f_BF @ cc.W_dec_FMd[:, m] + cc.b_dec_Md[m] for m in range(M)], 1)
    mse = sum(((x_hat[:, m] - x_BMd[:, m]) ** 2).sum(-1) for m in range(M)).mean()
    if cfg.arch == "l1":
        sparsity = l1_coeff_at(cfg, step) * (f_BF * norms_F).sum(-1).mean()
    else:
        dead = (cc.tokens_since_active_F >= cfg.dead_tokens).nonzero().flatten().tolist()
        sparsity = torch.zeros(())
        if dead:
            e = (x_BMd - x_hat).detach()
            post_BF = torch.relu(pre_BF)
            errs = []
            for b in range(B):
                vals = sorted(((post_BF[b, i], i) for i in dead), key=lambda t: -t[0].item())[: cfg.aux_k]
                e_hat = sum(a * cc.W_dec_FMd[i] for a, i in vals)
                errs.append(((e_hat - e[b]) ** 2).sum())
            num = torch.stack(errs).mean()
            den = ((e - e.mean(0)) ** 2).sum((1, 2)).mean()
            sparsity = cfg.auxk_alpha * num / den
    return x_hat, f_BF, keep_BF, mse + sparsity


def grads(loss, cc):
    return torch.autograd.grad(loss, list(cc.parameters()))


@pytest.mark.parametrize("arch", ["l1", "batchtopk"])
def test_matches_naive_loop(arch, kernels):
    cc = small_cc(arch, k=3, k_start=6, k_anneal_steps=10, aux_k=4)
    cc.eval()  # buffers frozen, so the dead set is the one the naive loop sees
    x = rand_x()
    if arch == "batchtopk":
        cc.tokens_since_active_F[::3] = cc.cfg.dead_tokens  # some dead latents, so AuxK is in the loss
    step = 4  # mid-warm-up for lambda, mid-anneal for k
    x_hat_ref, f_ref, keep_ref, loss_ref = naive(cc, x, step=step)
    out = cc.loss(x, step=step)
    assert torch.allclose(out["loss"], loss_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads(out["loss"], cc), grads(loss_ref, cc)):
        assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-5)
    if arch == "batchtopk":
        assert out["sparsity"] > 0
        assert out["l0"] == k_at(cc.cfg, step)
    # forward is inference: final k, then the threshold once it is set
    x_hat_ref, f_ref, keep_ref, _ = naive(cc, x)
    x_hat, f = cc(x)
    assert torch.allclose(x_hat, x_hat_ref, atol=1e-5) and torch.allclose(f, f_ref, atol=1e-6)
    if arch == "batchtopk":
        assert torch.equal(f > 0, keep_ref & (f_ref > 0))
        cc.threshold.fill_(0.05)
        x_hat_ref, f_ref, keep_ref, _ = naive(cc, x, threshold=0.05)
        x_hat, f = cc(x)
        assert torch.equal(f > 0, keep_ref) and torch.allclose(x_hat, x_hat_ref, atol=1e-5)


def test_sparse_decode_equals_dense(kernels):
    cc = small_cc("batchtopk", k=3)
    x = rand_x()
    f = cc.encode(x).detach().requires_grad_()
    f.data[0] = 0  # a token with no active latent: an empty bag
    dense, sparse = cc.decode(f, active_only=False), cc.decode(f, active_only=True)
    assert torch.allclose(dense, sparse, atol=1e-6)
    w = torch.randn_like(dense)
    g_dense = torch.autograd.grad((dense * w).sum(), [f, cc.W_dec_FMd, cc.b_dec_Md])
    g_sparse = torch.autograd.grad((sparse * w).sum(), [f, cc.W_dec_FMd, cc.b_dec_Md])
    # f's gradient only exists at the active entries on the sparse path; compare there
    active = f.detach() > 0
    assert torch.allclose(g_dense[0][active], g_sparse[0][active], atol=1e-5)
    for a, b in zip(g_dense[1:], g_sparse[1:]):
        assert torch.allclose(a, b, atol=1e-5)


def trained_cc(arch, B=96, M=3, d=16, F=300, fire=0.03, dtype=torch.float32, **kw):
    """A crosscoder in a 'trained state': b_enc puts latent i's threshold at the (1 - fire) quantile of
    its pre-activation on the test batch (midway between two tokens, so no code is ~0), so ~fire of
    the codes are active, as after the first few percent of a real run (and as bench.py builds it)."""
    cc = small_cc(arch, M=M, d=d, F=F, dtype=dtype, **kw)
    x = rand_x(B=B, M=M, d=d, seed=3, dtype=dtype)
    with torch.no_grad():
        pre = (x.reshape(B, -1) @ cc.W_enc.reshape(-1, F)).sort(0).values
        j = B - max(1, round(fire * B))
        cc.b_enc_F.copy_(-(pre[j - 1] + pre[j]) / 2)
    return cc, x


@pytest.mark.parametrize("arch", ["l1", "batchtopk"])
def test_trained_state_sparse_path_matches_naive(arch):
    """The default settings take the sparse kernels here; loss and every gradient (x's too) equal the
    naive loop's, with AuxK's own active set for BatchTopK."""
    cc, x = trained_cc(arch, k=4, k_start=4, aux_k=8)
    cc.eval()
    x.requires_grad_()
    if arch == "batchtopk":
        cc.tokens_since_active_F[1::4] = cc.cfg.dead_tokens
    pre = (x.detach().reshape(len(x), -1) @ cc.W_enc.reshape(-1, cc.cfg.dict_size) + cc.b_enc_F).detach()
    assert ActiveSet.where(pre > 0, pre.dtype).sparse  # ~3% active: the fast path, not the fallback
    out = cc.loss(x, step=7)
    _, f_ref, _, loss_ref = naive(cc, x, step=7)
    assert 0.01 < (f_ref > 0).float().mean() < 0.05
    assert torch.allclose(out["loss"], loss_ref, rtol=1e-5, atol=1e-6)
    assert out["l0"] == (f_ref > 0).float().sum(1).mean()
    if arch == "batchtopk":
        assert out["sparsity"] > 0
    wrt = [x, *cc.parameters()]
    for g, g_ref in zip(torch.autograd.grad(out["loss"], wrt), torch.autograd.grad(loss_ref, wrt)):
        assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-6)


def test_trained_state_training_matches_dense(monkeypatch):
    """Ten optimiser steps (buffers updating: theta, dead counters) on the sparse kernels, on the dense
    ones and on loss()'s dense branch end at the same weights and buffers."""
    runs = []
    monkeypatch.setattr(sparse, "ACTIVE_MAX_DENSITY", 1.0)
    for density, devices in ((1.0, ("cpu",)), (0.0, ("cpu",)), (0.0, ())):
        monkeypatch.setattr(sparse, "SPARSE_MAX_DENSITY", density)
        monkeypatch.setattr(sparse, "ACTIVE_SET_DEVICES", devices)
        cc, x = trained_cc("batchtopk", k=4, k_start=8, k_anneal_steps=5, threshold_start_step=3,
                           dead_tokens=300, aux_k=8)
        opt = cc.make_optimizer(1e-3)
        for step in range(10):
            out = cc.loss(rand_x(B=96, M=3, d=16, seed=10 + step), step=step)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
        runs.append(cc.state_dict())
    for other in runs[1:]:
        for (name, a), b in zip(runs[0].items(), other.values()):
            assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6), name
    assert runs[0]["threshold"] > 0 and (runs[0]["tokens_since_active_F"] >= 300).any()


@pytest.mark.parametrize("arch", ["l1", "batchtopk"])
def test_sparse_path_is_bit_deterministic_with_two_threads(arch, monkeypatch):
    """Repeated loss + backward on the active-set path with 2 threads give bit-identical gradients, so a
    resumed run at scale replays the uninterrupted one exactly. (The L1 term once summed through an
    indexing backward, whose threaded scatter-add order varies: this size made it differ every time.)"""
    monkeypatch.setattr(sparse, "ACTIVE_MAX_DENSITY", 1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        B, d, Fdim = 1024, 64, 4096
        cfg = CrossCoderConfig(n_models=2, d_model=d, dict_size=Fdim, arch=arch, k=80, k_start=80, aux_k=32, seed=1)
        cc = CrossCoder(cfg)
        x = rand_x(B=B, M=2, d=d, seed=2)
        with torch.no_grad():   # each latent fires on 3% of the tokens, as in a trained state
            pre = x.reshape(B, -1) @ cc.W_enc.reshape(-1, Fdim)
            cc.b_enc_F.copy_(-pre.quantile(0.97, dim=0))
            cc.tokens_since_active_F[1::4] = cfg.dead_tokens   # AuxK in the loss too
        cc.eval()   # the buffers stay as set: every repeat sees the same dead set
        grads = []
        for _ in range(10):
            cc.zero_grad(set_to_none=True)
            cc.loss(x, step=10_000)["loss"].backward()
            grads.append(torch.cat([p.grad.flatten() for p in cc.parameters()]))
    finally:
        torch.set_num_threads(threads)
    assert grads[0].abs().sum() > 0
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("arch", ["l1", "batchtopk"])
def test_autocast_bf16_runs_the_dense_branch(arch):
    """Under autocast (train.py --precision bf16 on a GPU; here CPU autocast) matmuls run in bf16, the loss
    in fp32; it stays close to the fp32 loss and every parameter gets a finite gradient."""
    cc, x = trained_cc(arch, k=4, k_start=4, aux_k=8)
    cc.eval()
    if arch == "batchtopk":
        cc.tokens_since_active_F[1::4] = cc.cfg.dead_tokens
    ref = cc.loss(x, step=7)
    with torch.autocast("cpu", torch.bfloat16):
        out = cc.loss(x, step=7)
    assert out["loss"].dtype == torch.float32 and out["fvu_M"].dtype == torch.float32
    assert torch.allclose(out["loss"], ref["loss"], rtol=0.05)
    for g in torch.autograd.grad(out["loss"], list(cc.parameters())):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()


class _LossOf(torch.nn.Module):
    """The loss (or AuxK's part alone) as a module's forward, for torch.func.functional_call."""
    def __init__(self, cc, aux_only):
        super().__init__()
        self.cc, self.aux_only = cc, aux_only

    def forward(self, x, x_hat):
        if self.aux_only:
            return self.cc.auxk_loss(x, x_hat, torch.relu(self.cc.pre_acts(x)))
        return self.cc.loss(x, step=5)["loss"]


@pytest.mark.parametrize("arch,aux_only", [("l1", False), ("batchtopk", False), ("batchtopk", True)])
def test_gradcheck_float64(arch, aux_only, kernels):
    cc = small_cc(arch, M=2, d=3, F=6, dtype=torch.float64, k=2, aux_k=2, total_steps=10)
    cc.eval()  # a pure function of its inputs: no buffer updates between evaluations
    x = rand_x(B=4, M=2, d=3, dtype=torch.float64)
    x_hat = cc(x)[0].detach()
    if aux_only:
        # AuxK's target e = x - x_hat is detached on purpose, so finite differences through the whole
        # loss would see a dependence autograd must not: check AuxK with e held fixed instead
        cc.tokens_since_active_F[:3] = cc.cfg.dead_tokens
    else:
        x.requires_grad_()
    names = [n for n, _ in cc.named_parameters()]
    wrapper = _LossOf(cc, aux_only)

    def fn(x, *params):
        return torch.func.functional_call(wrapper, {"cc." + n: p for n, p in zip(names, params)}, (x, x_hat))

    params = [p.detach().clone().requires_grad_() for p in cc.parameters()]
    assert fn(x, *params) > 0
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_init():
    cc = CrossCoder(CrossCoderConfig(n_models=3, d_model=16, dict_size=64))
    assert torch.allclose(cc.W_dec_FMd.norm(dim=-1), torch.full((64, 3), 0.08))
    assert torch.equal(cc.W_enc, cc.W_dec_FMd.permute(1, 2, 0))   # W_enc[m][:, i] = W_dec[i, m] at init
    assert not cc.b_enc_F.any() and not cc.b_dec_Md.any()
    assert cc.W_enc.shape == (3, 16, 64) and cc.W_enc.data_ptr() == cc.W_enc_FMd.data_ptr() and cc.W_dec is cc.W_dec_FMd
    again = CrossCoder(CrossCoderConfig(n_models=3, d_model=16, dict_size=64))
    other = CrossCoder(CrossCoderConfig(n_models=3, d_model=16, dict_size=64, seed=1))
    assert torch.equal(cc.W_dec_FMd, again.W_dec_FMd) and not torch.equal(cc.W_dec_FMd, other.W_dec_FMd)
    assert torch.allclose(cc.decoder_norms(), torch.full((64, 3), 0.08))


@pytest.mark.parametrize("field,value", [("dict_size", 0), ("d_model", -1), ("k", 0), ("arch", "topk"),
                                         ("threshold_beta", 1.0)])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r}"):
        CrossCoderConfig(**{"n_models": 2, "d_model": 4, field: value})


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_fold_unfold(arch):
    cc = small_cc(arch, k=3)
    if hasattr(cc, "threshold"):
        cc.threshold.fill_(0.02)
    s_M = torch.tensor([0.5, 2.0, 3.0])
    x_raw = rand_x()
    x_hat, f = cc(x_raw * s_M[:, None])  # trained on s*x
    assert (f > 0).any()
    folded = cc.fold_scales(s_M)
    x_hat_raw, f_raw = folded(x_raw)
    assert torch.allclose(f_raw, f, atol=1e-5)
    assert torch.allclose(x_hat_raw, x_hat / s_M[:, None], atol=1e-5)
    assert torch.allclose(folded.decoder_norms(), cc.decoder_norms(), atol=1e-6)  # RelDec unchanged
    if hasattr(cc, "threshold"):     # θ is BatchTopK's state (variants.BatchTopK); L1 has none
        assert folded.threshold == cc.threshold
    assert torch.equal(cc.scales_M, torch.ones(3))  # the original is untouched
    back = folded.unfold_scales()
    for a, b in zip(back.state_dict().values(), cc.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        cc.fold_scales([1.0, 0.0, 1.0])


def test_save_load_roundtrip(tmp_path):
    cc = small_cc("batchtopk", k=3)
    cc.threshold.fill_(0.3)
    cc.tokens_since_active_F[:5] = 7
    run = tmp_path / "run"
    cc.save(run, extra={"revisions": ["a", "b", "c"], "layer": 0})
    assert sorted(os.listdir(run)) == ["config.json", "crosscoder.safetensors"]  # no temporaries left
    back = CrossCoder.load(run)
    assert back.cfg == cc.cfg and back.extra == {"revisions": ["a", "b", "c"], "layer": 0}
    for (n, a), (n2, b) in zip(cc.state_dict().items(), back.state_dict().items()):
        assert n == n2 and torch.equal(a, b)
    assert all(p.requires_grad for p in back.parameters())
    x = rand_x()
    assert torch.equal(cc(x)[0], back(x)[0])
    with pytest.raises(ValueError, match="collide"):
        cc.save(run, extra={"dict_size": 3})

    meta = json.loads((run / "config.json").read_text())
    meta["dict_size"] = 64  # lie
    (run / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"W_enc_FMd has shape \(32, 3, 8\), config.json says \(64, 3, 8\)"):
        CrossCoder.load(run)

# -----------------------------------------------------------------------------
# schedules

def test_batchtopk_schedule_follows_k_and_the_run():
    """k = 8 of 512 latents anneals from 5k = 40 (not the paper's 1000, more latents than exist) over
    5.12% of the run, θ starts at 1.024% and latents are dead after 2.5% of its tokens: the paper's
    proportions (5000 / 1000 of 97,656 steps, 10M of 400M tokens), at any length."""
    cfg = CrossCoderConfig(n_models=2, d_model=8, dict_size=512, arch="batchtopk", k=8, total_steps=2000,
                           batch_size=256)
    assert (cfg.k_start, cfg.k_anneal_steps, cfg.threshold_start_step) == (40, 102, 20)
    assert cfg.dead_tokens == round(0.025 * 2000 * 256)
    assert k_at(cfg, 0) == 40 and k_at(cfg, 51) == 24 and k_at(cfg, 102) == 8 and k_at(cfg, 10**6) == 8
    paper = CrossCoderConfig(n_models=3, d_model=2048, arch="batchtopk")
    assert (paper.k_start, paper.k_anneal_steps, paper.threshold_start_step) == (1000, 5000, 1000)
    assert abs(paper.dead_tokens - 10_000_000) < 100
    with pytest.raises(ValueError, match="k_start=1000 is invalid: must be at most dict_size=512"):
        CrossCoderConfig(n_models=2, d_model=8, dict_size=512, arch="batchtopk", k=8, k_start=1000)
    with pytest.raises(ValueError, match="k=600 is invalid"):
        CrossCoderConfig(n_models=2, d_model=8, dict_size=512, arch="batchtopk", k=600)


def test_lr_schedule():
    cc = small_cc(total_steps=100, lr=1e-3)
    opt = cc.make_optimizer()
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["lr"] == 1e-3
    assert opt.defaults["fused"] or opt.defaults["foreach"]
    sched = cc.make_scheduler(opt)
    lrs = []
    for _ in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert all(lr == 1e-3 for lr in lrs[:81])  # flat through 80% (step 80 is the top of the ramp)
    assert lrs[90] == pytest.approx(0.5e-3) and lrs[100] == 0.0
    assert all(a > b for a, b in zip(lrs[80:100], lrs[81:101]))
    assert lr_factor(cc.cfg, 95) == pytest.approx(0.25)


def test_l1_warmup_and_k_anneal():
    cfg = CrossCoderConfig(n_models=2, d_model=4, total_steps=1000, k=20, k_start=100, k_anneal_steps=40)
    assert [l1_coeff_at(cfg, s) for s in (0, 25, 50, 500, None)] == [0.0, 1.0, 2.0, 2.0, 2.0]
    assert [k_at(cfg, s) for s in (0, 10, 20, 40, 1000, None)] == [100, 80, 60, 20, 20, 20]
    cc = small_cc(total_steps=1000)
    assert cc.loss(rand_x(), step=25)["l1_coeff"] == 1.0


def test_threshold_ema_starts_at_threshold_start_step():
    cc = small_cc("batchtopk", k=3, k_start=3, threshold_start_step=2, threshold_beta=0.9)
    xs = [rand_x(seed=s) for s in range(5)]
    for step in range(2):
        cc.loss(xs[step], step=step)
        assert cc.threshold == -1.0
    cc.eval()
    cc.loss(xs[2], step=2)  # eval mode: no buffer updates
    assert cc.threshold == -1.0
    cc.train()

    def smallest_kept(x):
        _, f, keep, _ = naive(cc, x, step=10)
        score = f * cc.decoder_norms().sum(1)
        return score[keep & (f > 0)].min().item()

    m2 = smallest_kept(xs[2])
    cc.loss(xs[2], step=2)
    assert cc.threshold.item() == pytest.approx(m2)
    m3 = smallest_kept(xs[3])
    cc.loss(xs[3], step=3)
    assert cc.threshold.item() == pytest.approx(0.9 * m2 + 0.1 * m3)

# -----------------------------------------------------------------------------
# AuxK

def test_auxk_sign_and_off_when_nothing_is_dead():
    cc = small_cc("batchtopk", F=32, k=2, aux_k=8, dead_tokens=1000)
    x = rand_x()
    out = cc.loss(x, step=None)
    assert out["sparsity"] == 0 and out["loss"] == out["mse"]  # nobody dead: no aux loss

    f = cc.encode(x)
    dead = (f == 0).all(0).nonzero().flatten()[:8]  # silent on this batch, declared dead
    assert len(dead) == 8  # = aux_k: every dead latent takes part for every token
    cc.tokens_since_active_F[dead] = 1000
    with torch.no_grad():
        cc.W_dec_FMd[dead] *= 0.01  # dead decoders small, so the gradient is about the target e
    x_hat = cc.decode(f).detach()
    aux = cc.auxk_loss(x, x_hat, torch.relu(cc.pre_acts(x)))
    assert aux > 0
    g_dec, = torch.autograd.grad(aux, [cc.W_dec_FMd])
    assert g_dec.abs().sum() > 0
    alive = torch.ones(32, dtype=torch.bool)
    alive[dead] = False
    assert not g_dec[alive].any()  # only dead latents' decoders are trained by AuxK
    # descent direction for latent i is toward sum_b a_bi * e_b, the error it is asked to explain
    e = (x - x_hat)
    post = torch.relu(cc.pre_acts(x)).detach()
    moved = 0
    for i in dead.tolist():
        if post[:, i].any():
            toward = (post[:, i, None, None] * e).sum(0)
            assert (-g_dec[i] * toward).sum() > 0
            moved += 1
    assert moved >= 2

# -----------------------------------------------------------------------------
# planted features: the acceptance test

N_PER = 16  # features per group: shared by all, checkpoint 0 only, checkpoint 2 only


def planted_dictionary(seed=0, M=3, d=32):
    """[3*N_PER, M, d]: random unit directions per checkpoint, norms differing per checkpoint,
    zero where a feature does not exist."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(3 * N_PER, M, d, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    present = torch.zeros(3 * N_PER, M)
    present[:N_PER] = 1
    present[N_PER:2 * N_PER, 0] = 1
    present[2 * N_PER:, 2] = 1
    return D * present[..., None] * torch.tensor([1.0, 1.5, 2.0])[None, :, None], g


def sample_acts(D, g, B, p=4 / 48):
    """Sparse non-negative coefficients, ~4 features on per token."""
    on = torch.rand(B, D.shape[0], generator=g) < p
    c = on * (0.5 + torch.rand(B, D.shape[0], generator=g))
    return torch.einsum("bn,nmd->bmd", c, D)


@pytest.mark.parametrize("arch,kw", [
    # lambda scaled down from 2: the paper's lambda goes with d = 2048 (||x|| = sqrt(d) = 45), here d = 32
    ("l1", dict(l1_coeff=0.5)),
    # the API's own schedule: k anneals from 5k over 5.12% of the run, θ from 1% (CrossCoderConfig)
    ("batchtopk", dict(k=4, dead_tokens=10_000, aux_k=32)),
    # the variants beyond the paper's (variants.py), each with its defaults: JumpReLU's penalty is per unit of
    # E‖x‖² = M·d, so its default serves d = 32 as it does the toy; Matryoshka as BatchTopK
    ("jumprelu", dict()),
    ("matryoshka", dict(k=4, dead_tokens=10_000, aux_k=32)),
])
@pytest.mark.slow
def test_planted_features_recovered(arch, kw):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        D, g = planted_dictionary()
        s_M = 32 ** 0.5 / sample_acts(D, g, 4096).norm(dim=-1).mean(0)  # the pipeline's normalisation
        steps = 1500
        cfg = CrossCoderConfig(n_models=3, d_model=32, dict_size=128, arch=arch, total_steps=steps, **kw)
        cc = CrossCoder(cfg)
        opt = cc.make_optimizer(3e-3)
        sched = cc.make_scheduler(opt)
        for step in range(steps):
            cc.train_step(opt, sched, sample_acts(D, g, 512) * s_M[:, None], step)
    finally:
        torch.set_num_threads(threads)

    with torch.no_grad():
        truth = torch.nn.functional.normalize((D * s_M[:, None]).flatten(1), dim=1)
        learned = torch.nn.functional.normalize(cc.W_dec_FMd.flatten(1), dim=1)
        best_cos, match = (truth @ learned.T).max(1)
        assert (best_cos >= 0.9).float().mean() >= 0.9, best_cos
        reldec = cc.decoder_norms()[match]
        reldec = reldec / reldec.sum(1, keepdim=True)
        in_group = torch.cat([(reldec[:N_PER] >= 0.2).all(1),
                              reldec[N_PER:2 * N_PER, 0] > 0.7,
                              reldec[2 * N_PER:, 2] > 0.7])
        assert in_group.float().mean() >= 0.9, reldec

        # and the crosscoder as used downstream (inference, BatchTopK's threshold) reconstructs well
        x = sample_acts(D, g, 2048) * s_M[:, None]
        x_hat, f = cc(x)
        fvu_M = ((x - x_hat) ** 2).sum((0, 2)) / ((x - x.mean(0)) ** 2).sum((0, 2))
        assert (fvu_M < 0.1).all(), fvu_M
        if arch in ("batchtopk", "matryoshka"):
            assert cc.threshold > 0
        if arch != "l1":
            assert 2 <= (f > 0).float().sum(1).mean() <= 8, (f > 0).float().sum(1).mean()


def test_loads_files_with_the_earlier_encoder_layout(tmp_path):
    """Runs saved before the encoder was stored latent-major (W_enc_MdF [M, d, F]) load to the same model."""
    from safetensors.torch import load_file, save_file
    cc = small_cc()
    cc.save(tmp_path, extra={"revisions": ["a", "b", "c"], "layer": 0})
    t = load_file(tmp_path / "crosscoder.safetensors")
    t["W_enc_MdF"] = t.pop("W_enc_FMd").permute(1, 2, 0).contiguous()
    save_file(t, tmp_path / "crosscoder.safetensors")
    back = CrossCoder.load(tmp_path)
    x = rand_x()
    assert torch.equal(back.W_enc, cc.W_enc) and torch.equal(back(x)[0], cc(x)[0])
