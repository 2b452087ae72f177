"""Tests for grammar.py and toy.py: the grammar, the held-out noun pairs, the tokenizer (no BOS on a
plain call, as GPT-NeoX's), the committed pairs file and a reduced training run. Fast (well under a
minute on 2 CPU cores)."""
import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hostsync import HostSync, HostSyncs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import toy  # noqa: E402
from crosscoding import grammar, lm  # noqa: E402
from crosscoding.common import UsageError  # noqa: E402

NOUN_NUMBER = {w: (i, pl) for i, pair in enumerate(grammar.NOUNS) for pl, w in enumerate(pair)}
VERB_NUMBER = {w: pl for pair in grammar.INTRANSITIVE + grammar.TRANSITIVE + grammar.BE + grammar.HAVE
               for pl, w in enumerate(pair)}


def nouns_of(words):
    """(noun index, number) of every noun in a word list, read from the words themselves."""
    return [NOUN_NUMBER[w] for w in words if w in NOUN_NUMBER]


def test_vocabulary_size_and_no_ambiguous_forms():
    vocab = grammar.vocabulary()
    assert len(vocab) == len(set(vocab)), "a word form appears twice"
    assert 100 <= len(vocab) <= 130
    assert len(grammar.NOUNS) == 24 and len(grammar.INTRANSITIVE) == 7 and len(grammar.TRANSITIVE) == 7


def test_grammar_agreement_on_sampled_sentences():
    rng = random.Random(0)
    kinds = {k: 0 for k in grammar.SUBJECT_KINDS}
    for _ in range(3000):
        s = grammar.sample_sentence(rng)
        kinds[s.kind] += 1
        w = s.words
        head, head_pl = nouns_of(w)[0]
        assert (head, head_pl) == (s.head, s.head_pl)
        # the main verb agrees with the head noun
        assert VERB_NUMBER[w[s.verb_pos]] == s.head_pl, s.text
        subject = w[:s.verb_pos]
        if s.kind == "bare":
            assert len(nouns_of(subject)) == 1
        else:
            assert nouns_of(subject)[1] == (s.attractor, s.attractor_pl), s.text
        if s.kind == "src":  # "the key that opens the cabinets": embedded verb agrees with the head
            assert VERB_NUMBER[w[w.index("that") + 1]] == s.head_pl
        if s.kind == "orc":  # "the key that the men open": embedded verb agrees with the attractor
            assert VERB_NUMBER[subject[-1]] == s.attractor_pl
        assert w[-1] == "."
    # subject shapes near 40 / 30 / 15 / 15 %
    for k, p in grammar.SUBJECT_KINDS.items():
        assert abs(kinds[k] / 3000 - p) < 0.04, kinds
    # the attractor's number is independent of the head's: all four combinations occur
    combos = {(s.head_pl, s.attractor_pl) for s in (grammar.sample_sentence(rng, "pp") for _ in range(200))}
    assert combos == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_pairs_agree_and_attractors_mismatch():
    pairs = grammar.make_pairs()
    by = {}
    for p in pairs:
        by.setdefault(p["subtask"], []).append(p)
        words = p["prefix"].split()
        (head, head_pl), *others = nouns_of(words)
        assert VERB_NUMBER[p["good"].strip()] == head_pl
        assert VERB_NUMBER[p["bad"].strip()] == 1 - head_pl
        if p["subtask"] == "simple":
            assert others == []
        else:  # an attractor of the other number inside the subject
            assert others and others[0][1] == 1 - head_pl, p
    assert set(by) == set(grammar.SUBTASKS)
    assert all(len(v) == grammar.PAIRS_PER_SUBTASK for v in by.values())
    assert all("that" in p["prefix"].split() for p in by["across_rc"] + by["across_orc"])
    # held-out noun pairs are among the test pairs
    heldout = grammar.heldout_pairs()
    used = {(nouns_of(p["prefix"].split())[0][0], nouns_of(p["prefix"].split())[1][0])
            for p in by["across_pp"]}
    assert len(used & heldout) > 30


def test_heldout_pairs_never_in_training():
    heldout = grammar.heldout_pairs()
    assert len(heldout) == round(0.15 * 24 * 24)
    assert heldout == grammar.heldout_pairs()  # fixed
    gen = grammar.training_sentences(seed=0)
    seen = set()
    for _ in range(20000):
        n = [i for i, _ in nouns_of(next(gen).words)]
        pairs = {(n[i], n[j]) for i in range(len(n)) for j in range(i + 1, len(n))}
        assert not pairs & heldout
        seen |= pairs
    assert len(seen) > 0.8 * (24 * 24 - len(heldout))  # everything else does occur
    # the LM text for later stages follows the same rule, from another stream
    corpus = list(grammar.toy_corpus(2000, seed=0))
    assert corpus == list(grammar.toy_corpus(2000, seed=0))
    gen = grammar.training_sentences(seed=0)
    assert corpus[:50] != [next(gen).text for _ in range(50)]
    for text in corpus:
        n = [i for i, _ in nouns_of(text.split())]
        assert not {(n[i], n[j]) for i in range(len(n)) for j in range(i + 1, len(n))} & heldout


def test_toy_corpus_is_lazy():
    it = grammar.toy_corpus(10**9, seed=3)
    assert isinstance(next(it), str)


