"""stability.py — how much of a run's findings is the crosscoder's seed: train N crosscoders that differ
only in their seed on the same data, run evaluate, relie and ablate on each, and report every finding
per seed with its mean, min and max, and how many top latents recur across the seeds.

    python stability.py                                  # the toy's default run, 5 seeds (~3½ minutes)
    python stability.py --run runs/<name> --seeds 3 --method atp
    python stability.py --compare ig,ig-error-held,ig-mean,atp --results   # the attribution methods

Each seed's run is RUN/stability/<arch>-seed<s>/ (the run itself for its own seed and arch), made by
the stages as subprocesses with the run's own arguments; a finished stage is kept, so a killed
command resumes. Writes RUN/stability/stability.json (stability-<arch>.json for an --arch other than
the run's) — `seeds`, `findings.<name>.per_seed / mean / min / max` (ablation_gap_last: top-k minus
random-k accuracy drop at the last revision, in points), `matched_top_k_fraction` — and, with
--compare, `methods.<method>.findings`; prints the table.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment

from crosscoding import cli, defaults, lm, measures
from crosscoding.analysis import METHODS
from crosscoding.common import (
    UsageError,
    is_done,
    mark_done,
    positive,
    read_json,
    require_done,
    run_main,
    update_results,
    write_json,
)
from crosscoding.crosscoder import CrossCoder
from crosscoding.training import RunConfig, flag

HERE = Path(__file__).resolve().parent
VARIED = ("arch", "seed")     # what a seed run changes of the run's RunConfig
MATCH_COS = 0.9


def stage(args, cwd):
    """Run one stage script as a subprocess; a failure ends this command with its last line."""
    r = subprocess.run([sys.executable, str(HERE / args[0]), *map(str, args[1:])], cwd=cwd, capture_output=True,
                       text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UsageError(f"{' '.join(map(str, args))} failed: {last}")
    return r


def train_args(run_args, arch, seed, out):
    """train.py with the run's RunConfig, another arch and seed, on the run's device."""
    cmd = ["train.py", "--arch", arch, "--seed", seed, "--out", out, "--device", run_args["device"]]
    for k, v in RunConfig.known(run_args).items():
        if k not in VARIED and v is not None:        # None: left to train.py (an LM seed's own cache)
            cmd += [flag(k), ",".join(v) if isinstance(v, list) else v]
    return cmd


def stale(seed_args, run_args) -> bool:
    """A seed's run no longer matches the run it varies (the run was trained again with other arguments)."""
    return any(str(seed_args.get(k)) != str(v) for k, v in RunConfig.known(run_args).items()
               if k not in VARIED and v is not None)


def seed_run(folder, run_args, arch, seed, methods, task, select, threshold, cwd, own=False):
    """One seed through every stage (each skipped when already finished) into folder (the run itself
    when own); returns folder."""
    again = (not own and (folder / "run_args.json").exists()
             and stale(read_json(folder / "run_args.json", "run arguments"), run_args))
    if again:
        print(f"   {folder} was trained with other arguments; training it again", file=sys.stderr)
    if again or not is_done(folder):
        resume = (folder / "ckpt").is_dir() and not again
        stage(train_args(run_args, arch, seed, folder) + (["--resume"] if resume else ["--overwrite"]), cwd)
    ev = folder / "eval.json"
    if not ev.exists() or ev.stat().st_mtime < (folder / "DONE").stat().st_mtime:
        stage(["evaluate.py", "--run", folder], cwd)
    for m in methods:
        name = f"{Path(task).stem}-{m}-{select}"
        if not is_done(folder / "relie" / name):
            stage(["relie.py", "--run", folder, "--task", task, "--method", m, "--name", name, "--select", select,
                   "--threshold", str(threshold)], cwd)
        if not is_done(folder / "ablation" / name):
            stage(["ablate.py", "--run", folder, "--task", task, "--name", name], cwd)
    return folder


