"""training.py — what train.py's loop stands on: the run's defining config, memory, data, checkpoints, DDP.

train.py reads top to bottom as the loop (data, step, log, checkpoint); the pieces it calls live here:
  RunConfig            what defines a run: the CLI's training flags, the resume check, seeds.py's seed
                       runs and config.json all use this one list
  predict_memory       the peak before step 1, and refusing what cannot fit
  data_source          batches as a pure function of the step (a cache, or the live buffer)
  checkpoints          ckpt/<step>/ written atomically, the newest finished one restored
  prepare_out          refuse a folder that holds another run, unless --resume or --overwrite
  validate             held-out FVU, L0 and dead fraction
  DDP                  process group set-up, the loss as a module for DDP, buffer sync
"""
import contextlib
import dataclasses
import inspect
import json
import math
import os
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from crosscoding import cli, common, defaults, lm, shards, tasks
from crosscoding.activations import (
    CacheBatches,
    LiveBuffer,
    layer_acts,
    load_models,
    make_cache,
    norm_scale,
    open_cache,
)
from crosscoding.common import UsageError
from crosscoding.crosscoder import CrossCoder, CrossCoderConfig
from crosscoding.variants import settings_fields

# ---------------------------------------------------------------------------------------------
# The run's defining config


@dataclasses.dataclass
class RunConfig:
    """What defines a training run: the same RunConfig trains the same crosscoder. Each field is train.py's
    flag of that name (--dict-size for dict_size, ...). --resume refuses a command whose RunConfig differs
    from the run's; seeds.py, controls.py and checkpoint_sets.py train their runs from the run's RunConfig, and
    config.json records it under "run". Flags that only say where or how fast (--out, --device, --log-every,
    --ckpt-every, --compile) are not part of it. The variants' own settings (k, jumprelu_coeff, …: every registered
    variant's, variants.settings_fields()) are `settings`, a dict; as_dict() gives every field flat, as config.json
    records it."""
    model: str
    layer: int
    revisions: list
    weights: str              # hub, or random (the architecture with random weights)
    cache: str | None         # the activation cache trained from; None: a live buffer over `text`
    text: str
    seq_len: int
    heldout_tokens: int
    buffer_tokens: int
    model_dtype: str | None
    arch: str
    dict_size: int
    batch_size: int
    tokens: int
    lr: float
    seed: int
    precision: str
    control: str              # none, or a negative control's change to training (CONTROLS; controls.py trains them)
    settings: dict            # the variants' settings by name: {"l1_coeff": 2.0, "k": 32, …}

    @staticmethod
    def names() -> list:
        """Every field's name, the settings' flat: each is train.py's flag of that name."""
        return [f.name for f in dataclasses.fields(RunConfig) if f.name != "settings"] + list(settings_fields())

    @classmethod
    def from_args(cls, args) -> "RunConfig":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name != "settings"},
                   settings={name: getattr(args, name) for name in settings_fields()})

    def as_dict(self) -> dict:
        mine = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"}
        return _jsonable({**mine, **self.settings})

    @classmethod
    def known(cls, saved: dict) -> dict:
        """The RunConfig fields a saved run records (a run written before a field existed lacks it)."""
        return {name: saved[name] for name in cls.names() if name in saved}

    def changed(self, saved: dict) -> list:
        """[(field, saved value, this value)] where a saved run's config differs from this one."""
        mine = self.as_dict()
        return [(k, v, mine[k]) for k, v in self.known(saved).items() if str(v) != str(mine[k])]

    def crosscoder(self, M, d) -> CrossCoderConfig:
        """The paper's crosscoder; its schedules (λ warm-up, k anneal, θ, dead after 2.5% of the run) follow
        the run's length as the paper's do (CrossCoderConfig)."""
        return CrossCoderConfig(n_models=M, d_model=d, dict_size=self.dict_size, arch=self.arch, lr=self.lr,
                                total_steps=self.tokens // self.batch_size, batch_size=self.batch_size,
                                seed=self.seed, **self.settings)


# Negative controls that change how the crosscoder trains (controls.py): each removes one thing a check credits
# and keeps the data, the tokens and the size. Nothing else of a run depends on them.
CONTROLS = {
    "none": "the crosscoder as the method trains it",
    "shuffled-revisions": "each token's M activations in a random order, drawn anew every step: no latent can be "
                          "specific to a revision",
    "fixed-decoder": "the decoder fixed at its random initialisation, only the encoder and biases trained: no "
                     "learned directions",
}


