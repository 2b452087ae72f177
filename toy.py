"""toy.py — the embedded default: a tiny language model that learns subject–verb agreement in stages.

Everything the pipeline needs runs offline from this one file:
  1. a seeded probabilistic grammar of English-like sentences with subject–verb agreement,
  2. a word-level tokenizer (saved with every checkpoint, reloads with AutoTokenizer),
  3. pretraining of a tiny GPT-NeoX with checkpoints saved as local revisions <out>/step<N>/,
  4. curve.csv: agreement accuracy per revision and sub-task,
  5. the minimal-pair task toy_sva (data/toy_sva.jsonl),
  6. toy_corpus(): LM text from the same grammar on a held-out seed, for the later stages.

The model first learns agreement with the nearest noun ("the key to the cabinets ARE"), then with
the head noun: a nearest-noun phase around step 128 sits between a random start and a correct end,
which is what the crosscoder over step64 / step128 / step512 is meant to show.

Examples:
  python toy.py                          # train into models/toy (about 20 s on 2 CPU cores)
  python toy.py --out /tmp/toy --seed 1  # another seed
  python toy.py --quick                  # 128 steps, for a smoke test
  python toy.py --write-pairs            # regenerate data/toy_sva.jsonl (deterministic)
"""
import argparse
import csv
import io
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from common import ArgumentParser, UsageError, folder_lock, positive, read_json, run_main, write_json, write_text

HERE = Path(__file__).resolve().parent
PAIRS_PATH = HERE / "data" / "toy_sva.jsonl"
DEFAULT_OUT = HERE / "models" / "toy"  # where lm.py looks for --model toy

# -----------------------------------------------------------------------------
# The grammar. Every lexical entry is a (singular, plural) pair; index 0 = singular, 1 = plural.

NOUNS = [  # 24 pairs, some irregular so that number is not just "ends in s"
    ("key", "keys"), ("cabinet", "cabinets"), ("dog", "dogs"), ("cat", "cats"),
    ("boy", "boys"), ("girl", "girls"), ("teacher", "teachers"), ("doctor", "doctors"),
    ("farmer", "farmers"), ("author", "authors"), ("pilot", "pilots"), ("table", "tables"),
    ("house", "houses"), ("bird", "birds"), ("friend", "friends"), ("box", "boxes"),
    ("glass", "glasses"), ("church", "churches"), ("child", "children"), ("man", "men"),
    ("woman", "women"), ("mouse", "mice"), ("person", "people"), ("goose", "geese"),
]
INTRANSITIVE = [
    ("sleeps", "sleep"), ("runs", "run"), ("smiles", "smile"), ("falls", "fall"),
    ("waits", "wait"), ("laughs", "laugh"), ("swims", "swim"),
]
TRANSITIVE = [
    ("opens", "open"), ("likes", "like"), ("sees", "see"), ("finds", "find"),
    ("helps", "help"), ("follows", "follow"), ("watches", "watch"),
]
BE = [("is", "are"), ("was", "were")]
HAVE = [("has", "have")]
ADJECTIVES = ["old", "new", "big", "small", "red", "happy", "quiet", "tall", "green", "young"]
PREPOSITIONS = ["to", "near", "behind", "with", "by", "from", "under"]
ADVERBS = ["often", "never", "always", "quickly", "slowly", "today", "again"]
FUNCTION_WORDS = ["the", "that", "."]
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]

# Subject shapes: bare 40%, prepositional-phrase attractor 30%, relative clause 30% (half subject-
# relative "the key that opens the cabinets", half object-relative "the key that the men open").
SUBJECT_KINDS = {"bare": 0.40, "pp": 0.30, "src": 0.15, "orc": 0.15}
# Main verb: copula with an adjective or a PP, has/have + object, intransitive, transitive.
VERB_KINDS = {"be": 0.35, "have": 0.15, "intransitive": 0.25, "transitive": 0.25}
P_ADJ = 0.3      # an adjective before a noun
P_ADVERB = 0.3   # an adverb at the end of the sentence

