"""train.py — train ONE sparse crosscoder over layer L of several checkpoints.

    python train.py                                   # embedded default: the toy model, ~1 minute on a CPU
    python train.py --model pythia-1b --layer 8       # the paper's run (GPU, network): live buffer, 400M tokens
    python train.py --cache cache/toy-L0-step64_step128_step512 --arch batchtopk
    torchrun --nproc_per_node=2 train.py ...          # data-parallel (gloo on CPU, nccl on GPU)

Activations come from a cache (--cache, made by cache_acts.py) or, without one, from a live buffer
that runs the checkpoints itself. The toy model is built, and its cache made, on first use.
The crosscoder trains on normalised activations s_m·x_m; the saved one has the scales folded in,
so it acts on raw activations (crosscoder.decoder_norms() still reports normalised norms).

Run folder (runs/<name>/): config.json + crosscoder.safetensors at the end, log.jsonl per logging
step, ckpt/ (weights, optimizer, schedule, RNG, data position) every --ckpt-every steps so --resume
continues after a kill and ends with the weights of an uninterrupted run.
"""
import contextlib
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import cache_acts
import lm
import tasks
from common import ArgumentParser, UsageError, fault_point, folder_lock, positive, run_main, write_json
from crosscoder import CrossCoder, CrossCoderConfig

