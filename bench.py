"""bench.py — the toolkit's hot loops against honest references, side by side, as ratios.

    python bench.py --quick                  # every section, fewer repeats: ≤ 3 minutes on 2 CPU cores
    python bench.py                          # every section, more repeats and a larger memory run
    python bench.py --only step --quick      # one or more sections: step, scale, cache, data, ig, memory, shards, live
    python bench.py --device cuda            # the same on a GPU
    python bench.py --quick --results        # … and write the table into RESULTS.md
    python bench.py --only live --quick      # the live buffer's refills, overlapped against synchronous (~1 minute)

On a GPU, the one script to run (≤ 8 minutes on one H200; offline: random weights, nothing downloaded):

    HF_HUB_OFFLINE=1 python3 bench.py --paper --device cuda --results

It prints, and writes into RESULTS.md (section `paper-check`): the crosscoder step at the paper's shape
(M = 3, d = 2048, F = 16384, batch 4096, bf16 autocast; L1 and BatchTopK k = 200) against its roofline,
the five dense bf16 matmuls of a step; the live path's tokens/s with its breakdown (section live, both
refills); and train.py, evaluate.py, relie.py and ablate.py's wall times at the paper's shape (pythia-1b,
layer 8, random weights), each as a process of its own. Each part runs in a try: one that fails prints
its error and the others go on. `python bench.py --paper` without a GPU runs every part at a tiny shape.

Every number is a median over repeats that alternate the two sides (same inputs, same threads), so
a load that comes and goes hits both alike; each line prints its target and PASS/FAIL.

  step    crosscoder.py's training step (CrossCoder.train_step: loss, backward, grad clip, fused Adam)
          against what users run today, science-of-finetuning/dictionary_learning's CrossCoder and
          BatchTopKCrossCoder with their trainers, written plainly from their structure (Peer, below),
          at d=64 (F=512), d=128 (F=2048) and d=512 (F=8192); M=3, batch 1024, fp32;
          L1 at init and in a trained state, BatchTopK trained with the same fixed k on both sides;
          JumpReLU and Matryoshka (variants.py) trained, against a plain dense implementation in the
          style of dictionary_learning's JumpReluTrainer / MatryoshkaBatchTopKTrainer (Peer);
          and our step against the matmul roofline.
  scale   our step per token·revision at M = 8 and 16 against M = 3 (the work is linear in M).
  cache   stop-at-layer (lm.run_to_layer) against a full forward, GPT-NeoX 12 layers, L mid-depth.
  data    train.py's loop from a cache (CacheBatches.batch_at, the device copy, the NaN check, the
          step) against the bare step on a preloaded batch.
  ig      analysis.ie_gradient (its 10 integrated-gradient steps batched, only the blocks above L run)
          against the plain loop: per step, a full forward with a hooked splice and a backward.
  memory  train.py (subprocess) on a cache larger than half the process's own peak RSS.
  shards  2 processes (gloo on a CPU, nccl on GPUs) training one crosscoder: revision-parallel
          (--revision-shards 2: each holds 2 of M = 4 revisions) against plain DDP (each holds all 4,
          half the batch), at the toy's shape (d=64, F=256) and d=512 (F=4096); L1 at init (dense codes:
          both sides take the dense path), batch 1024. Per step: the time (median), the bytes each rank
          all-reduces (revision shards: counted at every all-reduce call; DDP: every gradient once, from
          the parameter sizes, as its reducer sends them), and each rank's peak RSS or GPU memory.

The trained state: a freshly initialised crosscoder has ~half its latents firing per token; after
the first few percent of a real run, 1-6% do. The bench builds that state directly: W_enc and
W_dec are the init (random directions, decoder rows of norm 0.08), the inputs are standard normal
per revision (so ||x_m|| ≈ √d, as after the pipeline's normalisation), and b_enc[i] is set to minus
the (1 - p) quantile of latent i's pre-activation on a separate calibration batch, so each latent
fires on a fraction p of tokens: L1 p = 2%; BatchTopK p = 4% with k = 2% of F (the selection keeps
half of the positive codes). Steps are timed at step 10000 (λ warmed up, k fixed, θ updating);
no latent is dead (AuxK off on both sides, as in a healthy run). L0 is printed after timing.
"""
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from einops import einsum

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from crosscoding import cli, defaults  # noqa: E402
from crosscoding.common import (  # noqa: E402
    ArgumentParser,
    UsageError,
    keep_freed_memory,
    mark_done,
    run_main,
    update_results,
)
from crosscoding.crosscoder import CrossCoder, CrossCoderConfig  # noqa: E402
from crosscoding.variants import VARIANTS, JumpReLUFn, group_ends  # noqa: E402

SECTIONS = ("step", "scale", "cache", "data", "ig", "memory", "shards", "live")
RESULTS = []


LINES = []     # every reported line, for --results


def report(name, value, target=None, fmt="{:.2f}x", higher=True, note=""):
    """One result line: value, target and PASS/FAIL (no target: informational)."""
    line = f"  {name:<58} {fmt.format(value):>10}"
    want = verdict = ""
    if target is not None:
        ok = value >= target if higher else value <= target
        want, verdict = f"{'≥' if higher else '≤'} {fmt.format(target)}", "PASS" if ok else "FAIL"
        line += f"   target {want:<10} {verdict}"
        RESULTS.append((name, value, target, ok))
    if note:
        line += f"   ({note})"
    LINES.append((name, fmt.format(value), want, verdict, note))
    print(line, flush=True)


