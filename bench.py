"""bench.py — the toolkit's hot loops against their slow references, side by side, as ratios.

    python bench.py --quick                  # every section, fewer repeats: ≤ 2 minutes on 2 CPU cores
    python bench.py                          # every section, more repeats and a larger memory run
    python bench.py --only step --quick      # one or more sections: step, cache, data, ig, memory
    python bench.py --device cuda            # the same on a GPU

Every number is a median over repeats that alternate the two sides (same inputs, same threads), so
a load that comes and goes hits both alike; each line prints its target and PASS/FAIL.

  step    crosscoder training step (forward, loss, backward, grad clip, Adam) of crosscoder.py
          against the seed's way (dense einsum encode/decode with a revision axis, decoder norms
          recomputed, plain Adam), L1 and BatchTopK, M=3, d=512, F=8192, batch 1024, fp32, in a
          trained state (below); and the fraction of the matmul roofline the L1 step reaches.
  cache   stop-at-layer (lm.run_to_layer) against a full forward, GPT-NeoX 12 layers, L mid-depth.
  data    train.py's loop from a memmap cache (CacheBatches.batch_at, the device copy, the NaN
          check, the step) against the bare step on a preloaded batch.
  ig      relie.ie_gradient (its 10 integrated-gradient steps batched, only the blocks above L run)
          against the seed's way: per step, a full forward with a hooked splice and a backward.
  memory  train.py (subprocess) on a cache larger than half the process's own peak RSS.

The trained state: a freshly initialised crosscoder has ~half its latents firing per token; after
the first few percent of a real run, 1-3% do. The bench builds that state directly: W_enc and
W_dec are the init (random directions, decoder rows of norm 0.08), the inputs are standard normal
per revision (so ||x_m|| ≈ √d, as after the pipeline's normalisation), and b_enc[i] is set to minus
the (1 - p) quantile of latent i's pre-activation on a separate calibration batch, so each latent
fires on a fraction p of tokens: L1 p = 2%; BatchTopK p = 4% with k = 2% of F (the selection keeps
half of the positive codes). Steps are timed at step 10000 (λ warmed up, k annealed, θ updating);
no latent is dead (AuxK off, as in a healthy run). L0 is printed after timing.
"""
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cli  # noqa: E402
import defaults  # noqa: E402
from common import ArgumentParser, mark_done, run_main  # noqa: E402
from crosscoder import CrossCoder, CrossCoderConfig  # noqa: E402

SECTIONS = ("step", "cache", "data", "ig", "memory")
RESULTS = []


def report(name, value, target=None, fmt="{:.2f}x", higher=True, note=""):
    """One result line: value, target and PASS/FAIL (no target: informational)."""
    line = f"  {name:<58} {fmt.format(value):>10}"
    if target is not None:
        ok = value >= target if higher else value <= target
        line += f"   target {'≥' if higher else '≤'} {fmt.format(target):<8} {'PASS' if ok else 'FAIL'}"
        RESULTS.append((name, value, target, ok))
    if note:
        line += f"   ({note})"
    print(line, flush=True)


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
# step: crosscoder.py's training step against the seed's way

class SeedWay(torch.nn.Module):
    """The seed's crosscoder step (ckkissane's crosscoder, which the seed extended to BatchTopK):
    einsum with a revision axis, decoder norms recomputed, dense BatchTopK mask, dense decode."""

    def __init__(self, cc):
        super().__init__()
        self.W_enc = torch.nn.Parameter(cc.W_enc_MdF.detach().clone())
        self.b_enc = torch.nn.Parameter(cc.b_enc_F.detach().clone())
        self.W_dec = torch.nn.Parameter(cc.W_dec_FMd.detach().clone())
        self.b_dec = torch.nn.Parameter(cc.b_dec_Md.detach().clone())
        self.arch, self.l1_coeff, self.k = cc.cfg.arch, cc.cfg.l1_coeff, cc.cfg.k

    def loss(self, x_BMd):
        acts = torch.relu(torch.einsum("bmd,mdf->bf", x_BMd, self.W_enc) + self.b_enc)
        total_decoder_norm = self.W_dec.norm(dim=-1).sum(-1)
        if self.arch == "batchtopk":
            score = (acts * total_decoder_norm).detach().flatten()
            keep = torch.zeros_like(score, dtype=torch.bool)
            keep[score.topk(self.k * x_BMd.shape[0]).indices] = True
            acts = acts * keep.view_as(acts)
        x_hat = torch.einsum("bf,fmd->bmd", acts, self.W_dec) + self.b_dec
        mse = (x_hat - x_BMd).pow(2).sum(-1).sum(-1).mean()
        if self.arch == "l1":
            return mse + self.l1_coeff * (acts * total_decoder_norm[None, :]).sum(-1).mean()
        return mse