# The paper's defaults (DESIGN.md), and the toy's (a trial: FVU 0.02-0.03, L0 ~33 in ~40 s on 2 cores).
PAPER = dict(dict_size=16384, batch_size=4096, tokens=400_000_000, lr=5e-5, l1_coeff=2.0, k=200)
TOY = dict(dict_size=512, batch_size=1024, tokens=4_096_000, lr=2e-3, l1_coeff=2.0, k=32)
VAL_ROWS = 8192


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--revisions", default=None, help="comma-separated (default: the model's triplet)")
    p.add_argument("--cache", default=None, help="activation cache folder (cache_acts.py)")
    p.add_argument("--arch", choices=["l1", "batchtopk"], default="l1")
    p.add_argument("--dict-size", type=positive("--dict-size"), default=None)
    p.add_argument("--batch-size", type=positive("--batch-size"), default=None, help="tokens per step (global)")
    p.add_argument("--tokens", type=positive("--tokens"), default=None, help="training tokens in all")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--l1-coeff", type=float, default=None)
    p.add_argument("--k", type=positive("--k"), default=None, help="BatchTopK: latents per token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="crosscoder matmuls (bf16 autocast on GPU; the loss stays fp32)")
    p.add_argument("--model-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the language models in the live buffer (default bf16 on GPU)")
    p.add_argument("--buffer-tokens", type=positive("--buffer-tokens"), default=524_288)
    p.add_argument("--seq-len", type=positive("--seq-len"), default=None)
    p.add_argument("--text", default=None, help="LM text for the live buffer / toy cache")
    p.add_argument("--log-every", type=positive("--log-every"), default=None)
    p.add_argument("--ckpt-every", type=positive("--ckpt-every"), default=None)
    p.add_argument("--out", default=None, help="run folder (default runs/<model>-L<layer>-<revisions>-<arch>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or different run in --out")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss (GPU)")
    p.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to Weights & Biases")
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: --resume continues the run in "
                         "--out, --overwrite starts it again")
    for name in ("lr", "l1_coeff"):
        v = getattr(args, name)
        if v is not None and not (v > 0 if name == "lr" else v >= 0) or (v is not None and not math.isfinite(v)):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {v}")
    return args


def resolve_defaults(args, spec):
    """Fill unset flags: the toy's defaults for the toy model, the paper's for every other."""
    base = TOY if spec.key == "toy" else PAPER
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.layer = spec.layer if args.layer is None else args.layer
    if args.layer is None:
        raise UsageError(f"--layer is required for {args.model}")
    args.revisions = args.revisions.split(",") if isinstance(args.revisions, str) else list(spec.revisions)
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
    name = f"{Path(spec.key).name}-L{args.layer}-{'_'.join(args.revisions)}-{args.arch}"
    args.out = Path(args.out or Path("runs") / name)
    return args


def crosscoder_config(args, M, d):
    """The paper's schedules, scaled to the run's length where the paper's step counts would not fit
    (BatchTopK: k annealed over 5% of steps from 5k, θ from 1%, dead after 2.5% of tokens)."""
    kw = dict(n_models=M, d_model=d, dict_size=args.dict_size, arch=args.arch, l1_coeff=args.l1_coeff,
              lr=args.lr, total_steps=args.steps, seed=args.seed)
    if args.arch == "batchtopk":
        kw.update(k=args.k, k_start=min(5 * args.k, args.dict_size), k_anneal_steps=min(5000, args.steps // 20),
                  threshold_start_step=min(1000, args.steps // 100),
                  dead_tokens=min(10_000_000, max(args.batch_size, args.tokens // 40)))
    return CrossCoderConfig(**kw)


def check_memory(cfg, batch, device):
    """Refuse requests that cannot fit: weights, grads and 2 Adam moments, plus a few [B, F] tensors."""
    n_params = 2 * cfg.n_models * cfg.d_model * cfg.dict_size + cfg.dict_size + cfg.n_models * cfg.d_model
    need = 4 * (4 * n_params + 6 * batch * cfg.dict_size + 4 * batch * cfg.n_models * cfg.d_model)
    if str(device).startswith("cuda"):
        have = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        try:
            have = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return
    if need > have:
        raise UsageError(f"this run needs about {need / 2**30:.1f} GiB on {device} but {have / 2**30:.1f} GiB are "
                         "free; lower --dict-size or --batch-size")


# ---------------------------------------------------------------------------------------------
# Data: batches as a pure function of the step, so a resumed run sees the same data

class CacheBatches:
    """Random batches from a cache: a seeded permutation of the training rows per epoch."""

    def __init__(self, cache, batch_size, seed, rank=0, world=1):
        self.cache, self.B, self.seed, self.rank, self.world = cache, batch_size, seed, rank, world
        self.lo, self.hi = cache.rows("train")
        self.per_epoch = (self.hi - self.lo) // batch_size
        if self.per_epoch == 0:
            raise UsageError(f"cache {cache.folder} has {self.hi - self.lo} training rows, fewer than one "
                             f"batch of {batch_size}")
        self.epoch, self.perm = -1, None

    def batch_at(self, step):
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            g = np.random.default_rng([self.seed, epoch])
            self.perm, self.epoch = self.lo + g.permutation(self.hi - self.lo), epoch
        idx = np.sort(self.perm[j * self.B:(j + 1) * self.B][self.rank::self.world])
        return self.cache.get(idx)


def data_source(args, spec, rank, world):
    """(batch_at(step) → raw [B/world, M, d], scales [M], val [V, M, d], data description)."""
    if args.cache is None and spec.key == "toy":
        # the embedded default: make the toy's cache on first use (cached and resumable itself)
        args.cache = str(cache_acts.default_cache_dir("toy", args.layer, args.revisions))
        if rank == 0:
            cache_acts.make_cache("toy", args.layer, args.revisions, args.cache, 262_144, args.seq_len or 32,
                                  text=args.text)
        if world > 1:
            dist.barrier()
    if args.cache:
        cache = cache_acts.open_cache(args.cache)
        m = cache.meta
        if m["revisions"] != args.revisions or m["layer"] != args.layer or m["model"] != spec.key:
            raise UsageError(f"cache {args.cache} holds {m['model']} layer {m['layer']} revisions "
                             f"{','.join(m['revisions'])}, not {spec.key} layer {args.layer} "
                             f"revisions {','.join(args.revisions)}")
        batches = CacheBatches(cache, args.batch_size, args.seed, rank, world)
        lo, hi = cache.rows("val")
        val = cache.get(np.linspace(lo, hi - 1, min(VAL_ROWS, hi - lo)).astype(np.int64))
        desc = dict(cache=str(args.cache), fingerprint=m["fingerprint"], text=m["text"], d=m["d"])
        return (lambda step: batches.batch_at(step)), cache.scales, val, desc
    return live_source(args, spec, rank, world)


def live_source(args, spec, rank, world):
    mdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.model_dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")]
    avail = lm.revisions(spec, quiet=rank > 0)
    for r in args.revisions:
        lm.check_revision(spec, r, avail)
    models = cache_acts.load_models(spec, args.revisions, args.device, mdt, args.layer)
    tok, T, text = models[0][2], args.seq_len or 1024, args.text or spec.text
    # validation and scales come from blocks the training stream never reaches (another seed)
    val_ids = tasks.text_blocks(text, tok, max(1, VAL_ROWS // (T - 1)), T, seed=args.seed + 1)
    with torch.no_grad():
        val = torch.stack([torch.cat([cache_acts.layer_acts(m, args.layer, val_ids[i:i + 4])
                                      for i in range(0, len(val_ids), 4)]) for _, m, _ in models], 1).cpu()
    scales = [cache_acts.norm_scale(val[:, i]) for i in range(val.shape[1])]
    buf = cache_acts.LiveBuffer(models, args.layer, lambda: tasks.iter_blocks(text, tok, T, seed=args.seed),
                                args.buffer_tokens, T, args.seed, args.device)
    B = args.batch_size

    def batch_at(step):
        return buf.batch_at(step, B)[rank::world]

    desc = dict(cache=None, text=text, seq_len=T, d=val.shape[-1], buffer_tokens=args.buffer_tokens)
    return batch_at, scales, val, desc


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON, written to a temporary folder and swapped in

def save_checkpoint(folder, step, cc, opt, sched):
    tensors = {f"cc.{k}": v.detach().contiguous() for k, v in cc.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    state = dict(step=step, sched=sched.state_dict(), opt_groups=opt.state_dict()["param_groups"])
    tmp, final, old = folder / "ckpt.tmp", folder / "ckpt", folder / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.cpu() for k, v in tensors.items()}, tmp / "state.safetensors")
    fault_point("ckpt_write")                   # killed mid-write: ckpt.tmp has no marker yet
    (tmp / "state.json").write_text(json.dumps(state, default=str))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    (tmp / "COMPLETE").write_text(str(step))   # the marker goes last
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        fault_point("ckpt_swap")                # killed between the renames: ckpt.old is the newest
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder, cc, opt, sched, device):
    """Restore the newest complete checkpoint; returns its step (0 if none). A kill during the swap
    can leave the newest one in ckpt.tmp/ and the one before in ckpt.old/."""
    done = [d for d in (folder / n for n in ("ckpt", "ckpt.tmp", "ckpt.old")) if (d / "COMPLETE").exists()]
    if not done:
        return 0
    d = max(done, key=lambda d: int((d / "COMPLETE").read_text()))
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


def prepare_out(args, rank):
    """Refuse an output folder that holds another run, unless --resume or --overwrite."""
    out = args.out
    if rank != 0:
        return
    held = [f for f in ("config.json", "crosscoder.safetensors", "ckpt", "log.jsonl") if (out / f).exists()]
    if held and not (args.resume or args.overwrite):
        raise UsageError(f"{out} already holds a run ({held[0]}); pass --resume to continue it, "
                         "--overwrite to replace it, or another --out")
    if args.resume and (out / "crosscoder.safetensors").exists() and (out / "DONE").exists():
        raise UsageError(f"{out} is a finished run; nothing to resume (--overwrite to train it again)")
    if args.resume and (out / "run_args.json").exists():
        old = json.loads((out / "run_args.json").read_text())
        for k in ("model", "layer", "revisions", "arch", "dict_size", "batch_size", "tokens", "lr", "seed"):
            if str(old.get(k)) != str(getattr(args, k)):
                raise UsageError(f"--resume: {out} was started with {k}={old.get(k)}, this command has "
                                 f"{k}={getattr(args, k)}")
    if args.overwrite:
        for f in ("config.json", "crosscoder.safetensors", "log.jsonl", "DONE", "run_args.json", "eval.json",
                  "latents.csv"):
            (out / f).unlink(missing_ok=True)
        for d in ("ckpt", "ckpt.old", "ckpt.tmp", "relie", "ablation"):
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
    have them (DDP itself only averages gradients). Dead-latent counters: a latent fired if it fired on
    any rank (the minimum), and the tokens since then count every rank's (B_local·world per step).
    BatchTopK's θ: every rank applied the same EMA to its own smallest kept score; the EMA is monotone,
    so the minimum over ranks is the EMA of the whole batch's smallest kept score."""
    since_F = cc.tokens_since_active_F          # each rank: its previous (shared) value + B_local, or 0
    dist.all_reduce(since_F, op=dist.ReduceOp.MIN)
    since_F.add_((since_F > 0) * B_local * (world - 1))
    dist.all_reduce(cc.threshold, op=dist.ReduceOp.MIN)


class _LossModule(torch.nn.Module):
    """DDP averages gradients of what its forward returns: wrap the crosscoder's loss as a forward."""

    def __init__(self, cc):
        super().__init__()
        self.cc = cc

    def forward(self, x_BMd, step):
        return self.cc.loss(x_BMd, step=step)


def train(args):
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("nccl" if str(args.device).startswith("cuda") else "gloo")
        if str(args.device) == "cuda":
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(args.device)
    spec = lm.resolve(args.model)
    args = resolve_defaults(args, spec)
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    with folder_lock(args.out) if rank == 0 else contextlib.nullcontext():
        out = _train(args, spec, rank, world)
    if world > 1:
        dist.barrier()   # rank 0 may still be saving: a gloo peer torn down mid-way can abort the other
        dist.destroy_process_group()
    return out


def _train(args, spec, rank, world):
    prepare_out(args, rank)
    if world > 1:
        dist.barrier()
    batch_at, scales, val, desc = data_source(args, spec, rank, world)
    M, d = len(args.revisions), desc["d"]
    cfg = crosscoder_config(args, M, d)
    check_memory(cfg, args.batch_size // world, args.device)
    torch.manual_seed(args.seed)
    if str(args.device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True   # TF32 matmuls; the loss sums stay fp32
    cc = CrossCoder(cfg).to(args.device)
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
        write_json(args.out / "run_args.json", {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
        _truncate_log(args.out / "log.jsonl", start)
    loss_fn = _LossModule(cc)
    if world > 1:
        loss_fn = torch.nn.parallel.DistributedDataParallel(loss_fn, broadcast_buffers=False)
    if args.compile:
        loss_fn = torch.compile(loss_fn)
    wandb = _wandb(args) if (args.wandb and rank == 0) else None
    use_autocast = args.dtype == "bf16" and str(args.device).startswith("cuda")
    def checked(x_BMd, step):
        if not torch.isfinite(x_BMd).all():
            r = int((~torch.isfinite(x_BMd)).any(-1).any(0).nonzero()[0])
            raise UsageError(f"NaN/Inf in the activations of revision {args.revisions[r]} at step {step}")
        return x_BMd

    if start < args.steps:
        checked(batch_at(start), start)   # fail before the progress bar when the data is broken
    # on a GPU the next batch is read, checked and pinned in a thread while this step runs, so its
    # copy is asynchronous (batch_at is a pure function of the step: resuming is unaffected); on a
    # CPU the thread would only take cores from the step, so there it runs inline
    pin = str(args.device).startswith("cuda")

    def fetch(step):   # a live buffer's batches are on the device already: only cache batches are pinned
        x_BMd = batch_at(step)
        return checked(x_BMd.pin_memory() if pin and x_BMd.device.type == "cpu" else x_BMd, step)

    pool = ThreadPoolExecutor(1) if pin else _Inline()
    nxt = pool.submit(fetch, start) if start < args.steps else None
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", disable=rank != 0,
               dynamic_ncols=True)
    t0, seen = time.time(), 0
    try:
        for step in bar:
            x_BMd = nxt.result().to(args.device, non_blocking=True) * s_M[None, :, None]
            if step + 1 < args.steps:
                nxt = pool.submit(fetch, step + 1)
            with torch.autocast("cuda", torch.bfloat16, enabled=use_autocast):
                out = loss_fn(x_BMd, step)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(cc.parameters(), 1.0)
            opt.step()
            sched.step()
            if world > 1:
                sync_buffers(cc, world, x_BMd.shape[0])
            seen += x_BMd.shape[0] * world
            fault_point("train_step")
            if rank == 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
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
                save_checkpoint(args.out, step + 1, cc, opt, sched)
    except BaseException:
        bar.leave = False   # an error leaves one line on the terminal, not a stale bar
        bar.close()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if rank == 0:
        final = cc.fold_scales(scales)
        final.save(args.out, extra=dict(
            model=spec.key, repo=spec.repo, revisions=args.revisions, layer=args.layer, scales=scales,
            data=desc, steps=args.steps, batch_size=args.batch_size, tokens=args.tokens,
            args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            versions=_versions(), activations="raw (scales folded in)"))
        fault_point("train_final")              # killed here: weights saved, run not marked done
        write_json(args.out / "DONE", dict(step=args.steps))
        shutil.rmtree(args.out / "ckpt", ignore_errors=True)
        last = json.loads((args.out / "log.jsonl").read_text().splitlines()[-1])
        print(f"run {args.out}: val FVU {['%.3f' % v for v in last['val_fvu']]}, L0 {last['val_l0']:.1f}, "
              f"dead {100 * last['val_dead_frac']:.0f}%, {last['tokens_per_s']:.0f} tokens/s")
    return args.out


def _truncate_log(path, step):
    """On resume, drop log lines past the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    path.write_text("".join(l + "\n" for l in keep))


def _versions():
    import transformers
    return dict(torch=torch.__version__, transformers=transformers.__version__, python=sys.version.split()[0])


def _wandb(args):
    import wandb
    return wandb.init(project=args.wandb, config={k: str(v) for k, v in vars(args).items()})


def main(argv=None):
    args = parse_args(argv)
    return train(args)


if __name__ == "__main__":
    run_main(main)
