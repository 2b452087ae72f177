"""checkpoint_sets.py — is a latent's timeline a property of the model or of the checkpoints chosen? Train the
run's crosscoder again (same arch, seed, size, tokens) over variants of its set of revisions — each inner one
dropped, each scanned neighbour added, the whole set shifted one scan step — match the run's top latents
one-to-one into each, and report per variant whether each keeps its decoder-norm timeline class and formed_at,
beside random active latents of matched frequency (the null).

    python checkpoint_sets.py                                   # the toy's default run (~3½ minutes on 2 cores)
    python checkpoint_sets.py --run runs/<name> --results       # ... and its RESULTS.md section

The variants are RUN/stability/checkpoint-sets/<variant>/ (their caches are links into the run's, each new
revision cached once); a finished variant is kept, so a killed command resumes. Writes
RUN/stability/checkpoint_sets.json and prints the tables.
"""
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from crosscoding import cli, defaults, lm, measures
from crosscoding.analysis import METHODS
from crosscoding.common import UsageError, is_done, read_json, require_done, run_main, update_results, write_json
from crosscoding.crosscoder import CrossCoder
from crosscoding.findings import span
from crosscoding.matching import MATCH_COS, NULL_DRAWS, active_latents, null_interval, pairing, unit_decoders
from crosscoding.stages import ROOT, cache_view, extra_cache, stage, stale, took, train_args


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


def survival(base, chosen, variants, draws=NULL_DRAWS, seed=0) -> dict:
    """For each variant (name, folder, revisions): the base's chosen latents matched one-to-one (pairing, over
    all active latents, on decoder cosine over the revisions both hold, or position by position for a set of
    the run's length: a shift), and whether each keeps its decoder-norm timeline class and formed_at over those
    revisions; beside it the same for random active latents of matched frequency (the null), draws times."""
    revs = CrossCoder.load(base).extra["revisions"]
    act, freq = active_latents(base)
    rng = np.random.default_rng(seed)
    nulls = [measures.matched_random(np.where(freq > 0, freq, -1.0), chosen, rng, set(chosen)) for _ in range(draws)]
    latents = [dict(latent=int(i)) for i in chosen]
    tl_full = measures.timeline(CrossCoder.load(base).decoder_norms().detach().numpy()[chosen], revs)
    for row, cls, formed in zip(latents, tl_full.timeline_class, tl_full.formed_at):
        row.update(timeline_class=cls, formed_at=formed, variants={})
    out, all_top, all_null = [], np.ones(len(chosen), bool), np.ones((draws, len(chosen)), bool)
    for name, folder, vrevs in variants:
        # the revisions compared: those both hold; a set of the run's length (a shift) position by position,
        # its i-th revision standing in for the run's i-th (a shift may share none). Labelled by the run's.
        shift = len(vrevs) == len(revs)
        shared = list(revs) if shift else [r for r in revs if r in vrevs]
        dec_a, norm_a = unit_decoders(base, shared)
        dec_v, norm_v = unit_decoders(folder, list(vrevs) if shift else shared)
        pair = pairing(dec_a, act, dec_v, active_latents(folder)[0])

        def check(lat, pair=pair, norm_a=norm_a, norm_v=norm_v, shared=shared):
            j = np.array([pair.get(int(i), (-1, -1.0))[0] for i in lat])
            cos = np.array([pair.get(int(i), (-1, -1.0))[1] for i in lat])
            a, v = measures.timeline(norm_a[lat], shared), measures.timeline(norm_v[np.maximum(j, 0)], shared)
            matched = cos >= MATCH_COS
            keeps = matched & (a.timeline_class.to_numpy() == v.timeline_class.to_numpy()) & (
                a.formed_at.to_numpy() == v.formed_at.to_numpy())
            return j, cos, a, v, matched, keeps
        j, cos, a, v, matched, keeps = check(chosen)
        null = [check(lat) for lat in nulls]
        all_top &= keeps
        all_null &= np.stack([n[5] for n in null])
        for k, row in enumerate(latents):
            row["variants"][name] = dict(partner=int(j[k]), cos=float(cos[k]), class_shared=a.timeline_class[k],
                                         class_variant=v.timeline_class[k], formed_shared=a.formed_at[k],
                                         formed_variant=v.formed_at[k], survives=bool(keeps[k]))
        out.append(dict(name=name, revisions=list(vrevs), shared=shared, folder=str(folder),
                        matched=float(matched.mean()), survives=float(keeps.mean()),
                        matched_null=[float(n[4].mean()) for n in null],
                        survives_null=[float(n[5].mean()) for n in null]))
    null_all = all_null.mean(1)
    lo, hi = null_interval(null_all)
    return dict(variants=out, latents=latents, survive_all=float(all_top.mean()),
                survive_all_null=dict(mean=float(null_all.mean()), lo=lo, hi=hi),
                match_cos=MATCH_COS)


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
    res = survival(base, chosen, trained)
    res.update(attribution=name, scan=str(scan), seconds=time.time() - t0)
    return res


