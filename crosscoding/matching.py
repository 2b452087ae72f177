"""matching.py — the same latent in two crosscoders: their active latents matched one-to-one (Hungarian,
maximum total decoder cosine over the revisions both hold), the share of chosen latents matched, and that
share's null (random active latents of matched activation frequency). seeds.py, controls.py and
checkpoint_sets.py all read latents this way.
"""
import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment

from crosscoding import measures
from crosscoding.crosscoder import CrossCoder

MATCH_COS = 0.9               # a latent is matched when its partner's decoder cosine reaches this
MATCH_COS_GRID = (0.8, 0.85, 0.9)   # the thresholds reported side by side (the finding must not hang on one)
NULL_DRAWS = 100              # random-latent draws behind a null's interval


def unit_decoders(folder, revisions=None) -> tuple[torch.Tensor, np.ndarray]:
    """Every latent's decoder over `revisions` (default all of the run's), concatenated in the normalised space,
    unit norm [F, |revisions|·d], and its decoder norms over them [F, |revisions|]."""
    cc = CrossCoder.load(folder)
    idx = [cc.extra["revisions"].index(r) for r in revisions] if revisions is not None else slice(None)
    dec = cc.decoder().detach()[:, idx]
    return torch.nn.functional.normalize(dec.flatten(1), dim=1), cc.decoder_norms().detach()[:, idx].numpy()


def active_latents(folder) -> tuple[np.ndarray, np.ndarray]:
    """(the latents active on the evaluation tokens, every latent's activation frequency) from evaluate.py."""
    freq = pd.read_csv(folder / "latents.csv").sort_values("latent").freq.to_numpy()
    return np.nonzero(freq > 0)[0], freq


def pairing(dec_a, act_a, dec_b, act_b) -> dict:
    """One-to-one matching of a's active latents to b's: latent of a → (latent of b, cosine); (−1, −1.0) where
    a has more active latents than b and it is left over."""
    cos = (dec_a[act_a] @ dec_b[act_b].T).numpy()
    rows, cols = linear_sum_assignment(-cos)
    out = {int(i): (-1, -1.0) for i in act_a}
    out.update({int(act_a[r]): (int(act_b[c]), float(cos[r, c])) for r, c in zip(rows, cols)})
    return out


def partners(dec_a, act_a, dec_b, act_b) -> dict:
    """pairing without the partner's name: latent of a → its partner's cosine."""
    return {i: c for i, (_, c) in pairing(dec_a, act_a, dec_b, act_b).items()}


def random_like(freq_F, chosen, rng, draws) -> list[list[int]]:
    """`draws` sets of random active latents, each latent matched in activation frequency to one of `chosen`."""
    freq = np.where(freq_F > 0, freq_F, -1.0)           # dead latents are never drawn
    return [measures.matched_random(freq, chosen, rng, set(chosen)) for _ in range(draws)]


def random_within(freq_F, chosen, strata_F, rng, draws) -> tuple[list[list[int]], list[int]]:
    """`draws` sets of random active latents, each from the same stratum (say its timeline class) as its chosen
    latent and near it in activation frequency (measures.matched_random within the stratum), so that the null
    differs from the chosen latents in nothing the strata hold fixed. A chosen latent whose stratum holds no other
    active latent is matched over all active latents instead; those are returned second."""
    freq = np.where(freq_F > 0, freq_F, -1.0)           # dead latents are never drawn
    strata = np.asarray(strata_F, dtype=object)
    taken = {int(i) for i in chosen}
    outside = {}                                        # stratum → the latents its draws must not take
    for s in dict.fromkeys(strata[i] for i in chosen):     # in a fixed order: the draws are seeded
        pool = (strata == s) & (freq_F > 0)
        pool[list(taken)] = False
        outside[s] = set(np.nonzero(~pool)[0].tolist()) if pool.any() else None
    dead = set(np.nonzero(freq_F <= 0)[0].tolist()) | taken
    pooled = [int(i) for i in chosen if outside[strata[i]] is None]
    out = []
    for _ in range(draws):
        pick = {}
        for s, exclude in sorted(outside.items(), key=lambda x: x[1] is None):    # the pooled last: they
            lat = [int(i) for i in chosen if strata[i] == s]                      # avoid the others' picks
            exclude = exclude if exclude is not None else dead | set(pick.values())
            pick.update(zip(lat, measures.matched_random(freq, lat, rng, exclude)))
        out.append([pick[int(i)] for i in chosen])
    return out, pooled

def matched_fractions(folders, chosen, draws=20, seed=0, cos=MATCH_COS) -> tuple[list[float], list[float]]:
    """Per crosscoder, the fraction of its chosen latents whose partner in every other crosscoder has decoder
    cosine ≥ cos, and the same fraction for random active latents of matched frequency (the null: how stable
    the dictionary is anyway), averaged over draws."""
    decs = [unit_decoders(f)[0] for f in folders]
    act = [active_latents(f) for f in folders]
    rng = np.random.default_rng(seed)
    top, null = [], []
    for a, lat in enumerate(chosen):
        match = {}
        for b in range(len(folders)):
            if b != a:
                for i, c in partners(decs[a], act[a][0], decs[b], act[b][0]).items():
                    match[i] = match.get(i, True) and c >= cos

        def frac(latents, match=match):
            return float(np.mean([match.get(int(i), False) for i in latents])) if len(latents) else float("nan")
        top.append(frac(lat))
        null.append(float(np.mean([frac(r) for r in random_like(act[a][1], lat, rng, draws)])))
    return top, null


def match_with_null(folder_a, chosen, folder_b, draws=NULL_DRAWS, cos=MATCH_COS) -> tuple[float, list]:
    """The fraction of folder_a's chosen latents matched (cosine ≥ cos) in folder_b, and one value of its null
    per draw (random active latents of matched frequency)."""
    top = matched_fractions([folder_a, folder_b], [chosen, []], draws=1, cos=cos)[0][0]
    null = [matched_fractions([folder_a, folder_b], [chosen, []], draws=1, seed=s, cos=cos)[1][0]
            for s in range(draws)]
    return top, null


def null_interval(values) -> tuple[float, float]:
    """The central 95% of a null's draws (finite ones); NaN when there are none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) if len(v) else (float("nan"),) * 2