def shuffle_revisions(x_BMd, seed, step):
    """Each row's M revisions in a random order (seeded by the run's seed and the step, so a resumed run sees the
    same): the 'shuffled-revisions' control."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    B, M, d = x_BMd.shape
    perm_BM = torch.argsort(torch.rand(B, M, generator=g), dim=1).to(x_BMd.device)
    return x_BMd.gather(1, perm_BM[..., None].expand(B, M, d))


# ---------------------------------------------------------------------------------------------
# Memory: predict the peak before the first step, refuse what cannot fit

def _rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def crosscoder_bytes(M, d, F, batch) -> int:
    """What one rank's crosscoder holds at the training step's peak, for M revisions and a batch of `batch`
    rows: weights, grads and 2 Adam moments (16 bytes a parameter) + the step's temporaries: 36 bytes per
    [B, F] entry (pre-activations, codes, masks, grads; at init the codes are half dense, and the CPU's
    active-set path indexes them with int64) and 90 per [B, M·d] entry (inputs, reconstructions, errors,
    their grads, the batch read). The two constants are fitted to peak RSS on a CPU at four shapes;
    tests/test_train.py checks a fifth within 25%. GPUs take the dense path, which holds less: there it is
    an upper bound."""
    n_params = 2 * M * d * F + F + M * d
    return 16 * n_params + 36 * batch * F + 90 * batch * M * d


def predict_memory(cfg, batch, device, resident=0, M=None) -> int:
    """Bytes the device will hold at the training loop's peak: what it holds now (on a CPU the process's
    RSS: the interpreter, the language models) + `resident` not yet allocated (the live buffer) + the
    crosscoder's (crosscoder_bytes; M: the revisions this rank holds, default all)."""
    now = torch.cuda.memory_allocated(torch.device(device)) if str(device).startswith("cuda") else _rss()
    return now + resident + crosscoder_bytes(M or cfg.n_models, cfg.d_model, cfg.dict_size, batch)


@dataclasses.dataclass
class Layout:
    """R revision shards × D data replicas on R·D GPUs, and what one rank holds (bytes)."""
    shards: int
    replicas: int
    lms: int
    crosscoder: int
    buffer: int

    @property
    def gpus(self) -> int:
        return self.shards * self.replicas

    @property
    def total(self) -> int:
        return self.lms + self.crosscoder + self.buffer


