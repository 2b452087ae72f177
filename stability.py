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

import cli
import defaults
import measures
from analysis import METHODS
from common import (
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
from crosscoder import CrossCoder

HERE = Path(__file__).resolve().parent
TRAIN_KEYS = ("model", "layer", "weights", "cache", "dict_size", "batch_size", "tokens", "lr", "l1_coeff", "k",
              "text", "seq_len", "heldout_tokens", "buffer_tokens", "precision", "device", "model_dtype")
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
    cmd = ["train.py", "--revisions", ",".join(run_args["revisions"]), "--arch", arch, "--seed", seed, "--out", out]
    for k in TRAIN_KEYS:
        v = run_args.get(k)
        if v is not None and v != "None":
            cmd += [f"--{k.replace('_', '-')}", v]
    return cmd


def stale(seed_args, run_args) -> bool:
    """A seed's run no longer matches the run it varies (the run was trained again with other arguments)."""
    return any(str(seed_args.get(k)) != str(run_args.get(k)) for k in ("revisions",) + TRAIN_KEYS)


def seed_run(base, run_args, arch, seed, methods, task, select, threshold, cwd):
    """One seed through every stage (each skipped when already finished); returns its run folder."""
    own = seed == run_args["seed"] and arch == run_args["arch"]
    folder = base if own else base / "stability" / f"{arch}-seed{seed}"
    again = (not own and (folder / "run_args.json").exists()
             and stale(read_json(folder / "run_args.json", "run arguments"), run_args))
    if again:
        print(f"   {folder} was trained with other arguments than {base}; training it again", file=sys.stderr)
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
    sp = pd.read_csv(folder / "ablation" / name / "consistency.csv")
    for row in sp.itertuples():
        out[f"rho_relie_{row.A}_{row.B}"] = row.rho_relie
        out[f"rho_reldec_{row.A}_{row.B}"] = row.rho_reldec
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


def greedy_match(cos_KF) -> np.ndarray:
    """One-to-one matching of K latents to F (greedy by descending cosine): each row's matched cosine."""
    cos = np.asarray(cos_KF, dtype=float)
    order = np.dstack(np.unravel_index(np.argsort(-cos, axis=None), cos.shape))[0]
    best = np.full(cos.shape[0], -1.0)
    used_rows, used_cols = set(), set()
    for i, j in order:
        if i in used_rows or j in used_cols:
            continue
        best[i] = cos[i, j]
        used_rows.add(i)
        used_cols.add(j)
        if len(used_rows) == cos.shape[0]:
            break
    return best


def matched_fraction(folders, chosen) -> list[float]:
    """Per seed, the fraction of its chosen latents whose decoder has a one-to-one match (cosine ≥ 0.9) in
    every other seed's dictionary."""
    decs = [unit_decoders(f) for f in folders]
    out = []
    for a, lat in enumerate(chosen):
        ok = np.ones(len(lat), dtype=bool)
        for b in range(len(folders)):
            if b != a:
                ok &= greedy_match((decs[a][lat] @ decs[b].T).numpy()) >= MATCH_COS
        out.append(float(ok.mean()) if len(lat) else float("nan"))
    return out


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
    p.add_argument("--method", choices=METHODS, default=defaults.METHOD,
                   help="relie.py's attribution for the findings (default: %(default)s)")
    p.add_argument("--compare", default=None, metavar="METHODS",
                   help=f"comma-separated attribution methods to run side by side on every seed ({', '.join(METHODS)})")
    p.add_argument("--arch", choices=("l1", "batchtopk"), default=None, help="default: the run's")
    cli.add(p, "--select", "--threshold", select=defaults.SELECT, threshold=spec.preset.ie_threshold)
    p.add_argument("--results", action="store_true", help="write the table into RESULTS.md")
    args = p.parse_args(argv)
    args.methods = [args.method] + [m for m in (args.compare or "").split(",") if m and m != args.method]
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
        folders.append(seed_run(base, run_args, arch, s, args.methods, args.task, args.select, args.threshold,
                                Path.cwd()))
    stem = Path(args.task).stem
    result = dict(run=str(base), arch=arch, task=args.task, seeds=seeds, revisions=revisions, method=args.method,
                  select=args.select,
                  runs=[str(f) for f in folders], methods={})
    for m in args.methods:
        per_seed = [findings_of(f, f"{stem}-{m}-{args.select}", revisions) for f in folders]
        chosen = [read_json(f / "relie" / f"{stem}-{m}-{args.select}" / "summary.json")["chosen"] for f in folders]
        result["methods"][m] = dict(findings=summarise(per_seed),
                                    matched_top_k_fraction=summarise([{"x": v} for v in
                                                                      matched_fraction(folders, chosen)])["x"])
    result["findings"] = result["methods"][args.method]["findings"]
    result["matched_top_k_fraction"] = result["methods"][args.method]["matched_top_k_fraction"]
    out = base / "stability"
    path = out / ("stability.json" if arch == run_args["arch"] else f"stability-{arch}.json")
    write_json(path, result)
    mark_done(out, seeds=seeds, methods=args.methods)
    print(f"{len(seeds)} seeds of {base.name} ({arch}), attribution {args.method}:")
    print(table(result["findings"]))
    m = result["matched_top_k_fraction"]
    print(f"top-k latents matched in every other seed (decoder cosine ≥ {MATCH_COS}): mean {m['mean']:.2f}, "
          f"min {m['min']:.2f}, max {m['max']:.2f}")
    if len(args.methods) > 1:
        print("\n" + methods_table(result))
    if args.results:
        command = " ".join(["python stability.py"] + [a for a in (argv or sys.argv[1:]) if a != "--results"])
        update_results(f"stability-{arch}", results_markdown(result, command), HERE / "RESULTS.md")
    print(f"wrote {path}")


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


def results_markdown(result, command="python stability.py") -> str:
    revs = result["revisions"]
    f = result["findings"]
    keys = ([f"fvu_{r}" for r in revs] + ["l0", "dead_frac"] + [f"ablation_gap_{r}" for r in revs]
            + [k for k in f if k.startswith(("rho_relie_", "rho_reldec_"))] + ["faithfulness_rho",
                                                                              "faithfulness_flagged_frac"])
    rows = "\n".join(f"| {k} | {_fmt(f[k])} | {' '.join(_num(x) for x in f[k]['per_seed'])} |"
                     for k in keys if k in f)
    text = (f"## Over {len(result['seeds'])} seeds: {result['arch']} crosscoders on the revisions of "
            f"{Path(result['run']).name}, attribution {result['method']}, latents ranked by {result['select']} "
            f"(`{command}`)\n\nEach number: mean [min, max] over crosscoders that differ "
            f"only in their seed; then the value of each seed.\n\n| finding | mean [min, max] | per seed |\n"
            f"|---|---|---|\n{rows}\n| top-k latents matched in every other seed | "
            f"{_fmt(result['matched_top_k_fraction'])} | |")
    if len(result["methods"]) > 1:
        rows = "\n".join(f"| {m} | {_fmt(r['findings']['faithfulness_rho'])} | "
                         f"{_fmt(r['findings']['faithfulness_flagged_frac'])} | "
                         f"{_fmt(r['findings']['ablation_gap_last'])} | {_fmt(r['matched_top_k_fraction'])} |"
                         for m, r in result["methods"].items())
        text += ("\n\nThe attribution methods on the same seeds (Spearman ρ of each method's IE with exact "
                 "single-latent ablation over its chosen latents; the fraction of (latent, revision) that "
                 "disagree in sign or by more than 2×; the top-k vs random-k ablation gap at the last "
                 "revision):\n\n| method | faithfulness ρ | flagged | ablation gap, last (points) | top-k matched |"
                 f"\n|---|---|---|---|---|\n{rows}")
    return text


if __name__ == "__main__":
    run_main(main)
