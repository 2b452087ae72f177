"""checkpoint_sets.py: the variants of a run's set of revisions, and the matcher behind it on small synthetic
cases."""
import numpy as np
import pandas as pd
import pytest
import torch

import checkpoint_sets
from crosscoding.common import UsageError
from crosscoding.crosscoder import CrossCoder, CrossCoderConfig

SCANNED = ["step0", "step16", "step32", "step64", "step96", "step128", "step160", "step192", "step256", "step512"]


def test_revision_variants():
    """Drop each inner revision, add each scanned neighbour, shift the set where the scan has room."""
    v = dict(checkpoint_sets.revision_variants(["step64", "step128", "step512"], SCANNED))
    assert v == {"drop-step128": ["step64", "step512"],
                 "add-step32": ["step32", "step64", "step128", "step512"],
                 "add-step96": ["step64", "step96", "step128", "step512"],
                 "add-step160": ["step64", "step128", "step160", "step512"],
                 "add-step256": ["step64", "step128", "step256", "step512"],
                 "shift-earlier": ["step32", "step96", "step256"]}      # no revision after step512: no shift-later
    assert dict(checkpoint_sets.revision_variants(["step16", "step32"], SCANNED))["shift-later"] == ["step32", "step64"]
    with pytest.raises(UsageError, match="not in the scan"):
        checkpoint_sets.revision_variants(["step64", "step999"], SCANNED)


def _save(folder, W_FMd, revisions, freq):
    cc = CrossCoder(CrossCoderConfig(n_models=W_FMd.shape[1], d_model=W_FMd.shape[2], dict_size=len(W_FMd)))
    with torch.no_grad():
        cc.W_dec_FMd.copy_(W_FMd)
    cc.save(folder, extra=dict(revisions=revisions))
    pd.DataFrame(dict(latent=np.arange(len(W_FMd)), freq=freq)).to_csv(folder / "latents.csv", index=False)


def test_survival_on_a_synthetic_case(tmp_path):
    """A run over a, b, c and a variant without b whose latents are the run's, shuffled, over a and c, except:
    latent 1 keeps its direction but is at 0.45 of its size at a (still matched, cosine 0.94, but over a, c it
    now forms at c: emerging, not kept), latent 2 is a new random direction (unmatched). Latents 0 and 3 survive;
    random latents of matched frequency survive at the variant's rate."""
    g = torch.Generator().manual_seed(0)
    F, d = 48, 16
    W = torch.nn.functional.normalize(torch.randn(F, 3, d, generator=g), dim=-1)
    W[3, 0] *= 0.1                                   # latent 3 emerges at b in the run; over a, c it forms at c
    freq = np.linspace(0.01, 0.3, F)
    _save(tmp_path / "run", W, ["a", "b", "c"], freq)
    perm = torch.randperm(F, generator=g)
    V = W[:, [0, 2]].clone()
    V[1, 0] *= 0.45
    V[2] = torch.nn.functional.normalize(torch.randn(2, d, generator=g), dim=-1)
    (tmp_path / "var").mkdir()
    _save(tmp_path / "var", V[perm], ["a", "c"], freq[perm.numpy()])
    out = checkpoint_sets.survival(tmp_path / "run", [0, 1, 2, 3], [("drop-b", tmp_path / "var", ["a", "c"])], draws=20)
    rows = {r["latent"]: r["variants"]["drop-b"] for r in out["latents"]}
    inverse = {int(p): i for i, p in enumerate(perm)}
    assert rows[0]["survives"] and rows[0]["partner"] == inverse[0] and rows[0]["cos"] == pytest.approx(1, abs=1e-5)
    assert rows[1]["partner"] == inverse[1] and 0.9 < rows[1]["cos"] < 0.95
    assert (rows[1]["class_shared"], rows[1]["class_variant"], rows[1]["survives"]) == ("kept", "emerging", False)
    assert rows[2]["cos"] < 0.9 and not rows[2]["survives"]
    assert rows[3]["survives"] and rows[3]["formed_shared"] == rows[3]["formed_variant"] == "c"
    assert out["latents"][3]["timeline_class"] == "emerging" and out["latents"][3]["formed_at"] == "b"
    assert out["survive_all"] == 0.5
    v = out["variants"][0]
    assert v["matched"] == 0.75 and v["survives"] == 0.5 and v["shared"] == ["a", "c"]
    assert len(v["survives_null"]) == 20 and np.mean(v["survives_null"]) > 0.85   # 2 of 48 latents broken

    # a shifted set shares no revision with the run: compared position by position (a', b', c' for a, b, c)
    (tmp_path / "shift").mkdir()
    S = W.clone()
    S[2] = torch.nn.functional.normalize(torch.randn(3, d, generator=g), dim=-1)
    _save(tmp_path / "shift", S[perm], ["a2", "b2", "c2"], freq[perm.numpy()])
    out = checkpoint_sets.survival(tmp_path / "run", [0, 2, 3],
                                   [("shift-later", tmp_path / "shift", ["a2", "b2", "c2"])], draws=5)
    rows = {r["latent"]: r["variants"]["shift-later"] for r in out["latents"]}
    assert out["variants"][0]["shared"] == ["a", "b", "c"]
    assert rows[0]["survives"] and rows[0]["partner"] == inverse[0] and rows[0]["cos"] == pytest.approx(1, abs=1e-5)
    assert rows[3]["survives"] and rows[3]["formed_variant"] == "b"       # labelled by the run's revisions
    assert not rows[2]["survives"] and out["survive_all"] == pytest.approx(2 / 3)