def test_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer
    tok = toy.build_tokenizer()
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2.get_vocab() == tok.get_vocab()
    assert (tok2.bos_token, tok2.eos_token, tok2.pad_token, tok2.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert lm.bos_id(tok2) == tok2.bos_token_id
    for text in grammar.toy_corpus(200, seed=1):
        ids = tok2(text)["input_ids"]
        assert ids == tok(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        assert tok2.bos_token_id not in ids  # like GPT-NeoX's: a plain call adds no BOS (we add it ourselves)
        assert tok2.unk_token_id not in ids
        assert len(ids) == len(text.split())  # one token per word
        assert tok2.decode(ids, skip_special_tokens=True) == text
    for p in grammar.make_pairs()[::50]:  # answers are single tokens
        assert len(tok2(p["good"], add_special_tokens=False)["input_ids"]) == 1
        assert len(tok2(p["bad"], add_special_tokens=False)["input_ids"]) == 1


def test_pairs_file_is_a_fresh_regeneration():
    assert grammar.PAIRS_PATH.read_text() == grammar.pairs_jsonl()
    from crosscoding.tasks import load_pairs_jsonl
    pairs = load_pairs_jsonl(grammar.PAIRS_PATH)
    assert len(pairs) == len(grammar.SUBTASKS) * grammar.PAIRS_PER_SUBTASK
    assert pairs == toy.toy_pairs()
    first = json.loads(grammar.PAIRS_PATH.read_text().splitlines()[0])
    assert list(first) == ["prefix", "good", "bad", "subtask"]


def test_training_blocks_layout():
    tok = toy.build_tokenizer()
    gen = toy.blocks(tok, seed=0, context=32)
    for _ in range(20):
        b = next(gen)
        assert len(b) == 32 and b[0] == tok.bos_token_id
        assert tok.bos_token_id not in b[1:] and tok.eos_token_id in b and tok.unk_token_id not in b


def test_reduced_training_learns_and_saves(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(2)
    cfg = toy.ToyConfig(steps=128, revisions=[0, 64])
    for stale in ("step999", ".step5.tmp123"):  # left by an earlier, longer or killed run
        (tmp_path / "toy" / stale).mkdir(parents=True)
    (tmp_path / "toy" / "notes").mkdir()  # not ours: kept
    out = toy.train_toy(tmp_path / "toy", cfg, progress=False)
    assert not (out / "step999").exists() and not (out / ".step5.tmp123").exists()
    assert (out / "notes").is_dir() and not (out / ".lock").exists()
    done = json.loads((out / "DONE").read_text())
    assert done["revisions"] == ["step0", "step64", "step128"]
    assert not list(out.glob(".*tmp*"))  # no temporary folders left behind
    with open(out / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["revision"] for r in rows] == done["revisions"]
    assert list(rows[0])[:6] == ["revision", "step", "tokens", "simple", "across_pp", "across_rc"]
    assert int(rows[-1]["tokens"]) == 128 * 64 * 32
    first, last = rows[0], rows[-1]
    assert float(first["simple"]) <= 0.65
    assert float(last["simple"]) >= float(first["simple"]) + 0.25, rows
    for rev in done["revisions"]:
        model = AutoModelForCausalLM.from_pretrained(out / rev)
        tok = AutoTokenizer.from_pretrained(out / rev)
        assert (out / rev / "model.safetensors").exists()
        assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
        assert tok.bos_token_id == model.config.bos_token_id
    # ensure_toy finds the finished run and does not train again
    assert toy.ensure_toy(out, steps=128, seed=0) == out


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file
    torch.set_num_threads(2)
    cfg = toy.ToyConfig(steps=8, revisions=[0])
    a = toy.train_toy(tmp_path / "a", cfg, progress=False)
    b = toy.train_toy(tmp_path / "b", cfg, progress=False)
    wa, wb = load_file(a / "step8" / "model.safetensors"), load_file(b / "step8" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = toy.train_toy(tmp_path / "c", toy.ToyConfig(steps=8, revisions=[0], seed=1), progress=False)
    wc = load_file(c / "step8" / "model.safetensors")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_cli_bad_flags_exit_2():
    for args in (["--bogus"], ["--steps", "0"], ["--steps", "many"], ["--device", "gpu"]):
        r = subprocess.run([sys.executable, str(ROOT / "toy.py"), *args], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2, (args, r.stderr)
        assert "error" in r.stderr.strip().splitlines()[-1]


def test_training_loop_reads_nothing_back_per_step():
    """The toy's loop (its batches, train_step: forward, backward, clip, AdamW, schedule) run on the meta device,
    the GPU's stand-in, makes no host sync in 6 steps (on a GPU each would stall the queue of a model this small);
    the detector is seen to catch one: reading the loss."""
    cfg = toy.ToyConfig(steps=6)
    tok = toy.build_tokenizer()
    with torch.random.fork_rng():      # its init draws leave the other tests' global RNG as it was
        model = toy.build_model(cfg, tok).to("meta")
    opt, sched = toy.optimizer(model, cfg)
    data = toy.batches(tok, cfg, "meta", per_copy=4)
    with HostSyncs() as syncs:
        for _ in range(cfg.steps):
            loss = toy.train_step(model, opt, sched, next(data), cfg.clip)
    assert syncs.ops == [] and loss.device.type == "meta"
    with pytest.raises(HostSync), HostSyncs() as syncs:
        loss.item()
    assert syncs.ops == ["aten._local_scalar_dense.default"]


def test_device_flag():
    """--device cpu, cuda and auto parse; cuda without CUDA is one line and exit 2, before anything is written."""
    assert [toy.parse_args(["--device", d]).device for d in ("cpu", "cuda", "cuda:1", "auto")] == \
        ["cpu", "cuda", "cuda:1", "auto"]
    assert toy.pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="--device must be cpu, cuda, cuda:N or auto"):
        toy.pick_device("gpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot be seen")
    r = subprocess.run([sys.executable, str(ROOT / "toy.py"), "--device", "cuda", "--out", "/nonexistent/toy"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--device cuda" in r.stderr and "--device cpu" in r.stderr and "Traceback" not in r.stderr
