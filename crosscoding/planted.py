"""planted.py — planted timelines: synthetic activations over M revisions whose features are born at and
die after known revisions, a crosscoder trained on them through the public API, and its timelines
scored against the truth.

    python -m crosscoding.planted                  # every variant in crosscoder.ARCHS, 3 seeds (10–45 s each)
    python -m crosscoding.planted --arch l1 --steps 800
    python -m crosscoding.planted --results        # the table into FINDINGS.md (section `planted`)
    python -m crosscoding.planted --recovery --matryoshka-causes --results   # section `planted-recovery`

The generator (`planted_timelines`): N features per class — kept (alive at every revision), emerging
(born at a later revision, alive to the end), discontinued (alive from the first, dead after an inner
revision), transient (born later, dead inside the window) — each a direction per revision (a shared
direction with a per-revision wobble), its size drifting from revision to revision (a random walk of
±`drift`), zero where the feature is dead; a token is a sparse non-negative mix of features plus
isotropic noise. The truth (`formed`, `faded`, `classes`) is what measures.timeline's definitions say of
the planted sizes, which the tests check against the birth and death the generator drew.

Scoring (`score`): each planted feature is matched to the learned latent whose decoder (concatenated
over revisions, normalised space, unit norm) has the largest cosine with its planted one; that latent's
decoder norms over revisions go through measures.timeline, and formed_at / faded_at / the class are
compared with the truth: the exact-revision rate, the mean absolute error in revisions (faded_at over
the features that fade in both), the class accuracy.

Recovery (`--recovery`; `planted_groups`, `recovery`): 120 features in five fixed birth/death groups over
M = 3 revisions (GROUPS: alive on all three, the first only, the first two, the last two, the last only),
~6 on per token, F = 512; the fraction of planted features a latent's decoder matches at cosine ≥ 0.9, per
group, to its best latent and one-to-one; `--matryoshka-causes` adds Matryoshka with one config field
changed at a time (MATRYOSHKA_CAUSES).

Sparsity is sized to the generator's ~4 features on per token: k = 4 for BatchTopK and Matryoshka, λ = 0.5
for L1 (the paper's λ = 2 is for d = 2048), and for JumpReLU a coefficient read off the data by its L0
(`sized_by_l0`, the setting its variant names), since its default, chosen on the toy, trains this data to L0 ≈ 47.
"""
import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crosscoding import measures
from crosscoding.common import update_results
from crosscoding.variants import VARIANTS

CLASSES = measures.TIMELINE_CLASSES    # kept, emerging, discontinued, transient


@dataclass
class Planted:
    D_NMd: torch.Tensor      # each feature's planted decoder: direction × size, zero where it is dead
    formed_N: np.ndarray     # truth: revision index where it forms
    faded_N: np.ndarray      # truth: revision index where it fades, −1 if it never does
    classes: list            # truth: timeline class
    kinds: list              # the class each feature was drawn as (the truth must agree: a test checks)
    noise: float             # std of the isotropic noise per coordinate
    p_on: float              # chance that a feature is on at a token
    groups: list             # the group each feature was planted in (planted_timelines: its class)

    @property
    def revisions(self) -> list:
        return [f"r{m}" for m in range(self.D_NMd.shape[1])]


def planted_timelines(M=10, d=32, n_per_class=8, drift=0.2, wobble=0.3, noise=0.05, p_on=None, seed=0) -> Planted:
    """The generator (module docstring). Birth and death revisions are drawn so that every alive and
    every dead stretch lasts ≥ 2 revisions (the timeline's own rule: one revision neither forms nor fades)."""
    rng = np.random.default_rng(seed)
    alive_NM, kinds = [], []
    for cls in CLASSES:
        for _ in range(n_per_class):
            born, dies = 0, M          # alive on revisions [born, dies)
            if cls in ("emerging", "transient"):
                born = int(rng.integers(2, M - 3 if cls == "transient" else M - 1))
            if cls in ("discontinued", "transient"):
                dies = int(rng.integers(max(born + 2, 2), M - 1))
            row = np.zeros(M)
            row[born:dies] = 1
            alive_NM.append(row)
            kinds.append(cls)
    return _plant(np.array(alive_NM), kinds, d, drift, wobble, noise, 4 / len(kinds) if p_on is None else p_on, rng,
                  kinds=kinds)


