"""tasks.py — minimal pairs (subject–verb agreement) and LM text, as token tensors.

A minimal pair is a prefix and two one-word continuations, the grammatical one and the other:
"The key to the cabinets" → " is" / " are". Task sets:
  subjectverb          4 BLiMP agreement files (local folder, else HF nyu-mll/blimp)
  clams_en, clams_fr   CLAMS (local folder)
  multiblimp_<lang>    MultiBLiMP SV-#, SV-G, SV-P (HF jumelet/multiblimp, or a local tsv/jsonl)
  toy_sva              the toy grammar's held-out pairs (data/toy_sva.jsonl)
  path/to/file.jsonl   any file of BLiMP, CLAMS or {"prefix","good","bad","subtask"} lines

    python -m crosscoding.tasks subjectverb --model pythia-70m     # how many pairs survive tokenisation
"""
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from crosscoding import grammar, lm
from crosscoding.common import ArgumentParser, EnvError, UsageError, run_main

HERE = Path(__file__).resolve().parent.parent   # the repository root
SEED_DATA = HERE.parent / "shared" / "seed-data" / "data"
SUBJECTVERB = ("distractor_agreement_relational_noun", "distractor_agreement_relative_clause",
               "irregular_plural_subject_verb_agreement_1", "regular_plural_subject_verb_agreement_1")


@dataclass(frozen=True)
class Pair:
    prefix: str
    good: str      # the grammatical continuation, with its leading space (" is")
    bad: str
    subtask: str
    good_sentence: str | None = None   # the whole sentences, where the source has them (--metric sentence)
    bad_sentence: str | None = None

    def sentences(self) -> tuple[str, str]:
        """(good, bad) whole sentences; prefix + answer where the source gave no sentences."""
        if self.good_sentence and self.bad_sentence:
            return self.good_sentence, self.bad_sentence
        return self.prefix + self.good, self.prefix + self.bad


# ---------------------------------------------------------------------------------------------
# Loaders: every format ends as a list of Pair

def pair_from_sentences(good: str, bad: str, subtask: str) -> Pair | None:
    """Split two sentences at their first differing word: the shared words are the prefix."""
    g, b = good.split(), bad.split()
    for i, (wg, wb) in enumerate(zip(g, b)):
        if wg != wb:
            if i == 0:
                return None  # nothing to condition on
            return Pair(" ".join(g[:i]), " " + wg, " " + wb, subtask, good, bad)
    return None


def _pair_from_record(rec: dict, subtask: str) -> Pair | None:
    sentences = (rec.get("sentence_good"), rec.get("sentence_bad"))
    if "prefix" in rec and "good" in rec:                                   # ours
        return Pair(rec["prefix"], rec["good"], rec["bad"], rec.get("subtask", subtask), *sentences)
    if "one_prefix_prefix" in rec:                                          # BLiMP one-prefix
        return Pair(rec["one_prefix_prefix"], " " + rec["one_prefix_word_good"],
                    " " + rec["one_prefix_word_bad"], rec.get("UID", subtask), *sentences)
    if "clean_prefix" in rec:                                               # CLAMS
        return None if rec.get("skip") else Pair(rec["clean_prefix"], rec["clean_answer"],
                                                 rec["patch_answer"], subtask, *sentences)
    for g, b in (("sentence_good", "sentence_bad"), ("sen", "wrong_sen")):  # whole sentences
        if g in rec:
            return pair_from_sentences(rec[g], rec[b], rec.get("UID") or rec.get("phenomenon") or subtask)
    raise ValueError("no known fields (prefix/good/bad, one_prefix_prefix, clean_prefix, sentence_good, sen)")


