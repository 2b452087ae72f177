"""measures.py — the relative measures and their classes on plain tables: RelDec, RelIE (one-vs-all
and 2-way), the classes the paper draws from them, and the app's annotations file. numpy and pandas
only (no torch), so the viewer can use them without loading a model.
"""
import fcntl
import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from crosscoding.common import atomic_path

SPECIFIC, SHARED_MIN = 0.7, 0.3        # one-vs-all classes: > 0.7 specific, all ≥ 0.3 shared
LOW, HIGH = 0.3, 0.7                   # 2-way classes: < 0.3 discontinued, > 0.7 emerging
FVU_BAR = 0.05                         # a revision reconstructed worse than this is poorly covered (the toy's
#                                        preset meets it at every revision: tests/test_toy_findings.py)


def fvu_warning(fvu: dict, what: str) -> str | None:
    """One warning line naming every revision whose FVU misses FVU_BAR (None when all meet it): train.py's
    validation FVU, evaluate.py's held-out one, the app's Training page."""
    miss = {r: v for r, v in fvu.items() if not v <= FVU_BAR}
    if not miss:
        return None
    return (f"warning: {what} misses the bar (≤ {FVU_BAR}) at " + ", ".join(f"{r} ({v:.3f})" for r, v in miss.items())
            + ": the crosscoder reconstructs " + ("that revision" if len(miss) == 1 else "those revisions")
            + " poorly, so its latents there cover less of what the LM computes; train on more --tokens, with a "
              "larger --dict-size or with less sparsity (--l1-coeff, --k)")


def rel(values_NM) -> np.ndarray:
    """|v_m| / Σ_m' |v_m'| per row; an all-zero row splits evenly (1/M)."""
    a = np.abs(np.asarray(values_NM, dtype=float))
    s = a.sum(1, keepdims=True)
    return np.where(s > 0, a / np.where(s > 0, s, 1), 1.0 / a.shape[1])


def classify(rel_NM, revisions) -> list[str]:
    """One-vs-all: 'specific:<rev>' when one share > 0.7, 'shared' when every share ≥ 0.3, else 'others'."""
    out = []
    for row in np.asarray(rel_NM):
        top = int(np.argmax(row))
        if row[top] > SPECIFIC:
            out.append(f"specific:{revisions[top]}")
        elif (row >= SHARED_MIN).all():
            out.append("shared")
        else:
            out.append("others")
    return out


def add_shares(df, name, rel_NM, revisions):
    """Columns <name>_<revision> (each revision's share) and <name>_class (one-vs-all) of a latent table."""
    for m, r in enumerate(revisions):
        df[f"{name}_{r}"] = rel_NM[:, m]
    df[f"{name}_class"] = classify(rel_NM, revisions)


def rel2(a_N, b_N) -> np.ndarray:
    """2-way: |B| / (|A| + |B|), 0.5 when both are 0."""
    a, b = np.abs(np.asarray(a_N, dtype=float)), np.abs(np.asarray(b_N, dtype=float))
    s = a + b
    return np.where(s > 0, b / np.where(s > 0, s, 1), 0.5)


def classify2(r_N) -> list[str]:
    return ["discontinued" if r < LOW else "emerging" if r > HIGH else "maintained" for r in np.asarray(r_N)]


def normalise(ie_MF):
    """Each revision's (mean) IE divided by its total |IE| over all latents: the normalised IE, which
    removes the logit scale (a later checkpoint's logits are larger). relie.py and ablate.py both use it."""
    ie_MF = np.asarray(ie_MF, dtype=float)
    tot = np.abs(ie_MF).sum(1, keepdims=True)
    return ie_MF / np.where(tot > 0, tot, 1)


# ---------------------------------------------------------------------------------------------
# Timelines: when a latent forms, peaks and fades over M revisions in training order

TIMELINE_CLASSES = ("kept", "emerging", "discontinued", "transient")


def _first_lasting(cond_NM, start_N):
    """Per row, the first revision m ≥ start where cond holds at m and at m+1 (or m is the last
    revision): a state that lasts ≥ 2 revisions or to the end; −1 where there is none."""
    N, M = cond_NM.shape
    nxt = np.concatenate([cond_NM[:, 1:], np.ones((N, 1), dtype=bool)], 1)
    ok = cond_NM & nxt & (np.arange(M)[None, :] >= np.asarray(start_N)[:, None])
    return np.where(ok.any(1), ok.argmax(1), -1)