# The recovery setup's five birth/death groups over M = 3 revisions: on which revisions a feature is alive.
GROUPS = {"all three": (1, 1, 1), "first only": (1, 0, 0), "first two": (1, 1, 0), "last two": (0, 1, 1),
          "last only": (0, 0, 1)}


def planted_groups(groups=None, n_per_group=24, d=32, on=6, drift=0.2, wobble=0.3, noise=0.05, seed=0) -> Planted:
    """Features planted in fixed birth/death groups (`groups`: name → alive pattern over the revisions,
    default GROUPS: M = 3, five groups), `n_per_group` each, ~`on` features on per token; directions, size
    drift and noise as planted_timelines draws them."""
    groups = GROUPS if groups is None else groups
    alive_NM = np.array([pattern for pattern in groups.values() for _ in range(n_per_group)], dtype=float)
    names = [name for name in groups for _ in range(n_per_group)]
    return _plant(alive_NM, names, d, drift, wobble, noise, on / len(alive_NM), np.random.default_rng(seed))


def _plant(alive_NM, groups, d, drift, wobble, noise, p_on, rng, kinds=None) -> Planted:
    """Sizes, directions and the truth for features alive where alive_NM is 1 (module docstring); `kinds`: the
    class each was drawn as (None: the one the truth reads off its pattern)."""
    N, M = alive_NM.shape
    size_NM = np.exp(np.cumsum(rng.normal(0, drift, (N, M)), 1))     # a random walk of the feature's size
    size_NM /= size_NM.max(1, keepdims=True)
    size_NM = alive_NM * (0.6 + 0.4 * size_NM)                       # alive: between 0.6 and 1 of its largest
    u_Nd = rng.standard_normal((N, d))
    dirs_NMd = u_Nd[:, None] + wobble * rng.standard_normal((N, M, d))
    dirs_NMd /= np.linalg.norm(dirs_NMd, axis=-1, keepdims=True)
    D_NMd = torch.tensor(dirs_NMd * size_NM[..., None], dtype=torch.float32)
    tl = measures.timeline(size_NM, [f"r{m}" for m in range(M)])
    idx = {f"r{m}": m for m in range(M)} | {"": -1}
    classes = tl.timeline_class.tolist()
    return Planted(D_NMd, tl.formed_at.map(idx).to_numpy(), tl.faded_at.map(idx).to_numpy(), classes,
                   list(classes if kinds is None else kinds), noise, p_on, list(groups))


def sample(planted: Planted, B, g) -> torch.Tensor:
    """B tokens [B, M, d]: each feature on with chance p_on (~4 on per token in planted_timelines, ~6 in
    planted_groups), its coefficient in [0.5, 1.5], plus noise."""
    N = planted.D_NMd.shape[0]
    on = torch.rand(B, N, generator=g) < planted.p_on
    c_BN = on * (0.5 + torch.rand(B, N, generator=g))
    x_BMd = torch.einsum("bn,nmd->bmd", c_BN, planted.D_NMd)
    return x_BMd + planted.noise * torch.randn(x_BMd.shape, generator=g)