def results_markdown(args, seconds, load0, load1) -> str:
    cmd = "python bench.py" + (" --quick" if args.quick else "") + (f" --device {args.device}" if args.device != "cpu"
                                                                    else "")
    if set(args.only.split(",")) != set(SECTIONS):
        cmd += f" --only {args.only}"
    rows = "\n".join(f"| {n} | {v} | {w} | {k} | {note} |" for n, v, w, k, note in LINES)
    n_fail = sum(not ok for *_, ok in RESULTS)
    return (f"## Performance (`{cmd}`)\n\nMeasured on {args.device} with {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}, in {seconds:.0f} s (load average {load0:.1f} at the start, {load1:.1f} at the end): "
            f"{len(RESULTS) - n_fail} PASS, {n_fail} FAIL. Ratios are medians of alternating repeats. The peer is "
            f"dictionary_learning's crosscoder step written plainly from its structure (`bench.Peer`), run in a "
            f"process of its own with the C library's default allocator, as its users run it.\n\n"
            f"| measurement | value | target | | note |\n|---|---|---|---|---|\n{rows}")


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def compare(fns, repeats, device, warmup=1):
    """Median seconds of each of fns, run alternately (A B A B ...) after warmup rounds."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            t.append(timed(fn, device))
    return [statistics.median(t) for t in times]


# ---------------------------------------------------------------------------------------------
# step: crosscoder.py's training step against the peer users run today

class Peer(torch.nn.Module):
    """dictionary_learning's crosscoder step (CrossCoder + CrossCoderTrainer with use_mse_loss, and
    BatchTopKCrossCoder + BatchTopKCrossCoderTrainer), written plainly from its structure: the encoder
    einsum "bmd,mdf->bmf" (a [B, M, F] intermediate) summed over revisions, + bias, ReLU; the dense
    decoder einsum "bf,mfd->bmd" + bias; the decoder norms Σ_m ‖W_dec[m,i]‖ recomputed each step;
    L1: the decoder-norm-weighted L1 on the MSE, per-step dead-latent tracking; BatchTopK: one top-k
    over the B·F scores and a scatter, the threshold EMA, tokens-since-fired, the L2 reconstruction
    (its trainer's), AuxK (zero without dead latents); torch.optim.Adam with its defaults, no clipping.
    The same weights as ours, so the codes are the same.
    The two variants the paper does not have, written plainly in the style of the field's trainers, dense:
    jumprelu as dictionary_learning's JumpReluTrainer (its JumpReLU and step autograd functions on the dense
    [B, F] code, the rectangle kernel, log-threshold parameter), crosscoded: the einsum encoder and decoder
    above, and our tanh-L0 penalty (variants.JumpReLU) on the dense code; matryoshka as its
    MatryoshkaBatchTopKTrainer: the BatchTopK above, then per group a dense slice f[:, :end] @ W_dec[:, :end]
    and the sum of the prefixes' squared errors. Each variant names the trainer it is timed against (its class's
    `peer`); a variant that names none of STEPS' is refused (a second, plain implementation to time ours
    against, not part of the toolkit)."""
    STEPS = {"dictionary_learning CrossCoderTrainer": "_l1_loss",
             "dictionary_learning BatchTopKCrossCoderTrainer": "_batchtopk_loss",
             "dictionary_learning JumpReluTrainer": "_jumprelu_loss",
             "dictionary_learning MatryoshkaBatchTopKTrainer": "_matryoshka_loss"}

    def __init__(self, cc):
        super().__init__()
        self.W_enc = torch.nn.Parameter(cc.W_enc.detach().contiguous())                      # [M, d, F]
        self.b_enc = torch.nn.Parameter(cc.b_enc_F.detach().clone())
        self.W_dec = torch.nn.Parameter(cc.W_dec_FMd.detach().permute(1, 0, 2).contiguous())  # [M, F, d]
        self.b_dec = torch.nn.Parameter(cc.b_dec_Md.detach().clone())
        self._setup(cc.cfg)
        if hasattr(cc, "log_threshold_F"):
            self.log_threshold = torch.nn.Parameter(cc.log_threshold_F.detach().clone())
        F, dev = cc.cfg.dict_size, cc.W_enc.device      # its counters live where its weights do
        self.register_buffer("steps_since_active", torch.zeros(F, dtype=torch.long, device=dev))
        self.register_buffer("tokens_since_fired", torch.zeros(F, dtype=torch.long, device=dev))

    def _setup(self, cfg):
        """The trainer the variant names (its step: self.step) and the settings the steps read."""
        self.trainer = VARIANTS[cfg.arch].peer
        if self.trainer not in self.STEPS:
            raise UsageError(f"bench.py has no reference step for variant {cfg.arch!r}: its class names no trainer "
                             f"that bench.Peer writes out (peer = {self.trainer!r}; it has {', '.join(self.STEPS)})")
        self.step = getattr(self, self.STEPS[self.trainer])
        self.l1_coeff, self.k, self.cfg = cfg.l1_coeff, cfg.k, cfg
        self.threshold, self.threshold_start = -1.0, 1000

    def loss(self, x_BMd, step):
        f_BF = torch.relu(einsum(x_BMd, self.W_enc, "b m d, m d f -> b m f").sum(1) + self.b_enc)
        return self.step(x_BMd, f_BF, step)

    def _l1_loss(self, x_BMd, f_BF, step):
        """dictionary_learning's CrossCoderTrainer step (use_mse_loss): the decoder-norm-weighted L1."""
        norm_1F = self.W_dec.norm(dim=2).sum(0, keepdim=True)
        x_hat = einsum(f_BF, self.W_dec, "b f, m f d -> b m d") + self.b_dec
        torch.linalg.norm(x_BMd - x_hat, dim=-1).mean()        # its l2_loss, computed for the log
        mse = (x_BMd - x_hat).pow(2).sum(-1).mean()
        f_scaled = f_BF * norm_1F
        l1 = f_scaled.norm(p=1, dim=-1).mean()
        with torch.no_grad():
            deads = (f_scaled <= 1e-4).all(dim=0)
            self.steps_since_active[deads] += 1
            self.steps_since_active[~deads] = 0
        return mse + self.l1_coeff * l1

    def _batchtopk_code(self, f_BF, step):
        """One top-k over the B·F scores and a scatter, then the threshold EMA."""
        B = f_BF.shape[0]
        norm_1F = self.W_dec.norm(dim=2).sum(0, keepdim=True)
        scaled_BF = f_BF * norm_1F
        top = scaled_BF.flatten().topk(self.k * B, sorted=False)
        f_BF = torch.zeros_like(scaled_BF.flatten()).scatter_(-1, top.indices, f_BF.flatten()[top.indices])
        f_BF = f_BF.reshape(scaled_BF.shape)
        if step > self.threshold_start:
            active = (f_BF * norm_1F)[f_BF * norm_1F > 0]
            smallest = active.min().detach().float() if len(active) else 0.0
            self.threshold = smallest if self.threshold < 0 else 0.999 * self.threshold + 0.001 * smallest
        return f_BF

    def _batchtopk_loss(self, x_BMd, f_BF, step):
        """dictionary_learning's BatchTopKCrossCoderTrainer step: the selection, its L2 reconstruction, AuxK."""
        B = x_BMd.shape[0]
        f_BF = self._batchtopk_code(f_BF, step)
        x_hat = einsum(f_BF, self.W_dec, "b f, m f d -> b m d") + self.b_dec
        e = x_BMd - x_hat
        with torch.no_grad():
            fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
            fired[f_BF.sum(0) > 0] = True
            self.tokens_since_fired += B
            self.tokens_since_fired[fired] = 0
        e.pow(2).sum(dim=-1).mean()                                     # its mse_loss, for the log
        l2 = torch.linalg.norm(e, dim=-1).mean()
        dead = self.tokens_since_fired >= 10_000_000
        auxk = torch.zeros((), device=x_BMd.device) if dead.sum() == 0 else None   # no dead latents here
        return l2 + auxk / 32

    def _jumprelu_loss(self, x_BMd, z_BF, step):
        """dictionary_learning's JumpReluTrainer step on the dense code: f = JumpReLU(z, θ) with its
        rectangle-kernel STE, the dense decoder, the squared error, the penalty on every [B, F] entry."""
        cfg = self.cfg
        f_BF = JumpReLUFn.apply(z_BF, self.log_threshold.exp(), cfg.jumprelu_bandwidth)
        x_hat = einsum(f_BF, self.W_dec, "b f, m f d -> b m d") + self.b_dec
        mse = (x_BMd - x_hat).pow(2).sum((-2, -1)).mean()
        coeff = cfg.jumprelu_coeff * cfg.n_models * cfg.d_model
        norm_F = self.W_dec.norm(dim=2).sum(0)
        return mse + coeff * torch.tanh(cfg.jumprelu_tanh_c * f_BF * norm_F).sum(-1).mean()

    def _matryoshka_loss(self, x_BMd, f_BF, step):
        """dictionary_learning's MatryoshkaBatchTopKTrainer step: BatchTopK (one top-k over the B·F scores, a
        scatter), then per group the dense slice of the code and decoder added to the running reconstruction."""
        B = x_BMd.shape[0]
        f_BF = self._batchtopk_code(f_BF, step)
        x_rec, loss, start = self.b_dec.expand_as(x_BMd), 0.0, 0
        for end in group_ends(self.cfg):
            x_rec = x_rec + einsum(f_BF[:, start:end], self.W_dec[:, start:end], "b f, m f d -> b m d")
            loss = loss + (x_BMd - x_rec).pow(2).sum((-2, -1)).mean()
            start = end
        with torch.no_grad():
            fired = f_BF.sum(0) > 0
            self.tokens_since_fired += B
            self.tokens_since_fired[fired] = 0
        return loss

    @classmethod
    def from_state(cls, state, cfg):
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "log_threshold"):
            if name in state:
                setattr(self, name, torch.nn.Parameter(state[name].clone()))
        for name in ("steps_since_active", "tokens_since_fired"):
            self.register_buffer(name, state[name].clone())
        self._setup(cfg)
        return self

    def make_optimizer(self, lr):
        return torch.optim.Adam(self.parameters(), lr=lr)

    def train_step(self, opt, sched, x_BMd, step):
        opt.zero_grad()
        self.loss(x_BMd, step).backward()
        opt.step()
        sched.step()


