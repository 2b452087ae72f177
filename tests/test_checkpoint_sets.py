"""checkpoint_sets.py: the variants of a run's set of revisions, formation intervals, the class-stratified null, and
the graded survival with its verdict on small synthetic crosscoders."""
import numpy as np
import pandas as pd
import pytest
import torch

import checkpoint_sets
from crosscoding import matching, measures
from crosscoding.common import UsageError
from crosscoding.crosscoder import CrossCoder, CrossCoderConfig

SCANNED = ["step0", "step16", "step32", "step64", "step96", "step128", "step160", "step192", "step256", "step512"]
RUN = ["step64", "step128", "step512"]


def test_revision_variants():
    """Drop each inner revision, add each scanned neighbour, shift the set where the scan has room."""
    v = dict(checkpoint_sets.revision_variants(RUN, SCANNED))
    assert v == {"drop-step128": ["step64", "step512"],
                 "add-step32": ["step32", "step64", "step128", "step512"],
                 "add-step96": ["step64", "step96", "step128", "step512"],
                 "add-step160": ["step64", "step128", "step160", "step512"],
                 "add-step256": ["step64", "step128", "step256", "step512"],
                 "shift-earlier": ["step32", "step96", "step256"]}      # no revision after step512: no shift-later
    assert dict(checkpoint_sets.revision_variants(["step16", "step32"], SCANNED))["shift-later"] == ["step32", "step64"]
    with pytest.raises(UsageError, match="not in the scan"):
        checkpoint_sets.revision_variants(["step64", "step999"], SCANNED)


def test_revision_times():
    """Tokens when every name gives them, else steps, else the scan's order; none of these: a usage error."""
    times = checkpoint_sets.revision_times
    assert times(["step64", "step128"]) == ({"step64": 64.0, "step128": 128.0}, "training steps")
    assert times(["step1-tokens2M", "step2-tokens4M"]) == ({"step1-tokens2M": 2e6, "step2-tokens4M": 4e6}, "tokens")
    assert times(["early", "main"], ["early", "late", "main"])[0] == {"early": 0.0, "main": 2.0}
    with pytest.raises(UsageError, match="order in training"):
        checkpoint_sets.revision_times(["early", "main"])


def test_formation_intervals_overlap():
    """A formation is (revision before formed_at, formed_at]; (64, 128] and (96, 256] agree, touching ones do not,
    and the first revision's reaches back to −inf. Checked against a naive count of the integer times in both."""
    revs, shifted = RUN, ["step32", "step96", "step256"]
    lo, hi = measures.formation_intervals(["step128", "step64", "step512", ""], revs, [64, 128, 512])
    assert lo[:3].tolist() == [64, -np.inf, 128] and hi[:3].tolist() == [128, 64, 512]
    assert np.isnan([lo[3], hi[3]]).all()                                   # no formed_at: no interval
    slo, shi = measures.formation_intervals(["step256", "step96", "step32", "step256"], shifted, [32, 96, 256])
    assert measures.intervals_overlap(lo, hi, slo, shi).tolist() == [True, True, False, False]
    # (64, 128] vs (96, 256]: agree; (−inf, 64] vs (32, 96]: agree; (128, 512] vs (−inf, 32]: no; NaN: no
    assert measures.intervals_overlap([64], [128], [128], [256]).tolist() == [False]        # they only touch
    assert measures.intervals_overlap([-np.inf], [64], [-np.inf], [32]).tolist() == [True]
    rng = np.random.default_rng(0)
    a, b = np.sort(rng.integers(0, 20, (200, 2)), 1), np.sort(rng.integers(0, 20, (200, 2)), 1)
    a[:, 1] += 1
    b[:, 1] += 1                                                            # non-empty intervals (lo, hi]
    naive = [any(x[0] < t <= x[1] and y[0] < t <= y[1] for t in range(25)) for x, y in zip(a, b)]
    assert measures.intervals_overlap(a[:, 0], a[:, 1], b[:, 0], b[:, 1]).tolist() == naive