def train(planted: Planted, arch, steps=1500, batch=512, dict_size=128, lr=3e-3, seed=0, **kw):
    """A crosscoder trained on the planted activations through the public API (CrossCoderConfig with its
    defaults apart from the sizes, steps and `kw`; train_step), on s_m·x_m as the pipeline normalises
    (s_m = √d / mean‖x_m‖). Returns it with the scales folded in, as train.py saves a run."""
    from crosscoding.crosscoder import CrossCoder, CrossCoderConfig
    g = torch.Generator().manual_seed(seed)
    M, d = planted.D_NMd.shape[1:]
    s_M = d ** 0.5 / sample(planted, 4096, g).norm(dim=-1).mean(0)
    cfg = CrossCoderConfig(n_models=M, d_model=d, dict_size=dict_size, arch=arch, total_steps=steps,
                           batch_size=batch, seed=seed, **kw)
    cc = CrossCoder(cfg)
    opt = cc.make_optimizer(lr)
    sched = cc.make_scheduler(opt)
    for step in range(steps):
        cc.train_step(opt, sched, sample(planted, batch, g) * s_M[:, None], step, metrics=False)
    return cc.fold_scales(s_M).eval().requires_grad_(False)


def cosines(planted: Planted, cc) -> np.ndarray:
    """[N, F]: the cosine of each planted feature's decoder with each latent's, both concatenated over the
    revisions, in the normalised space the crosscoder was trained in (its folded scales restored)."""
    with torch.no_grad():
        s_M = cc.scales_M
        truth = torch.nn.functional.normalize((planted.D_NMd * s_M[None, :, None]).flatten(1), dim=1)
        learned = torch.nn.functional.normalize(cc.decoder().flatten(1), dim=1)
        return (truth @ learned.T).numpy()


RECOVERED_AT = 0.9     # a planted feature is recovered when a latent's decoder has at least this cosine with it


def score(planted: Planted, cc) -> dict:
    """The learned timelines against the truth (module docstring); also per feature, for reading."""
    C_NF = cosines(planted, cc)
    match_N = C_NF.argmax(1)
    cos_N = C_NF[np.arange(len(C_NF)), match_N]
    with torch.no_grad():
        norms_NM = cc.decoder_norms()[torch.as_tensor(match_N)].numpy()
    tl = measures.timeline(measures.rel(norms_NM), planted.revisions)
    idx = {r: m for m, r in enumerate(planted.revisions)} | {"": -1}
    formed, faded = tl.formed_at.map(idx).to_numpy(), tl.faded_at.map(idx).to_numpy()
    both = (faded >= 0) & (planted.faded_N >= 0)
    return dict(
        n=len(formed), matched_cos_mean=float(cos_N.mean()), matched_cos_min=float(cos_N.min()),
        missed=int((cos_N < RECOVERED_AT).sum()),
        formed_exact=float((formed == planted.formed_N).mean()),
        formed_mae=float(np.abs(formed - planted.formed_N).mean()),
        faded_exact=float((faded == planted.faded_N).mean()),
        faded_mae=float(np.abs(faded[both] - planted.faded_N[both]).mean()) if both.any() else float("nan"),
        class_accuracy=float((tl.timeline_class.to_numpy() == np.array(planted.classes)).mean()),
        per_class={c: float((tl.timeline_class.to_numpy()[np.array(planted.classes) == c] == c).mean())
                   for c in CLASSES},
        features=dict(formed=formed.tolist(), faded=faded.tolist(), classes=tl.timeline_class.tolist(),
                      cos=cos_N.tolist()))


def recovery(planted: Planted, cc, at=RECOVERED_AT) -> dict:
    """The fraction of planted features recovered (cosine ≥ `at`), over all and per planted group: `best`
    matches each feature to its best latent (two features may share one), `one_to_one` to distinct latents
    (the assignment of largest total cosine; a feature left without a latent, when F < N, is not recovered)."""
    from scipy.optimize import linear_sum_assignment
    C_NF = cosines(planted, cc)
    best_N = C_NF.max(1)
    rows, cols = linear_sum_assignment(C_NF, maximize=True)
    one_N = np.full(len(C_NF), -1.0)
    one_N[rows] = C_NF[rows, cols]
    groups = np.array(planted.groups)
    out = {"n": len(C_NF)}
    for name, cos_N in (("best", best_N), ("one_to_one", one_N)):
        out[name] = float((cos_N >= at).mean())
        out[name + "_groups"] = {g: float((cos_N[groups == g] >= at).mean()) for g in dict.fromkeys(planted.groups)}
    return out


