"""grammar.py — the toy world's language: an English-like grammar with subject–verb agreement.

Pure Python (no torch), read by tasks.py (LM text 'toy') and toy.py (pretraining):
  - sample_sentence: bare subjects, prepositional attractors ("the key to the cabinets is"),
    subject- and object-relative clauses; the attractor's number is independent of the head's,
  - a fixed 15% of (head, attractor) noun pairs never meet in training, only in the test pairs,
  - training_sentences / toy_corpus: endless seeded sentence streams,
  - make_pairs: the minimal-pair task toy_sva (data/toy_sva.jsonl, `python toy.py --write-pairs`).
"""
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from crosscoding.common import write_text

HERE = Path(__file__).resolve().parent.parent   # the repository root
PAIRS_PATH = HERE / "data" / "toy_sva.jsonl"

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


def toy_corpus(n_sentences: int | None = None, seed: int = 0) -> Iterator[str]:
    """LM text for the later stages (caching, top contexts), one sentence (document) per item, lazily
    and endless by default: the training distribution, but another random stream than the one the
    model was trained on. tasks.iter_blocks joins them with <eos> behind a <bos>, as toy.py's training does."""
    gen = training_sentences(seed, stream="corpus")
    return (next(gen).text for _ in (range(n_sentences) if n_sentences is not None else iter(int, 1)))


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