def randn(*shape, seed, device):
    """Standard normal inputs, the same numbers on every device (drawn on the CPU, then moved)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def trained_state(arch, M, d, F, device, fire=0.02, k_frac=0.02, calib=4096, seed=0, x_calib=None):
    """A crosscoder whose latents each fire on a fraction `fire` of the tokens of x_calib [N, M, d]
    (default: a standard normal batch, not the one timed; module docstring)."""
    k = max(1, round(k_frac * F))
    cfg = CrossCoderConfig(n_models=M, d_model=d, dict_size=F, arch=arch, k=k, k_start=k)    # k fixed
    cc = CrossCoder(cfg).to(device)
    if x_calib is None:
        x_calib = randn(calib, M, d, seed=seed + 1, device=device)
    n = len(x_calib)
    with torch.no_grad():
        pre = (x_calib.reshape(n, -1) @ cc.W_enc_FMd.view(F, M * d).t()).sort(0).values
        j = n - max(1, round(fire * n))
        cc.b_enc_F.copy_(-(pre[j - 1] + pre[j]) / 2)  # midway between two tokens: no code sits at ~0
    return cc


def roofline_s(B, D, F, device, repeats, dtype=torch.float32):
    """Seconds of the five plain torch.mm calls a dense step needs: encode x@W_enc, decode f@W_dec,
    dL/df = g@W_dec^T, dL/dW_dec = f^T@g, dL/dW_enc = x^T@dL/dpre (10·B·D·F FLOPs)."""
    x, g = torch.randn(B, D, device=device, dtype=dtype), torch.randn(B, D, device=device, dtype=dtype)
    f, W_enc = torch.randn(B, F, device=device, dtype=dtype), torch.randn(D, F, device=device, dtype=dtype)
    W_dec = torch.randn(F, D, device=device, dtype=dtype)
    calls = [lambda: x @ W_enc, lambda: f @ W_dec, lambda: g @ W_dec.t(), lambda: f.t() @ g, lambda: x.t() @ f]
    return sum(compare(calls, repeats, device))


STEP_SHAPES = [("d=64", 64, 512), ("d=128", 128, 2048), ("d=512", 512, 8192)]
# (state, variant, fraction of tokens each latent fires on): L1 at init and trained; every other variant of
# the table trained (BatchTopK-selecting ones fire on 4% with k = 2% of F, as BatchTopK: the selection halves
# it). The paper's two keep their targets against dictionary_learning; the others must at least beat the
# plain dense reference (target 1.0).
STEP_CASES = [("init", "l1", None), ("trained", "l1", 0.02)] + [
    ("trained", a, 0.04 if v.keeps_top_k else 0.02) for a, v in VARIANTS.items() if a != "l1"]
# peer / ours to reach, (d ≥ 512, smaller d); a case not named here: 1.0
STEP_TARGETS = {("trained", "l1"): (4.0, 1.5), ("trained", "batchtopk"): (3.0, 1.5)}
ROOFLINE_CASE = ("trained", "l1")     # also timed against the matmul roofline
# Timed steps do all the work of a step (Adam included) at an lr too small to move the weights, so the
# hundreds of steps timed all see the state the bench built (a trained code stays ~2% dense).
TIMING_LR = 1e-12
SHAPES = os.environ.get("BENCH_SHAPES")     # e.g. "d=512": time only those (for a quick look)


def _peer_worker(conn, threads, state, cfg, x, lr):
    """The peer in a process of its own, as its users run it (the C library's default allocator: train.py
    and this bench keep freed memory mapped, see common.keep_freed_memory). It answers each request with
    the seconds one of its training steps took."""
    torch.set_num_threads(threads)
    peer = Peer.from_state(state, cfg)
    opt = peer.make_optimizer(lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    step = 10_000
    while (n := conn.recv()) != "stop":
        t0 = time.perf_counter()
        for _ in range(n):
            step += 1
            peer.train_step(opt, sched, x, step)
        conn.send((time.perf_counter() - t0) / n)


class PeerProcess:
    """A callable that times one peer step in the worker process; close() ends the worker."""

    def __init__(self, cc, x, threads, lr=None):
        lr = TIMING_LR if lr is None else lr
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        state = {k: v.detach().cpu() for k, v in Peer(cc).state_dict().items()}
        self.proc = ctx.Process(target=_peer_worker, args=(child, threads, state, cc.cfg, x.cpu(), lr), daemon=True)
        self.proc.start()

    def __call__(self, n=1):
        """Seconds per step of n back-to-back peer steps."""
        self.conn.send(n)
        return self.conn.recv()

    def close(self):
        self.conn.send("stop")
        self.proc.join(30)


def _check_same_objective(cc, x):
    """For L1 the two objectives agree at the same weights (ours sums the squared error over revisions
    where the peer averages: ours = peer + (M − 1)·its MSE), so both sides time the same computation."""
    peer = Peer(cc)
    with torch.no_grad():
        ours = cc.loss(x, step=10_000)["loss"].item()
        f = torch.relu(einsum(x, peer.W_enc, "b m d, m d f -> b m f").sum(1) + peer.b_enc)
        mse = (x - einsum(f, peer.W_dec, "b f, m f d -> b m d") - peer.b_dec).pow(2).sum(-1).mean().item()
        theirs = peer.loss(x, 10_000).item()
    assert abs(ours - (theirs + (cc.cfg.n_models - 1) * mse)) <= 1e-3 * abs(ours), (ours, theirs, mse)


def _ours(cc, x, lr=None, autocast=False):
    lr = TIMING_LR if lr is None else lr
    opt = cc.make_optimizer(lr)
    sched = cc.make_scheduler(opt)
    steps = iter(range(10_000, 10_000_000))
    return lambda: cc.train_step(opt, sched, x, next(steps), autocast=autocast, metrics=False)


def compare_with_peer(cc, x, repeats, dev, threads):
    """Median seconds of our step (here) and the peer's (in its own process, on the same state and
    batch), alternating; on a GPU both run here."""
    peer = Peer(cc)
    if peer.step == peer._l1_loss:         # the objective that agrees with ours at the same weights
        _check_same_objective(cc, x)
    ours = _ours(cc, x)
    if str(dev).startswith("cuda"):
        peer = Peer(cc).to(dev)
        opt = peer.make_optimizer(TIMING_LR)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        steps = iter(range(10_000, 10_000_000))
        return compare([ours, lambda: peer.train_step(opt, sched, x, next(steps))], repeats, dev)
    worker = PeerProcess(cc, x, threads)
    try:
        worker(), ours()                        # warm-up
        t0 = time.perf_counter()
        ours()
        n = max(1, int(0.2 / (time.perf_counter() - t0)))   # each measurement ≥ 0.2 s of back-to-back steps
        t_ours, t_peer = [], []
        for _ in range(repeats):
            t_ours.append(timed(lambda: [ours() for _ in range(n)], dev) / n)
            t_peer.append(worker(n))
    finally:
        worker.close()
    return statistics.median(t_ours), statistics.median(t_peer)


def bench_step(args):
    M, B = 3, (256 if args.tiny else 1024)
    shapes = [("d=64", 64, 512)] if args.tiny else [s for s in STEP_SHAPES if not SHAPES or s[0] in SHAPES.split(",")]
    dev = args.device
    print(f"step: crosscoder.py's training step vs the peer's (dictionary_learning's structure), M={M}, "
          f"batch {B}, fp32, {torch.get_num_threads()} threads", flush=True)
    for name, d, F in shapes:
        repeats = 3 if args.tiny else (3 if d >= 512 else (7 if args.quick else 15))
        x = randn(B, M, d, seed=0, device=dev)
        big = d >= 512
        for state, arch, fire in STEP_CASES:
            if fire is None:
                cc = CrossCoder(CrossCoderConfig(n_models=M, d_model=d, dict_size=F)).to(dev)
            else:
                cc = trained_state(arch, M, d, F, dev, fire=fire)
            t_ours, t_peer = compare_with_peer(cc, x, repeats, dev, args.threads)
            with torch.no_grad():
                l0 = cc.loss(x, step=10_000)["l0"].item()
            target = STEP_TARGETS.get((state, arch), (1.0, 1.0))[0 if big else 1]
            report(f"{name} {arch} {state}: peer {1e3 * t_peer:.1f} ms / ours {1e3 * t_ours:.1f} ms",
                   t_peer / t_ours, target, note=f"L0 {100 * l0 / F:.1f}% of F")
            if (state, arch) == ROOFLINE_CASE:
                roof = roofline_s(B, M * d, F, dev, repeats)
                report(f"{name} l1 trained: our step / the matmul roofline ({1e3 * roof:.1f} ms of torch.mm)",
                       t_ours / roof, None if big else 1.3, higher=False,
                       note="dense-equivalent FLOPs 10·B·M·d·F; < 1 = FLOPs skipped")
            if str(dev).startswith("cuda") and state == "trained":
                _gpu_variants(cc, x, t_ours, dev, repeats)


def bench_scale(args):
    """Step time per token·revision at M = 8 and 16 against M = 3 (trained L1, d=128, F=2048)."""
    d, F, B = (32, 256, 256) if args.tiny else (128, 2048, 1024)
    dev = args.device
    print(f"scale: our step per token·revision at M = 8, 16 vs M = 3 (L1 trained, d={d}, F={F}, batch {B})",
          flush=True)
    per = {}
    for M in (3, 8, 16):
        cc = trained_state("l1", M, d, F, dev, fire=0.02)
        x = randn(B, M, d, seed=0, device=dev)
        per[M] = compare([_ours(cc, x)], 3 if args.tiny else 7, dev)[0] / M
        if M > 3:
            report(f"M={M}: {1e3 * per[M] * M:.1f} ms, per revision / M=3's ({1e3 * per[3] * 3:.1f} ms / 3)",
                   per[M] / per[3], 1.2, higher=False)


def _gpu_variants(cc, x, t_fp32, dev, repeats):
    """On a GPU: the same step under bf16 autocast (train.py --precision bf16), and in fp32 with TF32 matmuls."""
    opt, sched = cc.make_optimizer(5e-5), None
    steps = iter(range(20_000, 10_000_000))
    t_bf16, = compare([lambda: cc.train_step(opt, sched, x, next(steps), autocast=True, metrics=False)], repeats, dev)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        t_tf32, = compare([lambda: cc.train_step(opt, sched, x, next(steps), metrics=False)], repeats, dev)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    report(f"{cc.cfg.arch} step, fp32 {1e3 * t_fp32:.1f} ms / bf16 autocast {1e3 * t_bf16:.1f} ms", t_fp32 / t_bf16)
    report(f"{cc.cfg.arch} step, fp32 {1e3 * t_fp32:.1f} ms / TF32 {1e3 * t_tf32:.1f} ms", t_fp32 / t_tf32)


# ---------------------------------------------------------------------------------------------
# cache: stop-at-layer against a full forward

def neox(n_layers, d, vocab, heads=None, seed=0):
    """A GPT-NeoX built from a config (random weights: speed does not depend on them); heads of 64 dims
    unless given."""
    import transformers as tf
    cfg = tf.GPTNeoXConfig(vocab_size=vocab, num_hidden_layers=n_layers, hidden_size=d,
                           num_attention_heads=heads or d // 64,
                           intermediate_size=4 * d, max_position_embeddings=1024, rotary_pct=0.25,
                           tie_word_embeddings=False)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)


def bench_cache(args):
    from crosscoding import lm
    n_layers, d, vocab, B, T = (4, 64, 512, 2, 32) if args.tiny else (12, 384, 2048, 4, 128)
    L = n_layers // 2 - 1
    print(f"cache: lm.run_to_layer(L={L}) vs a full forward, GPT-NeoX {n_layers} layers, d={d}, vocab {vocab}, "
          f"{B}x{T} tokens", flush=True)
    model = neox(n_layers, d, vocab).to(args.device)
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0)).to(args.device)
    with torch.no_grad():
        x = lm.run_to_layer(model, L, ids)
        ref = lm.forward(model, ids, output_hidden_states=True).hidden_states[L + 1]
        assert torch.allclose(x, ref, atol=1e-4), "run_to_layer differs from output_hidden_states"
        t_stop, t_full = compare([lambda: lm.run_to_layer(model, L, ids), lambda: lm.forward(model, ids)],
                                 3 if args.tiny else (5 if args.quick else 9), args.device)
    ideal = n_layers / (L + 1)
    report(f"stop-at-layer: full {1e3 * t_full:.0f} ms / to layer {L} {1e3 * t_stop:.0f} ms", t_full / t_stop,
           0.8 * ideal, note=f"0.8 x n_layers/(L+1) = 0.8 x {ideal:.1f}")


# ---------------------------------------------------------------------------------------------
# data: train.py's loop from a memmap cache against the bare step

def write_cache(folder, model, revisions, layer, d, rows, seq_len=1024, seed=0):
    """A complete cache in cache_acts.py's on-disk format (bf16 rows, meta.json), of random activations
    with a per-revision scale, written directly (no language model needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    T1 = seq_len - 1
    n_blocks = max(2, math.ceil(rows / T1))
    n_val = max(1, n_blocks // 20)
    g = torch.Generator().manual_seed(seed)
    for m, r in enumerate(revisions):
        mm = np.memmap(folder / f"{r}.bin", dtype=np.uint16, mode="w+", shape=(n_blocks * T1, d))
        for i in range(0, n_blocks * T1, 65536):
            j = min(i + 65536, n_blocks * T1)
            x = (1 + m) * torch.randn(j - i, d, generator=g)
            mm[i:j] = x.bfloat16().view(torch.uint16).numpy()
        mm.flush()
        del mm
    meta = dict(model=str(model), repo=str(model), revisions=list(revisions), layer=layer, text="bench",
                n_blocks=n_blocks, seq_len=seq_len, tokens=n_blocks * T1, d=d, dtype="bf16",
                split=dict(train_blocks=n_blocks - n_val, val_blocks=n_val), fingerprint="bench",
                position0="excluded",
                scales={r: math.sqrt(d) / ((1 + m) * math.sqrt(d)) for m, r in enumerate(revisions)})
    meta["split"]["heldout_tokens"] = 0
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    mark_done(folder)
    return folder


def bench_data(args):
    from crosscoding import activations
    M, d, F, B = (3, 64, 512, 256) if args.tiny else (3, 512, 8192, 1024)
    dev = args.device
    n_batches = 8 if args.tiny else (24 if args.quick else 64)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        folder = write_cache(Path(tmp) / "cache", "bench", ["a", "b", "c"], 0, d, n_batches * B)
        cache = activations.open_cache(folder)
        cache.held = None    # read from the memory map, as a cache larger than PRELOAD_BYTES is
        size = sum(a.nbytes for a in cache.arrays)
        print(f"data: train.py's loop from a memory-mapped cache ({size / 2**20:.0f} MiB, page-cached) vs the bare "
              f"step (L1, M={M}, d={d}, F={F}, batch {B})", flush=True)
        batches = activations.CacheBatches(cache, B, seed=0)
        s_M = torch.tensor(cache.scales, device=dev)
        cc = trained_state("l1", M, d, F, dev)
        opt = cc.make_optimizer(5e-5)
        sched = cc.make_scheduler(opt)
        bare_x = [(batches.batch_at(i).to(dev) * s_M[None, :, None]) for i in range(4)]
        it = {"loop": 10_000, "bare": 10_000}

        def step_on(x, step):
            cc.train_step(opt, sched, x, step, metrics=False)

        def loop():  # train.py's loop body, minus logging and checkpoints
            step = it["loop"] = it["loop"] + 1
            x_BMd = batches.batch_at(step).to(dev, non_blocking=True) * s_M[None, :, None]
            if not torch.isfinite(x_BMd).all():
                raise RuntimeError("NaN in the cache")
            step_on(x_BMd, step)

        def bare():
            step = it["bare"] = it["bare"] + 1
            step_on(bare_x[step % len(bare_x)], step)

        t_loop, t_bare = compare([loop, bare], 3 if args.tiny else (6 if args.quick else 12), dev)
        t_get = statistics.median(timed(lambda i=i: batches.batch_at(it["loop"] + i), dev) for i in range(5))
    report(f"data loading overhead: loop {1e3 * t_loop:.0f} ms / bare step {1e3 * t_bare:.0f} ms - 1",
           t_loop / t_bare - 1, 0.10, fmt="{:.1%}", higher=False,
           note=f"CacheBatches.batch_at alone {1e3 * t_get:.1f} ms; {B / t_loop:.0f} tokens/s")


# ---------------------------------------------------------------------------------------------
# ig: relie.py's batched integrated gradients against one forward/backward per step

def bench_ig(args):
    """Two scales. The toy's, which is what relie.py runs on a CPU here: the 3x target applies to it.
    And a 'tiny-but-not-trivial' 8-layer model, informational: at 16 pairs a CPU is already
    compute-bound there, so the ratio is capped near the block count ratio (see _ig_one)."""
    print(f"ig: relie.ie_gradient, its {10} IG steps batched in one call vs one call per step", flush=True)
    # name, layers, d, heads, vocab, F, target; the first is toy.py's LM (F = 512, twice its default crosscoder's)
    configs = [("toy scale", 2, 64, 4, 113, 512, 3.0)]
    if not args.tiny:
        configs.append(("GPT-NeoX 8 layers", 8, 256, 4, 2048, 4096, None))
    for name, n_layers, d, heads, vocab, F, target in configs:
        _ig_one(args, name, n_layers, d, heads, vocab, F, target)


def _ig_one(args, name, n_layers, d, heads, vocab, F, target, B=16, T=12):
    from types import SimpleNamespace

    from crosscoding import analysis, defaults, lm, tasks
    L, S, dev = n_layers // 2 - 1, defaults.IG_STEPS, args.device
    model = neox(n_layers, d, vocab, heads).to(dev)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):  # left padding, as tasks.tokenize_pairs makes it
        mask[b, : b % 4] = 0
    batch = tasks.PairBatch(ids, mask, torch.randint(0, vocab, (B,), generator=g),
                            torch.randint(0, vocab, (B,), generator=g), ["s"] * B, [None] * B).to(dev)
    with torch.no_grad():
        x = lm.run_to_layer(model, L, batch.ids_BT, batch.mask_BT)
        cc = trained_state("l1", 1, d, F, dev, fire=0.02, x_calib=x.reshape(B * T, 1, d))
        x_hat, f = cc(x.reshape(B * T, 1, d))
        f_BTF, r_BTd = f.view(B, T, F), (x - x_hat.view(B, T, d))
    run = SimpleNamespace(cc=cc, layer=L)
    alphas = [i / S for i in range(S)]
    W, b = cc.W_dec_FMd[:, 0], cc.b_dec_Md[0]
    keep = analysis.splice_mask(batch.mask_BT)[..., None]

    def batched():
        return analysis.ie_gradient(run, model, 0, batch, x, f_BTF, r_BTd, alphas)[0]

    def looped():  # the plain loop: per step, a full forward with a hook splicing the decoded point, a backward
        gf_sum = torch.zeros_like(f_BTF)
        for a in alphas:
            fa = ((1 - a) * f_BTF).requires_grad_(True)
            new = fa @ W + b + (1 - a) * r_BTd
            with lm.patch_layer(model, L, lambda h, new=new: torch.where(keep, new, h)):
                metric = -tasks.logit_diff(lm.forward(model, batch.ids_BT, batch.mask_BT).logits, batch)
            gf_sum += torch.autograd.grad(metric.sum(), fa)[0]
        return -f_BTF * gf_sum / S

    ie = batched()
    diff, scale = (ie - looped()).abs().max().item(), ie.abs().max().item()
    assert scale > 0 and diff <= 1e-4 * scale, (diff, scale)
    t_batch, t_loop = compare([batched, looped], 3 if (args.quick or args.tiny) else 7, dev)
    # Blocks run per IG step: the loop does all N forward and the A = N−L−1 above L backward; batched,
    # only the A above L, forward and backward. With a backward about as costly as a forward (no weight
    # gradients), that bounds what a compute-bound device can gain without batching overhead away.
    A = n_layers - L - 1
    report(f"batched IG, {name} (L={L} of {n_layers}, d={d}, F={F}, {B}x{T} tokens): "
           f"loop {1e3 * t_loop:.0f} ms / batched {1e3 * t_batch:.0f} ms", t_loop / t_batch, target,
           note=f"same IE within {diff / scale:.0e}; block-count ratio {(n_layers + A) / (2 * A):.1f}x")


# ---------------------------------------------------------------------------------------------
# memory: train.py on a cache larger than half its own peak

def _watch_rss(pid, box, stop):
    """Sample the child's resident memory (anonymous and file-backed) until stop is set."""
    while not stop.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            break
        vals = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in status.splitlines())
                if k in ("RssAnon", "RssFile", "VmRSS", "VmHWM")}
        for k, v in vals.items():
            box[k] = max(box.get(k, 0), v)
        stop.wait(0.05)