def test_random_within_strata():
    """Each drawn latent is active, not chosen, of its chosen latent's stratum and among the 5 nearest to it in
    frequency there (found here by brute force); a stratum with no other active latent draws over all."""
    rng = np.random.default_rng(1)
    F = 60
    freq = rng.uniform(0.01, 0.5, F)
    freq[[5, 17, 33]] = 0                                                   # dead: never drawn
    strata = np.array(["kept", "emerging", "transient"] * 20, dtype=object)
    strata[59] = "alone"
    chosen = [0, 1, 2, 3, 4, 59]
    draws, pooled = matching.random_within(freq, chosen, strata, np.random.default_rng(0), draws=30)
    assert pooled == [59] and len(draws) == 30
    for d in draws:
        assert len(set(d)) == len(d) and not set(d) & set(chosen) and (freq[d] > 0).all()
        for i, j in zip(chosen, d):
            same = [k for k in range(F) if freq[k] > 0 and k not in chosen and (
                strata[k] == strata[i] if i != 59 else k not in d[:-1])]            # the pooled: over the rest
            near = sorted(same, key=lambda k: abs(freq[k] - freq[i]))[:5]
            assert j in near and (i == 59 or strata[j] == strata[i])


def _save(folder, W_FMd, revisions, freq):
    folder.mkdir(exist_ok=True)
    cc = CrossCoder(CrossCoderConfig(n_models=W_FMd.shape[1], d_model=W_FMd.shape[2], dict_size=len(W_FMd)))
    with torch.no_grad():
        cc.W_dec_FMd.copy_(W_FMd)
    cc.save(folder, extra=dict(revisions=revisions))
    pd.DataFrame(dict(latent=np.arange(len(W_FMd)), freq=freq)).to_csv(folder / "latents.csv", index=False)


def test_survival_on_a_synthetic_case(tmp_path):
    """A run over step64, step128, step512 and a variant without step128 whose latents are the run's, shuffled,
    except: latent 1 keeps its direction but is at 0.45 of its size at step64 (still matched, cosine 0.94, but it
    now forms at step512: emerging, not kept), latent 2 is a new random direction (unmatched). Latent 0 is kept;
    latent 3 forms at step128 in the run, which the variant drops: it cannot tell (left out, not a failure)."""
    g = torch.Generator().manual_seed(0)
    F, d = 48, 16
    W = torch.nn.functional.normalize(torch.randn(F, 3, d, generator=g), dim=-1)
    W[3, 0] *= 0.1                                   # latent 3 emerges at step128
    W[5, 0] *= 0.3                                   # latent 5 too (formation (64, 128])
    freq = np.linspace(0.01, 0.3, F)
    _save(tmp_path / "run", W, RUN, freq)
    perm = torch.randperm(F, generator=g)
    inverse = {int(p): i for i, p in enumerate(perm)}
    V = W[:, [0, 2]].clone()
    V[1, 0] *= 0.45
    V[2] = torch.nn.functional.normalize(torch.randn(2, d, generator=g), dim=-1)
    _save(tmp_path / "var", V[perm], ["step64", "step512"], freq[perm.numpy()])
    out = checkpoint_sets.survival(tmp_path / "run", [0, 1, 2, 3], [("drop-step128", tmp_path / "var",
                                                                     ["step64", "step512"])], draws=20)
    rows = {r["latent"]: r["variants"]["drop-step128"] for r in out["latents"]}
    assert rows[0]["kept"] == {"0.8": True, "0.85": True, "0.9": True} and rows[0]["partner"] == inverse[0]
    assert rows[0]["cos"] == pytest.approx(1, abs=1e-5)
    assert rows[1]["partner"] == inverse[1] and 0.9 < rows[1]["cos"] < 0.95
    assert (rows[1]["class_shared"], rows[1]["class_variant"], rows[1]["formed_variant"]) == ("kept", "emerging",
                                                                                              "step512")
    assert not rows[1]["formed_agrees"] and rows[1]["kept"]["0.8"] is False      # (−inf, 64] vs (64, 512]
    assert rows[2]["cos"] < 0.8 and set(rows[2]["kept"].values()) == {False}
    assert rows[3]["cannot_tell"] and set(rows[3]["kept"].values()) == {None}
    assert out["latents"][3]["timeline_class"] == "emerging" and out["latents"][3]["formed"] == [64, 128]
    v = out["variants"][0]
    assert v["n"] == 3 and v["shared"] == ["step64", "step512"] and not v["shift"]
    assert v["by_cos"]["0.9"]["matched"] == pytest.approx(2 / 3) and v["by_cos"]["0.9"]["top"] == pytest.approx(1 / 3)
    assert v["class_kept"] == 0.5 and v["formed_agrees"] == 0.5                  # of the 2 matched
    assert out["graded"]["by_cos"]["0.9"]["top"] == pytest.approx(1 / 3) and out["shifts"] is None
    assert out["every"]["top"] == pytest.approx(1 / 3)
    # latent 3's class (emerging) has only latent 5 besides: 5 is its null, and forms at step128 too: cannot tell
    assert out["null_pooled"] == [] and len(v["by_cos"]["0.9"]["null"]) == 20
    assert np.mean(v["by_cos"]["0.9"]["null"]) > 0.9                             # 2 of 48 latents broken
    assert out["verdict"]["verdict"] == "uninformative" and "only 3" in out["verdict"]["why"]

    # a shift shares no revision with the run: the class compared position by position, the formation as an
    # interval in steps: latent 3 forms at step256 there, (96, 256] against the run's (64, 128]: they agree
    S = W.clone()
    S[2] = torch.nn.functional.normalize(torch.randn(3, d, generator=g), dim=-1)
    S[5, 1] *= 0.45                                  # latent 5 now forms at step1024: (256, 1024], not (64, 128]
    later = ["step96", "step256", "step1024"]
    _save(tmp_path / "shift", S[perm], later, freq[perm.numpy()])
    out = checkpoint_sets.survival(tmp_path / "run", [0, 2, 3, 5], [("shift-later", tmp_path / "shift", later)],
                                   draws=5)
    rows = {r["latent"]: r["variants"]["shift-later"] for r in out["latents"]}
    assert out["variants"][0]["shared"] == RUN and out["variants"][0]["shift"] and out["graded"] is None
    assert rows[0]["kept"]["0.9"] and rows[0]["partner"] == inverse[0]
    assert rows[3]["formed_variant"] == "step256" and rows[3]["formed_variant_interval"] == [96, 256]
    assert rows[3]["formed_agrees"] and rows[3]["kept"]["0.9"] and not rows[3]["cannot_tell"]
    assert rows[5]["cos"] > 0.9 and rows[5]["class_variant"] == rows[5]["class_shared"] == "emerging"
    assert rows[5]["formed_variant"] == "step1024" and not rows[5]["formed_agrees"] and not rows[5]["kept"]["0.9"]
    assert not rows[2]["kept"]["0.8"]
    assert out["shifts"]["by_cos"]["0.9"]["top"] == 0.5 and out["verdict"]["verdict"] == "uninformative"