# 15% of the ordered (head, attractor) noun pairs never occur in training, only in test pairs.
# The split is fixed (not tied to --seed) so data/toy_sva.jsonl is valid for every training seed.
HELDOUT_FRACTION = 0.15
SPLIT_SEED = 1234
PAIRS_SEED = 4321          # the test pairs' own stream
PAIRS_PER_SUBTASK = 300
SUBTASKS = ["simple", "across_pp", "across_rc", "across_orc"]  # across_orc: an extra, not a target


def vocabulary() -> list[str]:
    words = [w for pair in NOUNS + INTRANSITIVE + TRANSITIVE + BE + HAVE for w in pair]
    return SPECIALS + words + ADJECTIVES + PREPOSITIONS + ADVERBS + FUNCTION_WORDS


def heldout_pairs() -> set[tuple[int, int]]:
    """The fixed set of (head, attractor) noun indices that training never shows together."""
    all_pairs = [(h, a) for h in range(len(NOUNS)) for a in range(len(NOUNS))]
    rng = random.Random(SPLIT_SEED)
    return set(rng.sample(all_pairs, round(HELDOUT_FRACTION * len(all_pairs))))


@dataclass
class Sentence:
    words: list[str]
    kind: str                  # subject shape: bare / pp / src / orc
    head: int                  # noun index of the subject's head
    head_pl: int               # 0 singular, 1 plural
    attractor: int | None      # noun index inside the subject (PP object, RC noun), if any
    attractor_pl: int | None
    verb_pos: int              # index in `words` of the main verb (agrees with the head)
    nouns: list[int] = field(default_factory=list)  # every noun index, in sentence order

    @property
    def text(self) -> str:
        return " ".join(self.words)


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _np(rng, noun: int, pl: int) -> list[str]:
    adj = [rng.choice(ADJECTIVES)] if rng.random() < P_ADJ else []
    return ["the", *adj, NOUNS[noun][pl]]


def sample_sentence(rng: random.Random, kind: str | None = None, head: int | None = None,
                    head_pl: int | None = None, attractor: int | None = None,
                    attractor_pl: int | None = None) -> Sentence:
    """One sentence; anything not given is drawn. The attractor's number is independent of the head's."""
    kind = kind or _pick(rng, SUBJECT_KINDS)
    head = rng.randrange(len(NOUNS)) if head is None else head
    head_pl = rng.randrange(2) if head_pl is None else head_pl
    nouns = [head]
    words = _np(rng, head, head_pl)
    if kind != "bare":
        attractor = rng.randrange(len(NOUNS)) if attractor is None else attractor
        attractor_pl = rng.randrange(2) if attractor_pl is None else attractor_pl
        nouns.append(attractor)
        if kind == "pp":      # the key to the cabinets
            words += [rng.choice(PREPOSITIONS), *_np(rng, attractor, attractor_pl)]
        elif kind == "src":   # the key that opens the cabinets  (embedded verb agrees with the head)
            words += ["that", rng.choice(TRANSITIVE)[head_pl], *_np(rng, attractor, attractor_pl)]
        elif kind == "orc":   # the key that the men open        (embedded verb agrees with the attractor)
            words += ["that", *_np(rng, attractor, attractor_pl), rng.choice(TRANSITIVE)[attractor_pl]]
        else:
            raise ValueError(f"unknown subject kind {kind!r}")
    else:
        attractor = attractor_pl = None
    verb_pos = len(words)
    vkind = _pick(rng, VERB_KINDS)
    if vkind == "be":
        words.append(rng.choice(BE)[head_pl])
        if rng.random() < 0.5:
            words.append(rng.choice(ADJECTIVES))
        else:
            obj, obj_pl = rng.randrange(len(NOUNS)), rng.randrange(2)
            words += [rng.choice(PREPOSITIONS), *_np(rng, obj, obj_pl)]
            nouns.append(obj)
    elif vkind == "have" or vkind == "transitive":
        verb = HAVE[0] if vkind == "have" else rng.choice(TRANSITIVE)
        obj, obj_pl = rng.randrange(len(NOUNS)), rng.randrange(2)
        words += [verb[head_pl], *_np(rng, obj, obj_pl)]
        nouns.append(obj)
    else:
        words.append(rng.choice(INTRANSITIVE)[head_pl])
    if rng.random() < P_ADVERB:
        words.append(rng.choice(ADVERBS))
    words.append(".")
    return Sentence(words, kind, head, head_pl, attractor, attractor_pl, verb_pos, nouns)