def _train_child(cmd, tmp):
    """Run train.py (1 thread: this section measures memory) and sample its RSS; (its peak RSS, the
    kernel's VmHWM of the process after exec, and the sampled peaks). Not ru_maxrss: Linux carries the
    forked copy of this (large) process's RSS into the child's ru_maxrss."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env, cwd=tmp)
        box, stop = {}, threading.Event()
        watcher = threading.Thread(target=_watch_rss, args=(child.pid, box, stop), daemon=True)
        watcher.start()
        child.wait()
        stop.set()
        watcher.join()
        if child.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"train.py failed:\n{err.read()[-3000:]}")
    return box.get("VmHWM", 0), box


def bench_memory(args):
    M, d, F, B = 3, 256, 256, 4096
    size_mib = 32 if args.tiny else (512 if args.quick else 1536)
    rows = size_mib * 2**20 // (M * d * 2)
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        tmp = Path(tmp)
        (tmp / "model").mkdir()  # train.py resolves --model to this (empty) local folder; the cache is all it reads
        folder = write_cache(tmp / "cache", tmp / "model", ["a", "b", "c"], 0, d, rows)
        size = sum(f.stat().st_size for f in folder.glob("*.bin"))
        n_train = json.loads((folder / "meta.json").read_text())["split"]["train_blocks"] * 1023
        tokens = n_train // B * B  # one epoch: every training row is read once
        print(f"memory: train.py (subprocess, 1 thread) on a {size / 2**20:.0f} MiB cache, one epoch "
              f"({tokens} tokens), M={M}, d={d}, F={F}, batch {B}", flush=True)
        # cache_acts.Cache.get releases each chunk's pages after reading it (MADV_DONTNEED): without
        # that, the kernel's fault-around leaves every page read in the process's RSS
        run = tmp / "run"
        cmd = [sys.executable, str(HERE / "train.py"), "--model", str(tmp / "model"), "--layer", "0",
               "--revisions", "a,b,c", "--cache", str(folder), "--dict-size", str(F), "--batch-size", str(B),
               "--tokens", str(tokens), "--log-every", str(tokens // B), "--ckpt-every", str(10**9),
               "--out", str(run), "--device", str(args.device)]
        t0 = time.time()
        peak, box = _train_child(cmd, tmp)
        tps = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["tokens_per_s"]
        report(f"train.py: cache {size / 2**20:.0f} MiB / peak RSS {peak / 2**20:.0f} MiB", size / peak, 0.5,
               note=f"sampled peaks: anonymous {box.get('RssAnon', 0) / 2**20:.0f} MiB, file-backed "
                    f"{box.get('RssFile', 0) / 2**20:.0f} MiB; {tps:.0f} tokens/s, {time.time() - t0:.0f} s")


def _shards_rank(rank, world, mode, shape, steps, port, device, out):
    """One rank of the shards section: `steps` timed training steps through train.py's pieces (Ranks,
    loss_module, CrossCoder.train_step, Ranks.sync); writes its numbers to out/<rank>.json."""
    import torch.distributed as dist

    from crosscoding import shards, training
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dev = f"cuda:{rank}" if device == "cuda" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    M, d, F, B = shape
    grid = shards.make_grid(world if mode == "shards" else 1, world, rank, M)
    ranks = training.Ranks(rank, world, grid, grid.revisions(M))
    sent = [0]
    real = dist.all_reduce

    def counting(t, *a, **kw):           # what this rank hands to all-reduce, byte for byte
        sent[0] += t.numel() * t.element_size()
        return real(t, *a, **kw)
    dist.all_reduce = counting
    cfg = CrossCoderConfig(n_models=M, d_model=d, dict_size=F, total_steps=10**6, batch_size=B)
    cc = (shards.ShardedCrossCoder(cfg, grid) if grid.shards > 1 else CrossCoder(cfg)).to(dev)
    cc.group = ranks.data_group
    opt, loss_fn = cc.make_optimizer(), training.loss_module(cc, ranks)
    x = torch.randn(B // grid.replicas, len(ranks.revs), d, generator=torch.Generator().manual_seed(rank)).to(dev)
    times = []
    for step in range(steps + 2):            # 2 warm-up steps
        sent[0] = 0
        dist.barrier()
        t = timed(lambda step=step: (cc.train_step(opt, None, x, step, loss_fn=loss_fn, metrics=False),
                                     ranks.sync(cc, len(x))), device)
        times.append(t)
    n_params = sum(p.numel() for p in cc.parameters())
    grads = n_params * 4 if mode == "ddp" else sent[0]       # DDP's reducer all-reduces every gradient once
    peak = (torch.cuda.max_memory_allocated(dev) if device == "cuda"
            else int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024)
    Path(out, f"{rank}.json").write_text(json.dumps(dict(seconds=statistics.median(times[2:]), bytes=grads,
                                                         params=n_params, peak=peak)))
    dist.barrier()
    dist.destroy_process_group()


def bench_shards(args):
    world = 2
    shapes = [(4, 64, 256, 1024)] + ([] if args.tiny else [(4, 512, 4096, 1024)])
    steps = 3 if args.tiny else (5 if args.quick else 10)
    if args.device == "cuda" and torch.cuda.device_count() < world:
        print(f"shards: skipped ({torch.cuda.device_count()} GPU(s); the section needs {world})", flush=True)
        return
    print(f"shards: {world} processes ({'nccl' if args.device == 'cuda' else 'gloo'}), M=4, batch 1024, L1 at init; "
          f"revision shards (each 2 revisions, the whole batch) against DDP (each 4 revisions, half the batch)",
          flush=True)
    for i, shape in enumerate(shapes):
        res = {}
        for j, mode in enumerate(("ddp", "shards")):
            with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
                torch.multiprocessing.start_processes(
                    _shards_rank, args=(world, mode, shape, steps, 29750 + 4 * i + j, args.device, tmp),
                    nprocs=world, start_method="spawn")
                res[mode] = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]
        M, d, F, B = shape
        ddp, sh = res["ddp"][0], res["shards"][0]
        mib = lambda b: f"{b / 2**20:.1f} MiB"
        report(f"d={d} F={F}: step DDP {1e3 * ddp['seconds']:.0f} ms / revision shards {1e3 * sh['seconds']:.0f} ms",
               ddp["seconds"] / sh["seconds"],
               note=f"all-reduced per step per rank: DDP {mib(ddp['bytes'])}, shards {mib(sh['bytes'])}")
        report(f"d={d} F={F}: params per rank, DDP {ddp['params']} / shards {sh['params']}",
               ddp["params"] / sh["params"],
               note=f"peak {'GPU memory' if args.device == 'cuda' else 'RSS'} per rank: DDP "
                    f"{mib(max(r['peak'] for r in res['ddp']))}, shards {mib(max(r['peak'] for r in res['shards']))}")


# ---------------------------------------------------------------------------------------------
# live: train.py's live buffer (the LMs run on the text while the crosscoder trains), refilled in a producer
# thread against the synchronous refill

PAPER_TOKENS = 400_000_000
REVISIONS = ("step512", "step2000", "step143000")


def small_neox():
    """A small GPT-NeoX spec (random weights, the toy text's stand-in tokenizer): the live section's CPU shape."""
    from crosscoding import lm
    arch = ("GPTNeoXConfig", dict(vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=512, rotary_pct=0.25, max_position_embeddings=2048,
                                  use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0,
                                  eos_token_id=0))
    return dataclasses.replace(lm.MODELS["pythia-70m"], key="bench-neox", arch=arch, tokenizer_size=256)


def live_shape(args):
    """The paper's on a GPU (pythia-1b to block 8, 3 revisions, random weights, d 2048, F 16384, batch 4096,
    1024-token blocks, its 524,288-row buffer); a small one on a CPU and with --tiny."""
    from crosscoding import lm
    if str(args.device).startswith("cuda") and not args.tiny:
        return dict(name="paper shape (pythia-1b L8, d=2048, F=16384, batch 4096)", spec=lm.MODELS["pythia-1b"],
                    layer=8, T=1024, B=4096, F=16384, buffer=defaults.PAPER.buffer_tokens, lm_batch=32,
                    windows=3 if args.quick else 5)
    return dict(name="small shape (GPT-NeoX 2 of 4 blocks, d=128, F=1024, batch 512)", spec=small_neox(), layer=1,
                T=64, B=512, F=1024, buffer=4096, lm_batch=8, windows=2 if args.tiny else (4 if args.quick else 8))


def live_models(spec, layer, device):
    """The revisions' LMs as train.py holds them: random weights, the device's dtype (bf16 on a GPU), blocks 0..L."""
    from crosscoding import cli, lm
    models = [(r, *lm.load(spec, r, device=device, dtype=cli.dtype(None, device), weights="random"))
              for r in REVISIONS]
    for _, model, _ in models:
        lm.keep_through(model, layer)
    return models


def live_run(models, shape, overlap, device):
    """train.py's loop on a live buffer (its data, step and laps; no logging, validation or checkpoints) for
    shape['windows'] windows after the first (filled before the clock starts, as in train.py): the phase times
    (training.phase_times), tokens/s and the last batch."""
    from crosscoding import activations, training
    layer, T, B, F = shape["layer"], shape["T"], shape["B"], shape["F"]
    gpu = str(device).startswith("cuda")
    blocks = training.block_stream("toy", models[0][2], T, T)
    probe = activations.LiveBuffer(models, layer, blocks, T, shape["buffer"], 10**12, 0, device)
    steps = (shape["windows"] + 1) * probe.per_window(B)
    buf = activations.LiveBuffer(models, layer, blocks, T, shape["buffer"], steps * B, seed=0, device=device,
                                 lm_batch=shape["lm_batch"], overlap=overlap)
    revs = [r for r, _, _ in models]
    batches = training.Prefetch(lambda step: buf.batch_at(step, B), revs, device, 0, steps,
                                ready=lambda step: buf.ready(step, B))
    try:
        x0 = buf.batch_at(0, B)
        s_M = torch.tensor([activations.norm_scale(x0[:, m]) for m in range(len(models))], device=device)[:, None]
        cc = trained_state("l1", len(models), x0.shape[-1], F, device, x_calib=x0 * s_M)
        opt = cc.make_optimizer(TIMING_LR)
        first = buf.per_window(B)                    # the first window's steps are not timed: the others refill
        for step in range(first):
            x_BMd = batches.get(step) * s_M
            cc.train_step(opt, None, x_BMd, step, autocast=gpu, metrics=False)
        sync(device)
        clock, base, t0 = activations.Laps(device), dict(buf.times), time.perf_counter()
        for step in range(first, steps):
            batches.wait(step)
            clock.lap("wait")
            x_BMd = batches.get(step) * s_M
            clock.lap("copy")
            cc.train_step(opt, None, x_BMd, step, autocast=gpu, metrics=False)
            clock.lap("step")
        sync(device)
        wall = time.perf_counter() - t0
    finally:
        buf.close()
    t = training.phase_times(clock, buf, base, wall)
    return dict(t, tokens_per_s=(steps - first) * B / wall, last=x_BMd.cpu(), steps=steps - first)


def bench_live(args):
    shape = live_shape(args)
    dev = args.device
    t0 = time.time()
    models = live_models(shape["spec"], shape["layer"], dev)
    attn = models[0][1].config._attn_implementation
    print(f"live: train.py's live buffer at the {shape['name']}, 3 revisions, {shape['windows']} windows after the "
          f"first; LMs {models[0][1].dtype} ({attn} attention, built in {time.time() - t0:.0f} s); the refill in a "
          f"producer thread{' and CUDA stream' if str(dev).startswith('cuda') else ''} (overlap) against the "
          "synchronous refill (sync, train.py --refill sync)", flush=True)
    rounds = 1 if (args.tiny or shape["spec"].key == "pythia-1b") else (2 if args.quick else 3)
    runs = {"sync": [], "overlap": []}
    for _ in range(rounds):                  # alternating, so a load that comes and goes hits both alike
        for mode in runs:
            runs[mode].append(live_run(models, shape, mode == "overlap", dev))
    same = torch.equal(runs["sync"][-1]["last"], runs["overlap"][-1]["last"])
    res = {mode: min(rs, key=lambda r: abs(r["tokens_per_s"] - statistics.median(x["tokens_per_s"] for x in rs)))
           for mode, rs in runs.items()}     # the median round of each
    for mode, r in res.items():
        w = r["wall"]
        breakdown = (f"of {w:.1f} s: LM forward {r['lm_forward']:.1f} s, buffer shuffle/copy {r['buffer_copy']:.1f} s, "
                     f"step {r['step']:.1f} s, wait {r['wait']:.1f} s; median of {rounds}")
        goal = 90_000 if (mode == "overlap" and shape["spec"].key == "pythia-1b") else None
        report(f"live {mode}: tokens/s ({r['steps']} steps)", r["tokens_per_s"], goal, fmt="{:.0f}", note=breakdown)
        report(f"live {mode}: crosscoder step's share of the wall time", r["step"] / w, fmt="{:.1%}")
        report(f"live {mode}: wall time waiting on the buffer", r["wait"] / w, fmt="{:.1%}")
    paper = shape["spec"].key == "pythia-1b"
    best = res["overlap"]["tokens_per_s"]
    report("live: overlapped refill / synchronous, tokens/s", best / res["sync"]["tokens_per_s"],
           note=f"the same batches: {'yes' if same else 'NO'}")
    where = "the paper's run" if paper else "at this shape, NOT the paper's"
    report(f"live: {PAPER_TOKENS // 10**6}M tokens, overlapped, projected", PAPER_TOKENS / best / 3600,
           75 / 60 if paper else None, fmt="{:.2f} h", higher=False,
           note=where + ("; the goal: ≥ 90000 tokens/s on one H200" if paper else ""))
    if not same:
        print("  note: the two refills served different last batches: the LMs' forwards differ between the "
              "threads (kernels chosen per stream?); see crosscoding/activations.LiveBuffer", flush=True)


# ---------------------------------------------------------------------------------------------
# --paper: the one script a developer lent a GPU runs (≤ 8 minutes on one H200), or at a tiny shape on a CPU

def paper_gpu(args):
    return str(args.device).startswith("cuda") and not args.tiny


def paper_step(args):
    """The crosscoder's training step at the paper's shape (M = 3, d = 2048, F = 16384, batch 4096, bf16 autocast as
    train.py --precision bf16), L1 and BatchTopK k = 200 in a trained state, against its roofline: the five
    matmuls of a dense step in bf16 (fp32 and a tiny shape on a CPU)."""
    gpu = paper_gpu(args)
    M, d, F, B = (3, 2048, 16384, 4096) if gpu else (3, 64, 512, 256)
    dev, repeats = args.device, (20 if gpu else 3)
    print(f"paper step: CrossCoder.train_step, M={M}, d={d}, F={F}, batch {B}, "
          f"{'bf16 autocast' if gpu else 'fp32'}, median of {repeats}", flush=True)
    x = randn(B, M, d, seed=0, device=dev)
    roof = roofline_s(B, M * d, F, dev, repeats, dtype=torch.bfloat16 if gpu else torch.float32)
    flop = 10 * B * M * d * F
    for arch, fire in (("l1", 0.02), ("batchtopk", 0.04)):
        cc = trained_state(arch, M, d, F, dev, fire=fire, k_frac=(200 if gpu else 10) / F)
        t, = compare([_ours(cc, x, autocast=gpu)], repeats, dev)
        report(f"paper step {arch}: {1e3 * t:.2f} ms / roofline {1e3 * roof:.2f} ms", t / roof, fmt="{:.2f}x",
               higher=False, note=f"{B / t:.0f} tokens/s, {flop / t / 1e12:.0f} TFLOP/s dense-equivalent")


def _stage(cmd, cwd, env):
    """Seconds a stage script took, as its users run it (a process of its own); its error when it fails."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]], cwd=cwd, env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-1500:]}")
    return time.perf_counter() - t0