# A world of latents whose decoder norms follow their class over training time, seen through any set of revisions:
# one direction per latent at every revision, the norm 1 where the latent is on and 0.2 where it is off.
TIMES = {"step32": 32, "step64": 64, "step96": 96, "step128": 128, "step256": 256, "step512": 512}
ON = {"kept": lambda t: True, "emerging": lambda t: t > 80, "discontinued": lambda t: t < 200,
      "transient": lambda t: 80 < t < 200}
VARIANTS = {"drop-step128": ["step64", "step512"], "add-step96": ["step64", "step96", "step128", "step512"],
            "add-step256": ["step64", "step128", "step256", "step512"],
            "shift-earlier": ["step32", "step96", "step256"]}


def _world(tmp_path, shuffle, F=96, d=16, seed=0):
    """The run over RUN and the VARIANTS, their latents permuted; in each variant the latents in `shuffle` take the
    timeline (class) of another latent in `shuffle`, the same one in every variant. Returns (run, variants, chosen)."""
    rng = np.random.default_rng(seed)
    classes = np.array(list(ON) * (F // len(ON)), dtype=object)
    dirs = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(F, d)), dtype=torch.float32), dim=-1)
    freq = rng.uniform(0.01, 0.3, F)

    def coder(cls, revisions):
        norms = torch.tensor([[1.0 if ON[c](TIMES[r]) else 0.2 for r in revisions] for c in cls])
        return dirs[:, None, :] * norms[..., None]

    _save(tmp_path / "run", coder(classes, RUN), RUN, freq)
    chosen = [i for c in ON for i in np.nonzero(classes == c)[0][:4]]       # 4 of each class
    shuffle = np.asarray(sorted(shuffle(chosen, F)))
    own = classes.copy()
    own[shuffle] = classes[rng.permutation(shuffle)]
    perm = rng.permutation(F)
    variants = []
    for name, revisions in VARIANTS.items():
        _save(tmp_path / name, coder(own, revisions)[perm], revisions, freq[perm])
        variants.append((name, tmp_path / name, revisions))
    return tmp_path / "run", variants, chosen


