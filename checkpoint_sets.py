"""checkpoint_sets.py — is a latent's timeline a property of the model or of the checkpoints chosen? Train the
run's crosscoder again (same arch, seed, size, tokens) over variants of its set of revisions — each inner one
dropped, each scanned neighbour added, the whole set shifted one scan step — match the run's top latents
one-to-one into each, and grade each top latent by the fraction of variants in which it is kept (matched, its
decoder-norm timeline class and its formation interval unchanged), beside random active latents of the same
timeline class and matched frequency (the null), with a verdict.

    python checkpoint_sets.py                                   # the toy's default run (~3½ minutes on 2 cores)
    python checkpoint_sets.py --run runs/<name> --results       # ... and its FINDINGS.md section

The variants are RUN/stability/checkpoint-sets/<variant>/ (their caches are links into the run's, each new
revision cached once); a finished variant is kept, so a killed command resumes. Writes
RUN/stability/checkpoint_sets.json and prints the tables.
"""
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from crosscoding import cli, defaults, lm, measures, verdicts
from crosscoding.analysis import METHODS
from crosscoding.common import UsageError, is_done, read_json, require_done, run_main, update_results, write_json
from crosscoding.crosscoder import CrossCoder
from crosscoding.matching import (
    MATCH_COS,
    MATCH_COS_GRID,
    NULL_DRAWS,
    active_latents,
    null_interval,
    pairing,
    random_within,
    unit_decoders,
)
from crosscoding.stages import ROOT, cache_view, extra_cache, stage, stale, took, train_args

RULE = ("the top latents' graded survival (its 95% interval: bootstrap over the latents) against random active "
        f"latents of the same timeline class and matched frequency ({NULL_DRAWS} draws): {verdicts.VERSUS_NULL_RULE}")


def revision_variants(revisions, scanned) -> list[tuple[str, list]]:
    """(name, revisions) of each variant: each inner revision dropped; each scanned neighbour of a revision
    (the scanned revision just before or after it) added; the whole set shifted one scan step earlier and
    later, where the scan has room."""
    missing = [r for r in revisions if r not in scanned]
    if missing:
        raise UsageError(f"revisions {missing} are not in the scan; scan them with cache_acts.py "
                         "--scan")
    idx = [scanned.index(r) for r in revisions]
    out = [(f"drop-{r}", [x for x in revisions if x != r]) for r in revisions[1:-1]]
    near = sorted({j for i in idx for j in (i - 1, i + 1) if 0 <= j < len(scanned) and scanned[j] not in revisions})
    out += [(f"add-{scanned[j]}", [scanned[i] for i in sorted(idx + [j])]) for j in near]
    for step, tag in ((-1, "earlier"), (1, "later")):
        if all(0 <= i + step < len(scanned) for i in idx):
            out.append((f"shift-{tag}", [scanned[i + step] for i in idx]))
    return out


def revision_times(names, scanned=None) -> tuple[dict, str]:
    """Each revision's place in training, so that formation intervals compare across sets of revisions, and its
    unit: the tokens its name gives when every name gives them, else its step, else its position in the scan
    (training order)."""
    names = list(dict.fromkeys(names))
    parsed = [lm.parse_revision(n) for n in names]
    if all(p.tokens is not None for p in parsed):
        return {p.name: float(p.tokens) for p in parsed}, "tokens"
    if all(p.step is not None for p in parsed):
        return {p.name: float(p.step) for p in parsed}, "training steps"
    if scanned is not None and all(n in scanned for n in names):
        return {n: float(scanned.index(n)) for n in names}, "positions in the scan"
    raise UsageError(f"revisions {names} give no step or tokens in their names and are not all in the scan: their "
                     "order in training is unknown")