def lm_seed_args(run_args, seed, cwd) -> dict:
    """The run's arguments for the toy LM pretrained with another seed: that LM (built first), the
    revisions its own scan suggests (as the paper picks them, by accuracy shifts), its own cache."""
    model = f"toy-seed{seed}"
    spec = lm.resolve(model)
    if not is_done(spec.repo):
        stage(["toy.py", "--out", spec.repo, "--seed", seed], cwd)
    out = stage(["cache_acts.py", "--scan", "--model", model, "--layer", run_args["layer"], "--suggest",
                 len(run_args["revisions"])], cwd).stdout
    line = [x for x in out.splitlines() if x.startswith("suggested revisions")]
    if not line:
        raise UsageError(f"cache_acts.py --scan --model {model} suggested no revisions")
    revisions = line[-1].split(":", 1)[1].strip().split(",")
    return dict(run_args, model=model, revisions=revisions, cache=None)


# ---------------------------------------------------------------------------------------------
# The findings of one seed's run

def findings_of(folder, name, revisions) -> dict:
    """Every finding of one run and attribution (relie/<name>, ablation/<name>) as name → number."""
    out = {}
    ev = read_json(folder / "eval.json", "evaluation")
    for r in revisions:
        out[f"fvu_{r}"] = ev["revisions"][r]["fvu"]
    out["l0"], out["dead_frac"] = ev["l0"], ev["dead_frac"]
    summary = read_json(folder / "relie" / name / "summary.json", "attribution summary")
    faith = summary["faithfulness"]
    out["faithfulness_rho"] = faith["rho"]
    out["faithfulness_flagged_frac"] = faith["n_flagged"] / max(faith["n"], 1)
    abl = pd.read_csv(folder / "ablation" / name / "ablation.csv")
    abl = abl[(abl.subtask == "all") & (abl.selected_at == abl.revision)]
    for r in revisions:
        a = abl[abl.revision == r]
        out[f"ablation_gap_{r}"] = 100 * (a[a.kind == "top"].acc_drop.mean() - a[a.kind == "random"].acc_drop.mean())
    out["ablation_gap_last"] = out[f"ablation_gap_{revisions[-1]}"]
    out["top_drop_last"] = 100 * abl[(abl.revision == revisions[-1]) & (abl.kind == "top")].acc_drop.mean()
    joint = pd.read_csv(folder / "ablation" / name / "joint.csv")
    last = joint[(joint.selected_at == revisions[-1]) & (joint.revision == revisions[-1])]
    out["joint_predicted_last"], out["joint_measured_last"] = float(last.predicted.sum()), float(last.measured.sum())
    for r, c in summary["coverage"].items():
        out[f"latents_share_{r}"] = c["latents_share"] if c["latents_share"] is not None else float("nan")
    out["latents_share_last"] = out[f"latents_share_{revisions[-1]}"]
    out["latents_share_min"] = min(out[f"latents_share_{r}"] for r in revisions)
    sp = pd.read_csv(folder / "ablation" / name / "consistency.csv")
    for row in sp.itertuples():
        out[f"rho_relie_{row.A}_{row.B}"] = row.rho_relie
        out[f"rho_reldec_{row.A}_{row.B}"] = row.rho_reldec
    out["rho_relie_mean"], out["rho_reldec_mean"] = float(sp.rho_relie.mean()), float(sp.rho_reldec.mean())
    sheet = pd.read_csv(folder / "relie" / name / "latents.csv")
    for a, b in measures.pairs_of(revisions):
        tag = f"{revisions[a]}_{revisions[b]}"
        out[f"relie2_norm_{tag}"] = sheet[f"relie2_norm_{tag}"].mean()
        out[f"reldec2_{tag}"] = sheet[f"reldec2_{tag}"].mean()
    for col in ("relie_class", "reldec_class"):
        for cls, frac in sheet[col].value_counts(normalize=True).items():
            out[f"frac_{col.split('_')[0]}_{cls}"] = float(frac)
    return out