def shows_heldout(s: Sentence, heldout: set[tuple[int, int]]) -> bool:
    """Does any ordered pair of nouns in the sentence belong to the held-out split?
    Stricter than checking (head, attractor) only: held-out nouns never meet in training at all."""
    n = s.nouns
    return any((n[i], n[j]) in heldout for i in range(len(n)) for j in range(i + 1, len(n)))


def training_sentences(seed: int, stream: str = "train"):
    """Endless sentences for training (never showing a held-out noun pair)."""
    rng = random.Random(f"{stream}-{seed}")  # str seeds are stable across processes
    heldout = heldout_pairs()
    while True:
        s = sample_sentence(rng)
        if not shows_heldout(s, heldout):
            yield s


def toy_corpus(n_sentences: int, seed: int = 0) -> Iterator[str]:
    """LM text for the later stages (caching, top contexts), one sentence per item, lazily: the
    training distribution, but a different random stream from the one the model was trained on.
    tasks.text_blocks joins these with <eos> and starts each block with <bos>, as training does."""
    gen = training_sentences(seed, stream="corpus")
    return (next(gen).text for _ in range(n_sentences))


# -----------------------------------------------------------------------------
# The minimal pairs (toy_sva)

def _verb_pair(s: Sentence) -> tuple[str, str]:
    """(good, bad) answers: the main verb and its other-number form."""
    verb = s.words[s.verb_pos]
    for pair in INTRANSITIVE + TRANSITIVE + BE + HAVE:
        if verb in pair:
            return " " + pair[s.head_pl], " " + pair[1 - s.head_pl]
    raise AssertionError(f"{verb!r} is not a verb")


def make_pairs(n_per_subtask: int = PAIRS_PER_SUBTASK, seed: int = PAIRS_SEED) -> list[dict]:
    """Minimal pairs per sub-task, as dicts {prefix, good, bad, subtask}. Attractor sub-tasks put an
    attractor of the OTHER number in the subject, half of them from the held-out noun pairs."""
    rng = random.Random(f"pairs-{seed}")
    heldout = sorted(heldout_pairs())
    seen_pairs = [(h, a) for h in range(len(NOUNS)) for a in range(len(NOUNS)) if (h, a) not in set(heldout)]
    kinds = {"simple": "bare", "across_pp": "pp", "across_rc": "src", "across_orc": "orc"}
    out = []
    for subtask in SUBTASKS:
        seen: set[tuple[str, str]] = set()
        for _ in range(100 * n_per_subtask):
            if len(seen) == n_per_subtask:
                break
            head_pl = rng.randrange(2)
            if subtask == "simple":
                s = sample_sentence(rng, "bare", head_pl=head_pl)
            else:
                head, attractor = rng.choice(heldout if rng.random() < 0.5 else seen_pairs)
                s = sample_sentence(rng, kinds[subtask], head, head_pl, attractor, 1 - head_pl)
            prefix = " ".join(s.words[:s.verb_pos])
            good, bad = _verb_pair(s)
            if (prefix, good) in seen:
                continue
            seen.add((prefix, good))
            out.append({"prefix": prefix, "good": good, "bad": bad, "subtask": subtask})
    return out


def pairs_jsonl() -> str:
    return "".join(json.dumps(p) + "\n" for p in make_pairs())