def _why(v) -> str:
    """A latent's fate in one variant: yes, or why not (unmatched, its class, its formed_at there)."""
    if v["survives"]:
        return "yes"
    if v["cos"] < MATCH_COS:
        return f"unmatched {v['cos']:.2f}"
    return (f"→{v['class_variant']}" if v["class_variant"] != v["class_shared"]
            else f"formed {v['formed_variant']}")


def checkpoint_sets_table(rs) -> str:
    lines = [f"{'variant':<16} {'revisions':<38} {'matched':>8} {'null':>14} {'survive':>8} {'null':>14}"]
    for v in rs["variants"]:
        lines.append(f"{v['name']:<16} {','.join(v['revisions']):<38} {v['matched']:8.2f} "
                     f"{span(v['matched_null']):>14} {v['survives']:8.2f} {span(v['survives_null']):>14}")
    names = [v["name"] for v in rs["variants"]]
    lines.append(f"\n{'latent':>6} {'class':<13} {'formed':<9} " + " ".join(f"{n[:15]:>15}" for n in names))
    for row in rs["latents"]:
        lines.append(f"{row['latent']:>6} {row['timeline_class']:<13} {row['formed_at']:<9} "
                     + " ".join(f"{_why(row['variants'][n])[:15]:>15}" for n in names))
    n = rs["survive_all_null"]
    lines.append(f"top latents that keep their class and formed_at in every variant: {rs['survive_all']:.2f}; random "
                 f"active latents of matched frequency: {n['mean']:.2f} [{n['lo']:.2f}, {n['hi']:.2f}] "
                 f"({rs['seconds']:.0f} s)")
    return "\n".join(lines)


def checkpoint_sets_markdown(rs, command, seconds=None) -> str:
    rows = "\n".join(f"| {v['name']} | {', '.join(v['revisions'])} | {v['matched']:.2f} | {span(v['matched_null'])} | "
                     f"{v['survives']:.2f} | {span(v['survives_null'])} |" for v in rs["variants"])
    names = [v["name"] for v in rs["variants"]]
    lat = "\n".join(f"| {r['latent']} | {r['timeline_class']} | {r['formed_at']} | "
                    + " | ".join(_why(r["variants"][n]) for n in names) + " |" for r in rs["latents"])
    n = rs["survive_all_null"]
    return (f"## Robust to the checkpoints chosen (`{command}`)\n\nThe run's crosscoder trained again (same arch, "
            f"seed, size, data) over each variant of its revisions: each inner one dropped, each scanned neighbour "
            f"added, the whole set shifted one scan step. The top latents of `{rs['attribution']}` are matched "
            f"one-to-one (Hungarian over all active latents, decoder cosine ≥ {rs['match_cos']} over the revisions "
            f"both hold; a shifted set position by position, its i-th revision for the run's i-th); a latent "
            f"survives a variant when it is matched and keeps its decoder-norm timeline class "
            f"and formed_at over those shared revisions. Null: random active latents of matched frequency "
            f"({NULL_DRAWS} draws: [2.5%, 97.5%])." + took(seconds) + "\n\n| variant | revisions | top matched | "
            f"null | top survive | null |\n|---|---|---|---|---|---|\n{rows}\n\n"
            f"Top latents that survive every variant: **{rs['survive_all']:.2f}**; random active latents: "
            f"{n['mean']:.2f} [{n['lo']:.2f}, {n['hi']:.2f}].\n\n| latent | class | formed_at | "
            + " | ".join(names) + " |\n|" + "---|" * (3 + len(names)) + f"\n{lat}")


def parse_args(argv=None):
    run_dir, spec = cli.run_in(argv)
    p = cli.parser(__doc__.split("\n\n")[0], spec.preset)
    cli.add(p, "--run", "--task", "--select", run=str(run_dir), task=spec.task, select=defaults.SELECT)
    p.add_argument("--method", choices=list(METHODS), default=defaults.METHOD,
                   help="the attribution whose top latents are followed: relie/<task>-<method>-<select> (seeds.py's "
                        "name), else relie/<task> (default: %(default)s)")
    p.add_argument("--results", action="store_true", help="write the tables into RESULTS.md")
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
                       checkpoint_sets_markdown(res, command, time.time() - t0), ROOT / "RESULTS.md")
    print(f"wrote {base / 'stability' / 'checkpoint_sets.json'}")


if __name__ == "__main__":
    run_main(main)