def timeline(values_NM, revisions, tokens=None, prefix="") -> pd.DataFrame:
    """Per row (latent) of non-negative values over revisions in training order (decoder norms, |IE|):
    formed_at = the first revision from which the row stays at ≥ half its maximum for ≥ 2 revisions (or
    to the end; a one-revision spike forms at its peak), peak_at = the maximum, faded_at = the first
    revision after the peak from which it stays below half for ≥ 2 revisions or to the end ('' if it
    never fades) — one noisy revision neither forms nor fades a latent —, each also in tokens seen (NaN
    where a revision's name gives none), and the class: kept (formed at the first revision, never
    fades), emerging (forms later, never fades), discontinued (formed at the first, fades), transient
    (forms later and fades inside the window). An all-zero row gets no points and no class."""
    v = np.abs(np.asarray(values_NM, dtype=float))
    N, M = v.shape
    tokens = [np.nan if t is None else t for t in (tokens or [None] * M)]
    peak = v.argmax(1)
    half = v.max(1, keepdims=True) / 2
    formed = _first_lasting((v >= half) & (half > 0), np.zeros(N, dtype=int))
    formed = np.where((formed < 0) | (formed > peak), peak, formed)
    faded = _first_lasting(v < half, peak + 1)
    alive = half[:, 0] > 0
    cls = np.where(formed == 0, np.where(faded >= 0, "discontinued", "kept"),
                   np.where(faded >= 0, "transient", "emerging"))
    names = np.array(list(revisions) + [""], dtype=object)
    toks = np.array(list(tokens) + [np.nan], dtype=float)
    pick = lambda i: np.where(alive & (i >= 0), i, M)      # noqa: E731   M → '' / NaN
    out = pd.DataFrame({f"{prefix}formed_at": names[pick(formed)], f"{prefix}peak_at": names[pick(peak)],
                        f"{prefix}faded_at": names[pick(faded)]})
    for k, idx in (("formed_at", formed), ("peak_at", peak), ("faded_at", faded)):
        out[f"{prefix}{k}_tokens"] = toks[pick(idx)]
    out[f"{prefix}timeline_class"] = np.where(alive, cls, "")
    return out



def formation_intervals(formed_N, revisions, times) -> tuple[np.ndarray, np.ndarray]:
    """Each row's formation as the interval (lo, hi] in training time: hi = the time of its formed_at revision, lo =
    the time of the revision before it (the latent was under half its peak there, or at least not yet lasting), −inf
    at the first revision (it formed before the window). NaN for a row with no formed_at (''). `times`: each
    revision's place in training (tokens or steps), so that intervals compare across different sets of revisions."""
    t = dict(zip(revisions, map(float, times)))
    before = {r: t[revisions[m - 1]] if m else -np.inf for m, r in enumerate(revisions)}
    formed = list(formed_N)
    return (np.array([before.get(f, np.nan) for f in formed], dtype=float),
            np.array([t.get(f, np.nan) for f in formed], dtype=float))


def intervals_overlap(lo_a, hi_a, lo_b, hi_b) -> np.ndarray:
    """Whether half-open intervals (lo, hi] share a point: two formations agree when they overlap — (64, 128] and
    (96, 256] do, (64, 128] and (128, 256] do not. False where either is NaN."""
    lo = np.maximum(np.asarray(lo_a, dtype=float), np.asarray(lo_b, dtype=float))
    return lo < np.minimum(np.asarray(hi_a, dtype=float), np.asarray(hi_b, dtype=float))

# ---------------------------------------------------------------------------------------------
# Signed classes: a latent that hurts the task where it matters most is not the same finding as one
# that helps there

PLUS, MINUS = "+", "−"


def signed(classes, sign_N) -> list[str]:
    """'+class' / '−class' by the sign of the IE at the revision that decided the class ('' stays '')."""
    return [c and (PLUS if s >= 0 else MINUS) + c for c, s in zip(classes, np.asarray(sign_N, dtype=float))]


def sign_at(ie_NM, where_N) -> np.ndarray:
    """The sign of each row's IE at its revision where_N."""
    ie = np.asarray(ie_NM, dtype=float)
    return np.sign(ie[np.arange(len(ie)), np.asarray(where_N, dtype=int)])


def unsigned(cls: str) -> str:
    """The class without its sign."""
    return cls[1:] if cls[:1] in (PLUS, MINUS) else cls


def agreement(point, samples_nN) -> np.ndarray:
    """Per latent, the fraction of bootstrap resamples whose class equals the point estimate's."""
    s = np.asarray(samples_nN, dtype=object)
    return (s == np.asarray(point, dtype=object)[None, :]).mean(0)


def peak_fraction(values_NM) -> np.ndarray:
    """Each row divided by its own maximum (|value|): the many-checkpoint heatmap's colour, in which
    formation reads as a staircase when rows are sorted by formed_at."""
    v = np.abs(np.asarray(values_NM, dtype=float))
    top = v.max(1, keepdims=True)
    return v / np.where(top > 0, top, 1)


# ---------------------------------------------------------------------------------------------
# Uncertainty: bootstrap over the split's groups of near-copy pairs (95%, 1000 resamples, seeded)

BOOTSTRAP_N, BOOTSTRAP_LEVEL, BOOTSTRAP_SEED = 1000, 0.95, 0
BOOTSTRAP_OVER = "groups of near-copies (tasks.split_groups), each group drawn whole"


