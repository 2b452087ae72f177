"""train.py — train ONE sparse crosscoder over layer L of several checkpoints.

    python train.py                                   # the toy model (after `python toy.py`), ~1 minute on a CPU
    python train.py --model pythia-1b --layer 8       # the paper's run (GPU, network): live buffer, 400M tokens
    python train.py --cache cache/toy-L0-step64_step128_step512 --arch batchtopk
    torchrun --nproc_per_node=2 train.py ...          # data-parallel (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=4 train.py ... --revision-shards 2   # 2 revision shards × 2 data replicas

Activations come from a cache (made by cache_acts.py; the toy's preset makes its cache first, saying
so) or from a live buffer that runs the checkpoints on the text's training split. Validation and the
normalisation scales s_m come from the held-out split. The crosscoder trains on s_m·x_m; the saved
one has the scales folded in, so it acts on raw activations.

Run folder (runs/<name>/): config.json + crosscoder.safetensors, then DONE; log.jsonl per logging
step; ckpt/<step>/ (weights, optimizer, schedule, RNG, the live buffer's text position) every
--ckpt-every steps, so --resume continues after a kill and ends with the weights of an
uninterrupted run.
"""
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from crosscoding import activations, cli, common, defaults, lm, measures, training
from crosscoding.common import UsageError, positive
from crosscoding.crosscoder import ConfigError, CrossCoder
from crosscoding.shards import ShardedCrossCoder
from crosscoding.training import RunConfig


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
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="the crosscoder's matmuls: fp32, or bf16 autocast on a GPU (the loss sums stay fp32) "
                        "(default: %(default)s)")
    cli.add_settings(p, pre)     # the variants' own: --l1-coeff, --k, --jumprelu-coeff, … (variants.py)
    p.add_argument("--control", choices=list(training.CONTROLS), default="none",
                   help="a negative control (controls.py trains them): "
                        + "; ".join(f"{k}: {v}" for k, v in training.CONTROLS.items()) + " (default: %(default)s)")
    p.add_argument("--buffer-tokens", type=positive("--buffer-tokens"), default=pre.buffer_tokens,
                   help="live buffer: token positions held on the device (default: %(default)s)")
    p.add_argument("--refill", choices=("auto", "sync", "overlap"), default="auto",
                   help="live buffer: compute the next window's chunk while the current one trains (overlap: a "
                        "thread, on a GPU its own CUDA stream) or when the window starts (sync); the same batches "
                        "either way. auto: overlap on a GPU, sync on a CPU, where the thread would take the step's "
                        "cores (default: %(default)s)")
    p.add_argument("--log-every", type=positive("--log-every"), default=None, help="default: 1/20 of the steps")
    p.add_argument("--ckpt-every", type=positive("--ckpt-every"), default=None, help="default: 1/10 of the steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss (GPU)")
    p.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to Weights & Biases")
    p.add_argument("--revision-shards", type=positive("--revision-shards"), default=1,
                   help="under torchrun: split the revisions over this many ranks (each holds its revisions' LMs, "
                        "crosscoder slices and Adam state); the other factor of the world is data-parallel "
                        "(default: %(default)s, plain DDP)")
    p.add_argument("--plan", action="store_true", help="print the per-rank memory of each multi-GPU layout for "
                   "--gpus GPUs of --gpu-gb GB and the smallest that fits, load nothing, and exit")
    p.add_argument("--gpus", type=positive("--gpus"), default=8, help="--plan: GPUs available (default: %(default)s)")
    p.add_argument("--gpu-gb", type=cli.finite_positive("--gpu-gb"), default=80,
                   help="--plan: memory of one GPU in GB (default: %(default)s)")
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: --resume continues the run in "
                         "--out, --overwrite starts it again")
    if args.layer is None:
        raise UsageError(f"--layer is required for {args.model}")
    args.revisions = args.revisions or []
    if len(args.revisions) < 2:
        raise UsageError(f"--revisions needs at least 2 revisions to crosscode, got {args.revisions}")
    if len(set(args.revisions)) != len(args.revisions):
        raise UsageError(f"--revisions lists a revision twice: {args.revisions}")
    if args.control != "none" and args.revision_shards > 1:
        raise UsageError(f"--control {args.control} trains in one process or plain DDP; drop --revision-shards")
    args.steps = args.tokens // args.batch_size
    if args.steps < 1:
        raise UsageError(f"--tokens {args.tokens} is less than one batch of {args.batch_size}")
    args.log_every = args.log_every or max(1, args.steps // 20)
    args.ckpt_every = args.ckpt_every or max(1, args.steps // 10)
    args.text = cli.given(argv, "--text") or lm.default_text(spec, args.weights)
    if args.cache is None and pre.data == "cache" and args.weights == "hub":
        args.cache = str(defaults.cache_dir(spec.key, args.layer, args.revisions))
        args.make_cache = True
    else:
        args.make_cache = False
    args.out = Path(args.out or defaults.run_dir(spec.key, args.layer, args.revisions, args.arch))
    try:    # the config's and the variant's own checks (BatchTopK's k ≤ F, Matryoshka's groups …), before any load
        RunConfig.from_args(args).crosscoder(len(args.revisions), 1)
    except ConfigError as e:     # named by its flag where it has one (--k), else by the field (from --tokens …)
        what = f"{cli.flag(e.field)} {getattr(args, e.field)!r}" if e.field in RunConfig.names() else str(e)
        raise UsageError(f"--arch {args.arch}: {what} is invalid: {str(e).split('is invalid: ')[-1]}") from None
    return args, spec


def train(args, spec, ranks):
    # ---- set-up: the output folder, the data, the crosscoder and its optimizer, a checkpoint to resume from
    training.prepare_out(args, ranks.rank)
    ranks.barrier()
    resume_buffer = training.checkpoint_buffer(args.out) if args.resume else None
    batch_at, scales, val_BMd, desc, buf = training.data_source(args, spec, ranks, resume_buffer)
    mine = [args.revisions[m] for m in ranks.revs]     # this rank's revisions: all, or its shard's
    cfg = RunConfig.from_args(args).crosscoder(len(args.revisions), desc["d"])
    need = training.predict_memory(cfg, args.batch_size // ranks.replicas, args.device,
                                   buf.resident_bytes(desc["d"]) if buf else 0, M=len(mine))
    training.check_memory(need, args.device)
    training.check_finite(mine, scales, val_BMd)
    torch.manual_seed(args.seed)
    if str(args.device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True   # TF32 matmuls; the loss sums stay fp32
    # one process or DDP: the crosscoder; revision shards: this shard's (shards.py)
    cc = (ShardedCrossCoder(cfg, ranks.grid) if ranks.shards > 1 else CrossCoder(cfg)).to(args.device)
    if args.control == "fixed-decoder":
        cc.W_dec_FMd.requires_grad_(False)             # Adam skips it: the decoder stays at its random init
    cc.group = ranks.data_group                        # BatchTopK selects over the global batch
    opt = cc.make_optimizer(args.lr)
    sched = cc.make_scheduler(opt)
    start = training.load_checkpoint(args.out, cc, opt, sched, args.device, ranks) if args.resume else 0
    if ranks.main:
        training.start_log(args, start)
    s_M = torch.tensor(scales, device=args.device)[None, :, None]   # training runs on s_m·x_m
    val_BMd = val_BMd * s_M.cpu()
    loss_fn = training.loss_module(cc, ranks, args.compile)
    autocast = args.precision == "bf16" and str(args.device).startswith("cuda")
    wandb = training.wandb_run(args) if (args.wandb and ranks.main) else None
    batches = training.Prefetch(batch_at, mine, args.device, start, args.steps,
                                ready=(lambda step: buf.ready(step, args.batch_size)) if buf else None)
    if ranks.main:
        grid = f" as {ranks.shards} revision shards × {ranks.replicas} replicas" if ranks.shards > 1 else ""
        print(f"training {cfg.n_models} revisions × d={cfg.d_model} → F={cfg.dict_size} ({cfg.arch}){grid}, "
              f"{args.steps} steps of {args.batch_size}; predicted peak memory {need / 2**30:.2f} GiB per rank on "
              f"{args.device}", file=sys.stderr)

    # ---- the loop
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", disable=not ranks.main,
               dynamic_ncols=True)
    # where the time goes, phase by phase (training.phase_times), without a host sync per step
    clock, base = activations.Laps(args.device), dict(buf.times) if buf else {}
    t0, seen = time.time(), 0
    try:
        for step in bar:
            # data: this step's batch, normalised (a pure function of the step: a resumed run sees the same)
            batches.wait(step)
            clock.lap("wait")
            x_BMd = batches.get(step) * s_M
            if args.control == "shuffled-revisions":
                x_BMd = training.shuffle_revisions(x_BMd, args.seed, step)
            clock.lap("copy")
            # step: loss, backward, clip, Adam, lr schedule; under DDP, every replica's buffers made one
            log_now = (step + 1) % args.log_every == 0 or step + 1 == args.steps
            out = cc.train_step(opt, sched, x_BMd, step, loss_fn=loss_fn, autocast=autocast, metrics=log_now)
            ranks.sync(cc, x_BMd.shape[0])
            clock.lap("step")
            seen += x_BMd.shape[0] * ranks.replicas
            common.fault_point("train_step")
            # log: the whole batch's loss terms, the held-out FVU / L0 / dead, one line of log.jsonl
            if log_now:
                out = ranks.mean(out)
            if log_now and ranks.replica == 0:
                wall = time.time() - t0
                rec = training.log_record(step, args, out, sched, seen, wall, cc, val_BMd, ranks,
                                          training.phase_times(clock, buf, base, wall))
                if rec:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", L0=f"{rec['val_l0']:.1f}",
                                    FVU="/".join(f"{v:.3f}" for v in rec["val_fvu"]))
                if wandb:
                    wandb.log(rec, step=step + 1)
            # checkpoint: every --ckpt-every steps, atomically (every shard its slice); the last step saves the run
            if (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
                training.save_checkpoint(args.out, step + 1, cc, opt, sched,
                                         buf.state(step + 1, args.batch_size) if buf else None, ranks)
            clock.lap("other")
    except BaseException:
        bar.leave = False   # an error leaves one line on the terminal, not a stale bar
        bar.close()
        raise
    finally:
        batches.close()
        if buf:
            buf.close()

    # ---- the run: the crosscoder on raw activations, config.json, DONE last
    if ranks.replica == 0:
        training.save_run(args, spec, cc, scales, desc, need, ranks)
    if ranks.main:
        last = training.last_log(args.out)
        times = f"; time: {training.format_times(last['time'])}" if "time" in last else ""
        print(f"run {args.out}: val FVU {[f'{v:.3f}' for v in last['val_fvu']]}, L0 {last['val_l0']:.1f}, "
              f"dead {100 * last['val_dead_frac']:.0f}%, {last['tokens_per_s']:.0f} tokens/s, "
              f"{time.time() - t0:.0f} s{times}")
        warning = measures.fvu_warning(dict(zip(args.revisions, last["val_fvu"])), "val FVU")
        if warning:
            print(warning)


def main(argv=None):
    args, spec = parse_args(argv)
    if args.plan:
        print(training.plan(spec, args.layer, len(args.revisions), args.dict_size, args.batch_size, args.buffer_tokens,
                            args.gpus, args.gpu_gb))
        return None
    common.keep_freed_memory()
    ranks = training.start_ranks(args)
    fresh = ranks.main and not args.out.exists()
    try:
        with ranks.lock(args.out):
            train(args, spec, ranks)
    except BaseException:
        # a run that fails before its first checkpoint has nothing to resume: leave no folder that looks
        # like a run (a killed one keeps its folder, which --resume continues)
        if fresh and not (args.out / "ckpt").exists():
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    training.stop_ranks(ranks)
    return args.out


if __name__ == "__main__":
    common.run_main(main)