def summarise(per_seed: list[dict]) -> dict:
    """name → {per_seed, mean, min, max} over the seeds (a class no seed found counts 0 where absent)."""
    names = list(dict.fromkeys(k for f in per_seed for k in f))
    out = {}
    for k in names:
        vals = [f.get(k, 0.0 if k.startswith("frac_") else float("nan")) for f in per_seed]
        arr = np.array(vals, dtype=float)
        ok = arr[np.isfinite(arr)]
        out[k] = dict(per_seed=[None if not np.isfinite(v) else float(v) for v in arr],
                      mean=float(ok.mean()) if len(ok) else None, min=float(ok.min()) if len(ok) else None,
                      max=float(ok.max()) if len(ok) else None)
    return out


# ---------------------------------------------------------------------------------------------
# Do the top latents recur across seeds?

def unit_decoders(folder) -> torch.Tensor:
    """Every latent's decoder, concatenated over revisions in the normalised space, unit norm: [F, M·d]."""
    dec = CrossCoder.load(folder).decoder().detach()
    return torch.nn.functional.normalize(dec.flatten(1), dim=1)


def active_latents(folder) -> tuple[np.ndarray, np.ndarray]:
    """(the latents active on the evaluation tokens, every latent's activation frequency) from evaluate.py."""
    freq = pd.read_csv(folder / "latents.csv").sort_values("latent").freq.to_numpy()
    return np.nonzero(freq > 0)[0], freq


def partners(dec_a, act_a, dec_b, act_b) -> dict:
    """One-to-one matching (Hungarian, maximum total cosine) of a's active latents to b's: latent → cosine
    of its partner (−1 where a has more active latents than b and it is left over)."""
    cos = (dec_a[act_a] @ dec_b[act_b].T).numpy()
    rows, cols = linear_sum_assignment(-cos)
    out = {int(i): -1.0 for i in act_a}
    out.update({int(act_a[r]): float(cos[r, c]) for r, c in zip(rows, cols)})
    return out


def matched_fractions(folders, chosen, draws=20, seed=0) -> tuple[list[float], list[float]]:
    """Per seed, the fraction of its chosen latents whose partner (partners) in every other seed has
    decoder cosine ≥ 0.9, and the same fraction for random active latents of matched frequency (the null:
    how stable the dictionary is anyway), averaged over draws."""
    decs = [unit_decoders(f) for f in folders]
    act = [active_latents(f) for f in folders]
    rng = np.random.default_rng(seed)
    top, null = [], []
    for a, lat in enumerate(chosen):
        match = {}
        for b in range(len(folders)):
            if b != a:
                p = partners(decs[a], act[a][0], decs[b], act[b][0])
                for i, c in p.items():
                    match[i] = match.get(i, True) and c >= MATCH_COS

        def frac(latents, match=match):
            return float(np.mean([match.get(int(i), False) for i in latents])) if len(latents) else float("nan")
        top.append(frac(lat))
        freq = np.where(act[a][1] > 0, act[a][1], -1.0)       # dead latents are never drawn
        null.append(float(np.mean([frac(measures.matched_random(freq, lat, rng, set(lat))) for _ in range(draws)])))
    return top, null


# ---------------------------------------------------------------------------------------------