def variant_outcomes(base, revs, act, run_tl, run_formed, folder, vrevs, times, grid=MATCH_COS_GRID) -> dict:
    """Every latent of the run in one variant (name, folder, revisions): its one-to-one partner there (pairing over
    all active latents, on decoder cosine over the revisions both hold; a shift — a set of the run's length that is
    not the run's — position by position, its i-th revision standing in for the run's i-th), whether the partner
    keeps its decoder-norm timeline class over those revisions, whether its formation interval (over the variant's
    own revisions, in training time) overlaps the run's, and kept = matched (cosine ≥ c, per c of grid) and both.
    NaN (cannot tell) where the variant drops the revision the latent forms at in the run: no variant without it
    could keep it. A shift replaces every revision and is read by its intervals, never 'cannot tell'."""
    shift = len(vrevs) == len(revs) and list(vrevs) != list(revs)
    shared = list(revs) if shift else [r for r in revs if r in vrevs]
    dec_a, norm_a = unit_decoders(base, shared)
    dec_v, norm_v = unit_decoders(folder, list(vrevs) if shift else shared)
    j, cos = np.full(len(norm_a), -1), np.full(len(norm_a), -1.0)
    for i, (partner, c) in pairing(dec_a, act, dec_v, active_latents(folder)[0]).items():
        j[i], cos[i] = partner, c
    jj = np.maximum(j, 0)                                     # an unmatched latent's partner is never read as kept
    a, v = measures.timeline(norm_a, shared), measures.timeline(norm_v[jj], shared)
    full = measures.timeline(unit_decoders(folder)[1][jj], list(vrevs))
    formed = measures.formation_intervals(full.formed_at, list(vrevs), [times[r] for r in vrevs])
    formed_ok = measures.intervals_overlap(*run_formed, *formed)
    class_ok = a.timeline_class.to_numpy() == v.timeline_class.to_numpy()
    cannot = np.zeros(len(j), bool) if shift else ~run_tl.formed_at.isin(list(vrevs)).to_numpy()
    kept = {c: np.where(cannot, np.nan, (cos >= c) & class_ok & formed_ok) for c in grid}
    return dict(shift=shift, shared=shared, partner=j, cos=cos, class_shared=a.timeline_class.to_numpy(),
                class_variant=v.timeline_class.to_numpy(), formed_variant=full.formed_at.to_numpy(),
                formed_lo=formed[0], formed_hi=formed[1], class_ok=class_ok, formed_ok=formed_ok, cannot=cannot,
                kept=kept)


def graded(kept_VN) -> np.ndarray:
    """Per latent, the fraction of the variants that can tell in which it is kept (NaN where none can)."""
    k = np.asarray(kept_VN, dtype=float).reshape(-1, np.shape(kept_VN)[-1])
    n = np.isfinite(k).sum(0)
    return np.where(n > 0, np.nansum(k, 0) / np.maximum(n, 1), np.nan)


def _mean(x) -> float:
    x = np.asarray(x, dtype=float)
    return float(x[np.isfinite(x)].mean()) if np.isfinite(x).any() else float("nan")


def against_null(top_N, null_dN) -> dict:
    """The top latents' mean of a per-latent value (latents it is NaN for left out), with a 95% bootstrap interval
    over those latents, beside the null: the same mean for each draw of random latents, its mean and central 95%."""
    t = np.asarray(top_N, dtype=float)
    t = t[np.isfinite(t)]
    mean, lo, hi = measures.mean_interval(t) if len(t) else (np.nan,) * 3
    null = [_mean(d) for d in null_dN]
    nlo, nhi = null_interval(null)
    return dict(top=float(mean), lo=float(lo), hi=float(hi), n=int(len(t)), null_mean=_mean(null), null_lo=nlo,
                null_hi=nhi, null=null)


def verdict(c) -> tuple[str, str]:
    """holds / fails / uninformative for one against_null comparison, and why (RULE)."""
    v, why = verdicts.versus_null(c["top"], c["lo"], c["hi"], c["n"], c["null_mean"], c["null_lo"], c["null_hi"])
    if v == verdicts.FAILS:
        why += ": the top latents' timelines survive no more often than random latents' of their class"
    return v, f"top latents: {why}"