def trained_state(arch, M, d, F, device, fire=0.02, k_frac=0.02, calib=4096, seed=0, x_calib=None):
    """A crosscoder whose latents each fire on a fraction `fire` of the tokens of x_calib [N, M, d]
    (default: a standard normal batch, not the one timed; module docstring)."""
    cfg = CrossCoderConfig(n_models=M, d_model=d, dict_size=F, arch=arch, k=max(1, round(k_frac * F)),
                           k_start=max(1, round(k_frac * F)))
    cc = CrossCoder(cfg).to(device)
    if x_calib is None:
        g = torch.Generator(device=device).manual_seed(seed + 1)
        x_calib = torch.randn(calib, M, d, generator=g, device=device)
    n = len(x_calib)
    with torch.no_grad():
        pre = (x_calib.reshape(n, -1) @ cc.W_enc_MdF.view(M * d, F)).sort(0).values
        j = n - max(1, round(fire * n))
        cc.b_enc_F.copy_(-(pre[j - 1] + pre[j]) / 2)  # midway between two tokens: no code sits at ~0
    return cc


def step_fn(loss_fn, params, opt):
    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return step


def roofline_s(B, D, F, device, repeats):
    """Seconds of the five plain torch.mm calls a dense step needs: encode x@W_enc, decode f@W_dec,
    dL/df = g@W_dec^T, dL/dW_dec = f^T@g, dL/dW_enc = x^T@dL/dpre (10·B·D·F FLOPs)."""
    x, g = torch.randn(B, D, device=device), torch.randn(B, D, device=device)
    f, W_enc = torch.randn(B, F, device=device), torch.randn(D, F, device=device)
    W_dec = torch.randn(F, D, device=device)
    calls = [lambda: x @ W_enc, lambda: f @ W_dec, lambda: g @ W_dec.t(), lambda: f.t() @ g, lambda: x.t() @ f]
    return sum(compare(calls, repeats, device))


def bench_step(args):
    M, d, F, B = (3, 64, 512, 256) if args.tiny else (3, 512, 8192, 1024)
    print("step: crosscoder training step, crosscoder.py vs the seed's way "
          f"(M={M}, d={d}, F={F}, batch {B}, fp32, {torch.get_num_threads()} threads)", flush=True)
    dev = args.device
    repeats = 3 if args.tiny else (5 if args.quick else 9)
    x = torch.randn(B, M, d, generator=torch.Generator(device=dev).manual_seed(0), device=dev)
    roof = None
    for arch, fire, target in (("l1", 0.02, 1.5), ("batchtopk", 0.04, 2.5)):
        cc = trained_state(arch, M, d, F, dev, fire=fire)
        seed = SeedWay(cc)
        opt_cc = cc.make_optimizer(5e-5)
        opt_seed = torch.optim.Adam(seed.parameters(), lr=5e-5, betas=(0.9, 0.999))  # plain: the default
        steps = iter(range(10_000, 10_000_000))
        fast = step_fn(lambda cc=cc, steps=steps: cc.loss(x, step=next(steps))["loss"], list(cc.parameters()), opt_cc)
        slow = step_fn(lambda seed=seed: seed.loss(x), list(seed.parameters()), opt_seed)
        t_fast, t_slow = compare([fast, slow], repeats, dev)
        with torch.no_grad():
            l0 = cc.loss(x, step=10_000)["l0"].item()
        report(f"{arch} step: seed's way {1e3 * t_slow:.0f} ms / crosscoder.py {1e3 * t_fast:.0f} ms",
               t_slow / t_fast, target, note=f"L0 {l0:.0f} = {100 * l0 / F:.1f}% of F")
        if arch == "l1":
            roof = roofline_s(B, M * d, F, dev, repeats)
            report(f"l1 step, fraction of the matmul roofline ({1e3 * roof:.0f} ms of torch.mm)", roof / t_fast, 0.6,
                   fmt="{:.0%}", note="dense-equivalent FLOPs 10·B·M·d·F; > 100% = FLOPs skipped")
            report("l1 step, the seed's way, fraction of the same roofline", roof / t_slow, fmt="{:.0%}")
            # what the fast path executes: the dense encoder matmul, and 4 products over the active entries
            done = roof / 5 * (1 + 4 * l0 / F)
            report("l1 step, executed FLOPs at the torch.mm rate / step time (informational)", done / t_fast,
                   fmt="{:.0%}", note="the sparse products are memory-bound, not FLOP-bound")
        if str(dev).startswith("cuda"):
            _gpu_variants(cc, x, t_fast, dev, repeats)
    return roof


