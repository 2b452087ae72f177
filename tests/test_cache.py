"""The activation cache (activations.make_cache, run by cache_acts.py) on a local folder of tiny
revisions: rows equal output_hidden_states, training rows from the training split and validation rows
from the held-out one, resume after an interruption is byte-equal, mismatched requests are refused;
scan and suggest."""
import numpy as np
import pytest
import torch

import cache_acts
from crosscoding import activations, lm, tasks
from crosscoding.common import UsageError, is_done


def _make(local_model, out, **kw):
    root, text, _ = local_model
    args = dict(n_tokens=300, seq_len=16, heldout_tokens=400, text=str(text), batch_blocks=4, val_rows=150)
    args.update(kw)
    return activations.make_cache(str(root), 1, ["step0", "step100"], out, **args)


def test_cache_rows_equal_hidden_states(local_model, tmp_path):
    root, text, _ = local_model
    folder = _make(local_model, tmp_path / "c")
    c = activations.open_cache(folder)
    assert is_done(folder) and c.meta["d"] == 32 and c.meta["position0"] == "excluded"
    ids = c.tokens()
    _, tok = lm.load(str(root), "step0")
    split = c.meta["split"]
    assert torch.equal(ids[:split["train_blocks"]], tasks.text_blocks(str(text), tok, 20, 16, 400, "train"))
    assert torch.equal(ids[split["train_blocks"]:], tasks.text_blocks(str(text), tok, 10, 16, 400, "heldout"))
    for m_i, rev in enumerate(["step0", "step100"]):
        model, _ = lm.load(str(root), rev)
        hs = model(ids, output_hidden_states=True).hidden_states[2][:, 1:]   # block 1 output, pos ≥ 1
        want = hs.reshape(-1, 32).to(torch.bfloat16).float()
        got = c.get(np.arange(len(want)))[:, m_i]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        # normalisation scale: √d / mean‖x‖ on the held-out rows
        lo, hi = c.rows("val")
        s = 32 ** 0.5 / want[lo:hi].norm(dim=-1).mean().item()
        assert abs(c.scales[m_i] - s) / s < 1e-4


def test_resume_after_interruption_is_byte_equal(local_model, tmp_path, monkeypatch):
    ref = _make(local_model, tmp_path / "ref")
    real = activations.layer_acts
    calls = {"n": 0}

    def dying(*a):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # a kill in the middle of the second revision's chunks... or the first
        return real(*a)

    monkeypatch.setattr(activations, "layer_acts", dying)
    with pytest.raises(KeyboardInterrupt):
        _make(local_model, tmp_path / "part")
    assert not is_done(tmp_path / "part")
    with pytest.raises(UsageError, match="unfinished"):
        activations.open_cache(tmp_path / "part")
    monkeypatch.setattr(activations, "layer_acts", real)
    _make(local_model, tmp_path / "part")
    for f in ["step0.bin", "step100.bin", "tokens.npy"]:
        assert (tmp_path / "part" / f).read_bytes() == (ref / f).read_bytes()


def test_mismatched_request_refused(local_model, tmp_path):
    _make(local_model, tmp_path / "c")
    with pytest.raises(UsageError, match=r"was made with n_blocks=30, this request has n_blocks=50"):
        _make(local_model, tmp_path / "c", n_tokens=600)
    with pytest.raises(UsageError, match="dtype='bf16', this request has dtype='fp16'"):
        _make(local_model, tmp_path / "c", cache_dtype="fp16")


def test_fp16_and_fp32_round_trip(local_model, tmp_path):
    a = activations.open_cache(_make(local_model, tmp_path / "a", cache_dtype="fp32"))
    b = activations.open_cache(_make(local_model, tmp_path / "b", cache_dtype="fp16"))
    idx = np.arange(50)
    torch.testing.assert_close(b.get(idx), a.get(idx).half().float(), rtol=0, atol=0)