def table(findings: dict, keys=None) -> str:
    rows = [(k, v) for k, v in findings.items() if keys is None or k in keys]
    lines = [f"{'finding':<34} {'mean':>9} {'min':>9} {'max':>9}   per seed"]
    for k, v in rows:
        fmt = (lambda x: "—" if x is None else f"{x:9.3f}")
        lines.append(f"{k:<34} {fmt(v['mean'])} {fmt(v['min'])} {fmt(v['max'])}   "
                     + " ".join("—" if x is None else f"{x:.3f}" for x in v["per_seed"]))
    return "\n".join(lines)


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
    if args.lm_seeds > 1:
        result["lm_seeds"] = lm_seed_findings(base, run_args, arch, args, folders[seeds.index(run_args["seed"])]
                                              if run_args["seed"] in seeds else base)
    out = base / "stability"
    path = out / ("stability.json" if arch == run_args["arch"] else f"stability-{arch}.json")
    write_json(path, result)
    mark_done(out, seeds=seeds, methods=args.methods)
    print(f"{len(seeds)} seeds of {base.name} ({arch}), attribution {args.method}:")
    print(table(result["findings"]))
    m = result["matched_top_k_fraction"]
    n = result["matched_random_fraction"]
    if m["mean"] is not None:
        print(f"top-k latents matched one-to-one in every other seed (decoder cosine ≥ {MATCH_COS}): mean "
              f"{m['mean']:.2f} [{m['min']:.2f}, {m['max']:.2f}]; random active latents of matched frequency (the "
              f"null): {n['mean']:.2f} [{n['min']:.2f}, {n['max']:.2f}]")
    if "lm_seeds" in result:
        print(f"\nover LM seeds {result['lm_seeds']['seeds']} (revisions {result['lm_seeds']['revisions']}), "
              f"crosscoder seed {run_args['seed']}, attribution {args.method}:")
        print(table(result["lm_seeds"]["findings"]))
    if len(args.methods) > 1:
        print("\n" + methods_table(result))
    if args.results:
        command = " ".join(["python stability.py"] + [a for a in (argv or sys.argv[1:]) if a != "--results"])
        update_results(f"stability-{arch}", results_markdown(result, command), HERE / "RESULTS.md")
    print(f"wrote {path}")


LM_KEYS = ("l0", "dead_frac", "ablation_gap_last", "top_drop_last", "joint_predicted_last", "joint_measured_last",
           "latents_share_last", "latents_share_min", "rho_relie_mean", "rho_reldec_mean", "faithfulness_rho")


def lm_seed_findings(base, run_args, arch, args, own_folder) -> dict:
    """The run's findings over toy LMs pretrained with other seeds (LM seed 0 is the run's own LM): each LM
    crosscoded on the revisions its own scan suggests, so only findings named by position (the last
    revision, the smallest share) compare across them."""
    name = f"{Path(args.task).stem}-{args.method}-{args.select}"
    rows, revs = [findings_of(own_folder, name, run_args["revisions"])], [run_args["revisions"]]
    for s in range(1, args.lm_seeds):
        print(f"LM seed {s}: pretrain, scan, cache, train, evaluate, relie, ablate", file=sys.stderr, flush=True)
        a = lm_seed_args(run_args, s, Path.cwd())
        folder = seed_run(base / "stability" / f"lm-seed{s}-{arch}", a, arch, run_args["seed"], [args.method],
                          args.task, args.select, args.threshold, Path.cwd())
        rows.append(findings_of(folder, name, a["revisions"]))
        revs.append(a["revisions"])
    return dict(seeds=list(range(args.lm_seeds)), revisions=revs,
                findings=summarise([{k: f[k] for k in LM_KEYS} for f in rows]))


def _num(x):
    return "—" if x is None else f"{x:.3f}" if abs(x) < 0.1 else f"{x:.2f}"   # FVUs are 0.001–0.05


def _fmt(v):
    return "—" if v["mean"] is None else f"{_num(v['mean'])} [{_num(v['min'])}, {_num(v['max'])}]"


def methods_table(result) -> str:
    lines = [f"{'method':<15} {'faithfulness ρ':>22} {'flagged':>22} {'ablation gap, last (pts)':>26} "
             f"{'top-k matched':>22}"]
    for m, r in result["methods"].items():
        f = r["findings"]
        lines.append(f"{m:<15} {_fmt(f['faithfulness_rho']):>22} {_fmt(f['faithfulness_flagged_frac']):>22} "
                     f"{_fmt(f['ablation_gap_last']):>26} {_fmt(r['matched_top_k_fraction']):>22}")
    return "\n".join(lines)