def survival(base, chosen, variants, scanned=None, draws=NULL_DRAWS, seed=0, grid=MATCH_COS_GRID) -> dict:
    """The run's chosen latents in each variant (name, folder, revisions) (variant_outcomes), graded: per variant,
    the fraction of the top latents it can tell about that it keeps; per latent, the fraction of the variants
    that can tell (shifts apart) that keep it, averaged over the top latents; each with a 95% bootstrap interval
    over the latents, beside the same for random active latents of the same timeline class and matched frequency
    (the null, `draws` draws), per matching cosine of `grid`, and the verdict at MATCH_COS. Shifts are graded on
    their own. The conjunction (kept in every variant that can tell) stays as a row: over many variants it has
    no power. `scanned`: the scan's revisions in training order, for names that give no step."""
    grid = tuple(sorted({*grid, MATCH_COS}))     # the verdict's cosine is always among them
    revs = CrossCoder.load(base).extra["revisions"]
    times, unit = revision_times(list(revs) + [r for _, _, v in variants for r in v], scanned)
    act, freq = active_latents(base)
    run_tl = measures.timeline(unit_decoders(base)[1], revs)
    run_formed = measures.formation_intervals(run_tl.formed_at, revs, [times[r] for r in revs])
    chosen = [int(i) for i in chosen]
    nulls, pooled = random_within(freq, chosen, run_tl.timeline_class.to_numpy(), np.random.default_rng(seed), draws)
    outs = [(name, list(vrevs), folder, variant_outcomes(base, revs, act, run_tl, run_formed, folder, vrevs, times,
                                                          grid)) for name, folder, vrevs in variants]
    key = lambda c: f"{c:g}"                    # noqa: E731   JSON keys of the cosines

    per_variant = []
    for name, vrevs, folder, o in outs:
        tell = [i for i in chosen if not o["cannot"][i]]
        matched = o["cos"][tell] >= MATCH_COS
        per_variant.append(dict(
            name=name, revisions=vrevs, shared=o["shared"], folder=str(folder), shift=o["shift"], n=len(tell),
            class_kept=_mean(o["class_ok"][tell][matched]), formed_agrees=_mean(o["formed_ok"][tell][matched]),
            by_cos={key(c): dict(matched=_mean(np.where(o["cannot"][chosen], np.nan, o["cos"][chosen] >= c)),
                                 **against_null(o["kept"][c][chosen], [o["kept"][c][lat] for lat in nulls]))
                    for c in grid}))

    def grade(shift):
        sel = [o for *_, o in outs if o["shift"] == shift]
        if not sel:
            return None
        out = {}
        for c in grid:
            k = np.stack([o["kept"][c] for o in sel])
            g = graded(k)
            out[key(c)] = against_null(g[chosen], [g[lat] for lat in nulls])
            out[key(c)]["verdict"], out[key(c)]["why"] = verdict(out[key(c)])
            m = np.stack([np.where(o["cannot"], np.nan, o["cos"] >= c) for o in sel])
            out[key(c)]["matched"] = against_null(graded(m)[chosen], [graded(m)[lat] for lat in nulls])
        return dict(variants=[n for n, *_, o in outs if o["shift"] == shift], by_cos=out)

    every = graded(np.stack([o["kept"][MATCH_COS] for *_, o in outs]) if outs else np.full((1, len(run_tl)), np.nan))
    every = np.where(np.isfinite(every), every == 1, np.nan)          # kept in every variant that can tell
    latents = []
    for i in chosen:
        row = dict(latent=i, timeline_class=run_tl.timeline_class[i], formed_at=run_tl.formed_at[i],
                   formed=[float(run_formed[0][i]), float(run_formed[1][i])], variants={})
        for name, _, _, o in outs:
            row["variants"][name] = dict(
                partner=int(o["partner"][i]), cos=float(o["cos"][i]), class_shared=o["class_shared"][i],
                class_variant=o["class_variant"][i], formed_variant=o["formed_variant"][i],
                formed_variant_interval=[float(o["formed_lo"][i]), float(o["formed_hi"][i])],
                formed_agrees=bool(o["formed_ok"][i]), cannot_tell=bool(o["cannot"][i]),
                kept={key(c): None if o["cannot"][i] else bool(o["kept"][c][i]) for c in grid})
        latents.append(row)
    inner, shifts = grade(False), grade(True)
    head = inner["by_cos"][key(MATCH_COS)] if inner else dict(n=0)
    v, why = verdict(head) if inner else ("uninformative", "no variant but shifts")
    return dict(variants=per_variant, latents=latents, graded=inner, shifts=shifts,
                every=against_null(every[chosen], [every[lat] for lat in nulls]),
                verdict=dict(finding="the top latents' timelines are robust to the checkpoints chosen", verdict=v,
                             why=why, rule=RULE, cos=MATCH_COS),
                times=times, time_unit=unit, match_cos=MATCH_COS, grid=list(grid), draws=draws, null_pooled=pooled)