# Sizes for d = 32 (the paper's λ = 2 goes with d = 2048; k with ~4 features on per token), given to every
# variant; each uses the ones its sparsity reads, the rest are its CrossCoderConfig defaults.
SIZE_KW = dict(l1_coeff=0.5, k=4, aux_k=32, dead_tokens=10_000)


def inference_l0(planted: Planted, cc, seed=0) -> float:
    """Mean number of latents on per token under the crosscoder's inference rule, on a fresh draw."""
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        return float((cc.encode(sample(planted, 4096, g)) > 0).sum(1).float().mean())


def sized_by_l0(planted: Planted, arch, steps, seed, size_kw=SIZE_KW):
    """A variant's penalty sized to the data as k is for BatchTopK: the setting it names (sized_by_l0; JumpReLU's
    coefficient, per unit of L0 in units of E‖x‖², has no width rule that carries over from the toy it was
    chosen on: at its default this data trains to L0 ≈ 47, twelve times the ~4 features on per token) is read
    off the data: its default × 4^j, j = 0, 1, …, trained in turn until the inference L0 falls to the target
    (size_kw's k); of the last two, the one whose L0 is nearer the target in ratio. Chosen by L0 on fresh
    draws, never by the score. Returns the crosscoder and the value chosen."""
    knob = VARIANTS[arch].sized_by_l0
    coeff, tried, target_l0 = getattr(VARIANTS[arch].Settings, knob), [], size_kw["k"]
    for _ in range(8):
        cc = train(planted, arch, steps=steps, seed=seed, **size_kw | {knob: coeff})
        l0 = inference_l0(planted, cc, seed)
        tried.append((abs(np.log(l0 / target_l0)), coeff, cc))
        if l0 <= target_l0:
            break
        coeff *= 4
    _, coeff, cc = min(tried[-2:], key=lambda t: t[0])
    return cc, coeff


def trained(planted: Planted, arch, steps, seed, size_kw=SIZE_KW, **kw):
    """A crosscoder of variant `arch` trained on `planted` with its sparsity sized to the data (size_kw; the
    setting its variant names sized_by_l0, JumpReLU's coefficient, by L0), on one thread; `kw`: config fields
    over size_kw's. Returns it and what was chosen for it."""
    kw = size_kw | kw
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        knob = VARIANTS[arch].sized_by_l0
        if knob:
            cc, coeff = sized_by_l0(planted, arch, steps, seed, kw)
            return cc, {knob: coeff}
        return train(planted, arch, steps=steps, seed=seed, **kw), {}
    finally:
        torch.set_num_threads(threads)


def run_arch(arch, steps=1500, seed=0) -> dict:
    planted = planted_timelines(seed=seed)
    t0 = time.time()
    cc, extra = trained(planted, arch, steps, seed)
    out = score(planted, cc) | extra
    out["l0"] = inference_l0(planted, cc, seed)
    out["seconds"] = time.time() - t0
    return out


# The recovery setup (`--recovery`): M = 3 revisions, 24 features in each of the five GROUPS (120), ~6 on per
# token, F = 512 latents, k = 8 (L1's λ as above; JumpReLU sized to L0 8 as above).
RECOVERY_KW = SIZE_KW | dict(k=8)
RECOVERY_F = 512


def run_recovery(arch, steps=1500, seed=0, **kw) -> dict:
    """One variant's recovery of the planted groups (planted_groups, seed `seed`: the draw and the init);
    `kw`: config fields that change the variant (e.g. matryoshka_groups)."""
    planted = planted_groups(seed=seed)
    t0 = time.time()
    cc, extra = trained(planted, arch, steps, seed, RECOVERY_KW, dict_size=RECOVERY_F, **kw)
    out = recovery(planted, cc) | extra
    out["l0"] = inference_l0(planted, cc, seed)
    out["seconds"] = time.time() - t0
    return out


