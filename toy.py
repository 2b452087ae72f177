"""toy.py — the embedded default: a tiny language model that learns subject–verb agreement in stages.

Offline, from the toy grammar (grammar.py):
  1. a word-level tokenizer that, like GPT-NeoX's, adds no BOS on a plain call (saved with every
     checkpoint, reloads with AutoTokenizer),
  2. pretraining of a tiny GPT-NeoX with checkpoints saved as local revisions <out>/step<N>/,
  3. curve.csv: agreement accuracy per revision and sub-task; DONE last.

The model first learns agreement with the nearest noun ("the key to the cabinets ARE"), then with
the head noun: a nearest-noun phase around step 128 sits between a random start and a correct end,
which is what the crosscoder over step64 / step128 / step512 is meant to show.

Where it trains (--device): the CPU by default, with 2 threads, so the toy is the same model on every
machine (its default revisions step64 / step128 / step512 were chosen on it; thread counts and GPUs sum in
other orders and train slightly other weights). `--device cuda` (or `auto`: CUDA when there is one) trains
it on a GPU, where its phases may fall a few steps elsewhere (curve.csv says where); `--device cuda`
without CUDA is refused in one line. The loop never waits on the device: the batches are made on the CPU
64 steps at a time and copied in one asynchronous transfer, and nothing is read back per step.

Examples:
  python toy.py                          # train into models/toy (about 20 s on 2 CPU cores)
  python toy.py --out /tmp/toy --seed 1  # another seed
  python toy.py --steps 128              # a smoke test
  python toy.py --device cuda            # on a GPU (other weights than the CPU's, see above)
  python toy.py --write-pairs            # regenerate data/toy_sva.jsonl (deterministic)
"""
import argparse
import csv
import io
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __name__ == "__main__":
    # OpenMP's threads spin while they wait for each other; when another process holds a core, each of the
    # thousands of small parallel ops a step makes waits out a time slice: on 2 cores shared with other
    # processes a step took 450-1080 ms instead of 40-60 ms with passive waiting (it changes no number).
    # libgomp reads this when torch loads it, so it goes before the first import of torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from crosscoding import cli  # noqa: E402
from crosscoding.common import (  # noqa: E402
    ArgumentParser,
    UsageError,
    folder_lock,
    is_done,
    mark_done,
    positive,
    read_json,
    run_main,
    unmark_done,
    update_results,
    write_text,
)
from crosscoding.grammar import (  # noqa: E402
    PAIRS_PATH,
    SUBTASKS,
    make_pairs,
    training_sentences,
    vocabulary,
    write_pairs,
)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "models" / "toy"  # where lm.py looks for --model toy


def toy_pairs():
    """The toy_sva pairs as tasks.Pair objects (the same ones as data/toy_sva.jsonl)."""
    from crosscoding.tasks import Pair
    return [Pair(**p) for p in make_pairs()]


# -----------------------------------------------------------------------------
# The tokenizer: one token per word. Like GPT-NeoX's, a plain call adds no BOS: every sequence the
# model sees starts with <bos> because the code puts it there (lm.bos_id), so the toy walks the real
# models' path.

def build_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=CONTEXT)


# -----------------------------------------------------------------------------
# Model and training

CONTEXT = 32
REVISIONS = [0, 16, 32, 64, 96, 128, 160, 192, 256, 512]


@dataclass
class ToyConfig:
    steps: int = 512
    seed: int = 0
    batch: int = 64
    context: int = CONTEXT
    layers: int = 2
    d_model: int = 64
    heads: int = 4
    d_ff: int = 256
    rotary_pct: float = 0.25
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup: int = 50
    final_lr_frac: float = 0.1
    clip: float = 1.0
    revisions: list[int] = field(default_factory=lambda: list(REVISIONS))

    def checkpoints(self) -> list[int]:
        """The revisions that fit in `steps`, always including the last step."""
        return sorted({r for r in self.revisions if r <= self.steps} | {self.steps})


