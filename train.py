"""train.py — train ONE sparse crosscoder over layer L of several checkpoints.

    python train.py                                   # the toy model (after `python toy.py`), ~1 minute on a CPU
    python train.py --model pythia-1b --layer 8       # the paper's run (GPU, network): live buffer, 400M tokens
    python train.py --cache cache/toy-L0-step64_step128_step512 --arch batchtopk
    torchrun --nproc_per_node=2 train.py ...          # data-parallel (gloo on CPU, nccl on GPU)

Activations come from a cache (made by cache_acts.py; the toy's preset makes its cache first, saying
so) or from a live buffer that runs the checkpoints on the text's training split. Validation and the
normalisation scales s_m come from the held-out split. The crosscoder trains on s_m·x_m; the saved
one has the scales folded in, so it acts on raw activations.

Run folder (runs/<name>/): config.json + crosscoder.safetensors, then DONE; log.jsonl per logging
step; ckpt/<step>/ (weights, optimizer, schedule, RNG, the live buffer's text position) every
--ckpt-every steps, so --resume continues after a kill and ends with the weights of an
uninterrupted run.
"""
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from crosscoding import cli, common, defaults, lm, tasks
from crosscoding.activations import (
    CacheBatches,
    LiveBuffer,
    layer_acts,
    load_models,
    make_cache,
    norm_scale,
    open_cache,
)
from crosscoding.common import UsageError, positive
from crosscoding.crosscoder import CrossCoder, CrossCoderConfig