def _spread(rs, key, fmt=".2f") -> str:
    """mean [min, max] over seeds (the value alone for one seed), over the seeds where it is defined."""
    v = np.array([r[key] for r in rs], dtype=float)
    v = v[~np.isnan(v)]           # faded_at's MAE is undefined for a seed where no feature fades in both
    if not len(v):
        return "—"
    return f"{v.mean():{fmt}}" if len(v) == 1 else f"{v.mean():{fmt}} [{v.min():{fmt}}, {v.max():{fmt}}]"


def _sized(arch, rs) -> str:
    """What sized_by_l0 chose for each seed, for a row's label ("" for a variant sized by its settings alone)."""
    knob = VARIANTS[arch].sized_by_l0
    return " (coefficient " + ", ".join(f"{r[knob]:.3g}" for r in rs) + ", sized to L0)" if knob else ""


def _row(label, rs) -> str:
    cos_min = min(r["matched_cos_min"] for r in rs)
    return (f"| {label} | {_spread(rs, 'class_accuracy')} | {_spread(rs, 'formed_exact')} | "
            f"{_spread(rs, 'formed_mae')} | {_spread(rs, 'faded_exact')} | {_spread(rs, 'faded_mae')} | "
            f"{_spread(rs, 'matched_cos_mean')} "
            f"(min {cos_min:.2f}) | {_spread(rs, 'missed', '.1f')} | "
            + (_spread(rs, "l0", ".1f") if "l0" in rs[0] else "—") + " |")


def _recovery_row(label, rs) -> str:
    groups = list(rs[0]["best_groups"])
    flat = [{"best": r["best"], "one_to_one": r["one_to_one"], "l0": r["l0"]}
            | {g: r["best_groups"][g] for g in groups} for r in rs]
    return (f"| {label} | {_spread(flat, 'best')} | " + " | ".join(_spread(flat, g) for g in groups)
            + f" | {_spread(flat, 'one_to_one')} | {_spread(flat, 'l0', '.1f')} |")


# Matryoshka, one change at a time (`--matryoshka-causes`): (label, variant, config fields changed). Under the
# default mean over prefixes, the paper's sum is the same loss × G (G = 5 prefixes) with auxk_alpha / G; the
# factor reaches only the gradient clipping.
MATRYOSHKA_CAUSES = [
    ("matryoshka: the paper's sum over prefixes (auxk_alpha 1/160)", "matryoshka", dict(auxk_alpha=1 / 160)),
    ("matryoshka: AuxK off (auxk_alpha 0)", "matryoshka", dict(auxk_alpha=0.0)),
    ("matryoshka: AuxK × 5 (auxk_alpha 5/32)", "matryoshka", dict(auxk_alpha=5 / 32)),
    ("matryoshka: one prefix (the whole dictionary: BatchTopK's loss)", "matryoshka",
     dict(matryoshka_groups=(1.0,))),
    ("matryoshka: prefixes 1/4, 1/4, 1/2 (the smallest: 128 latents ≥ 120 features)", "matryoshka",
     dict(matryoshka_groups=(0.25, 0.25, 0.5))),
    ("matryoshka: prefixes 1/16, 15/16 (only the smallest, 32 latents)", "matryoshka",
     dict(matryoshka_groups=(1 / 16, 15 / 16))),
    ("matryoshka: no k anneal (k_anneal_steps 0)", "matryoshka", dict(k_anneal_steps=0)),
    ("matryoshka: k = 6 (the features on per token)", "matryoshka", dict(k=6)),
    ("matryoshka: k = 16", "matryoshka", dict(k=16)),
    ("batchtopk: k = 16 (the control for k)", "batchtopk", dict(k=16)),
]