def test_scan_and_suggest(local_model, tmp_path):
    root, text, pairs = local_model
    csv = cache_acts.scan(str(root), 0, str(pairs), None, n_tokens=200, seq_len=16, heldout_tokens=400,
                          out=tmp_path / "scan.csv", text=str(text))
    import pandas as pd
    df = pd.read_csv(csv)
    assert list(df.revision) == ["step0", "step10", "step100"]
    assert {"acc_a", "acc_b", "acc_mean", "cos_prev", "cos_last"} <= set(df.columns)
    cos = pd.read_csv(tmp_path / "scan-cos.csv", index_col=0)
    assert np.allclose(np.diag(cos.values), 1, atol=1e-3) and np.allclose(cos.values, cos.values.T)
    assert cache_acts.suggest(csv)[-1] == "step100"


def test_suggest_rule(tmp_path):
    """The toy's staged curve: chance at s64, the nearest-noun phase from s96 (deepest at s128), last s512."""
    import pandas as pd
    f = tmp_path / "s.csv"
    pd.DataFrame(dict(revision=["s0", "s16", "s64", "s96", "s128", "s160", "s512"],
                      acc_simple=[.45, .55, .62, .90, .97, .99, 1.0],
                      acc_across_pp=[.5, .5, .27, .10, .03, .05, 1.0],
                      acc_mean=[.47, .52, .45, .5, .5, .52, 1.0])).to_csv(f, index=False)
    assert cache_acts.suggest(f) == ["s64", "s128", "s512"]


def test_suggest_k_revisions_in_training_order(tmp_path):
    """--suggest K: before, during and after the phase change, and the rest where the scan changes fastest."""
    import pandas as pd
    f = tmp_path / "s.csv"
    pd.DataFrame(dict(revision=["s0", "s16", "s64", "s96", "s128", "s160", "s192", "s256", "s512"],
                      acc_simple=[.45, .55, .62, .90, .97, .99, 1.0, 1.0, 1.0],
                      acc_across_pp=[.5, .5, .27, .10, .03, .05, .94, 1.0, 1.0],
                      acc_mean=[.47, .52, .45, .5, .5, .52, .97, 1.0, 1.0],
                      cos_prev=[None, .99, .9, .8, .95, .97, .7, .96, .98])).to_csv(f, index=False)
    assert cache_acts.suggest(f, 3) == ["s64", "s128", "s512"]
    five = cache_acts.suggest(f, 5)
    assert five == ["s64", "s96", "s128", "s192", "s512"]       # + the two largest changes: s192 (.89 + .3), s96
    assert cache_acts.suggest(f, 2) == ["s64", "s512"]
    with pytest.raises(UsageError, match="--suggest 12 needs at least 12"):
        cache_acts.suggest(f, 12)


def test_sentence_metric_scores_whole_sentences(local_model):
    """--metric sentence scores each whole sentence after BOS, as lm-eval-harness scores BLiMP: words after
    the verb count too (scoring prefix + answer would miss them)."""
    root, _, _ = local_model
    model, tok = lm.load(str(root), "step100")
    good, bad = "w1 w2 w3 w4 w5", "w1 w2 w9 w4 w5"
    p = tasks.pair_from_sentences(good, bad, "s")
    assert p.prefix == "w1 w2" and p.sentences() == (good, bad)

    def logp(sentence):
        ids = [tok.bos_token_id] + tok(sentence, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        return sum(lp[i, t].item() for i, t in enumerate(ids[1:]))
    got = cache_acts.sentence_diffs(model, tok, [p], "cpu")[0].item()
    assert got == pytest.approx(logp(good) - logp(bad), abs=1e-4)
    short = tasks.Pair("w1 w2", " w3", " w9", "s")          # no sentences: prefix + answer
    assert cache_acts.sentence_diffs(model, tok, [short], "cpu")[0].item() == pytest.approx(
        logp("w1 w2 w3") - logp("w1 w2 w9"), abs=1e-4)
    assert abs(got - (logp("w1 w2 w3") - logp("w1 w2 w9"))) > 1e-3   # the words after the verb matter