def checkpoint_sets(base, name, run_args, arch, cwd, eval_args=()) -> dict:
    """Train the run's crosscoder (its arch, seed, size, data) again over every variant of its
    revisions (revision_variants; the scan gives the neighbours), evaluate each, and match the run's top latents
    into each (survival). The variants are RUN/stability/checkpoint-sets/<variant>/."""
    t0 = time.time()
    task = read_json(base / "relie" / name / "summary.json")["task"]
    scan = Path(cwd) / defaults.scan_path(lm.resolve(run_args["model"]).key, run_args["layer"], task)
    if not scan.exists():
        raise UsageError(f"checkpoint_sets.py needs the scan of the run's model, {scan}: python cache_acts.py --scan "
                         f"--model {run_args['model']} --layer {run_args['layer']}")
    scanned = pd.read_csv(scan).revision.tolist()
    variants = revision_variants(run_args["revisions"], scanned)
    folder = base / "stability" / "checkpoint-sets"
    new = [r for r in scanned if r not in run_args["revisions"] and any(r in v for _, v in variants)]
    extra = extra_cache(run_args, new, folder)
    trained = []
    for vname, revs in variants:
        print(f"   revision set {vname}: {','.join(revs)}", file=sys.stderr, flush=True)
        out = folder / vname
        a = dict(run_args, revisions=revs, cache=cache_view(run_args, revs, extra, folder))
        if not is_done(out) or stale(read_json(out / "run_args.json", "run arguments"), a):
            stage(train_args(a, arch, run_args["seed"], out) + ["--overwrite"], cwd)
        ev = out / "latents.csv"
        if not ev.exists() or ev.stat().st_mtime < (out / "DONE").stat().st_mtime:
            stage(["evaluate.py", "--run", out, *eval_args], cwd)
        trained.append((vname, out, revs))
    chosen = read_json(base / "relie" / name / "summary.json")["chosen"]
    res = survival(base, chosen, trained, scanned)
    res.update(attribution=name, scan=str(scan), seconds=time.time() - t0)
    return res


def _why(v, c=MATCH_COS) -> str:
    """A latent's fate in one variant at cosine c: yes, cannot tell, or why not (unmatched, its class, its
    formed_at there)."""
    kept = v["kept"][f"{c:g}"]
    if kept is None:
        return "cannot tell"
    if kept:
        return "yes"
    if v["partner"] < 0:
        return "no partner"                   # the variant has fewer active latents than the run
    if v["cos"] < c:
        return f"unmatched {v['cos']:.2f}"
    return f"→{v['class_variant']}" if v["class_variant"] != v["class_shared"] else f"formed {v['formed_variant']}"


def _ci(c, top="top") -> str:
    return f"{c[top]:.2f} [{c['lo']:.2f}, {c['hi']:.2f}]" if np.isfinite(c[top]) else "—"


def _null(c) -> str:
    return f"{c['null_mean']:.2f} [{c['null_lo']:.2f}, {c['null_hi']:.2f}]" if np.isfinite(c["null_mean"]) else "—"


def _graded_rows(g) -> list[tuple]:
    """(cosine, top kept, null, verdict, top matched, null) per cosine of a graded block."""
    return [(c, _ci(x), _null(x), x["verdict"], _ci(x["matched"]), _null(x["matched"])) for c, x in g["by_cos"].items()]