def load_pairs_jsonl(path, subtask: str | None = None) -> list[Pair]:
    """Pairs from a jsonl file in any supported format; a bad line is an error naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"task file {path} does not exist")
    subtask = subtask or path.stem
    pairs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                p = _pair_from_record(rec, subtask)
            except (ValueError, KeyError, TypeError) as e:
                raise UsageError(f"{path}:{n}: malformed task line ({e})") from None
            if p is not None:
                pairs.append(p)
    if not pairs:
        raise UsageError(f"task file {path} holds no minimal pairs")
    return pairs


def _find_local(folder: str, name: str) -> Path | None:
    for root in (HERE / "data" / folder, SEED_DATA / folder):
        if (root / name).is_file():
            return root / name
    return None


def load_blimp(uid: str) -> list[Pair]:
    local = _find_local("blimp_data", f"{uid}.jsonl")
    if local:
        return load_pairs_jsonl(local, uid)
    rows = _hf_rows("nyu-mll/blimp", uid, "train")
    return [p for r in rows if (p := _pair_from_record(dict(r), uid))]


def load_clams(lang: str) -> list[Pair]:
    roots = [r for r in (HERE / "data" / "clams_data", SEED_DATA / "clams_data") if r.is_dir()]
    if not roots:
        raise UsageError("CLAMS files not found: put the CLAMS jsonl files in data/clams_data/")
    files = sorted(f for f in roots[0].glob(f"{lang}_*.jsonl") if "tokenprefix" not in f.name)
    return [p for f in files for p in load_pairs_jsonl(f, f.stem)]


def load_multiblimp(lang: str) -> list[Pair]:
    """MultiBLiMP: subject–verb agreement in number (SV-#), gender (SV-G) and person (SV-P)."""
    rows = _hf_rows("jumelet/multiblimp", lang, "train")
    return [p for r in rows if (p := _pair_from_record(dict(r), "multiblimp"))]


def _hf_rows(repo, name, split):
    try:
        import datasets
        return datasets.load_dataset(repo, name, split=split)
    except Exception as e:
        raise EnvError(f"cannot load {repo}/{name} from the Hugging Face hub ({type(e).__name__}); "
                       "without network, give a local jsonl file as the task") from None


TASK_SETS = ("subjectverb", "clams_en", "clams_fr", "multiblimp_<lang>", "toy_sva", "<file.jsonl>")


def limit_pairs(pairs: list[Pair], max_pairs: int | None) -> list[Pair]:
    """At most max_pairs pairs of each sub-task (all when None), in order."""
    if not max_pairs:
        return pairs
    by = {}
    for p in pairs:
        by.setdefault(p.subtask, []).append(p)
    return [p for group in by.values() for p in group[:max_pairs]]


def load_task(name: str) -> list[Pair]:
    """A named task set (see the module docstring) or a jsonl path → its pairs, each with its sub-task."""
    if name == "subjectverb":
        return [p for uid in SUBJECTVERB for p in load_blimp(uid)]
    if name in ("clams_en", "clams_fr"):
        return load_clams(name.split("_")[1])
    if name.startswith("multiblimp_"):
        path = Path(name.split("_", 1)[1])
        return load_pairs_jsonl(path) if path.suffix == ".jsonl" else load_multiblimp(str(path))
    if name == "toy_sva":
        return load_pairs_jsonl(HERE / "data" / "toy_sva.jsonl")
    if name.endswith(".jsonl") or os.path.isfile(name):
        return load_pairs_jsonl(name)
    raise UsageError(f"unknown task {name!r}; valid: {', '.join(TASK_SETS)}")


# ---------------------------------------------------------------------------------------------
# The selection / test split: attribution and the top-k choice on one half, every ablation on the other

DETERMINERS = {"the", "a", "an", "this", "that", "these", "those", "some", "every", "no", "my", "his", "her"}
SPLIT_KEY = "same prefix, or same (first word after the determiner, last word of the prefix)"


def pair_keys(p: Pair) -> tuple[str, tuple[str, str]]:
    """The two things near-copies share: the prefix itself, and (head, last word) — in "the key to the
    cabinets" the head noun and the attractor, in "the boy" the head twice."""
    words = p.prefix.lower().split()
    head = next((w for w in words if w not in DETERMINERS), words[0] if words else "")
    return p.prefix.strip().lower(), (head, words[-1] if words else "")


def split_groups(pairs: list[Pair]) -> list[int]:
    """A group id per pair: pairs linked by a shared key (pair_keys), directly or through others, share
    a group (union-find), so no near-copy of a pair can fall on the other side of a split."""
    parent = list(range(len(pairs)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    first = {}
    for i, p in enumerate(pairs):
        for key in pair_keys(p):
            j = first.setdefault(key, i)
            parent[root(i)] = root(j)
    roots = [root(i) for i in range(len(pairs))]
    ids = {r: n for n, r in enumerate(dict.fromkeys(roots))}
    return [ids[r] for r in roots]


def split_pairs(pairs: list[Pair], test_frac: float, seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """(selection rows, test rows, group per row): whole groups (split_groups) go to the test half, in a
    seeded random order within each sub-task, until that sub-task has test_frac of its pairs there.
    test_frac 0 puts every pair on both sides (no split: every finding is then in-sample)."""
    groups = split_groups(pairs)
    if test_frac <= 0:
        everything = list(range(len(pairs)))
        return everything, everything, groups
    rng = random.Random(seed)
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    by_subtask = {}
    for g, rows in members.items():        # a group belongs to the sub-task of its first pair
        by_subtask.setdefault(pairs[rows[0]].subtask, []).append(g)
    test = set()
    for gs in by_subtask.values():
        want = test_frac * sum(len(members[g]) for g in gs)
        rng.shuffle(gs)
        n = 0
        for g in gs:
            if n >= want:
                break
            test.update(members[g])
            n += len(members[g])
    selection = [i for i in range(len(pairs)) if i not in test]
    if not selection or not test:
        raise UsageError(f"{len(pairs)} pairs in {len(members)} groups of near-copies cannot be split into a "
                         f"selection and a test half at --test-frac {test_frac}; give more pairs or --test-frac 0")
    return selection, sorted(test), groups


# ---------------------------------------------------------------------------------------------
# Tokenisation: left-padded prefixes, one answer token each

@dataclass
class PairBatch:
    ids_BT: torch.Tensor      # left-padded prefix ids
    mask_BT: torch.Tensor     # 1 on real tokens
    good_B: torch.Tensor      # correct-answer token id
    bad_B: torch.Tensor       # wrong-answer token id
    subtask: list             # sub-task name per pair
    pairs: list               # the Pair each row came from

    def __len__(self):
        return len(self.subtask)

    def to(self, device):
        return PairBatch(self.ids_BT.to(device), self.mask_BT.to(device), self.good_B.to(device),
                         self.bad_B.to(device), self.subtask, self.pairs)

    def repeat(self, n):
        """n copies of the batch stacked copy-major (row c·B + b is pair b), for batched variants."""
        rep = lambda t: t.repeat(n, *[1] * (t.dim() - 1))  # noqa: E731
        return PairBatch(rep(self.ids_BT), rep(self.mask_BT), rep(self.good_B), rep(self.bad_B),
                         self.subtask * n, self.pairs * n)

    def slice(self, i, j):
        return PairBatch(self.ids_BT[i:j], self.mask_BT[i:j], self.good_B[i:j], self.bad_B[i:j],
                         self.subtask[i:j], self.pairs[i:j])

    def take(self, idx):
        """The rows idx (a list of row numbers), in that order."""
        t = torch.as_tensor(list(idx), dtype=torch.long)
        return PairBatch(self.ids_BT[t], self.mask_BT[t], self.good_B[t], self.bad_B[t],
                         [self.subtask[i] for i in idx], [self.pairs[i] for i in idx])


def encode_pair(p: Pair, tok) -> tuple[list[int], int, int] | None:
    """(BOS + prefix ids, good id, bad id), or None when the paper's rule drops the pair: answers of
    different token counts or longer than 2 tokens. 2-token answers sharing their first token move
    it into the prefix; 2-token answers that differ at once are told apart by their first token."""
    prefix = [lm.bos_id(tok)] + tok(p.prefix, add_special_tokens=False)["input_ids"]
    g = tok(p.good, add_special_tokens=False)["input_ids"]
    b = tok(p.bad, add_special_tokens=False)["input_ids"]
    if len(g) != len(b) or not 1 <= len(g) <= 2:
        return None
    if len(g) == 2 and g[0] == b[0]:
        return prefix + [g[0]], g[1], b[1]
    if g[0] == b[0]:
        return None
    return prefix, g[0], b[0]


def tokenize_pairs(pairs: list[Pair], tok, name="task") -> PairBatch:
    """All pairs that survive the token rules, left-padded to one length."""
    rows = [(p, e) for p in pairs if (e := encode_pair(p, tok)) is not None]
    if not rows:
        raise UsageError(f"{name}: the tokenizer drops every one of its {len(pairs)} pairs "
                         "(answers of unequal or >2-token length)")
    T = max(len(e[0]) for _, e in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (_, (pre, _, _)) in enumerate(rows):
        ids[i, T - len(pre):] = torch.tensor(pre)
        mask[i, T - len(pre):] = 1
    return PairBatch(ids, mask, torch.tensor([e[1] for _, e in rows]), torch.tensor([e[2] for _, e in rows]),
                     [p.subtask for p, _ in rows], [p for p, _ in rows])


def logit_diff(logits_BTV: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """logit(correct) − logit(wrong) at the last prefix position, per pair [B]."""
    last_BV = logits_BTV[:, -1].float()
    return last_BV.gather(1, batch.good_B[:, None])[:, 0] - last_BV.gather(1, batch.bad_B[:, None])[:, 0]


@torch.no_grad()
def logit_diffs(model, batch: PairBatch, device="cpu", batch_size=256) -> torch.Tensor:
    out = []
    for i in range(0, len(batch), batch_size):
        b = batch.slice(i, i + batch_size).to(device)
        out.append(logit_diff(lm.forward(model, b.ids_BT, b.mask_BT, last_only=True).logits, b).cpu())
    return torch.cat(out)


def by_subtask(values, subtasks) -> dict:
    """Mean of a per-pair value within each sub-task, in first-seen order."""
    values = torch.as_tensor(values, dtype=torch.float)
    out = {}
    for s in dict.fromkeys(subtasks):
        idx = torch.tensor([i for i, t in enumerate(subtasks) if t == s])
        out[s] = values[idx].mean().item()
    return out


def accuracy_by_subtask(model, tok, pairs: list[Pair], device="cpu", batch_size=256) -> dict:
    """Per sub-task, the fraction of pairs where the model prefers the correct answer token."""
    batch = tokenize_pairs(pairs, tok)
    return by_subtask(logit_diffs(model, batch, device, batch_size) > 0, batch.subtask)


# ---------------------------------------------------------------------------------------------
# LM text → fixed-length token blocks. A source is a stream of documents (the toy grammar's sentences,
# a local file's non-empty lines, a Hugging Face dataset's "text" field). Its first documents, the
# fewest that hold `heldout_tokens` tokens, are the held-out split (validation, normalisation scales,
# evaluation, top contexts); training reads the documents after them, so the two never share text.

@dataclass(frozen=True)
class TextPos:
    """Where a block's first token lies in a source: the document's index, the token offset in that
    document (its tokens + EOS), and for a local file the document's byte offset (to seek straight to it)."""
    doc: int = 0
    offset: int = 0
    byte: int = 0


def _documents(source: str, start: TextPos = TextPos()):
    """(index, byte offset, text) of every document from start.doc on."""
    if source == "toy":
        for i, text in enumerate(grammar.toy_corpus()):
            if i >= start.doc:
                yield i, 0, text
        return
    if os.path.isfile(source):
        with open(source, "rb") as f:
            f.seek(start.byte)
            i = start.doc
            while line := f.readline():
                text = line.decode("utf-8", errors="replace")
                if text.strip():
                    yield i, f.tell() - len(line), text
                    i += 1
        return
    if os.path.exists(source) or "/" not in source:
        raise UsageError(f"text source {source!r} is neither 'toy', a file, nor a HF dataset id (org/name)")
    name, _, config = source.partition(":")
    try:
        import datasets
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
        yield from ((start.doc + i, 0, r["text"]) for i, r in enumerate(ds.skip(start.doc)))
    except (ConnectionError, OSError) as e:
        raise EnvError(f"cannot stream {source} from the Hugging Face hub ({type(e).__name__}); "
                       "without network, give a local text file") from None


def _doc_ids(tok, text) -> list[int]:
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return tok(text, add_special_tokens=False)["input_ids"] + eos


_BOUNDARY: dict = {}


def heldout_end(source: str, tok, heldout_tokens: int) -> TextPos:
    """Where training text starts: the document after the fewest first documents holding ≥ heldout_tokens."""
    key = (source, tok.name_or_path, len(tok), heldout_tokens)
    if key not in _BOUNDARY:
        n = 0
        for i, byte, text in _documents(source):
            if n >= heldout_tokens:
                _BOUNDARY[key] = TextPos(i, 0, byte)
                break
            n += len(_doc_ids(tok, text))
        else:
            raise UsageError(f"text source {source!r} holds only {n} tokens, all of them in its held-out split "
                             f"({heldout_tokens} tokens): nothing is left to train on; give more text")
    return _BOUNDARY[key]


def iter_blocks(source: str, tok, seq_len: int, heldout_tokens: int, split: str = "train",
                start: TextPos | None = None):
    """Yield (block [seq_len] ids, TextPos of its first token after BOS). Each block is BOS (or EOS where
    the tokenizer has no BOS) and seq_len − 1 tokens of documents joined by EOS. split 'heldout' reads
    the held-out documents only; 'train' the documents after them, from `start` when given (resume)."""
    end = heldout_end(source, tok, heldout_tokens)
    if split == "heldout":
        first, stop = TextPos(), end.doc
    elif split == "train":
        first, stop = start or end, None
    else:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    bos, body = [lm.bos_id(tok)], seq_len - 1
    ids: list[int] = []
    segs: list[list] = []   # per document with tokens in `ids`: [index, byte, offset of its next token, tokens left]
    for i, byte, text in _documents(source, first):
        if stop is not None and i >= stop:
            return
        skip = first.offset if i == first.doc else 0
        doc = _doc_ids(tok, text)[skip:]
        if not doc:
            continue
        segs.append([i, byte, skip, len(doc)])
        ids += doc
        while len(ids) >= body:
            yield torch.tensor(bos + ids[:body]), TextPos(segs[0][0], segs[0][2], segs[0][1])
            ids, used = ids[body:], body
            while used:   # the segments' offsets move past the tokens just used
                take = min(used, segs[0][3])
                segs[0][2] += take
                segs[0][3] -= take
                used -= take
                if segs[0][3] == 0:
                    segs.pop(0)


def text_blocks(source: str, tok, n_blocks: int, seq_len: int, heldout_tokens: int,
                split: str = "heldout", min_blocks: int | None = None) -> torch.Tensor:
    """[n_blocks, seq_len] token ids: the first n_blocks of a split (see iter_blocks); fewer, down to
    min_blocks, where the split holds fewer (a small held-out split still validates)."""
    out = [b for (b, _), _ in zip(iter_blocks(source, tok, seq_len, heldout_tokens, split), range(n_blocks))]
    if len(out) < (n_blocks if min_blocks is None else min_blocks):
        where = (f"its held-out split (the first {heldout_tokens} tokens)" if split == "heldout"
                 else "its training split")
        raise UsageError(f"text source {source!r} gives only {len(out)} blocks of {seq_len} tokens in {where}; "
                         f"{n_blocks} are needed")
    return torch.stack(out)


def count_blocks(source: str, tok, seq_len: int, heldout_tokens: int, need: int, start: TextPos | None = None):
    """How many training blocks the source holds from `start`, counting up to `need` (the toy's is endless)."""
    if source == "toy":
        return need
    n = 0
    for n, _ in enumerate(iter_blocks(source, tok, seq_len, heldout_tokens, "train", start), 1):
        if n >= need:
            break
    return n


def main():
    p = ArgumentParser(description="Load a task and report how many pairs survive tokenisation.")
    p.add_argument("task")
    from crosscoding import cli
    cli.add(p, "--model", model="toy")
    args = p.parse_args()
    pairs = load_task(args.task)
    spec = lm.resolve(args.model)
    _, tok = lm.load(spec, spec.revisions[-1] if spec.revisions else None)
    batch = tokenize_pairs(pairs, tok, args.task)
    counts = {s: batch.subtask.count(s) for s in dict.fromkeys(batch.subtask)}
    print(f"{args.task}: {len(batch)} of {len(pairs)} pairs kept; per sub-task: {counts}")


if __name__ == "__main__":
    run_main(main)
