"""crosscoding/measures.py on hand-made tables: RelIE / RelDec and their classes, timelines that one noisy
revision does not flip, matched-frequency random latents, bootstrap intervals (per pair and per group of
near-copies) with known answers, the disagreement flags."""
import numpy as np

from crosscoding import measures


def test_rel_and_classes_hand_made():
    ie = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [-4.0, 1.0, 0.0], [0.35, 0.33, 0.32]])
    r = measures.rel(ie)
    np.testing.assert_allclose(r[0], [1 / 3] * 3)
    np.testing.assert_allclose(r[3], [0.8, 0.2, 0.0])
    revs = ["a", "b", "c"]
    assert measures.classify(r, revs) == ["shared", "specific:a", "others", "specific:a", "shared"]
    r2 = measures.rel2([0.0, 1.0, 1.0, 2.0], [0.0, 0.0, 9.0, 2.0])
    np.testing.assert_allclose(r2, [0.5, 0.0, 0.9, 0.5])
    assert measures.classify2(r2) == ["maintained", "discontinued", "emerging", "maintained"]
    two = measures.rel(np.array([[0.0, 0.0], [3.0, 1.0]]))
    assert measures.classify(two, ["a", "b"]) == ["shared", "specific:a"]


def test_random_k_draws_break_ties_at_random_and_avoid_every_top_set():
    """Matched-frequency random latents: among equal frequencies (dead latents, say) the draw changes from
    one draw to the next, and never picks a latent of any revision's top-k set."""
    freq = np.zeros(200)
    freq[:10] = np.linspace(0.1, 0.2, 10)
    rng = np.random.default_rng(0)
    exclude = set(range(10)) | {50, 51, 52}
    draws = [tuple(measures.matched_random(freq, [150, 160, 170], rng, exclude)) for _ in range(6)]
    assert len(set(draws)) > 1
    assert not {i for d in draws for i in d} & exclude
    near = measures.matched_random(freq, [3], rng, {3})[0]
    assert near in range(10) and near != 3           # the nearest frequencies, not a dead latent


def test_bootstrap_intervals_have_the_known_answers():
    """Identical values: a zero-width interval; a large normal sample: the interval of its mean covers the
    population mean with about ±1.96 σ/√n; ρ per resample equals the plain ρ."""
    lo, hi = measures.interval(measures.bootstrap_means(np.full((50, 3), 2.5)))
    np.testing.assert_array_equal(lo, 2.5)
    np.testing.assert_array_equal(hi, 2.5)
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 1.0, 4000)
    mean, lo, hi = measures.mean_interval(x)
    assert lo < 1.0 < hi and abs((hi - lo) - 2 * 1.96 / np.sqrt(4000)) < 0.01, (lo, hi)
    a = measures.mean_interval(x, seed=3)
    assert a[1] != lo                            # another seed, another (equally valid) interval
    assert measures.mean_interval(x)[1] == lo    # the same seed, the same interval
    X, y = rng.normal(size=(20, 15)), rng.normal(size=15)
    np.testing.assert_allclose(measures.spearman_rows(X, y), [measures.spearman(row, y) for row in X], atol=1e-12)


def test_disagreement_flags():
    ie = np.array([1.0, -1.0, 1.0, 1.0, 1e-6, 0.5])
    exact = np.array([0.9, 1.0, 3.0, 0.4, -1e-6, 0.5])
    # same / opposite sign / 3× / 2.5× / both negligible / same
    assert measures.disagree(ie, exact).tolist() == [False, True, True, True, False, False]


def test_timeline_ignores_one_noisy_revision():
    tl = measures.timeline(np.array([[1, .45, 1, 1, 1], [0.3, 1, .45, 1, 1], [1, 1, 1, .3, .2]]), list("abcde"))
    assert tl.timeline_class.tolist() == ["kept", "emerging", "discontinued"]
    assert tl.faded_at.tolist() == ["", "", "d"]


def test_flat_latent_with_noise_is_mostly_kept():
    """A flat latent with 20% noise over 10 revisions: fading needs two revisions in a row below half (or the last
    one), so 87% stay kept here; the old first-revision-below-half rule kept 77%."""
    rng = np.random.default_rng(0)
    v = np.clip(1 + 0.2 * rng.standard_normal((2000, 10)), 0, None)
    kept = (measures.timeline(v, [f"r{i}" for i in range(10)]).timeline_class == "kept").mean()
    assert kept > 0.85


def test_group_bootstrap_draws_near_copies_together():
    """With groups, every member of a group is drawn as often as its group; an interval over 50 groups of 10
    exact copies is as wide as one over the 50 distinct values (not √10 narrower, as a per-pair bootstrap that
    counts copies as independent would make it)."""
    groups = np.repeat(np.arange(50), 10)
    counts = measures.resample_counts(len(groups), n=200, groups=groups)
    per_group = counts.reshape(200, 50, 10)
    assert (per_group == per_group[..., :1]).all() and (counts.sum(1) % 10 == 0).all()
    rng = np.random.default_rng(0)
    values = rng.normal(0, 1, 50)
    copies = np.repeat(values, 10)
    _, lo, hi = measures.mean_interval(copies, groups=groups)
    _, lo1, hi1 = measures.mean_interval(values)
    _, lo_pairs, hi_pairs = measures.mean_interval(copies)
    assert abs((hi - lo) - (hi1 - lo1)) < 0.15 * (hi1 - lo1)
    assert (hi_pairs - lo_pairs) < 0.5 * (hi - lo)
    # groups of unequal size: the mean of a resample weights each pair once (a ratio of sums, not a mean of means)
    v, g = np.array([1.0, 1.0, 1.0, 4.0]), np.array([0, 0, 0, 1])
    c = measures.resample_counts(4, n=50, groups=g)
    np.testing.assert_allclose(measures.bootstrap_means(v, n=50, groups=g), (c @ v) / c.sum(1))