def checkpoint_sets_table(rs) -> str:
    h = f"{rs['match_cos']:g}"
    lines = [f"per variant: n = top latents it can tell about (a variant without the revision a latent forms at "
             f"cannot); kept = matched one-to-one at decoder cosine ≥ c, class kept and formed_at consistent as an "
             f"interval; class / formed: of those matched at {h}; 95% intervals: bootstrap over the top latents, and "
             f"the null's (same timeline class, matched frequency) draws",
             f"{'variant':<14} {'revisions':<34} {'n':>3} {'matched':>7} {'class':>6} {'formed':>6}   "
             + "   ".join(f"kept @{c:<5} {'null':>18}" for c in rs["grid"])]
    for v in rs["variants"]:
        lines.append(f"{v['name']:<14} {','.join(v['revisions']):<34} {v['n']:>3} {v['by_cos'][h]['matched']:7.2f} "
                     f"{v['class_kept']:6.2f} {v['formed_agrees']:6.2f}   "
                     + "   ".join(f"{_ci(v['by_cos'][f'{c:g}']):>18} {_null(v['by_cos'][f'{c:g}']):>18}"
                                  for c in rs["grid"]))
    for title, g in (("drop / add variants", rs["graded"]), ("shifts, on their own", rs["shifts"])):
        if g is None:
            continue
        lines.append(f"\ngraded survival over the {title} ({', '.join(g['variants'])}): per top latent, the fraction "
                     "of the variants that can tell in which it is kept, averaged")
        lines.append(f"{'cosine':<7} {'top kept':>18} {'null':>18} {'verdict':<14} {'top matched':>18} {'null':>18}")
        for c, top, null, verd, mt, mn in _graded_rows(g):
            lines.append(f"{c:<7} {top:>18} {null:>18} {verd:<14} {mt:>18} {mn:>18}")
    e = rs["every"]
    lines.append(f"\nkept in every variant that can tell (a conjunction: no power over many variants): top "
                 f"{e['top']:.2f}, null {_null(e)}")
    if rs["null_pooled"]:
        lines.append(f"null drawn over all active latents for {rs['null_pooled']} (no other latent of their class)")
    names = [v["name"] for v in rs["variants"]]
    lines.append(f"\n{'latent':>6} {'class':<13} {'formed':<9} " + " ".join(f"{n[:15]:>15}" for n in names))
    for row in rs["latents"]:
        lines.append(f"{row['latent']:>6} {row['timeline_class']:<13} {row['formed_at']:<9} "
                     + " ".join(f"{_why(row['variants'][n], rs['match_cos'])[:15]:>15}" for n in names))
    vd = rs["verdict"]
    lines.append(f"\nverdict — {vd['finding']}: {vd['verdict'].upper()} at cosine {vd['cos']:g} ({vd['why']})\n"
                 f"rule: {vd['rule']}")
    if "seconds" in rs:
        lines.append(f"({rs['seconds']:.0f} s)")
    return "\n".join(lines)