def paper_stages(args):
    """train.py, evaluate.py, relie.py and ablate.py, each as a process of its own with its defaults, on a run of
    the paper's shape with random weights (pythia-1b, layer 8, F = 16384; 20 steps of 4096): wall times from the
    start of the process (building the models included). On a CPU: pythia-70m at small sizes."""
    gpu = paper_gpu(args)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if gpu:
        model, train = "pythia-1b", ["--tokens", str(4096 * 20), "--dict-size", "16384", "--precision", "bf16",
                                     "--heldout-tokens", "65536"]
        later = {"evaluate.py": [], "relie.py": [], "ablate.py": []}
    else:
        model, train = "pythia-70m", ["--tokens", "2048", "--batch-size", "1024", "--dict-size", "1024",
                                      "--seq-len", "64", "--heldout-tokens", "4096"]
        later = {"evaluate.py": ["--blocks", "2"],
                 "relie.py": ["--max-pairs", "2", "--context-blocks", "2", "--threshold", "0"],
                 "ablate.py": ["--max-pairs", "2", "--draws", "1"]}
    print(f"paper stages: {model} with random weights, each stage a process of its own, on {args.device}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-paper-") as tmp:
        run = str(Path(tmp) / "run")
        t = _stage(["train.py", "--model", model, "--weights", "random", "--device", str(args.device), "--out", run,
                    *train], tmp, env)
        log = json.loads(Path(run, "log.jsonl").read_text().splitlines()[-1])
        report(f"paper stages: train.py, {log['step']} steps (start-up included)", t, fmt="{:.0f} s", higher=False,
               note=f"{log['tokens_per_s']:.0f} tokens/s; " + training_times(log["time"]))
        for script, extra in later.items():
            t = _stage([script, "--run", run, "--device", str(args.device), *extra], tmp, env)
            target = 60 if (gpu and script == "evaluate.py") else None
            report(f"paper stages: {script} (start-up included)", t, target, fmt="{:.0f} s", higher=False)


