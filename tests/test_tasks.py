"""tasks.py: loaders on the real BLiMP/CLAMS files (skipped without ../shared), the multi-token
rules case by case, BOS first (EOS where a tokenizer has no BOS), left padding, and LM text blocks
with a held-out split disjoint from training and a resumable position."""
import json

import pytest
import torch

from conftest import SHARED, tiny_model, word_tokenizer
from crosscoding import tasks
from crosscoding.common import UsageError

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/seed-data is absent")


def _bpe_tokenizer(texts, vocab_size=400):
    """A small byte-level BPE trained here, so some answers split into 2+ tokens as in real models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@needs_shared
def test_blimp_subjectverb_real_files():
    pairs = tasks.load_task("subjectverb")
    assert len(pairs) == 4000
    assert {p.subtask for p in pairs} == set(tasks.SUBJECTVERB)
    first = json.loads((SHARED / "data/blimp_data/distractor_agreement_relational_noun.jsonl").open().readline())
    p = pairs[0]
    assert p.prefix == first["one_prefix_prefix"] and p.good == " " + first["one_prefix_word_good"]
    tok = _bpe_tokenizer([q.prefix + q.good for q in pairs] + [q.prefix + q.bad for q in pairs])
    batch = tasks.tokenize_pairs(pairs, tok)
    assert 0 < len(batch) <= 4000
    # every kept row decodes back to its prefix (possibly + a shared first answer token) and answers
    for i in range(0, len(batch), 97):
        real = batch.ids_BT[i][batch.mask_BT[i].bool()]
        assert real[0] == tok.eos_token_id   # no BOS in this tokenizer: EOS starts every prefix
        pre = tok.decode(real[1:])
        q = batch.pairs[i]
        full_good = tok.decode(torch.cat([real[1:], batch.good_B[i:i + 1]]))
        assert pre.startswith(q.prefix)
        assert full_good == q.prefix + q.good or (q.prefix + q.good).startswith(full_good)
    assert (batch.good_B != batch.bad_B).all()


@needs_shared
def test_clams_real_files():
    en = tasks.load_task("clams_en")
    assert {p.subtask for p in en} >= {"en_simple_agrmt", "en_prep_anim"}
    assert en[0].good.startswith(" ")
    fr = tasks.load_task("clams_fr")
    assert any(p.good == " sont" for p in fr)


def test_multi_token_rules():
    # vocabulary where "are" is one token but "were" splits into "we"+"re" and "was" into "wa"+"s"
    tok = word_tokenizer(["the", "dogs", "is", "are", "x", "y", "z"])
    P = tasks.Pair
    bos = [tok.bos_token_id]
    ok = tasks.encode_pair(P("the dogs", " are", " is", "s"), tok)
    assert ok == (bos + tok("the dogs")["input_ids"], tok.convert_tokens_to_ids("are"), tok.convert_tokens_to_ids("is"))
    # two-token answers sharing their first token: it moves into the prefix
    two = tasks.encode_pair(P("the dogs", " x y", " x z", "s"), tok)
    assert two == (bos + tok("the dogs")["input_ids"] + [tok.convert_tokens_to_ids("x")],
                   tok.convert_tokens_to_ids("y"), tok.convert_tokens_to_ids("z"))
    # different token counts → dropped; longer than 2 → dropped
    assert tasks.encode_pair(P("the dogs", " x y", " z", "s"), tok) is None
    assert tasks.encode_pair(P("the dogs", " x y z", " x y y", "s"), tok) is None
    # two tokens, first differs: judged by the first token
    assert tasks.encode_pair(P("the dogs", " y x", " z x", "s"), tok)[1:] == (
        tok.convert_tokens_to_ids("y"), tok.convert_tokens_to_ids("z"))


def test_left_padding_and_accuracy_shape():
    tok = word_tokenizer(["the", "dog", "dogs", "of", "is", "are"])
    pairs = [tasks.Pair("the dog", " is", " are", "simple"), tasks.Pair("the dogs of the dog", " are", " is", "pp")]
    b = tasks.tokenize_pairs(pairs, tok)
    assert b.ids_BT.shape == (2, 6) and b.mask_BT[0].tolist() == [0, 0, 0, 1, 1, 1]
    assert b.ids_BT[0, :3].tolist() == [tok.pad_token_id] * 3 and b.ids_BT[:, -6 + 3].tolist()[0] == tok.bos_token_id
    m = tiny_model("gpt_neox")
    acc = tasks.accuracy_by_subtask(m, tok, pairs)
    assert set(acc) == {"simple", "pp"} and all(v in (0.0, 1.0) for v in acc.values())
    # the accuracy is the sign of an independently computed logit difference
    for p in pairs:
        ids = torch.tensor([[tok.bos_token_id] + tok(p.prefix)["input_ids"]])
        last = m(ids).logits[0, -1]
        want = float(last[tok.convert_tokens_to_ids(p.good.strip())] > last[tok.convert_tokens_to_ids(p.bad.strip())])
        assert acc[p.subtask] == want


def test_tokenizer_drops_everything():
    tok = word_tokenizer(["a", "b", "c"])
    with pytest.raises(UsageError, match="drops every one of its 1 pairs"):
        tasks.tokenize_pairs([tasks.Pair("a", " b c d", " b c", "s")], tok)


@pytest.mark.parametrize("content,msg", [
    ('{"prefix": "a", "good": " b", "bad": " c"}\nnot json\n', r":2: malformed"),
    ('[1, 2]\n', r":1: malformed"),
    ('{"foo": 1}\n', r":1: malformed task line \(no known fields"),
    ('', "holds no minimal pairs"),
])
def test_malformed_task_file(tmp_path, content, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(UsageError, match=msg):
        tasks.load_task(str(f))


def test_unknown_task():
    with pytest.raises(UsageError, match="unknown task 'subjverb'; valid: subjectverb"):
        tasks.load_task("subjverb")


def test_sentence_pairs_split_at_first_difference():
    p = tasks.pair_from_sentences("The keys to the cabinet are here.", "The keys to the cabinet is here.", "x")
    assert p == tasks.Pair("The keys to the cabinet", " are", " is", "x", "The keys to the cabinet are here.",
                           "The keys to the cabinet is here.")
    assert p.sentences() == ("The keys to the cabinet are here.", "The keys to the cabinet is here.")
    assert tasks.Pair("a b", " c", " d", "x").sentences() == ("a b c", "a b d")


def test_every_sequence_starts_with_bos_or_eos():
    """GPT-NeoX-, OLMo- and BLOOM-style tokenizers add no BOS on a plain call: a one-word prefix must still
    be [BOS, word] (its word at position 1, which is spliced), and a tokenizer without BOS starts with EOS."""
    tok = word_tokenizer(["Paula", "references", "reference"])
    assert tok("Paula")["input_ids"] == [tok.convert_tokens_to_ids("Paula")]       # no BOS added by the tokenizer
    pre, good, bad = tasks.encode_pair(tasks.Pair("Paula", " references", " reference", "s"), tok)
    assert pre == [tok.bos_token_id, tok.convert_tokens_to_ids("Paula")]
    no_bos = _bpe_tokenizer(["Paula references Robert.", "Paula reference Robert."] * 20, vocab_size=300)
    assert no_bos.bos_token_id is None
    pre = tasks.encode_pair(tasks.Pair("Paula", " references", " reference", "s"), no_bos)[0]
    assert pre[0] == no_bos.eos_token_id and len(pre) >= 2


def _text_file(tmp_path, n_docs=300):
    import numpy as np
    rng = np.random.default_rng(0)
    words = ["the", "dog", "is", "here", "cat", "runs", "a", "big"]
    f = tmp_path / "t.txt"
    f.write_text("\n".join(f"doc{i} " + " ".join(rng.choice(words, rng.integers(3, 15))) for i in range(n_docs)))
    return f, word_tokenizer(words + [f"doc{i}" for i in range(n_docs)])


def test_text_blocks_from_file(tmp_path):
    f, tok = _text_file(tmp_path)
    blocks = tasks.text_blocks(str(f), tok, n_blocks=4, seq_len=8, heldout_tokens=100, split="heldout")
    assert blocks.shape == (4, 8)
    assert (blocks[:, 0] == tok.bos_token_id).all()
    assert tok.decode(blocks[0, 1:3]) == f.read_text().split()[0] + " " + f.read_text().split()[1]
    with pytest.raises(UsageError, match="gives only"):
        tasks.text_blocks(str(f), tok, n_blocks=1000, seq_len=8, heldout_tokens=100, split="heldout")


@pytest.mark.parametrize("source", ["file", "toy"])
def test_heldout_blocks_never_occur_in_training(tmp_path, source):
    """The held-out split (validation, scales, evaluation, contexts) is whole documents that training never
    reads: no held-out block appears among the training blocks, and no held-out document's text either."""
    if source == "file":
        f, tok = _text_file(tmp_path)
        src, H = str(f), 300
    else:
        import toy
        src, H, tok = "toy", 2000, toy.build_tokenizer()
    held = [b for b, _ in tasks.iter_blocks(src, tok, 16, H, "heldout")]
    train = [b for b, _ in zip((b for b, _ in tasks.iter_blocks(src, tok, 16, H, "train")), range(150))]
    assert len(held) >= H // 16 - 2 and len(train) == 150
    held_set = {tuple(b.tolist()) for b in held}
    assert not held_set & {tuple(b.tolist()) for b in train}
    end = tasks.heldout_end(src, tok, H)
    first_train = next(tasks.iter_blocks(src, tok, 16, H, "train"))[1]
    assert first_train.doc == end.doc >= 1 and first_train.offset == 0
    if source == "file":
        docs = [line for line in f.read_text().splitlines()]
        held_words = {w for line in docs[:end.doc] for w in line.split() if w.startswith("doc")}
        train_words = {tok.convert_ids_to_tokens(i) for b in train for i in b.tolist()}
        assert not held_words & train_words       # every document carries its own "doc<i>" word


