"""Planted timelines (crosscoding/planted.py): features born at and dying after known revisions over M = 10,
recovered by every sparsity variant in crosscoder.ARCHS, scored with measures.timeline on decoder-norm shares;
and the score seen to fail on a crosscoder that learned nothing."""
import numpy as np
import pytest
import torch

from crosscoding import measures, planted
from crosscoding.crosscoder import ARCHS, CrossCoder, CrossCoderConfig

# 10 s of one CPU thread per variant; l1, batchtopk and matryoshka score 1.00 from 600 steps to 1500. JumpReLU
# (sized by L0: three or four trainings) needs the full 1500: at 600 it misses a fifth transient feature.
STEPS = {"jumprelu": 1500}


def test_generator_truth_is_what_it_planted():
    """measures.timeline's definitions, applied to the planted sizes, give back the classes the generator drew,
    with scale drift inside each feature's life; every class is there, births and deaths spread out."""
    p = planted.planted_timelines()
    assert p.D_NMd.shape == (32, 10, 32)
    assert p.classes == p.kinds
    assert {c: p.classes.count(c) for c in planted.CLASSES} == {c: 8 for c in planted.CLASSES}
    norms = p.D_NMd.norm(dim=-1).numpy()
    alive = norms > 0
    assert (norms[alive] < 0.999).any() and norms[alive].min() >= 0.6 - 1e-6     # drift, never below half
    kinds = np.array(p.kinds)
    assert (p.formed_N[kinds == "kept"] == 0).all() and (p.faded_N[kinds == "kept"] == -1).all()
    assert len(set(p.formed_N[kinds == "emerging"])) >= 3 and len(set(p.faded_N[kinds == "discontinued"])) >= 3
    for n in range(len(kinds)):      # alive exactly on [formed, faded)
        end = p.faded_N[n] if p.faded_N[n] >= 0 else 10
        assert alive[n].tolist() == [p.formed_N[n] <= m < end for m in range(10)]


def test_the_score_fails_on_a_crosscoder_that_learned_nothing():
    """The negative control of the planted check: an untrained crosscoder's decoder norms are flat over the
    revisions, so every matched latent reads as kept — a quarter of the classes right, births at revision 0."""
    p = planted.planted_timelines()
    cc = CrossCoder(CrossCoderConfig(n_models=10, d_model=32, dict_size=128))
    s = planted.score(p, cc)
    assert s["class_accuracy"] <= 0.3 and s["formed_exact"] <= 0.5 and s["matched_cos_mean"] < 0.5
    assert s["missed"] == 32 == int((np.array(s["features"]["cos"]) < 0.9).sum())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_planted_timelines_recovered(arch):
    """Trained through the public API with each variant's defaults (sparsity aside: planted.SIZE_KW, and
    JumpReLU's coefficient sized by L0), every variant held to the bar: ≥ 90% of classes and of formed_at
    exact (the numbers print with -s)."""
    torch.manual_seed(0)
    s = planted.run_arch(arch, steps=STEPS.get(arch, 600))
    print(f"{arch}: class accuracy {s['class_accuracy']:.2f}, formed_at exact {s['formed_exact']:.2f} (MAE "
          f"{s['formed_mae']:.2f}), faded_at exact {s['faded_exact']:.2f} (MAE {s['faded_mae']:.2f}), matched "
          f"cosine ≥ {s['matched_cos_min']:.2f}, {s['seconds']:.0f} s")
    assert s["n"] == 32 and 0 <= s["class_accuracy"] <= 1
    assert set(s["per_class"]) == set(measures.TIMELINE_CLASSES)
    assert s["class_accuracy"] >= 0.9, s["per_class"]
    assert s["formed_exact"] >= 0.9, s["features"]
    assert s["matched_cos_mean"] >= 0.9


def test_the_command_reports_each_seed_and_the_spread(capsys, tmp_path, monkeypatch):
    """python -m crosscoding.planted: a line per variant and seed, the control's spread over the seeds; the
    markdown row gives mean [min, max] over seeds and skips a seed where a value is undefined."""
    planted.main(["--arch", "l1", "--steps", "30", "--seeds", "2"])
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith("l1 ")]) == 2
    assert "class accuracy 0.25 [0.25, 0.25]" in out          # the untrained control, both seeds
    rs = [dict(class_accuracy=a, formed_exact=1.0, formed_mae=0.0, faded_exact=1.0, faded_mae=m,
               matched_cos_mean=0.9, matched_cos_min=c, missed=int(c < 0.9), l0=4.0)
          for a, m, c in ((0.5, float("nan"), 0.8), (1.0, 2.0, 0.95))]
    row = planted._row("x", rs)
    assert row.startswith("| x | 0.75 [0.50, 1.00] |") and "| 2.00 |" in row and "(min 0.80)" in row
    assert "| 0.5 [0.0, 1.0] |" in row                          # missed: one feature under 0.9 in seed 0
    with pytest.raises(SystemExit):
        planted.main(["--seeds", "0"])


