"""seeds.py — how much of a run's findings is the crosscoder's seed (and the LM's): train N crosscoders that
differ only in their seed on the same data, run evaluate, relie and ablate on each, and report every finding
per seed with its mean, min and max, and how many top latents recur across the seeds.

    python seeds.py                                  # the toy's default run, 5 seeds (~3½ minutes)
    python seeds.py --run runs/<name> --seeds 3 --method atp
    python seeds.py --lm-seeds 5                     # ... and toy LMs pretrained with seeds 1 … 4
    python seeds.py --split-seeds 3                  # ... and the run's pairs split 3 ways
    python seeds.py --compare ig,ig-error-held,ig-mean,atp --results   # the attribution methods side by side

Each seed's run is RUN/stability/<arch>-seed<s>/ (the run itself for its own seed and arch), made by the stages
as subprocesses with the run's own arguments (crosscoding/stages.py); a finished stage is kept, so a killed
command resumes. Writes RUN/stability/seeds.json (seeds-<arch>.json for an --arch other than the run's) —
`seeds`, `findings.<name>.per_seed / mean / min / max` (ablation_gap_last: top-k minus random-k accuracy drop at
the last revision, in points), `matched_top_k_fraction` — and, with --compare, `methods.<method>.findings`;
prints the table; --results writes it into RESULTS.md.
"""
import sys
from pathlib import Path

import pandas as pd

from crosscoding import cli, defaults
from crosscoding.analysis import METHODS
from crosscoding.common import (
    UsageError,
    is_done,
    positive,
    read_json,
    require_done,
    run_main,
    update_results,
    write_json,
)
from crosscoding.findings import findings_of, fmt, num, summarise, table
from crosscoding.matching import MATCH_COS, matched_fractions
from crosscoding.stages import ROOT, lm_seed_args, seed_run, stage