def layout(lm_params, d, M, F, batch, buffer_tokens, shards, replicas, item=2) -> Layout:
    """Per-rank memory of training M revisions with R = shards: a rank holds M/R revisions' LMs (lm_params
    each: blocks 0..L, `item`-byte weights), their encoder and decoder slices with grads and Adam
    (crosscoder_bytes: the [B, F] code is whole on every rank, the batch is split over the D replicas) and
    their share of the live buffer (buffer_tokens rows of d per revision, in the LMs' dtype)."""
    M_r = M // shards
    return Layout(shards, replicas, lms=M_r * lm_params * item,
                  crosscoder=crosscoder_bytes(M_r, d, F, batch // replicas), buffer=buffer_tokens * M_r * d * item)


def layouts(lm_params, d, M, F, batch, buffer_tokens, gpus) -> list:
    """Every layout of `gpus` GPUs: R revision shards (R divides M) × D data replicas (D divides the batch)."""
    return [layout(lm_params, d, M, F, batch, buffer_tokens, R, gpus // R)
            for R in range(1, min(gpus, M) + 1) if gpus % R == 0 and M % R == 0 and batch % (gpus // R) == 0]


def plan(spec, layer, M, F, batch, buffer_tokens, gpus, gpu_gb) -> str:
    """--plan: every layout of `gpus` GPUs (layouts) with its per-rank memory, and the smallest layout on at most `gpus`
    GPUs that fits gpu_gb each. The LM is counted from its architecture on the meta device: nothing loads."""
    with torch.device("meta"):
        model = lm.architecture(spec)
    size = (lm.params_through(model, layer), model.config.hidden_size, M, F, batch, buffer_tokens)
    cap = gpu_gb * 2**30
    gb = lambda b: f"{b / 2**30:.1f}"
    lines = [f"plan: {spec.key} layer {layer}, M = {M} revisions, F = {F}, batch {batch}, live buffer "
             f"{buffer_tokens} rows; per-rank GB on {gpus} GPUs of {gpu_gb:g} GB (bf16 LMs through block {layer}, "
             "fp32 crosscoder + Adam):",
             f"{'shards × replicas':>18} {'LMs':>7} {'crosscoder':>10} {'buffer':>7} {'total':>7}  fits"]
    for lay in layouts(*size, gpus):
        lines.append(f"{lay.shards:>8} × {lay.replicas:<8} {gb(lay.lms):>7} {gb(lay.crosscoder):>10} "
                     f"{gb(lay.buffer):>7} {gb(lay.total):>7}  {'yes' if lay.total <= cap else 'no'}")
    fit = next((lay for n in range(1, gpus + 1) for lay in layouts(*size, n) if lay.total <= cap), None)
    if fit is None:
        lines.append(f"no layout on up to {gpus} GPUs of {gpu_gb:g} GB fits: give more --gpus, or lower --dict-size, "
                     "--batch-size or --buffer-tokens")
    else:
        cmd = "python train.py …" if fit.gpus == 1 else f"torchrun --nproc-per-node {fit.gpus} train.py …" + (
            f" --revision-shards {fit.shards}" if fit.shards > 1 else "")
        lines.append(f"smallest that fits: {fit.gpus} GPU(s) as {fit.shards} revision shard(s) × {fit.replicas} data "
                     f"replica(s), {gb(fit.total)} GB per rank: {cmd}")
    return "\n".join(lines)


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

def data_source(args, spec, ranks, resume_state):
    """(batch_at(step) → raw [B/D, M_r, d], scales [M_r], val [V, M_r, d], data description, buffer): this rank's
    revisions (all M, or its shard's M_r) on its data replica's share of the batch (all B, or B/D)."""
    revs, rank = ranks.revs, ranks.rank
    if args.make_cache and rank == 0 and not common.is_done(args.cache):
        print(f"making the activation cache first (as `python cache_acts.py --model {spec.key}` would): {args.cache}",
              file=sys.stderr)
        make_cache(spec.key, args.layer, args.revisions, args.cache, spec.preset.cache_tokens,
                              args.seq_len, args.heldout_tokens, args.text, args.device)
    ranks.barrier()
    if args.cache:
        cache = open_cache(args.cache)
        m = cache.meta
        if m["revisions"] != args.revisions or m["layer"] != args.layer or m["model"] != spec.key:
            raise UsageError(f"cache {args.cache} holds {m['model']} layer {m['layer']} revisions "
                             f"{','.join(m['revisions'])}, not {spec.key} layer {args.layer} "
                             f"revisions {','.join(args.revisions)}")
        batches = CacheBatches(cache, args.batch_size, args.seed, ranks.replica, ranks.replicas)
        desc = dict(cache=str(args.cache), fingerprint=m["fingerprint"], text=m["text"], d=m["d"],
                    seq_len=m["seq_len"], heldout_tokens=m["split"]["heldout_tokens"], weights=m.get("weights", "hub"),
                    random_on=m.get("random_on"))
        mine = slice(revs.start, revs.stop)
        return (lambda step: batches.batch_at(step)[:, mine], cache.scales[mine],
                cache.val(defaults.VAL_ROWS)[:, mine], desc, None)
    return live_source(args, spec, ranks, resume_state)


def block_stream(text, tok, T, H):
    """The live buffer's text: (a checkpoint's text position, or None for the start) → the training split's blocks
    of T tokens from there, each with the position (a dict, as checkpoints record it) of its first token."""
    def blocks(pos):
        start = None if pos is None else tasks.TextPos(**pos)
        return ((b, dataclasses.asdict(p)) for b, p in tasks.iter_blocks(text, tok, T, H, "train", start))
    return blocks


def live_source(args, spec, ranks, resume_state):
    """The live buffer: this rank's revisions' LMs (blocks 0..L) on the training text every rank reads alike
    (the same blocks, shuffles and resume point: a pure function of the seed and the step)."""
    rank = ranks.rank
    mdt = cli.dtype(args.model_dtype, args.device)
    if args.weights == "hub":
        avail = lm.revisions(spec, quiet=rank > 0)
        for r in args.revisions:
            lm.check_revision(spec, r, avail)
    models = load_models(spec, [args.revisions[m] for m in ranks.revs], args.device, mdt, args.layer, args.weights)
    for _, model, _ in models:
        lm.keep_through(model, args.layer)       # the blocks after L never run here
    tok, T, text, H = models[0][2], args.seq_len, args.text, args.heldout_tokens
    # validation and scales: the held-out split, which training never reads
    val_ids = tasks.text_blocks(text, tok, math.ceil(defaults.VAL_ROWS / (T - 1)), T, H, "heldout", min_blocks=1)
    with torch.no_grad():
        val = torch.stack([torch.cat([layer_acts(m, args.layer, val_ids[i:i + 4]) for i in range(0, len(val_ids), 4)])
                           for _, m, _ in models], 1).cpu()
    scales = [norm_scale(val[:, i]) for i in range(val.shape[1])]

    blocks = block_stream(text, tok, T, H)
    gpu = str(args.device).startswith("cuda")
    buf = LiveBuffer(models, args.layer, blocks, T, args.buffer_tokens, args.steps * args.batch_size, args.seed,
                     args.device, lm_batch=32 if gpu else 8, start=resume_state,
                     overlap=args.refill == "overlap" or (args.refill == "auto" and gpu))
    need = buf.blocks_needed(args.steps, args.batch_size)
    if resume_state is None:
        have = tasks.count_blocks(text, tok, T, H, need)
        if have < need:
            raise UsageError(f"text source {text!r} holds {have} training blocks of {T} tokens after its held-out "
                             f"split, this run needs {need} (--tokens {args.tokens}, the live buffer's windows); "
                             "give a longer --text or fewer --tokens")
    desc = dict(cache=None, text=text, seq_len=T, heldout_tokens=H, d=val.shape[-1], buffer_tokens=args.buffer_tokens,
                buffer_windows=buf.n_parts, weights=args.weights, random_on=lm.drawn_on(args.weights, args.device))

    def batch_at(step):
        return buf.batch_at(step, args.batch_size)[ranks.replica::ranks.replicas]

    return batch_at, scales, val, desc, buf


# ---------------------------------------------------------------------------------------------
# Checkpoints: ckpt/<step>/ (safetensors + JSON, DONE last), made in a temporary folder and renamed
# into place; the older one is removed only after. A kill anywhere leaves the newest finished one.
# Revision shards each write their own slice (state.safetensors, or state-<shard>of<R>.safetensors) into
# the one temporary folder; rank 0 marks it done and renames it once every shard has written.

def shard_file(ranks) -> str:
    return "state.safetensors" if ranks.shards == 1 else f"state-{ranks.shard}of{ranks.shards}.safetensors"


def save_checkpoint(folder, step, cc, opt, sched, buffer_state=None, ranks=None):
    """Every rank calls it (a run of one process: ranks None); replica 0's shards write their slices."""
    ranks = ranks or Ranks()
    tensors = {f"cc.{k}": v.detach().contiguous() for k, v in cc.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    state = dict(step=step, sched=sched.state_dict(), opt_groups=opt.state_dict()["param_groups"],
                 buffer=buffer_state)
    final = folder / "ckpt" / f"{step:09d}"
    if not ranks.main:
        tmp = ranks.broadcast(None)                    # rank 0's temporary folder
        if ranks.replica == 0:
            save_file({k: v.cpu() for k, v in tensors.items()}, Path(tmp) / shard_file(ranks))
        ranks.barrier()
        return
    with common.atomic_dir(final) as tmp:
        ranks.broadcast(str(tmp))
        save_file({k: v.cpu() for k, v in tensors.items()}, tmp / shard_file(ranks))
        ranks.barrier()                                # every shard's slice is written
        common.fault_point("ckpt_write")               # killed mid-write: the temporary folder has no marker yet
        (tmp / "state.json").write_text(json.dumps(dict(state, shards=ranks.shards), default=str))
        common.mark_done(tmp, step=step)               # the marker goes last
    common.fault_point("ckpt_prune")                   # killed here: two finished checkpoints, the newer one wins
    for old in (folder / "ckpt").iterdir():
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)


def newest_checkpoint(folder):
    """The newest finished checkpoint folder, or None."""
    root = folder / "ckpt"
    done = sorted(d for d in root.iterdir() if d.name.isdigit() and common.is_done(d)) if root.is_dir() else []
    return done[-1] if done else None


def checkpoint_buffer(folder):
    """The live buffer's text position recorded in the newest checkpoint (None: none, or a cache run)."""
    ckpt = newest_checkpoint(folder)
    return json.loads((ckpt / "state.json").read_text()).get("buffer") if ckpt else None


def load_checkpoint(folder, cc, opt, sched, device, ranks=None):
    """Restore the newest checkpoint (this rank's shard of it); returns its step (0 if there is none)."""
    ranks = ranks or Ranks()
    d = newest_checkpoint(folder)
    if d is None:
        return 0
    state = json.loads((d / "state.json").read_text())
    if state.get("shards", 1) != ranks.shards:
        raise UsageError(f"--resume: {folder}'s checkpoint was written by {state.get('shards', 1)} revision "
                         f"shard(s), this command runs {ranks.shards}; resume with --revision-shards "
                         f"{state.get('shards', 1)}")
    t = load_file(d / shard_file(ranks), device=str(device))
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
    """Refuse an output folder that holds another run, unless --resume or --overwrite; --resume refuses a
    command whose RunConfig differs from the run's."""
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
        for k, was, now in RunConfig.from_args(args).changed(old)[:1]:
            raise UsageError(f"--resume: {out} was started with {cli.flag(k)} {was}, this command has "
                             f"{cli.flag(k)} {now}; resume with the run's value, or --overwrite to train it again")
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


class Prefetch:
    """The step's raw batch. From a cache, checked for NaN/Inf; on a GPU the next cache batch is read, checked and
    pinned in a thread while this step runs, so its copy is asynchronous (batch_at is a pure function of the step:
    resuming is unaffected); on a CPU the thread would only take cores from the step. From a live buffer (`ready`
    makes a step's window resident): its batches are on the device already, their rows checked when the LMs
    computed them; the first window is filled here, before the loop."""

    def __init__(self, batch_at, revisions, device, start, steps, ready=None):
        self.batch_at, self.revisions, self.device, self.steps, self.ready = batch_at, revisions, device, steps, ready
        self.pin = str(device).startswith("cuda") and ready is None
        self.pool = ThreadPoolExecutor(1) if self.pin else None
        self.next = None
        if start < steps:                    # fails here, before the bar, on bad data
            if ready:
                ready(start)
            else:
                self.next = self._submit(start)

    def wait(self, step):
        """Until `step`'s data is at hand: the live buffer's window (a refill, or the producer finishing one), or
        the cache read in flight."""
        if self.ready:
            self.ready(step)
        else:
            self.next.result()

    def get(self, step):
        if self.ready:
            return self.batch_at(step)
        x_BMd = self.next.result().to(self.device, non_blocking=True)
        if step + 1 < self.steps:
            self.next = self._submit(step + 1)
        return x_BMd

    def close(self):
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, step):
        if self.pool:
            return self.pool.submit(self._fetch, step)
        f = Future()
        f.set_result(self._fetch(step))
        return f

    def _fetch(self, step):
        x_BMd = self.batch_at(step)
        if not torch.isfinite(x_BMd).all():
            r = int((~torch.isfinite(x_BMd)).any(-1).any(0).nonzero()[0])
            raise UsageError(f"NaN/Inf in the activations of revision {self.revisions[r]} at step {step}")
        return x_BMd.pin_memory() if self.pin else x_BMd


def phase_times(clock, buf, base, wall) -> dict:
    """Where the loop's time went, in seconds since it started (log.jsonl's "time", train.py's last line):
    lm_forward, the LMs' forwards, and buffer_copy, the shuffle of their rows into the live buffer and of each batch
    out of it (or a cache batch's copy to the device), wherever they ran; step, the crosscoder's training step;
    wait, the loop standing still for its data (a synchronous refill, which holds that refill's forwards and
    shuffle, or a producer not done yet); other: logging, validation, checkpoints; wall. clock: the loop's Laps;
    base: buf.times when the loop started (the first window is filled before it)."""
    laps = clock.read()
    refill = {k: v - base.get(k, 0.0) for k, v in (buf.times if buf else {}).items()}
    t = dict(lm_forward=refill.get("lm_forward", 0.0),
             buffer_copy=laps.get("copy", 0.0) + refill.get("refill_copy", 0.0),
             step=laps.get("step", 0.0), wait=laps.get("wait", 0.0), other=laps.get("other", 0.0), wall=wall)
    return {k: round(v, 3) for k, v in t.items()}


def format_times(t: dict) -> str:
    w = t["wall"] or float("nan")
    return (f"LM forward {t['lm_forward']:.1f} s, buffer shuffle/copy {t['buffer_copy']:.1f} s, crosscoder step "
            f"{t['step']:.1f} s ({100 * t['step'] / w:.0f}% of the wall time), waiting on the buffer {t['wait']:.1f} s "
            f"({100 * t['wait'] / w:.0f}%)")


def check_finite(revisions, scales, val_BMd):
    for r, s, v in zip(revisions, scales, val_BMd.unbind(1)):
        if not (math.isfinite(s) and torch.isfinite(v).all()):
            raise UsageError(f"NaN/Inf in the activations of revision {r} (normalisation scale {s}): "
                             "the checkpoint is broken or the cache is corrupt")


def log_record(step, args, out, sched, seen, seconds, cc, val_BMd, ranks, times=None) -> dict | None:
    """One line of log.jsonl: the batch's loss terms (Ranks.mean), then validation on the held-out rows, and where
    the time went (phase_times).
    Every rank of data replica 0 calls it (a shard validates its own revisions, summing the code over the
    shards); rank 0 writes the line and returns it."""
    val = validate(cc, val_BMd, args.device)
    val["val_fvu"] = ranks.gather_revisions(val["val_fvu"])
    if not ranks.main:
        return None
    rec = dict(step=step + 1, tokens=(step + 1) * args.batch_size, loss=out["loss"].item(), mse=out["mse"].item(),
               l0=out["l0"].item(), fvu=out["fvu_M"].tolist(), dead_frac=out["dead_frac"].item(),
               lr=sched.get_last_lr()[0], tokens_per_s=seen / seconds)
    rec.update(val)
    if times is not None:
        rec["time"] = times
    with open(args.out / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def save_run(args, spec, cc, scales, desc, need, ranks):
    """The finished run: the crosscoder with the scales folded in (it acts on raw activations), config.json
    with the RunConfig and where the data came from, DONE last; the checkpoints go. Every rank of replica 0
    calls it: revision shards' slices are assembled on rank 0 into the one-process layout."""
    if ranks.shards > 1:
        state, scales = shards.gather_state(cc, ranks.grid), ranks.gather_revisions(scales)
        if not ranks.main:
            return
        cc = CrossCoder(cc.cfg, init=False)
        cc.load_state_dict(state)
    final = cc.fold_scales(scales)
    gpu = str(args.device).startswith("cuda")
    peak = torch.cuda.max_memory_allocated(torch.device(args.device)) if gpu else None
    final.save(args.out, extra=dict(
        model=spec.key, repo=spec.repo, revisions=args.revisions, layer=args.layer, scales=scales,
        revision_tokens=[lm.parse_revision(r, spec.tokens_per_step).tokens for r in args.revisions],
        data=desc, steps=args.steps, tokens=args.tokens, memory=dict(predicted=need, measured_gpu_peak=peak),
        run=RunConfig.from_args(args).as_dict(), args=_jsonable(vars(args)),
        versions=_versions(), activations="raw (scales folded in)"))
    common.fault_point("train_final")              # killed here: weights saved, run not marked done
    common.mark_done(args.out, step=args.steps)
    shutil.rmtree(args.out / "ckpt", ignore_errors=True)


def start_log(args, start):
    """run_args.json (what --resume compares) and log.jsonl cut back to the checkpoint's step."""
    common.write_json(args.out / "run_args.json", _jsonable(vars(args)))
    _truncate_log(args.out / "log.jsonl", start)


# ---------------------------------------------------------------------------------------------
# DDP: torchrun's processes, the loss as a module DDP can wrap, one set of buffers on every rank

@dataclasses.dataclass
class Ranks:
    """This process in torchrun's world: R revision shards × D data replicas (shards.Grid; R = 1 is plain
    DDP over D = world ranks, one process is 1 × 1)."""
    rank: int = 0
    world: int = 1
    grid: shards.Grid = dataclasses.field(default_factory=shards.Grid)
    revs: range = range(0)            # this rank's revisions

    shards = property(lambda self: self.grid.shards)
    shard = property(lambda self: self.grid.shard)
    replicas = property(lambda self: self.grid.replicas)
    replica = property(lambda self: self.grid.replica)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def data_group(self):
        """The process group BatchTopK selects over and DDP averages over (the global batch); None: one."""
        if self.replicas == 1:
            return None
        return self.grid.data_group if self.shards > 1 else dist.group.WORLD

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def lock(self, folder):
        """Rank 0 holds the run folder's lock for the whole run."""
        return common.folder_lock(folder) if self.main else contextlib.nullcontext()

    def sync(self, cc, B_local):
        """One state on every replica after a step (CrossCoder.sync_buffers: dead-latent counters, the
        variant's); a shard's buffers follow from the summed code, the same on every shard."""
        if self.replicas > 1:
            cc.sync_buffers(self.replicas, B_local, self.data_group)

    def mean(self, out, keys=("loss", "mse", "l0")):
        """The whole batch's numbers: a shard's loss terms summed over the shards (each holds its revisions'),
        then averaged over the data replicas; the per-revision FVU gathered in revision order."""
        if self.shards > 1:
            for k in ("loss", "mse"):
                out[k] = out[k].detach().clone()
                dist.all_reduce(out[k], group=self.grid.shard_group)
            if "fvu_M" in out:
                out["fvu_M"] = torch.tensor(self.gather_revisions(out["fvu_M"].tolist()))
        if self.replicas > 1:
            for k in keys:
                out[k] = out[k].detach().clone()
                dist.all_reduce(out[k], group=self.data_group)
                out[k] /= self.replicas
        return out

    def gather_revisions(self, values: list) -> list:
        """Per-revision values of every shard, in revision order (the shards of this replica)."""
        if self.shards == 1:
            return list(values)
        parts = [None] * self.shards
        dist.all_gather_object(parts, list(values), group=self.grid.shard_group)
        return [v for part in parts for v in part]


def start_ranks(args) -> Ranks:
    """torchrun's process group (nccl on GPUs, gloo on CPUs), each rank on its own GPU, split into
    --revision-shards R × D data replicas; one process without it."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    M = len(args.revisions)
    if world > 1:
        dist.init_process_group("nccl" if str(args.device).startswith("cuda") else "gloo")
        args.device = rank_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
        if args.device.startswith("cuda"):
            torch.cuda.set_device(args.device)
    grid = shards.make_grid(args.revision_shards, world, rank, M)
    if args.batch_size % grid.replicas:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {grid.replicas} data replicas")
    return Ranks(rank, world, grid, grid.revisions(M))


def stop_ranks(ranks):
    if ranks.world > 1:
        dist.barrier()   # rank 0 may still be saving: a gloo peer torn down mid-way can abort the other
        dist.destroy_process_group()


class _LossModule(torch.nn.Module):
    """DDP averages gradients of what its forward returns: wrap the crosscoder's loss as a forward."""

    def __init__(self, cc):
        super().__init__()
        self.cc = cc

    def forward(self, x_BMd, step, metrics=True):
        return self.cc.loss(x_BMd, step=step, metrics=metrics)


def loss_module(cc, ranks, compile=False):
    """The loss train_step calls: under DDP wrapped so that backward averages the gradients over ranks
    (revision shards average over their replicas in ShardedCrossCoder.clip_grads instead)."""
    loss_fn = _LossModule(cc)
    if ranks.shards == 1 and ranks.world > 1:
        # the buffers are synced by CrossCoder.sync_buffers after each step, not at each forward; torch 2.13
        # renamed the switch (its forward_sync_buffers=False still syncs once at init: harmless, every rank
        # starts from the same seed or checkpoint)
        DDP = torch.nn.parallel.DistributedDataParallel
        new = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        loss_fn = DDP(loss_fn, **{"forward_sync_buffers" if new else "broadcast_buffers": False})
    return torch.compile(loss_fn) if compile else loss_fn


def rank_device(device, local_rank) -> str:
    """Under torchrun each rank takes its own GPU, cuda:LOCAL_RANK, whatever cuda or cuda:N was asked for."""
    return f"cuda:{local_rank}" if str(device).startswith("cuda") else str(device)


def _jsonable(d: dict) -> dict:
    """As JSON holds it: paths as text, tuples as lists (so a saved value compares equal to a fresh one)."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def last_log(folder) -> dict:
    return json.loads((folder / "log.jsonl").read_text().splitlines()[-1])


def _truncate_log(path, step):
    """On resume, drop log lines past the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _versions():
    import transformers
    return dict(torch=torch.__version__, transformers=transformers.__version__, python=sys.version.split()[0])


def wandb_run(args):
    import wandb
    return wandb.init(project=args.wandb, config={k: str(v) for k, v in vars(args).items()})