def recovery_main(args):
    """--recovery: every variant's recovery of the planted groups (FINDINGS.md `planted-recovery`)."""
    from crosscoding.crosscoder import ARCHS, CrossCoder, CrossCoderConfig
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    groups = list(GROUPS)
    print(f"{'run':<60} {'seed':>4} {'all':>5} " + " ".join(f"{g:>10}" for g in groups)
          + f" {'1-to-1':>6} {'L0':>5} {'s':>4}")
    runs = [(arch, arch, {}) for arch in ([args.arch] if args.arch else ARCHS)]
    if args.matryoshka_causes:
        runs += MATRYOSHKA_CAUSES
    rows = []
    for label, arch, kw in runs:
        rs = []
        for seed in seeds:
            r = run_recovery(arch, args.steps, seed, **kw)
            print(f"{label[:60]:<60} {seed:4d} {r['best']:5.2f} "
                  + " ".join(f"{r['best_groups'][g]:10.2f}" for g in groups)
                  + f" {r['one_to_one']:6.2f} {r['l0']:5.1f} {r['seconds']:4.0f}", flush=True)
            rs.append(r)
        rows.append(_recovery_row(label + _sized(arch, rs), rs))
    untrained = []
    for seed in seeds:
        planted = planted_groups(seed=seed)
        cc = CrossCoder(CrossCoderConfig(n_models=3, d_model=planted.D_NMd.shape[2], dict_size=RECOVERY_F, seed=seed))
        untrained.append(recovery(planted, cc) | {"l0": float("nan")})
    print(f"untrained crosscoder (the measure's negative control): recovered {_spread(untrained, 'best')}")
    if args.results:
        command = ("python -m crosscoding.planted --recovery" + (f" --arch {args.arch}" if args.arch else "")
                   + (" --matryoshka-causes" if args.matryoshka_causes else "")
                   + (f" --steps {args.steps}" if args.steps != 1500 else "")
                   + (f" --seeds {args.seeds}" if args.seeds != 3 else "")
                   + (f" --first-seed {args.first_seed}" if args.first_seed else ""))
        head = "| run | recovered | " + " | ".join(groups) + " | one-to-one | L0 |\n|" + "---|" * (len(groups) + 4)
        update_results("planted-recovery", (
            f"## Planted recovery per birth/death group (`{command}`)\n\n"
            f"120 independent planted features over 3 revisions, 24 in each of five groups by the revisions they "
            f"are alive on ({', '.join(f'{g} {GROUPS[g]}' for g in groups)}), ~6 on per token (coefficients in "
            f"[0.5, 1.5]; d = 32, direction wobble and size drift as in `planted`, noise), a crosscoder of "
            f"{RECOVERY_F} latents trained {args.steps} steps of 512 tokens through the public API: BatchTopK and "
            f"Matryoshka k = 8, L1 λ = 0.5, JumpReLU's coefficient sized to L0 8 as in `planted`, every other field "
            f"its CrossCoderConfig default. A planted feature is recovered when a latent's decoder (concatenated "
            f"over the revisions, normalised space) has cosine ≥ {RECOVERED_AT} with it: its best latent (per group "
            f"and over all), and one-to-one (distinct latents, the assignment of largest total cosine). L0: the "
            f"inference rule's on fresh draws. Mean [min, max] over seeds {seeds.start}–{seeds.stop - 1}, each a new "
            f"generator draw and crosscoder initialisation.\n\n" + head + "\n" + "\n".join(rows) + "\n"
            + _recovery_row("untrained (negative control)", untrained)),
            Path(__file__).resolve().parent.parent / "FINDINGS.md")