def resample_counts(n_items, n=BOOTSTRAP_N, seed=BOOTSTRAP_SEED, groups=None) -> np.ndarray:
    """[n, n_items]: how often each item is drawn in each of n resamples with replacement. With `groups` (a
    group id per item) whole groups are drawn and every item gets its group's count: near-copies are
    resampled together, as the split keeps them together, so an interval does not count them as independent."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=n).astype(np.float64)
    _, item_group = np.unique(np.asarray(groups), return_inverse=True)
    G = item_group.max() + 1
    return rng.multinomial(G, np.full(G, 1.0 / G), size=n).astype(np.float64)[:, item_group]


def interval(samples, level=BOOTSTRAP_LEVEL, axis=0):
    """The percentile interval (lo, hi) of bootstrap samples along `axis`."""
    q = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(np.asarray(samples, dtype=float), [q, 100 - q], axis=axis)
    return lo, hi


def bootstrap_means(values_P, n=BOOTSTRAP_N, seed=BOOTSTRAP_SEED, groups=None):
    """Means of per-pair values [P, ...] over n resamples of the pairs (of their groups, when given): [n, ...]."""
    v = np.asarray(values_P, dtype=np.float64)
    counts = resample_counts(len(v), n, seed, groups)
    sums = (counts @ v.reshape(len(v), -1)).reshape((n,) + v.shape[1:])
    return sums / counts.sum(1).reshape((n,) + (1,) * (v.ndim - 1))


def mean_interval(values_P, n=BOOTSTRAP_N, seed=BOOTSTRAP_SEED, level=BOOTSTRAP_LEVEL, groups=None):
    """(mean, lo, hi) of the mean of per-pair values [P, ...] (a 95% bootstrap interval by default)."""
    lo, hi = interval(bootstrap_means(values_P, n, seed, groups), level)
    return np.asarray(values_P, dtype=np.float64).mean(0), lo, hi


def spearman(a, b) -> float:
    """Spearman's ρ (average ranks for ties); NaN when either side is constant."""
    a, b = pd.Series(np.asarray(a, dtype=float)).rank(), pd.Series(np.asarray(b, dtype=float)).rank()
    if a.std() == 0 or b.std() == 0 or len(a) < 2:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def disagree(ie, exact, floor=1e-3):
    """Where an attribution and exact ablation disagree: opposite signs, or one more than twice the other
    in size. Values both under floor × the largest |value| count as agreeing (noise, not a finding)."""
    ie, exact = np.asarray(ie, dtype=float), np.asarray(exact, dtype=float)
    tiny = floor * max(np.abs(ie).max(initial=0), np.abs(exact).max(initial=0))
    small = (np.abs(ie) <= tiny) & (np.abs(exact) <= tiny)
    sign = np.sign(ie) * np.sign(exact) < 0
    big, little = np.maximum(np.abs(ie), np.abs(exact)), np.minimum(np.abs(ie), np.abs(exact))
    return ~small & (sign | (big > 2 * little))


def spearman_rows(X_nK, y_K) -> np.ndarray:
    """Spearman ρ of each row of X with y: [n] (bootstrap replicates; y's ties get average ranks, a row's
    ties are broken by position — resampled means of continuous values rarely tie)."""
    X = np.asarray(X_nK, dtype=float)
    ry = pd.Series(np.asarray(y_K, dtype=float)).rank().to_numpy()
    rx = np.argsort(np.argsort(X, axis=1, kind="stable"), axis=1).astype(float) + 1
    rx -= rx.mean(1, keepdims=True)
    ry = ry - ry.mean()
    den = np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum())
    return np.where(den > 0, (rx * ry).sum(1) / np.where(den > 0, den, 1), np.nan)


def matched_random(freq_F, chosen, rng, exclude):
    """For each chosen latent, a random latent outside `exclude` among the 5 nearest in activation
    frequency; ties in frequency (dead latents, say) are broken at random, anew each draw."""
    pool = rng.permutation([i for i in range(len(freq_F)) if i not in exclude])
    out = []
    for i in chosen:
        near = pool[np.argsort(np.abs(freq_F[pool] - freq_F[i]), kind="stable")[:5]]
        near = [j for j in near if j not in out] or list(near)
        out.append(int(rng.choice(near)))
    return out


def pairs_of(revisions):
    """Every (A, B) with A before B."""
    return list(itertools.combinations(range(len(revisions)), 2))


# ---------------------------------------------------------------------------------------------
# Annotations (runs/<name>/annotations.csv, written by the app)

def read_annotations(folder) -> pd.DataFrame:
    """runs/<name>/annotations.csv (written by the app): latent, description, tags."""
    path = Path(folder) / "annotations.csv"
    if not path.exists():
        return pd.DataFrame(columns=["latent", "description", "tags"])
    return pd.read_csv(path, dtype={"description": str, "tags": str}).fillna("")


def save_annotation(run: Path, latent: int, description: str, tags: str):
    with open(run / ".annotations.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        df = read_annotations(run)
        df = df[df.latent.astype(int) != latent]
        df = pd.concat([df, pd.DataFrame([dict(latent=latent, description=description, tags=tags)])])
        with atomic_path(run / "annotations.csv") as tmp:
            df.sort_values("latent").to_csv(tmp, index=False)