def test_identical_timelines_survive(tmp_path):
    """The top latents' timelines the same in every variant (the other latents' shuffled among themselves): every
    top latent is kept wherever it can be told — a variant without step128 cannot tell about latents that form
    there, and that costs them nothing — and above the class-stratified null, so the verdict holds."""
    run, variants, chosen = _world(tmp_path, lambda chosen, F: [i for i in range(F) if i not in chosen])
    out = checkpoint_sets.survival(run, chosen, variants, draws=50)
    for c in ("0.8", "0.85", "0.9"):
        assert out["graded"]["by_cos"][c]["top"] == 1.0 and out["shifts"]["by_cos"][c]["top"] == 1.0
    drop = next(v for v in out["variants"] if v["name"] == "drop-step128")
    assert drop["n"] == 8 and drop["by_cos"]["0.9"]["top"] == 1.0     # kept and discontinued; the rest cannot tell
    told = {r["timeline_class"] for r in out["latents"] if not r["variants"]["drop-step128"]["cannot_tell"]}
    assert told == {"kept", "discontinued"}
    g = out["graded"]["by_cos"]["0.9"]
    assert g["n"] == 16 and g["lo"] == 1.0 and g["null_hi"] < 0.8
    assert out["verdict"]["verdict"] == "holds" and out["graded"]["by_cos"]["0.8"]["verdict"] == "holds"
    assert out["every"]["top"] == 1.0 and out["null_pooled"] == []
    text = checkpoint_sets.checkpoint_sets_table(out)                      # the verdict is printed with its rule
    assert "robust to the checkpoints chosen: HOLDS at cosine 0.9" in text and checkpoint_sets.RULE in text
    assert text.count("cannot tell") == 8                                  # the emerging and transient, drop-step128
    md = checkpoint_sets.checkpoint_sets_markdown(dict(out, attribution="toy_sva"), "python checkpoint_sets.py")
    assert "chosen: holds** at cosine 0.9" in md and "in training steps" in md


def test_shuffled_timelines_do_not_beat_the_null(tmp_path):
    """Every latent's timeline permuted across latents in the variants (the same decoders' directions): the top
    latents are kept no more often than random latents of their class and frequency (a latent keeps its class in
    about 1 of 4 permutations, top and null alike), and the verdict fails."""
    run, variants, chosen = _world(tmp_path, lambda chosen, F: list(range(F)))
    out = checkpoint_sets.survival(run, chosen, variants)
    for c in ("0.8", "0.85", "0.9"):
        g = out["graded"]["by_cos"][c]
        assert g["top"] <= g["null_hi"] and g["top"] < 0.5 and g["null_mean"] < 0.5
        assert g["verdict"] == "fails"
    assert out["verdict"]["verdict"] == "fails" and "no more often" in out["verdict"]["why"]
    assert out["verdict"]["rule"] == checkpoint_sets.RULE


def test_verdict_rule():
    """holds above the null's interval, fails inside or below it, uninformative with no room or too few latents."""
    base = dict(n=20, top=0.8, lo=0.7, hi=0.9, null_mean=0.5, null_lo=0.4, null_hi=0.6)
    assert checkpoint_sets.verdict(base)[0] == "holds"
    assert checkpoint_sets.verdict(dict(base, top=0.55, lo=0.45, hi=0.65))[0] == "fails"
    assert checkpoint_sets.verdict(dict(base, top=0.3, lo=0.2, hi=0.4))[0] == "fails"
    assert checkpoint_sets.verdict(dict(base, top=0.65, lo=0.55, hi=0.75))[0] == "uninformative"
    assert checkpoint_sets.verdict(dict(base, null_mean=0.97, null_lo=0.9, null_hi=1.0))[0] == "uninformative"
    assert checkpoint_sets.verdict(dict(base, n=4))[0] == "uninformative"