def main(argv=None):
    from crosscoding.crosscoder import ARCHS, CrossCoder, CrossCoderConfig
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=ARCHS, default=None, help="one variant (default: every one)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, default=3, help="generator and crosscoder seeds: each number is "
                   "reported as mean [min, max] over them (default: %(default)s)")
    p.add_argument("--first-seed", type=int, default=0, help="the seeds are first-seed, first-seed + 1, … "
                   "(default: %(default)s)")
    p.add_argument("--recovery", action="store_true", help="the recovery of planted birth/death groups (M = 3) "
                   "per variant instead of the timelines (FINDINGS.md section `planted-recovery`)")
    p.add_argument("--matryoshka-causes", action="store_true", help="with --recovery: also Matryoshka with one "
                   "config field changed at a time, and BatchTopK at the largest k tried (MATRYOSHKA_CAUSES)")
    p.add_argument("--results", action="store_true", help="write the table into FINDINGS.md (section `planted`, "
                   "or `planted-recovery`)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or args.first_seed < 0:
        p.error(f"--seeds and --steps must be ≥ 1 and --first-seed ≥ 0, got {args.seeds}, {args.steps} and "
                f"{args.first_seed}")
    if args.matryoshka_causes and not args.recovery:
        p.error("--matryoshka-causes goes with --recovery")
    if args.recovery:
        return recovery_main(args)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    print(f"{'arch':<12} {'seed':>4} {'class acc':>9} {'formed exact':>12} {'formed MAE':>10} {'faded exact':>11} "
          f"{'faded MAE':>9} {'cos min':>7} {'L0':>5} {'s':>5}")
    rows = []
    for arch in [args.arch] if args.arch else ARCHS:
        rs = []
        for seed in seeds:
            r = run_arch(arch, args.steps, seed)
            print(f"{arch:<12} {seed:4d} {r['class_accuracy']:9.2f} {r['formed_exact']:12.2f} {r['formed_mae']:10.2f} "
                  f"{r['faded_exact']:11.2f} {r['faded_mae']:9.2f} {r['matched_cos_min']:7.2f} {r['l0']:5.1f} "
                  f"{r['seconds']:5.0f}", flush=True)
            rs.append(r)
        rows.append(_row(arch + _sized(arch, rs), rs))
    untrained = [score(planted_timelines(seed=seed), CrossCoder(CrossCoderConfig(n_models=10, d_model=32,
                                                                                 dict_size=128, seed=seed)))
                 for seed in seeds]
    print("untrained crosscoder (the score's negative control): class accuracy "
          f"{_spread(untrained, 'class_accuracy')}, formed_at exact {_spread(untrained, 'formed_exact')}")
    if args.results:
        command = ("python -m crosscoding.planted" + (f" --arch {args.arch}" if args.arch else "")
                   + (f" --steps {args.steps}" if args.steps != 1500 else "")
                   + (f" --seeds {args.seeds}" if args.seeds != 3 else "")
                   + (f" --first-seed {args.first_seed}" if args.first_seed else ""))
        update_results("planted", (
            f"## Planted timelines (`{command}`)\n\n32 planted features over 10 revisions (8 each kept, emerging, "
            f"discontinued, transient; size drifting ±20% a revision, noise), a crosscoder of 128 latents trained "
            f"{args.steps} steps of 512 tokens through the public API, each planted feature matched to the latent "
            "of largest decoder cosine; formed_at / faded_at / the class read off its decoder-norm shares "
            "(measures.timeline) against the truth. MAE in revisions (faded_at: over features that fade in both). "
            "Sparsity sized to the ~4 features on per token: BatchTopK and Matryoshka k = 4, L1 λ = 0.5, JumpReLU's "
            "coefficient the default × 4^j until its L0 on fresh draws reaches 4 (chosen by L0, not by the score); "
            "L0 is the inference rule's on fresh draws; missed: planted features whose best latent has cosine < 0.9. "
            f"Each value is the mean [min, max] over {args.seeds} seeds, each a new generator draw (features, births, "
            "deaths, data) and a new crosscoder initialisation; the cosine's min is over every feature of every seed."
            "\n\n| arch | class accuracy | formed_at exact | formed_at MAE | faded_at exact | faded_at MAE | "
            f"matched cosine | missed | L0 |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
            + "\n" + _row("untrained (negative control)", untrained)),
            Path(__file__).resolve().parent.parent / "FINDINGS.md")


if __name__ == "__main__":
    main()