def training_times(t):
    from crosscoding import training
    return training.format_times(t)


PAPER_PARTS = (("step", "paper_step"), ("live", "bench_live"), ("stages", "paper_stages"))


def paper_check(args):
    """Every part in turn; a part that fails prints its error and the others still run. Returns the failed parts.
    Without a GPU every part runs at its tiny shape: it shows the script runs, not how fast."""
    if not str(args.device).startswith("cuda"):
        args.tiny = True
    failed = []
    for name, fn in PAPER_PARTS:
        try:
            globals()[fn](args)
        except Exception as e:     # noqa: BLE001 - one crash must not lose the other numbers
            failed.append(f"{name}: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
            print(f"  {name}: FAILED, the other parts go on ({failed[-1]})", flush=True)
            traceback.print_exc(file=sys.stderr)
    return failed


def paper_markdown(args, seconds, failed) -> str:
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if str(args.device).startswith("cuda") else "CPU"
    import transformers
    rows = "\n".join(f"| {n} | {v} | {w} | {k} | {note} |" for n, v, w, k, note in LINES)
    fails = "".join(f"\n- **failed** {f}" for f in failed)
    return (f"## The paper's shape on one device (`python3 bench.py --paper --device {args.device}"
            f"{' --tiny' if args.tiny else ''} --results`)\n\n"
            f"Measured on {gpu}, torch {torch.__version__}, transformers {transformers.__version__}, in {seconds:.0f} s"
            f"{'' if paper_gpu(args) else ' (a tiny shape: the numbers say only that it runs)'}. Random weights "
            "(nothing downloaded); the step against its roofline (five dense matmuls), the live path's two refills "
            "side by side, and each stage's wall time as a process of its own." + fails +
            f"\n\n| measurement | value | target | | note |\n|---|---|---|---|---|\n{rows}")


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, a smaller memory run (≤ 3 minutes)")
    p.add_argument("--tiny", action="store_true", help="toy sizes, for the smoke test (numbers mean nothing)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    cli.add(p, "--device", device=defaults.default_device())
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    cli.add(p, "--results")     # RESULTS.md: section bench, bench-<sections> with --only, paper-check with --paper
    p.add_argument("--paper", action="store_true", help="instead of the sections: the GPU check (the step at the "
                   "paper's shape against its roofline, the live path, each analysis stage's wall time; a tiny shape "
                   "on a CPU)")
    args = p.parse_args(argv)
    only = args.only.split(",")
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        p.error(f"--only: unknown section(s) {bad}; valid: {','.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    keep_freed_memory()     # as train.py does
    load = os.getloadavg()[0]
    print(f"bench.py: torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"load average {load:.1f} at start", flush=True)
    if load > 1.0 and str(args.device) == "cpu":
        print(f"  note: other processes are using the CPU (load {load:.1f}); when they take the cores this bench's "
              "threads want, every parallel op waits for a core and the ratios drift: rerun on a quiet machine",
              flush=True)
    t0 = time.time()
    if args.paper:
        failed = paper_check(args)
        print(f"done in {time.time() - t0:.0f} s" + (f"; FAILED: {'; '.join(failed)}" if failed else ""), flush=True)
        if args.results:
            update_results("paper-check", paper_markdown(args, time.time() - t0, failed), HERE / "RESULTS.md")
            print("wrote RESULTS.md (section paper-check)", flush=True)
        return
    for name in only:
        globals()[f"bench_{name}"](args)
        print(f"  (load average {os.getloadavg()[0]:.1f})", flush=True)
    n_fail = sum(not ok for *_, ok in RESULTS)
    print(f"done in {time.time() - t0:.0f} s: {len(RESULTS) - n_fail} PASS, {n_fail} FAIL; "
          f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    if args.results:     # a run of some sections writes a section of its own, leaving the full table as it was
        name = "-".join(["bench"] + ([] if set(only) == set(SECTIONS) else only) + ([] if args.device == "cpu"
                                                                                    else [str(args.device)]))
        update_results(name, results_markdown(args, time.time() - t0, load, os.getloadavg()[0]), HERE / "RESULTS.md")
        print(f"wrote RESULTS.md (section {name})", flush=True)


if __name__ == "__main__":
    run_main(main)