@pytest.mark.parametrize("source", ["file", "toy"])
def test_iter_blocks_resumes_from_a_position(tmp_path, source):
    """A block's TextPos restarts the stream exactly there (a file seeks to the document's byte)."""
    if source == "file":
        f, tok = _text_file(tmp_path)
        src = str(f)
    else:
        import toy
        src, tok = "toy", toy.build_tokenizer()
    full = list(zip(tasks.iter_blocks(src, tok, 16, 100, "train"), range(120)))
    for k in (1, 37, 90):
        pos = full[k][0][1]
        again = [b for (b, _), _ in zip(tasks.iter_blocks(src, tok, 16, 100, "train", start=pos), range(20))]
        assert all(torch.equal(a, b) for a, ((b, _), _) in zip(again, full[k:k + 20]))
    assert len({p.doc for (_, p), _ in full}) > 10


def test_count_blocks_says_when_text_runs_out(tmp_path):
    f, tok = _text_file(tmp_path, n_docs=50)
    n = tasks.count_blocks(str(f), tok, 8, 50, need=10**6)
    assert 0 < n < 10**6
    assert n == len(list(tasks.iter_blocks(str(f), tok, 8, 50, "train")))
    assert tasks.count_blocks(str(f), tok, 8, 50, need=3) == 3