def _with_decoder(p, rows_NMd, F=160, seed=0):
    """A crosscoder (M, d of `p`, F latents) whose first decoder rows are rows_NMd, the rest its random init."""
    cc = CrossCoder(CrossCoderConfig(n_models=p.D_NMd.shape[1], d_model=p.D_NMd.shape[2], dict_size=F, seed=seed))
    with torch.no_grad():
        cc.W_dec_FMd[:len(rows_NMd)] = rows_NMd
    return cc


def test_recovery_is_measured_per_group():
    """The recovery groups: five birth/death patterns over M = 3, 24 features each, ~6 on per token. A decoder that
    IS the planted dictionary recovers every feature of every group; one that lacks one group's features misses
    exactly that group; a random one recovers none."""
    p = planted.planted_groups(seed=0)
    assert p.D_NMd.shape == (120, 3, 32) and abs(p.p_on * 120 - 6) < 1e-9
    groups = np.array(p.groups)
    assert {g: int((groups == g).sum()) for g in planted.GROUPS} == {g: 24 for g in planted.GROUPS}
    alive = (p.D_NMd.norm(dim=-1) > 0).numpy().astype(int)
    for g, pattern in planted.GROUPS.items():
        assert (alive[groups == g] == pattern).all()
    r = planted.recovery(p, _with_decoder(p, p.D_NMd))
    assert r["n"] == 120 and r["best"] == r["one_to_one"] == 1.0
    assert r["best_groups"] == r["one_to_one_groups"] == {g: 1.0 for g in planted.GROUPS}
    noise = torch.randn(p.D_NMd.shape, generator=torch.Generator().manual_seed(1))
    lacking = torch.where(torch.as_tensor(groups == "first two")[:, None, None], noise, p.D_NMd)
    r = planted.recovery(p, _with_decoder(p, lacking))
    assert r["best_groups"] == {g: float(g != "first two") for g in planted.GROUPS}
    assert r["best"] == r["one_to_one"] == 0.8
    r = planted.recovery(p, CrossCoder(CrossCoderConfig(n_models=3, d_model=32, dict_size=512)))
    assert r["best"] == r["one_to_one"] == 0.0


def test_recovery_one_to_one_gives_a_latent_to_one_feature_only():
    """Two planted features with the same decoder and one latent for both: the best-latent count takes both, the
    one-to-one count one. The cosine is taken in the space the crosscoder was trained in (its folded scales
    restored): read there, the raw dictionary misses the features of several revisions, not those of one."""
    p = planted.planted_groups(seed=0)
    p.D_NMd[1] = p.D_NMd[0]                            # two 'all three' features, one direction
    rows = p.D_NMd.clone()
    rows[1] = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    s_M = torch.tensor([0.25, 1.0, 4.0])
    cc = _with_decoder(p, rows * s_M[None, :, None]).fold_scales(s_M)     # trained on s_m x_m, then folded
    r = planted.recovery(p, cc)
    assert r["best_groups"]["all three"] == 1.0 and r["one_to_one_groups"]["all three"] == 23 / 24
    assert r["best"] == 1.0 and r["one_to_one"] == 119 / 120
    unfolded = _with_decoder(p, rows).fold_scales(s_M)                   # the raw dictionary, read normalised
    r = planted.recovery(p, unfolded)["best_groups"]
    assert r["first only"] == r["last only"] == 1.0 and r["all three"] == 0.0


def test_the_recovery_command(capsys):
    """python -m crosscoding.planted --recovery: a line per variant and seed with every group, the untrained
    control; the markdown row gives mean [min, max] per group over the seeds."""
    planted.main(["--recovery", "--arch", "batchtopk", "--steps", "30", "--seeds", "2", "--first-seed", "5"])
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if line.startswith("batchtopk ")]
    assert [line[1] for line in lines] == ["5", "6"] and all(len(line) == 2 + 1 + 5 + 3 for line in lines)
    assert "recovered 0.00 [0.00, 0.00]" in out                # the untrained control, both seeds
    rs = [dict(best=b, one_to_one=o, l0=8.0, best_groups={"a": b, "b": 1.0}) for b, o in ((0.5, 0.4), (1.0, 1.0))]
    assert planted._recovery_row("x", rs) == ("| x | 0.75 [0.50, 1.00] | 0.75 [0.50, 1.00] | 1.00 [1.00, 1.00] | "
                                              "0.70 [0.40, 1.00] | 8.0 [8.0, 8.0] |")
    for bad in (["--matryoshka-causes"], ["--recovery", "--first-seed", "-1"]):
        with pytest.raises(SystemExit):
            planted.main(bad)