def checkpoint_sets_markdown(rs, command, seconds=None) -> str:
    h = f"{rs['match_cos']:g}"
    grid = [f"{c:g}" for c in rs["grid"]]
    rows = "\n".join(f"| {v['name']} | {', '.join(v['revisions'])} | {v['n']} | {v['by_cos'][h]['matched']:.2f} | "
                     f"{v['class_kept']:.2f} | {v['formed_agrees']:.2f} | "
                     + " | ".join(f"{_ci(v['by_cos'][c])} | {_null(v['by_cos'][c])}" for c in grid) + " |"
                     for v in rs["variants"])
    graded_md = ""
    for title, g in (("drop / add variants", rs["graded"]), ("shifts, on their own", rs["shifts"])):
        if g is not None:
            graded_md += (f"\n\nGraded survival over the {title} ({', '.join(g['variants'])}):\n\n| cosine | top "
                          "latents kept | null | verdict | top matched | null |\n|---|---|---|---|---|---|\n"
                          + "\n".join(f"| {c} | {t} | {n} | {v} | {mt} | {mn} |"
                                      for c, t, n, v, mt, mn in _graded_rows(g)))
    names = [v["name"] for v in rs["variants"]]
    lat = "\n".join(f"| {r['latent']} | {r['timeline_class']} | {r['formed_at']} | "
                    + " | ".join(_why(r["variants"][n], rs["match_cos"]) for n in names) + " |" for r in rs["latents"])
    e, vd = rs["every"], rs["verdict"]
    pooled = (f" For {len(rs['null_pooled'])} top latents no other active latent shares the class; their null is "
              "drawn over all active latents." if rs["null_pooled"] else "")
    return (f"## Robust to the checkpoints chosen (`{command}`)\n\n**Verdict — {vd['finding']}: {vd['verdict']}** at "
            f"cosine {vd['cos']:g}: {vd['why']}. Rule: {vd['rule']}.\n\nThe run's crosscoder trained again (same "
            f"arch, seed, size, data) over each variant of its revisions: each inner one dropped, each scanned "
            f"neighbour added, the whole set shifted one scan step. The top latents of `{rs['attribution']}` are "
            f"matched one-to-one (Hungarian over all active latents on decoder cosine over the revisions both hold; a "
            f"shifted set position by position, its i-th revision for the run's i-th). A latent is kept in a variant "
            f"when it is matched at cosine ≥ c, keeps its decoder-norm timeline class over those revisions, and its "
            f"formation — the interval (revision before formed_at, formed_at] in {rs['time_unit']} — overlaps the "
            f"variant's (so (64, 128] and (96, 256] agree). A variant that drops the revision a latent forms at "
            f"cannot tell (left out of that latent's denominator). Intervals: 95% bootstrap over the top latents; the "
            f"null is random active latents of the same timeline class and matched frequency ({rs['draws']} draws: "
            f"[2.5%, 97.5%]).{pooled}" + took(seconds) + "\n\n| variant | revisions | n | matched | class kept | "
            "formed agrees | " + " | ".join(f"kept @{c} | null" for c in grid) + " |\n|"
            + "---|" * (6 + 2 * len(grid)) + f"\n{rows}{graded_md}\n\nKept in every variant that can tell (a "
            f"conjunction, without power over many variants): {e['top']:.2f}; null {_null(e)}.\n\n"
            f"Per latent at cosine {h}:\n\n| latent | class | formed_at | " + " | ".join(names) + " |\n|"
            + "---|" * (3 + len(names)) + f"\n{lat}")


def parse_args(argv=None):
    run_dir, spec = cli.run_in(argv)
    p = cli.parser(__doc__.split("\n\n")[0], spec.preset)
    cli.add(p, "--run", "--task", "--select", run=str(run_dir), task=spec.task, select=defaults.SELECT)
    p.add_argument("--method", choices=list(METHODS), default=defaults.METHOD,
                   help="the attribution whose top latents are followed: relie/<task>-<method>-<select> (seeds.py's "
                        "name), else relie/<task> (default: %(default)s)")
    p.add_argument("--results", action="store_true", help="write the tables into FINDINGS.md")
    return p.parse_args(argv)


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    base = Path(args.run)
    require_done(base, "training run", "train it with train.py first")
    run_args = read_json(base / "run_args.json", "run arguments")
    stem = Path(args.task).stem
    name = next((n for n in (f"{stem}-{args.method}-{args.select}", stem) if is_done(base / "relie" / n)), None)
    if name is None:
        raise UsageError(f"{base} has no finished attribution of {args.task}: run python relie.py --run {base} first")
    res = checkpoint_sets(base, name, run_args, run_args["arch"], Path.cwd())
    write_json(base / "stability" / "checkpoint_sets.json", res)
    print("robust to the checkpoints chosen (top latents matched into each variant, null beside):\n"
          + checkpoint_sets_table(res))
    if args.results:
        command = " ".join(["python checkpoint_sets.py"] + [a for a in (argv or sys.argv[1:]) if a != "--results"])
        update_results(f"checkpoint-sets-{run_args['arch']}",
                       checkpoint_sets_markdown(res, command, time.time() - t0), ROOT / "FINDINGS.md")
    print(f"wrote {base / 'stability' / 'checkpoint_sets.json'}")


if __name__ == "__main__":
    run_main(main)