def parse_args(argv=None):
    run_dir, spec = cli.run_in(argv)
    p = cli.parser(__doc__.split("\n\n")[0], spec.preset)
    cli.add(p, "--run", "--task", run=str(run_dir), task=spec.task)
    p.add_argument("--seeds", type=positive("--seeds"), default=5,
                   help="crosscoders, seeds 0 … N−1 (default: %(default)s)")
    p.add_argument("--lm-seeds", type=positive("--lm-seeds"), default=1,
                   help="also toy LMs pretrained with seeds 1 … N−1 (toy.py --seed), each crosscoded on the revisions "
                        "its own scan suggests, the findings reported over LM seeds (default: %(default)s: the run's "
                        "LM only)")
    p.add_argument("--split-seeds", type=positive("--split-seeds"), default=3,
                   help="also split the pairs with seeds 1 … N−1 (relie.py --split-seed) and attribute and ablate the "
                        "run's own crosscoder on each split (default: %(default)s)")
    p.add_argument("--method", choices=list(METHODS), default=defaults.METHOD,
                   help="relie.py's attribution for the findings (default: %(default)s; the paper's ig always runs "
                        "beside it, for its ratio test)")
    p.add_argument("--compare", default=None, metavar="METHODS",
                   help=f"comma-separated attribution methods to run side by side on every seed ({', '.join(METHODS)})")
    p.add_argument("--arch", choices=cli.FLAGS["--arch"]["choices"], default=None, help="default: the run's")
    cli.add(p, "--select", "--threshold", select=defaults.SELECT, threshold=spec.preset.ie_threshold)
    p.add_argument("--results", action="store_true", help="write the table into RESULTS.md")
    args = p.parse_args(argv)
    args.methods = list(dict.fromkeys([args.method, "ig"] + [m for m in (args.compare or "").split(",") if m]))
    for m in args.methods:
        if m not in METHODS:
            raise UsageError(f"--compare: unknown method {m!r}; valid: {', '.join(METHODS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    base = Path(args.run)
    require_done(base, "training run", "train it with train.py first")
    run_args = read_json(base / "run_args.json", "run arguments")
    arch = args.arch or run_args["arch"]
    revisions = run_args["revisions"]
    seeds = list(range(args.seeds))
    folders = []
    for s in seeds:
        print(f"seed {s}: train, evaluate, relie, ablate ({', '.join(args.methods)})", file=sys.stderr, flush=True)
        own = s == run_args["seed"] and arch == run_args["arch"]
        folder = base if own else base / "stability" / f"{arch}-seed{s}"
        folders.append(seed_run(folder, run_args, arch, s, args.methods, args.task, args.select, args.threshold,
                                Path.cwd(), own))
    stem = Path(args.task).stem
    result = dict(run=str(base), arch=arch, task=args.task, seeds=seeds, revisions=revisions, method=args.method,
                  select=args.select, runs=[str(f) for f in folders], methods={},
                  pairs="findings from ablations are on the held-out test pairs (relie.py's split.csv)")
    for m in args.methods:
        per_seed = [findings_of(f, f"{stem}-{m}-{args.select}", revisions) for f in folders]
        chosen = [read_json(f / "relie" / f"{stem}-{m}-{args.select}" / "summary.json")["chosen"] for f in folders]
        top, null = matched_fractions(folders, chosen) if len(folders) > 1 else ([float("nan")], [float("nan")])
        result["methods"][m] = dict(findings=summarise(per_seed),
                                    matched_top_k_fraction=summarise([{"x": v} for v in top])["x"],
                                    matched_random_fraction=summarise([{"x": v} for v in null])["x"])
    result["findings"] = result["methods"][args.method]["findings"]
    result["matched_top_k_fraction"] = result["methods"][args.method]["matched_top_k_fraction"]
    result["matched_random_fraction"] = result["methods"][args.method]["matched_random_fraction"]
    own = folders[seeds.index(run_args["seed"])] if run_args["seed"] in seeds else base
    if args.split_seeds > 1:
        result["split_seeds"] = split_seed_findings(own, revisions, args)
    if args.lm_seeds > 1:
        result["lm_seeds"] = lm_seed_findings(base, run_args, arch, args, own)
    out = base / "stability"
    path = out / ("seeds.json" if arch == run_args["arch"] else f"seeds-{arch}.json")
    write_json(path, result)           # written whole and renamed into place: present means finished
    print(f"{len(seeds)} seeds of {base.name} ({arch}), attribution {args.method}:")
    print(table(result["findings"]))
    m = result["matched_top_k_fraction"]
    n = result["matched_random_fraction"]
    if m["mean"] is not None:
        print(f"top-k latents matched one-to-one in every other seed (decoder cosine ≥ {MATCH_COS}): mean "
              f"{m['mean']:.2f} [{m['min']:.2f}, {m['max']:.2f}]; random active latents of matched frequency (the "
              f"null): {n['mean']:.2f} [{n['min']:.2f}, {n['max']:.2f}]")
    if "split_seeds" in result:
        print(f"\nover split seeds {result['split_seeds']['seeds']} of the pairs (the run's crosscoder, attribution "
              f"{args.method}):")
        print(table(result["split_seeds"]["findings"], SPLIT_KEYS))
    if "lm_seeds" in result:
        print(f"\nover LM seeds {result['lm_seeds']['seeds']} (revisions {result['lm_seeds']['revisions']}), "
              f"crosscoder seed {run_args['seed']}, attribution {args.method}:")
        print(table(result["lm_seeds"]["findings"]))
        print("\nper LM, the last revision's top-k set against random-k sets (the verdict each run printed):\n"
              + verdict_table(result["lm_seeds"]["verdicts"]))
    if len(args.methods) > 1:
        print("\n" + methods_table(result))
    if args.results:
        command = " ".join(["python seeds.py"] + [a for a in (argv or sys.argv[1:]) if a != "--results"])
        update_results(f"seeds-{arch}", results_markdown(result, command), ROOT / "FINDINGS.md")
    print(f"wrote {path}")


LM_KEYS = ("l0", "dead_frac", "ablation_gap_last", "topk_holds_last", "top_drop_last", "joint_predicted_last",
           "joint_measured_last", "latents_share_last", "latents_share_min", "rho_relie_mean", "rho_reldec_mean",
           "rho_membership_mean", "faithfulness_rho")
SPLIT_KEYS = ("ablation_gap_last", "topk_holds_last", "excess_delta_last", "joint_predicted_last",
              "joint_measured_last", "joint_holds_last", "rho_relie_mean", "rho_reldec_mean", "rho_membership_mean",
              "consistency_holds", "faithfulness_rho")


def split_seed_findings(own, revisions, args) -> dict:
    """The run's own crosscoder attributed and ablated on the pairs split with seeds 0 … N−1 (relie.py
    --split-seed): how much of a finding is the split. Seed 0 is the run's own attribution."""
    stem = f"{Path(args.task).stem}-{args.method}-{args.select}"
    rows = [findings_of(own, stem, revisions)]
    for s in range(1, args.split_seeds):
        name = f"{stem}-split{s}"
        print(f"split seed {s}: relie, ablate", file=sys.stderr, flush=True)
        if not is_done(own / "relie" / name):
            stage(["relie.py", "--run", own, "--task", args.task, "--method", args.method, "--name", name, "--select",
                   args.select, "--threshold", args.threshold, "--split-seed", s, "--context-blocks", 1], Path.cwd())
        if not is_done(own / "ablation" / name):
            stage(["ablate.py", "--run", own, "--task", args.task, "--name", name], Path.cwd())
        rows.append(findings_of(own, name, revisions))
    return dict(seeds=list(range(args.split_seeds)), findings=summarise([{k: f[k] for k in SPLIT_KEYS} for f in rows]))


def last_verdict(folder, name, revisions) -> dict:
    """The last revision's row of ablate.py's verdicts.csv, as a plain dict."""
    v = pd.read_csv(folder / "ablation" / name / "verdicts.csv").set_index("revision").loc[revisions[-1]]
    return dict(revision=revisions[-1], acc_clean=float(v.acc_clean), flag=v.flag if isinstance(v.flag, str) else "",
                excess_points=float(v.excess_points), excess_points_lo=float(v.excess_points_lo),
                excess_points_hi=float(v.excess_points_hi), excess_delta=float(v.excess_delta),
                excess_delta_lo=float(v.excess_delta_lo), excess_delta_hi=float(v.excess_delta_hi), verdict=v.verdict)


def verdict_table(rows) -> str:
    lines = [f"{'LM seed':>7} {'revision':>9} {'clean acc':>9} {'excess points [95%]':>24} {'excess Δ [95%]':>26}  "
             "verdict"]
    for r in rows:
        lines.append(f"{r['seed']:>7} {r['revision']:>9} {r['acc_clean']:>9.2f} "
                     f"{r['excess_points']:>+7.1f} [{r['excess_points_lo']:+6.1f}, {r['excess_points_hi']:+6.1f}] "
                     f"{r['excess_delta']:>+8.3f} [{r['excess_delta_lo']:+7.3f}, {r['excess_delta_hi']:+7.3f}]  "
                     f"{r['verdict']}{' (' + r['flag'] + ')' if r['flag'] else ''}")
    return "\n".join(lines)


def lm_seed_findings(base, run_args, arch, args, own_folder) -> dict:
    """The run's findings over toy LMs pretrained with other seeds (LM seed 0 is the run's own LM): each LM
    crosscoded on the revisions its own scan suggests, so only findings named by position (the last
    revision, the smallest share) compare across them."""
    name = f"{Path(args.task).stem}-{args.method}-{args.select}"
    rows, revs = [findings_of(own_folder, name, run_args["revisions"])], [run_args["revisions"]]
    ver = [dict(seed=0, **last_verdict(own_folder, name, run_args["revisions"]))]
    for s in range(1, args.lm_seeds):
        print(f"LM seed {s}: pretrain, scan, cache, train, evaluate, relie, ablate", file=sys.stderr, flush=True)
        a = lm_seed_args(run_args, s, Path.cwd())
        folder = seed_run(base / "stability" / f"lm-seed{s}-{arch}", a, arch, run_args["seed"], [args.method],
                          args.task, args.select, args.threshold, Path.cwd())
        rows.append(findings_of(folder, name, a["revisions"]))
        revs.append(a["revisions"])
        ver.append(dict(seed=s, **last_verdict(folder, name, a["revisions"])))
    return dict(seeds=list(range(args.lm_seeds)), revisions=revs, verdicts=ver,
                findings=summarise([{k: f[k] for k in LM_KEYS} for f in rows]))


def methods_table(result) -> str:
    lines = [f"{'method':<15} {'faithfulness ρ':>22} {'flagged':>22} {'ablation gap, last (pts)':>26} "
             f"{'top-k matched':>22}"]
    for m, r in result["methods"].items():
        f = r["findings"]
        lines.append(f"{m:<15} {fmt(f['faithfulness_rho']):>22} {fmt(f['faithfulness_flagged_frac']):>22} "
                     f"{fmt(f['ablation_gap_last']):>26} {fmt(r['matched_top_k_fraction']):>22}")
    return "\n".join(lines)


def _rows(f, keys) -> str:
    return "\n".join(f"| {k} | {fmt(f[k])} | {' '.join(num(x) for x in f[k]['per_seed'])} |" for k in keys if k in f)


def _verdict_row(r) -> str:
    flag = f" ({r['flag']})" if r["flag"] else ""
    return (f"| {r['seed']} | {r['revision']} | {r['acc_clean']:.2f}{flag} | {r['excess_points']:+.1f} "
            f"[{r['excess_points_lo']:+.1f}, {r['excess_points_hi']:+.1f}] | {r['excess_delta']:+.3f} "
            f"[{r['excess_delta_lo']:+.3f}, {r['excess_delta_hi']:+.3f}] | {r['verdict']} |")


def results_markdown(result, command="python seeds.py") -> str:
    revs = result["revisions"]
    f = result["findings"]
    keys = ([f"fvu_{r}" for r in revs] + ["l0", "dead_frac"] + [f"ablation_gap_{r}" for r in revs]
            + [f"topk_holds_{r}" for r in revs] + ["joint_predicted_last", "joint_measured_last", "joint_holds_last"]
            + [f"latents_share_{r}" for r in revs] + [f"latents_share_ie_{r}" for r in revs]
            + ["rho_membership_mean", "consistency_holds"]
            + [k for k in f if k.startswith(("rho_relie_", "rho_reldec_"))] + ["faithfulness_rho",
                                                                              "faithfulness_flagged_frac"])
    text = (f"## Over {len(result['seeds'])} seeds: {result['arch']} crosscoders on the revisions of "
            f"{Path(result['run']).name}, attribution {result['method']}, latents ranked by {result['select']} "
            f"(`{command}`)\n\nEach number: mean [min, max] over crosscoders that differ only in their seed; then the "
            "value of each seed. Latents are attributed and selected on the selection half of the pairs; every "
            "ablation (gap, joint, ρ) is measured on the held-out test half. ablation_gap: top-k minus random-k "
            "accuracy drop (points); joint_*: Δ logit difference of the last revision's top-k set ablated together, "
            "predicted by its summed IE vs measured; *_holds: 1 where the run's verdict is holds, 0 where it fails "
            "(its mean: the share of seeds in which the finding holds; rules in crosscoding/verdicts.py); "
            "latents_share: the latents' share of the task against the error term's, exact (zeroing all latents vs "
            "the error term), latents_share_ie by the attribution's Σ|IE|; rho_*: the single-latent consistency check "
            "(ablation ratio vs RelIE / RelDec / set membership alone)."
            f"\n\n| finding | mean [min, max] | per seed |\n|---|---|---|\n{_rows(f, keys)}\n"
            f"| top-k latents matched one-to-one in every other seed | {fmt(result['matched_top_k_fraction'])} | |\n"
            f"| the same for random active latents of matched frequency (null) | "
            f"{fmt(result['matched_random_fraction'])} | |")
    if len(result["methods"]) > 1:
        rows = "\n".join(f"| {m} | {fmt(r['findings']['faithfulness_rho'])} | "
                         f"{fmt(r['findings']['faithfulness_flagged_frac'])} | "
                         f"{fmt(r['findings']['ablation_gap_last'])} | "
                         f"{fmt(r['findings']['rho_relie_mean'])} | {fmt(r['findings']['rho_reldec_mean'])} | "
                         f"{fmt(r['matched_top_k_fraction'])} | {fmt(r['matched_random_fraction'])} |"
                         for m, r in result["methods"].items())
        text += ("\n\nThe attribution methods on the same seeds (faithfulness: Spearman ρ of each method's IE "
                 "with exact single-latent ablation over its chosen latents, on the selection pairs; flagged: the "
                 "fraction of (latent, revision) that disagree in sign or by more than 2×; the top-k vs random-k "
                 "gap at the last revision; ρ of the ablation ratio with RelIE and with RelDec, mean over the "
                 "pairs of revisions — with ig, the paper's Table 7 test as the paper ran it):\n\n"
                 "| method | faithfulness ρ | flagged | gap, last (points) | ρ RelIE | ρ RelDec | top-k matched | "
                 f"null matched |\n|---|---|---|---|---|---|---|---|\n{rows}")
    if "split_seeds" in result:
        text += (f"\n\nOver split seeds {result['split_seeds']['seeds']} of the pairs (relie.py --split-seed; the "
                 "run's own crosscoder, attributed and ablated on each split):\n\n| finding | mean [min, max] | per "
                 f"split seed |\n|---|---|---|\n{_rows(result['split_seeds']['findings'], SPLIT_KEYS)}")
    if "lm_seeds" in result:
        lm = result["lm_seeds"]
        text += (f"\n\nOver LM seeds {lm['seeds']} (the toy LM pretrained with each seed, `toy.py --seed`; each "
                 "crosscoded on the revisions its own scan suggests: "
                 + "; ".join(f"seed {s}: {', '.join(r)}" for s, r in zip(lm["seeds"], lm["revisions"]))
                 + f"; crosscoder seed {result['seeds'][0]}):\n\n| finding | mean [min, max] | per LM seed |\n"
                 f"|---|---|---|\n{_rows(lm['findings'], LM_KEYS)}\n\nPer LM, the last revision's top-k set against "
                 "random-k sets (test pairs; intervals over their groups of near-copies) and the verdict the run "
                 "printed:\n\n| LM seed | revision | clean accuracy | excess accuracy drop (points) | excess Δ | "
                 "verdict |\n|---|---|---|---|---|---|\n" + "\n".join(_verdict_row(r) for r in lm["verdicts"]))
    return text


if __name__ == "__main__":
    run_main(main)
