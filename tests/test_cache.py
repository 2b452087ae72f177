"""cache_acts.py on a local folder of tiny revisions: rows equal output_hidden_states, resume after
an interruption is byte-equal, mismatched requests are refused, scan and suggest."""
import json

import numpy as np
import pytest
import torch

import cache_acts
import lm
from common import UsageError

def _make(local_model, out, **kw):
    root, text, _ = local_model
    args = dict(n_tokens=300, seq_len=16, text=str(text), batch_blocks=4)
    args.update(kw)
    return cache_acts.make_cache(str(root), 1, ["step0", "step100"], out, **args)


def test_cache_rows_equal_hidden_states(local_model, tmp_path):
    root, text, _ = local_model
    folder = _make(local_model, tmp_path / "c")
    c = cache_acts.open_cache(folder)
    assert c.meta["complete"] and c.meta["d"] == 32 and c.meta["position0"] == "excluded"
    ids = c.tokens()
    for m_i, rev in enumerate(["step0", "step100"]):
        model, _ = lm.load(str(root), rev)
        hs = model(ids, output_hidden_states=True).hidden_states[2][:, 1:]   # block 1 output, pos ≥ 1
        want = hs.reshape(-1, 32).to(torch.bfloat16).float()
        got = c.get(np.arange(len(want)))[:, m_i]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        # normalisation scale: √d / mean‖x‖ on the training rows
        lo, hi = c.rows("train")
        s = 32 ** 0.5 / want[lo:hi].norm(dim=-1).mean().item()
        assert abs(c.scales[m_i] - s) / s < 1e-4


def test_resume_after_interruption_is_byte_equal(local_model, tmp_path, monkeypatch):
    ref = _make(local_model, tmp_path / "ref")
    real = cache_acts.layer_acts
    calls = {"n": 0}

    def dying(*a):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # a kill in the middle of the second revision's chunks... or the first
        return real(*a)

    monkeypatch.setattr(cache_acts, "layer_acts", dying)
    with pytest.raises(KeyboardInterrupt):
        _make(local_model, tmp_path / "part")
    assert not json.loads((tmp_path / "part" / "meta.json").read_text())["complete"]
    with pytest.raises(UsageError, match="incomplete"):
        cache_acts.open_cache(tmp_path / "part")
    monkeypatch.setattr(cache_acts, "layer_acts", real)
    _make(local_model, tmp_path / "part")
    for f in ["step0.bin", "step100.bin", "tokens.npy"]:
        assert (tmp_path / "part" / f).read_bytes() == (ref / f).read_bytes()


def test_mismatched_request_refused(local_model, tmp_path):
    _make(local_model, tmp_path / "c")
    with pytest.raises(UsageError, match=r"was made with n_blocks=20, this request has n_blocks=40"):
        _make(local_model, tmp_path / "c", n_tokens=600)
    with pytest.raises(UsageError, match="dtype='bf16', this request has dtype='fp16'"):
        _make(local_model, tmp_path / "c", dtype="fp16")


def test_fp16_and_fp32_round_trip(local_model, tmp_path):
    a = cache_acts.open_cache(_make(local_model, tmp_path / "a", dtype="fp32"))
    b = cache_acts.open_cache(_make(local_model, tmp_path / "b", dtype="fp16"))
    idx = np.arange(50)
    torch.testing.assert_close(b.get(idx), a.get(idx).half().float(), rtol=0, atol=0)


def test_scan_and_suggest(local_model, tmp_path):
    root, text, pairs = local_model
    csv = cache_acts.scan(str(root), 0, str(pairs), n_tokens=200, seq_len=16, out_dir=tmp_path, text=str(text))
    import pandas as pd
    df = pd.read_csv(csv)
    assert list(df.revision) == ["step0", "step10", "step100"]
    assert {"acc_a", "acc_b", "acc_mean", "cos_prev", "cos_last"} <= set(df.columns)
    cos = pd.read_csv(str(csv).replace(".csv", "-cos.csv"), index_col=0)
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