def _gpu_variants(cc, x, t_fp32, dev, repeats):
    """On a GPU: the same step under bf16 autocast (train.py --dtype bf16), and in fp32 with TF32 matmuls."""
    opt = cc.make_optimizer(5e-5)
    steps = iter(range(20_000, 10_000_000))

    def loss_bf16():
        with torch.autocast("cuda", torch.bfloat16):
            return cc.loss(x, step=next(steps))["loss"]

    t_bf16, = compare([step_fn(loss_bf16, list(cc.parameters()), opt)], repeats, dev)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        t_tf32, = compare([step_fn(lambda: cc.loss(x, step=next(steps))["loss"], list(cc.parameters()), opt)],
                          repeats, dev)
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
    import lm
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
    import activations
    M, d, F, B = (3, 64, 512, 256) if args.tiny else (3, 512, 8192, 1024)
    dev = args.device
    n_batches = 8 if args.tiny else (24 if args.quick else 64)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        folder = write_cache(Path(tmp) / "cache", "bench", ["a", "b", "c"], 0, d, n_batches * B)
        cache = activations.open_cache(folder)
        size = sum(a.nbytes for a in cache.arrays)
        print(f"data: train.py's loop from a cache ({size / 2**20:.0f} MiB, page-cached) vs the bare step "
              f"(L1, M={M}, d={d}, F={F}, batch {B})", flush=True)
        batches = activations.CacheBatches(cache, B, seed=0)
        s_M = torch.tensor(cache.scales, device=dev)
        cc = trained_state("l1", M, d, F, dev)
        opt = cc.make_optimizer(5e-5)
        sched = cc.make_scheduler(opt)
        bare_x = [(batches.batch_at(i).to(dev) * s_M[None, :, None]) for i in range(4)]
        it = {"loop": 10_000, "bare": 10_000}

        def step_on(x, step):
            out = cc.loss(x, step=step)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(cc.parameters(), 1.0)
            opt.step()
            sched.step()

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
    # name, layers, d, heads, vocab, F, target; the first is toy.py's LM and its default crosscoder
    configs = [("toy scale", 2, 64, 4, 113, 512, 3.0)]
    if not args.tiny:
        configs.append(("GPT-NeoX 8 layers", 8, 256, 4, 2048, 4096, None))
    for name, n_layers, d, heads, vocab, F, target in configs:
        _ig_one(args, name, n_layers, d, heads, vocab, F, target)


def _ig_one(args, name, n_layers, d, heads, vocab, F, target, B=16, T=12):
    from types import SimpleNamespace

    import analysis
    import defaults
    import lm
    import tasks
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

    def looped():  # the seed's way: per step, a full forward with a hook splicing the decoded point, a backward
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
                if k in ("RssAnon", "RssFile", "VmRSS")}
        for k, v in vals.items():
            box[k] = max(box.get(k, 0), v)
        stop.wait(0.05)


def _train_child(cmd, tmp):
    """Run train.py (1 thread: this section measures memory) and sample its RSS; (ru_maxrss, sampled peaks)."""
    import resource
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)
    box, stop = {}, threading.Event()
    watcher = threading.Thread(target=_watch_rss, args=(child.pid, box, stop), daemon=True)
    watcher.start()
    _, err = child.communicate()
    stop.set()
    watcher.join()
    if child.returncode != 0:
        raise RuntimeError(f"train.py failed:\n{err[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # RUSAGE_CHILDREN keeps the largest child's peak: a smaller later child does not show; use the sample then
    return (peak * 1024 if peak > before else box.get("VmRSS", 0)), box


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


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, a smaller memory run (≤ 2 minutes)")
    p.add_argument("--tiny", action="store_true", help="toy sizes, for the smoke test (numbers mean nothing)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    cli.add(p, "--device", device=defaults.default_device())
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    args = p.parse_args(argv)
    only = args.only.split(",")
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        p.error(f"--only: unknown section(s) {bad}; valid: {','.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"bench.py: torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"load average {load:.1f} at start", flush=True)
    if load > 1.0 and str(args.device) == "cpu":
        print(f"  note: other processes are using the CPU (load {load:.1f}); when they take the cores this bench's "
              "threads want, every parallel op waits for a core and the ratios drift: rerun on a quiet machine",
              flush=True)
    t0 = time.time()
    for name in only:
        globals()[f"bench_{name}"](args)
        print(f"  (load average {os.getloadavg()[0]:.1f})", flush=True)
    n_fail = sum(not ok for *_, ok in RESULTS)
    print(f"done in {time.time() - t0:.0f} s: {len(RESULTS) - n_fail} PASS, {n_fail} FAIL; "
          f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)


if __name__ == "__main__":
    run_main(main)