def write_pairs(path: Path = PAIRS_PATH) -> Path:
    write_text(path, pairs_jsonl())
    return path


def toy_pairs():
    """The toy_sva pairs as tasks.Pair objects (the same ones as data/toy_sva.jsonl)."""
    from tasks import Pair
    return [Pair(**p) for p in make_pairs()]


# -----------------------------------------------------------------------------
# The tokenizer: one token per word, BOS prepended to every encoded text (as in training)

def build_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = Whitespace()
    # Every sentence the model saw starts with <bos>; prefixes at evaluation must too.
    # (Answers are encoded with add_special_tokens=False: " is" -> [is].)
    tk.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                           special_tokens=[("<bos>", vocab["<bos>"])])
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
    from tasks import accuracy_by_subtask
    was_training = model.training
    model.eval()
    acc = accuracy_by_subtask(model, tokenizer, pairs, device="cpu", batch_size=256)
    model.train(was_training)
    return acc


def train_toy(out=DEFAULT_OUT, cfg: ToyConfig | None = None, progress: bool = True) -> Path:
    """Train the toy model, saving <out>/step<N>/ per revision, <out>/curve.csv, and <out>/done.json last."""
    from tqdm import tqdm
    cfg = cfg or ToyConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    with folder_lock(out):
        # Incomplete until done.json is written again; revisions of an earlier run (and temporary
        # folders of a killed one) go now, so the folder never mixes two runs.
        (out / "done.json").unlink(missing_ok=True)
        for p in out.iterdir():
            if p.is_dir() and re.fullmatch(r"\.?step\d+(\.(tmp|old)\d+)?", p.name):
                shutil.rmtree(p)
        torch.manual_seed(cfg.seed)
        tokenizer = build_tokenizer()
        model = build_model(cfg, tokenizer)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        data = blocks(tokenizer, cfg.seed, cfg.context)
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
        for step in bar:
            if step in checkpoints:
                checkpoint(step)
                bar.set_postfix_str(" ".join(f"{k}={rows[-1][k]:.2f}" for k in SUBTASKS[:3]))
            if step == cfg.steps:
                break
            ids_BT = torch.tensor([next(data) for _ in range(cfg.batch)])
            loss = model(input_ids=ids_BT, labels=ids_BT).loss  # next-token loss at every position
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            sched.step()
        bar.close()

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        write_text(out / "curve.csv", buf.getvalue())
        write_json(out / "done.json", {"config": asdict(cfg), "revisions": [r["revision"] for r in rows],
                                       "subtasks": SUBTASKS, "seconds": round(time.time() - t0, 1),
                                       "final_loss": round(loss.item(), 4) if cfg.steps else None})
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
    done = out / "done.json"
    if done.exists():
        cfg = read_json(done, "toy completion marker").get("config", {})
        if cfg.get("steps") == steps and cfg.get("seed") == seed:
            return out
    print(f"training the toy model into {out} (no network needed)", file=sys.stderr)
    return train_toy(out, ToyConfig(steps=steps, seed=seed))


# -----------------------------------------------------------------------------

def main():
    p = ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: models/toy beside toy.py)")
    p.add_argument("--steps", type=positive("--steps"), default=None, help="training steps (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data (default 0)")
    p.add_argument("--quick", action="store_true", help="128 steps: a smoke test")
    p.add_argument("--write-pairs", action="store_true", help=f"regenerate {PAIRS_PATH.relative_to(HERE)} and exit")
    args = p.parse_args()
    if args.write_pairs:
        path = write_pairs()
        print(f"wrote {len(make_pairs())} pairs to {path}")
        return
    torch.set_num_threads(2)  # the dev machines have 2 cores; more threads only slow a model this small
    steps = args.steps or (128 if args.quick else 512)
    t0 = time.time()
    out = train_toy(args.out, ToyConfig(steps=steps, seed=args.seed))
    print(format_curve(read_curve(out)))
    print(f"saved {out}/step*/ and {out}/curve.csv in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    run_main(main)