def _rows(f, keys) -> str:
    return "\n".join(f"| {k} | {_fmt(f[k])} | {' '.join(_num(x) for x in f[k]['per_seed'])} |" for k in keys if k in f)


def results_markdown(result, command="python stability.py") -> str:
    revs = result["revisions"]
    f = result["findings"]
    keys = ([f"fvu_{r}" for r in revs] + ["l0", "dead_frac"] + [f"ablation_gap_{r}" for r in revs]
            + ["joint_predicted_last", "joint_measured_last"] + [f"latents_share_{r}" for r in revs]
            + [k for k in f if k.startswith(("rho_relie_", "rho_reldec_"))] + ["faithfulness_rho",
                                                                              "faithfulness_flagged_frac"])
    text = (f"## Over {len(result['seeds'])} seeds: {result['arch']} crosscoders on the revisions of "
            f"{Path(result['run']).name}, attribution {result['method']}, latents ranked by {result['select']} "
            f"(`{command}`)\n\nEach number: mean [min, max] over crosscoders that differ only in their seed; then the "
            "value of each seed. Latents are attributed and selected on the selection half of the pairs; every "
            "ablation (gap, joint, ρ) is measured on the held-out test half. ablation_gap: top-k minus random-k "
            "accuracy drop (points); joint_*: Δ logit difference of the last revision's top-k set ablated together, "
            "predicted by its summed IE vs measured; latents_share: the latents' share of the task's IE (the rest "
            "is the error term); rho_*: the single-latent consistency check (ablation ratio vs RelIE / RelDec)."
            f"\n\n| finding | mean [min, max] | per seed |\n|---|---|---|\n{_rows(f, keys)}\n"
            f"| top-k latents matched one-to-one in every other seed | {_fmt(result['matched_top_k_fraction'])} | |\n"
            f"| the same for random active latents of matched frequency (null) | "
            f"{_fmt(result['matched_random_fraction'])} | |")
    if len(result["methods"]) > 1:
        rows = "\n".join(f"| {m} | {_fmt(r['findings']['faithfulness_rho'])} | "
                         f"{_fmt(r['findings']['faithfulness_flagged_frac'])} | "
                         f"{_fmt(r['findings']['ablation_gap_last'])} | "
                         f"{_fmt(r['findings']['rho_relie_mean'])} | {_fmt(r['findings']['rho_reldec_mean'])} | "
                         f"{_fmt(r['matched_top_k_fraction'])} | {_fmt(r['matched_random_fraction'])} |"
                         for m, r in result["methods"].items())
        text += ("\n\nThe attribution methods on the same seeds (faithfulness: Spearman ρ of each method's IE "
                 "with exact single-latent ablation over its chosen latents, on the selection pairs; flagged: the "
                 "fraction of (latent, revision) that disagree in sign or by more than 2×; the top-k vs random-k "
                 "gap at the last revision; ρ of the ablation ratio with RelIE and with RelDec, mean over the "
                 "pairs of revisions — with ig, the paper's Table 7 test as the paper ran it):\n\n"
                 "| method | faithfulness ρ | flagged | gap, last (points) | ρ RelIE | ρ RelDec | top-k matched | "
                 f"null matched |\n|---|---|---|---|---|---|---|---|\n{rows}")
    if "lm_seeds" in result:
        lm = result["lm_seeds"]
        text += (f"\n\nOver LM seeds {lm['seeds']} (the toy LM pretrained with each seed, `toy.py --seed`; each "
                 "crosscoded on the revisions its own scan suggests: "
                 + "; ".join(f"seed {s}: {', '.join(r)}" for s, r in zip(lm["seeds"], lm["revisions"]))
                 + f"; crosscoder seed {result['seeds'][0]}):\n\n| finding | mean [min, max] | per LM seed |\n"
                 f"|---|---|---|\n{_rows(lm['findings'], LM_KEYS)}")
    return text


if __name__ == "__main__":
    run_main(main)