def build_model(cfg: ToyConfig, tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    mcfg = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.d_ff, rotary_pct=cfg.rotary_pct,
        max_position_embeddings=cfg.context, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPTNeoXForCausalLM(mcfg)


def blocks(tokenizer, seed: int, context: int):
    """Endless training blocks [context] of token ids: <bos>, then the sentence stream joined by <eos>
    and cut anywhere — the layout tasks.text_blocks gives the later stages, so cached activations
    look like training. (Blocks aligned to sentence starts made the nearest-noun phase shorter:
    about 40 steps instead of 60–100, over by step 128 for some seeds.)"""
    vocab = tokenizer.get_vocab()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    buf: list[int] = []
    for s in training_sentences(seed):
        buf += [vocab[w] for w in s.words] + [eos]
        while len(buf) >= context - 1:
            yield [bos] + buf[:context - 1]
            buf = buf[context - 1:]


def batches(tokenizer, cfg: ToyConfig, device, per_copy=64):
    """The training batches [batch, context] on `device`, in blocks' order: made on the CPU per_copy steps at a
    time and copied in one pinned, asynchronous transfer (a pageable copy per step would make the host wait
    for the device every step)."""
    data = blocks(tokenizer, cfg.seed, cfg.context)
    while True:
        ids_SBT = torch.tensor([[next(data) for _ in range(cfg.batch)] for _ in range(per_copy)])
        if torch.device(device).type == "cuda":
            ids_SBT = ids_SBT.pin_memory()
        yield from ids_SBT.to(device, non_blocking=True)


def optimizer(model, cfg: ToyConfig):
    """AdamW and its schedule (warm-up, then cosine to final_lr_frac)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def train_step(model, opt, sched, ids_BT, clip):
    """One step of next-token loss at every position; returns the loss, left on the device (reading it
    would make the host wait for the step)."""
    loss = model(input_ids=ids_BT, labels=ids_BT).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()
    return loss.detach()


def lr_lambda(cfg: ToyConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def save_revision(model, tokenizer, folder: Path):
    """save_pretrained into a temporary folder, then rename: a killed run leaves no half folder."""
    from transformers.utils import logging as hf_logging
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar would break our own
    try:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if folder.exists():  # os.replace cannot replace a non-empty directory: move the old one aside
        old = folder.with_name(f".{folder.name}.old{os.getpid()}")
        os.replace(folder, old)
        shutil.rmtree(old)
    os.replace(tmp, folder)


def evaluate(model, tokenizer, pairs) -> dict[str, float]:
    from crosscoding.tasks import accuracy_by_subtask
    was_training = model.training
    model.eval()
    acc = accuracy_by_subtask(model, tokenizer, pairs, device=next(model.parameters()).device, batch_size=256)
    model.train(was_training)
    return acc


def train_toy(out=DEFAULT_OUT, cfg: ToyConfig | None = None, progress: bool = True, device="cpu") -> Path:
    """Train the toy model on `device`, saving <out>/step<N>/ per revision, <out>/curve.csv, and <out>/DONE last.
    The weights start the same on every device (drawn on the CPU)."""
    from tqdm import tqdm
    cfg = cfg or ToyConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    with folder_lock(out):
        # Incomplete until DONE is written again; revisions of an earlier run (and temporary
        # folders of a killed one) go now, so the folder never mixes two runs.
        unmark_done(out)
        for p in out.iterdir():
            if p.is_dir() and re.fullmatch(r"\.?step\d+(\.(tmp|old)\d+)?", p.name):
                shutil.rmtree(p)
        torch.manual_seed(cfg.seed)
        tokenizer = build_tokenizer()
        model = build_model(cfg, tokenizer).to(device)
        opt, sched = optimizer(model, cfg)
        data = batches(tokenizer, cfg, device)
        pairs = toy_pairs()
        checkpoints = cfg.checkpoints()
        rows = []

        def checkpoint(step: int):
            rev = f"step{step}"
            save_revision(model, tokenizer, out / rev)
            acc = evaluate(model, tokenizer, pairs)
            rows.append({"revision": rev, "step": step, "tokens": step * cfg.batch * cfg.context,
                         **{k: round(acc.get(k, float("nan")), 4) for k in SUBTASKS}})

        t0 = time.time()
        model.train()
        bar = tqdm(range(cfg.steps + 1), desc="toy", disable=not progress, mininterval=0.5)
        loss = None
        for step in bar:
            if step in checkpoints:     # the only points where the loop reads anything back from the device
                checkpoint(step)
                bar.set_postfix_str(" ".join(f"{k}={rows[-1][k]:.2f}" for k in SUBTASKS[:3]))
            if step == cfg.steps:
                break
            loss = train_step(model, opt, sched, next(data), cfg.clip)
        bar.close()

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        write_text(out / "curve.csv", buf.getvalue())
        mark_done(out, config=asdict(cfg), revisions=[r["revision"] for r in rows], subtasks=SUBTASKS,
                  device=str(device), seconds=round(time.time() - t0, 1),
                  final_loss=round(loss.item(), 4) if loss is not None else None)
    return out


def read_curve(out=DEFAULT_OUT) -> list[dict]:
    with open(Path(out) / "curve.csv") as f:
        return list(csv.DictReader(f))


def format_curve(rows: list[dict]) -> str:
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def ensure_toy(out=DEFAULT_OUT, steps: int = 512, seed: int = 0) -> Path:
    """The toy model folder, training it first (defaults: ~20 s on CPU) unless a finished run with
    the same steps and seed is already there. This is what `--model toy` resolves to."""
    out = Path(out)

    def ready():
        cfg = read_json(out / "DONE", "toy completion marker").get("config", {}) if is_done(out) else {}
        return cfg.get("steps") == steps and cfg.get("seed") == seed

    if ready():
        return out
    with folder_lock(out.parent, wait=True):   # two commands started together build it once
        if ready():
            return out
        print(f"training the toy model into {out} (no network needed)", file=sys.stderr)
        return train_toy(out, ToyConfig(steps=steps, seed=seed))


# -----------------------------------------------------------------------------

def pick_device(name: str) -> str:
    """--device: cpu, cuda[:N], or auto (cuda when there is one); cuda without CUDA is refused."""
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", name):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or auto (cuda when there is one), got {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch sees no CUDA device here; use --device cpu, or --device auto "
                         "(CUDA when there is one)")
    return name


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add(p, "--out", "--seed", "--device", "--results", out=str(DEFAULT_OUT), seed=0, device="cpu")  # and auto
    p.add_argument("--steps", type=positive("--steps"), default=None, help="training steps (default 512)")
    p.add_argument("--write-pairs", action="store_true", help=f"regenerate {PAIRS_PATH.relative_to(HERE)} and exit")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.write_pairs:
        path = write_pairs()
        print(f"wrote {len(make_pairs())} pairs to {path}")
        return
    device = pick_device(args.device)
    torch.set_num_threads(2)  # the toy's thread count (see the docstring); more only slow a model this small
    steps = args.steps or 512
    t0 = time.time()
    out = train_toy(args.out, ToyConfig(steps=steps, seed=args.seed), device=device)
    curve = read_curve(out)
    print(format_curve(curve))
    print(f"saved {out}/step*/ and {out}/curve.csv in {time.time() - t0:.1f} s on {device}")
    if args.results:
        cols = list(curve[0])
        table = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                          + ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in curve])
        update_results("toy", f"## The toy LM's agreement accuracy per revision and sub-task "
                       f"(`{cli.command('toy.py', argv)}`)\n\nLM seed {args.seed}, {steps} steps, "
                       f"{time.time() - t0:.0f} s on {device} (`{os.path.relpath(Path(out) / 'curve.csv', HERE)}`):"
                       f"\n\n{table}", HERE / "FINDINGS.md")


if __name__ == "__main__":
    run_main(main)