def parse_args(argv=None):
    spec = cli.model_in(argv)
    pre = spec.preset
    p = cli.parser(__doc__.split("\n\n")[0], pre)
    cli.add(p, "--model", "--layer", "--revisions", "--weights", "--arch", "--batch-size", "--tokens", "--seed",
            "--device", "--model-dtype", "--text", "--seq-len", "--heldout-tokens", "--out", "--overwrite",
            model=spec.key, layer=spec.layer, revisions=",".join(spec.revisions) or None, weights="hub",
            arch=defaults.ARCH, batch_size=pre.batch_size, tokens=pre.tokens, seed=0,
            device=defaults.default_device(), text=spec.text, seq_len=pre.seq_len,
            heldout_tokens=pre.heldout_tokens, out=None)
    p.add_argument("--cache", default=None, help="activation cache folder made by cache_acts.py (default: "
                   + ("the toy's, made first if missing" if pre.data == "cache" else "none: a live buffer") + ")")
    p.add_argument("--dict-size", type=positive("--dict-size"), default=pre.dict_size,
                   help="latents F (default: %(default)s)")
    p.add_argument("--lr", type=cli.finite_positive("--lr"), default=pre.lr, help="Adam's lr (default: %(default)s)")
    p.add_argument("--l1-coeff", type=cli.finite_nonnegative("--l1-coeff"), default=pre.l1_coeff,
                   help="λ, the L1 penalty's weight after its warm-up (default: %(default)s)")
    p.add_argument("--k", type=positive("--k"), default=pre.k,
                   help="BatchTopK: latents per token (default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="the crosscoder's matmuls: fp32, or bf16 autocast on a GPU (the loss sums stay fp32) "
                        "(default: %(default)s)")
    p.add_argument("--buffer-tokens", type=positive("--buffer-tokens"), default=pre.buffer_tokens,
                   help="live buffer: token positions held on the device (default: %(default)s)")
    p.add_argument("--log-every", type=positive("--log-every"), default=None, help="default: 1/20 of the steps")
    p.add_argument("--ckpt-every", type=positive("--ckpt-every"), default=None, help="default: 1/10 of the steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss (GPU)")
    p.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to Weights & Biases")
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: --resume continues the run in "
                         "--out, --overwrite starts it again")
    if args.layer is None:
        raise UsageError(f"--layer is required for {args.model}")
    args.revisions = args.revisions.split(",") if args.revisions else []
    if len(args.revisions) < 2:
        raise UsageError(f"--revisions needs at least 2 revisions to crosscode, got {args.revisions}")
    if len(set(args.revisions)) != len(args.revisions):
        raise UsageError(f"--revisions lists a revision twice: {args.revisions}")
    args.steps = args.tokens // args.batch_size
    if args.steps < 1:
        raise UsageError(f"--tokens {args.tokens} is less than one batch of {args.batch_size}")
    args.log_every = args.log_every or max(1, args.steps // 20)
    args.ckpt_every = args.ckpt_every or max(1, args.steps // 10)
    if args.arch == "batchtopk" and args.k > args.dict_size:
        raise UsageError(f"--k {args.k} exceeds --dict-size {args.dict_size}")
    args.text = cli.given(argv, "--text") or lm.default_text(spec, args.weights)
    if args.cache is None and pre.data == "cache" and args.weights == "hub":
        args.cache = str(defaults.cache_dir(spec.key, args.layer, args.revisions))
        args.make_cache = True
    else:
        args.make_cache = False
    args.out = Path(args.out or defaults.run_dir(spec.key, args.layer, args.revisions, args.arch))
    return args, spec


def crosscoder_config(args, M, d):
    """The paper's crosscoder; its schedules (λ warm-up, k anneal, θ, dead after 2.5% of the run) follow
    the run's length as the paper's do (CrossCoderConfig)."""
    return CrossCoderConfig(n_models=M, d_model=d, dict_size=args.dict_size, arch=args.arch, l1_coeff=args.l1_coeff,
                            lr=args.lr, total_steps=args.steps, batch_size=args.batch_size, k=args.k, seed=args.seed)


# ---------------------------------------------------------------------------------------------
# Memory: predict the peak before the first step, refuse what cannot fit

def _rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def predict_memory(cfg, batch, device, resident=0) -> int:
    """Bytes the device will hold at the training loop's peak: what it holds now (on a CPU the process's
    RSS: the interpreter, the language models) + `resident` not yet allocated (the live buffer) + the
    crosscoder's weights, grads and 2 Adam moments (16 bytes a parameter) + the step's temporaries:
    36 bytes per [B, F] entry (pre-activations, codes, masks, grads; at init the codes are half dense,
    and the CPU's active-set path indexes them with int64) and 90 per [B, M·d] entry (inputs,
    reconstructions, errors, their grads, the batch read). The two constants are fitted to peak RSS
    on a CPU at four shapes; tests/test_train.py checks a fifth within 25%. GPUs take the dense
    path, which holds less: there it is an upper bound."""
    M, d, F = cfg.n_models, cfg.d_model, cfg.dict_size
    n_params = 2 * M * d * F + F + M * d
    now = torch.cuda.memory_allocated(torch.device(device)) if str(device).startswith("cuda") else _rss()
    return now + resident + 16 * n_params + 36 * batch * F + 90 * batch * M * d


def check_memory(need, device):
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        have = free + torch.cuda.memory_allocated(torch.device(device))
    else:
        try:
            have = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") + _rss()
        except (ValueError, OSError):
            return
    if need > have:
        raise UsageError(f"this run needs about {need / 2**30:.1f} GiB on {device} but {have / 2**30:.1f} GiB are "
                         "available; lower --dict-size, --batch-size or --buffer-tokens")


# ---------------------------------------------------------------------------------------------
# Data: batches as a pure function of the step, so a resumed run sees the same data

def data_source(args, spec, rank, world, resume_state):
    """(batch_at(step) → raw [B/world, M, d], scales [M], val [V, M, d], data description, buffer)."""
    if args.make_cache and rank == 0 and not common.is_done(args.cache):
        print(f"making the activation cache first (as `python cache_acts.py --model {spec.key}` would): {args.cache}",
              file=sys.stderr)
        make_cache(spec.key, args.layer, args.revisions, args.cache, spec.preset.cache_tokens,
                              args.seq_len, args.heldout_tokens, args.text, args.device)
    if world > 1:
        dist.barrier()
    if args.cache:
        cache = open_cache(args.cache)
        m = cache.meta
        if m["revisions"] != args.revisions or m["layer"] != args.layer or m["model"] != spec.key:
            raise UsageError(f"cache {args.cache} holds {m['model']} layer {m['layer']} revisions "
                             f"{','.join(m['revisions'])}, not {spec.key} layer {args.layer} "
                             f"revisions {','.join(args.revisions)}")
        batches = CacheBatches(cache, args.batch_size, args.seed, rank, world)
        desc = dict(cache=str(args.cache), fingerprint=m["fingerprint"], text=m["text"], d=m["d"],
                    seq_len=m["seq_len"], heldout_tokens=m["split"]["heldout_tokens"], weights=m.get("weights", "hub"))
        return batches.batch_at, cache.scales, cache.val(defaults.VAL_ROWS), desc, None
    return live_source(args, spec, rank, world, resume_state)


def live_source(args, spec, rank, world, resume_state):
    mdt = cli.dtype(args.model_dtype, args.device)
    if args.weights == "hub":
        avail = lm.revisions(spec, quiet=rank > 0)
        for r in args.revisions:
            lm.check_revision(spec, r, avail)
    models = load_models(spec, args.revisions, args.device, mdt, args.layer, args.weights)
    tok, T, text, H = models[0][2], args.seq_len, args.text, args.heldout_tokens
    # validation and scales: the held-out split, which training never reads
    val_ids = tasks.text_blocks(text, tok, math.ceil(defaults.VAL_ROWS / (T - 1)), T, H, "heldout", min_blocks=1)
    with torch.no_grad():
        val = torch.stack([torch.cat([layer_acts(m, args.layer, val_ids[i:i + 4]) for i in range(0, len(val_ids), 4)])
                           for _, m, _ in models], 1).cpu()
    scales = [norm_scale(val[:, i]) for i in range(val.shape[1])]

    def blocks(pos):
        start = None if pos is None else tasks.TextPos(**pos)
        return ((b, dataclasses.asdict(p)) for b, p in tasks.iter_blocks(text, tok, T, H, "train", start))

    buf = LiveBuffer(models, args.layer, blocks, T, args.buffer_tokens, args.steps * args.batch_size, args.seed,
                     args.device, lm_batch=32 if str(args.device).startswith("cuda") else 8, start=resume_state)
    need = buf.blocks_needed(args.steps, args.batch_size)
    if resume_state is None:
        have = tasks.count_blocks(text, tok, T, H, need)
        if have < need:
            raise UsageError(f"text source {text!r} holds {have} training blocks of {T} tokens after its held-out "
                             f"split, this run needs {need} (--tokens {args.tokens}, the live buffer's windows); "
                             "give a longer --text or fewer --tokens")
    desc = dict(cache=None, text=text, seq_len=T, heldout_tokens=H, d=val.shape[-1], buffer_tokens=args.buffer_tokens,
                buffer_windows=buf.n_parts, weights=args.weights)

    def batch_at(step):
        return buf.batch_at(step, args.batch_size)[rank::world]

    return batch_at, scales, val, desc, buf


# ---------------------------------------------------------------------------------------------
# Checkpoints: ckpt/<step>/ (safetensors + JSON, DONE last), made in a temporary folder and renamed
# into place; the older one is removed only after. A kill anywhere leaves the newest finished one.

def save_checkpoint(folder, step, cc, opt, sched, buffer_state=None):
    tensors = {f"cc.{k}": v.detach().contiguous() for k, v in cc.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    state = dict(step=step, sched=sched.state_dict(), opt_groups=opt.state_dict()["param_groups"],
                 buffer=buffer_state)
    with common.atomic_dir(folder / "ckpt" / f"{step:09d}") as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, tmp / "state.safetensors")
        common.fault_point("ckpt_write")               # killed mid-write: the temporary folder has no marker yet
        (tmp / "state.json").write_text(json.dumps(state, default=str))
        common.mark_done(tmp, step=step)               # the marker goes last
    common.fault_point("ckpt_prune")                   # killed here: two finished checkpoints, the newer one wins
    for old in (folder / "ckpt").iterdir():
        if old.name != f"{step:09d}":
            shutil.rmtree(old, ignore_errors=True)


def newest_checkpoint(folder):
    """The newest finished checkpoint folder, or None."""
    root = folder / "ckpt"
    done = sorted(d for d in root.iterdir() if d.name.isdigit() and common.is_done(d)) if root.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(folder, cc, opt, sched, device):
    """Restore the newest checkpoint; returns its step (0 if there is none)."""
    d = newest_checkpoint(folder)
    if d is None:
        return 0
    t = load_file(d / "state.safetensors", device=str(device))
    state = json.loads((d / "state.json").read_text())
    cc.load_state_dict({k[3:]: v for k, v in t.items() if k.startswith("cc.")})
    opt_state = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v if name != "step" else v.cpu()
    opt.load_state_dict(dict(state=opt_state, param_groups=state["opt_groups"]))
    sched.load_state_dict(state["sched"])
    torch.set_rng_state(t["rng.cpu"].cpu())
    return state["step"]


RESUME_KEYS = ("model", "layer", "revisions", "arch", "dict_size", "batch_size", "tokens", "lr", "seed", "weights")


def prepare_out(args, rank):
    """Refuse an output folder that holds another run, unless --resume or --overwrite."""
    out = args.out
    if rank != 0:
        return
    held = [f for f in ("config.json", "crosscoder.safetensors", "ckpt", "log.jsonl") if (out / f).exists()]
    if held and not (args.resume or args.overwrite):
        raise UsageError(f"{out} already holds a run ({held[0]}); pass --resume to continue it, "
                         "--overwrite to replace it, or another --out")
    if args.resume and common.is_done(out):
        raise UsageError(f"{out} is a finished run; nothing to resume (--overwrite to train it again)")
    if args.resume and (out / "run_args.json").exists():
        old = common.read_json(out / "run_args.json", "run arguments")
        for k in RESUME_KEYS:
            if str(old.get(k)) != str(getattr(args, k)):
                raise UsageError(f"--resume: {out} was started with {k}={old.get(k)}, this command has "
                                 f"{k}={getattr(args, k)}")
    if args.overwrite:
        for f in ("config.json", "crosscoder.safetensors", "log.jsonl", "DONE", "run_args.json", "eval.json",
                  "latents.csv"):
            (out / f).unlink(missing_ok=True)
        for d in ("ckpt", "relie", "ablation", "stability"):
            shutil.rmtree(out / d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Training

@torch.no_grad()
def validate(cc, val_BMd, device):
    """Held-out metrics per revision: FVU, L0, dead fraction (never active on these rows)."""
    cc.eval()
    err_M, l0, active = 0, [], None
    for i in range(0, len(val_BMd), 2048):
        x = val_BMd[i:i + 2048].to(device)
        x_hat, f = cc(x)
        err_M = err_M + (x_hat - x).pow(2).sum((0, 2))
        l0.append((f > 0).float().sum(1))
        active = (f > 0).any(0) if active is None else active | (f > 0).any(0)
    x = val_BMd.to(device)
    var_M = (x - x.mean(0)).pow(2).sum((0, 2))
    cc.train()
    return dict(val_fvu=(err_M / var_M).tolist(), val_l0=torch.cat(l0).mean().item(),
                val_dead_frac=1 - active.float().mean().item())


class _Inline:
    """ThreadPoolExecutor's submit/result/shutdown, run in the calling thread."""

    def submit(self, fn, *args):
        f = Future()
        f.set_result(fn(*args))
        return f

    def shutdown(self, **kw):
        pass


@torch.no_grad()
def sync_buffers(cc, world, B_local):
    """After each DDP step, one set of buffers on every rank, as one process over the whole batch would
    have them (CrossCoder.sync_buffers: dead-latent counters, then the variant's own state)."""
    cc.sync_buffers(world, B_local, dist.group.WORLD)


class _LossModule(torch.nn.Module):
    """DDP averages gradients of what its forward returns: wrap the crosscoder's loss as a forward."""

    def __init__(self, cc):
        super().__init__()
        self.cc = cc

    def forward(self, x_BMd, step, metrics=True):
        return self.cc.loss(x_BMd, step=step, metrics=metrics)


def rank_device(device, local_rank) -> str:
    """Under torchrun each rank takes its own GPU, cuda:LOCAL_RANK, whatever cuda or cuda:N was asked for."""
    return f"cuda:{local_rank}" if str(device).startswith("cuda") else str(device)


def train(args, spec):
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("nccl" if str(args.device).startswith("cuda") else "gloo")
        args.device = rank_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
        if args.device.startswith("cuda"):
            torch.cuda.set_device(args.device)
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    with common.folder_lock(args.out) if rank == 0 else contextlib.nullcontext():
        out = _train(args, spec, rank, world)
    if world > 1:
        dist.barrier()   # rank 0 may still be saving: a gloo peer torn down mid-way can abort the other
        dist.destroy_process_group()
    return out


def _train(args, spec, rank, world):
    prepare_out(args, rank)
    if world > 1:
        dist.barrier()
    ckpt = newest_checkpoint(args.out) if args.resume else None
    resume_state = json.loads((ckpt / "state.json").read_text()).get("buffer") if ckpt else None
    batch_at, scales, val, desc, buf = data_source(args, spec, rank, world, resume_state)
    M, d = len(args.revisions), desc["d"]
    cfg = crosscoder_config(args, M, d)
    need = predict_memory(cfg, args.batch_size // world, args.device, buf.resident_bytes(d) if buf else 0)
    check_memory(need, args.device)
    torch.manual_seed(args.seed)
    if str(args.device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True   # TF32 matmuls; the loss sums stay fp32
    cc = CrossCoder(cfg).to(args.device)
    cc.group = dist.group.WORLD if world > 1 else None   # BatchTopK over the global batch
    opt = cc.make_optimizer(args.lr)
    sched = cc.make_scheduler(opt)
    for r, s, v in zip(args.revisions, scales, val.unbind(1)):
        if not (math.isfinite(s) and torch.isfinite(v).all()):
            raise UsageError(f"NaN/Inf in the activations of revision {r} (normalisation scale {s}): "
                             "the checkpoint is broken or the cache is corrupt")
    s_M = torch.tensor(scales, device=args.device)
    val_BMd = val * s_M.cpu()[None, :, None]
    start = load_checkpoint(args.out, cc, opt, sched, args.device) if args.resume else 0
    if rank == 0:
        common.write_json(args.out / "run_args.json", _jsonable(vars(args)))
        _truncate_log(args.out / "log.jsonl", start)
    loss_fn = _LossModule(cc)
    if world > 1:
        loss_fn = torch.nn.parallel.DistributedDataParallel(loss_fn, broadcast_buffers=False)
    if args.compile:
        loss_fn = torch.compile(loss_fn)
    wandb = _wandb(args) if (args.wandb and rank == 0) else None
    autocast = args.precision == "bf16" and str(args.device).startswith("cuda")

    def checked(x_BMd, step):
        if not torch.isfinite(x_BMd).all():
            r = int((~torch.isfinite(x_BMd)).any(-1).any(0).nonzero()[0])
            raise UsageError(f"NaN/Inf in the activations of revision {args.revisions[r]} at step {step}")
        return x_BMd

    # on a GPU the next cache batch is read, checked and pinned in a thread while this step runs, so its
    # copy is asynchronous (batch_at is a pure function of the step: resuming is unaffected); on a CPU the
    # thread would only take cores from the step, and a live buffer's batches are on the device already
    pin = str(args.device).startswith("cuda") and buf is None

    def fetch(step):
        x_BMd = batch_at(step)
        return checked(x_BMd.pin_memory() if pin else x_BMd, step)

    pool = ThreadPoolExecutor(1) if pin else _Inline()
    nxt = pool.submit(fetch, start) if start < args.steps else None   # fails here, before the bar, on bad data
    if rank == 0:
        print(f"training {M} revisions × d={d} → F={cfg.dict_size} ({cfg.arch}), {args.steps} steps of "
              f"{args.batch_size}; predicted peak memory {need / 2**30:.2f} GiB on {args.device}", file=sys.stderr)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", disable=rank != 0,
               dynamic_ncols=True)
    t0, seen = time.time(), 0
    try:
        for step in bar:
            x_BMd = nxt.result().to(args.device, non_blocking=True) * s_M[None, :, None]
            if step + 1 < args.steps:
                nxt = pool.submit(fetch, step + 1)
            log_now = (step + 1) % args.log_every == 0 or step + 1 == args.steps
            out = cc.train_step(opt, sched, x_BMd, step, loss_fn=loss_fn, autocast=autocast, metrics=log_now)
            if world > 1:
                sync_buffers(cc, world, x_BMd.shape[0])
            seen += x_BMd.shape[0] * world
            common.fault_point("train_step")
            if log_now and world > 1:      # the whole batch's numbers, not rank 0's share
                for k in ("loss", "mse", "l0"):
                    out[k] = out[k].detach().clone()
                    dist.all_reduce(out[k])
                    out[k] /= world
            if rank == 0 and log_now:
                rec = dict(step=step + 1, tokens=(step + 1) * args.batch_size, loss=out["loss"].item(),
                           mse=out["mse"].item(), l0=out["l0"].item(), fvu=out["fvu_M"].tolist(),
                           dead_frac=out["dead_frac"].item(), lr=sched.get_last_lr()[0],
                           tokens_per_s=seen / (time.time() - t0))
                rec.update(validate(cc, val_BMd, args.device))
                with open(args.out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{rec['loss']:.3f}", L0=f"{rec['val_l0']:.1f}",
                                FVU="/".join(f"{v:.3f}" for v in rec["val_fvu"]))
                if wandb:
                    wandb.log(rec, step=step + 1)
            if (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps and rank == 0:
                save_checkpoint(args.out, step + 1, cc, opt, sched,
                                buf.state(step + 1, args.batch_size) if buf else None)
    except BaseException:
        bar.leave = False   # an error leaves one line on the terminal, not a stale bar
        bar.close()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if rank == 0:
        final = cc.fold_scales(scales)
        gpu = str(args.device).startswith("cuda")
        peak = torch.cuda.max_memory_allocated(torch.device(args.device)) if gpu else None
        final.save(args.out, extra=dict(
            model=spec.key, repo=spec.repo, revisions=args.revisions, layer=args.layer, scales=scales,
            revision_tokens=[lm.parse_revision(r, spec.tokens_per_step).tokens for r in args.revisions],
            data=desc, steps=args.steps, tokens=args.tokens,
            memory=dict(predicted=need, measured_gpu_peak=peak),
            args=_jsonable(vars(args)),
            versions=_versions(), activations="raw (scales folded in)"))
        common.fault_point("train_final")              # killed here: weights saved, run not marked done
        common.mark_done(args.out, step=args.steps)
        shutil.rmtree(args.out / "ckpt", ignore_errors=True)
        last = json.loads((args.out / "log.jsonl").read_text().splitlines()[-1])
        print(f"run {args.out}: val FVU {[f'{v:.3f}' for v in last['val_fvu']]}, L0 {last['val_l0']:.1f}, "
              f"dead {100 * last['val_dead_frac']:.0f}%, {last['tokens_per_s']:.0f} tokens/s, "
              f"{time.time() - t0:.0f} s")
    return args.out


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _truncate_log(path, step):
    """On resume, drop log lines past the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _versions():
    import transformers
    return dict(torch=torch.__version__, transformers=transformers.__version__, python=sys.version.split()[0])


def _wandb(args):
    import wandb
    return wandb.init(project=args.wandb, config={k: str(v) for k, v in vars(args).items()})


def main(argv=None):
    args, spec = parse_args(argv)
    common.keep_freed_memory()
    return train(args, spec)


if __name__ == "__main__":
    common.run_main(main)
