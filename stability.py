"""stability.py — how much of a run's findings is the crosscoder's seed: train N crosscoders that differ
only in their seed on the same data, run evaluate, relie and ablate on each, and report every finding
per seed with its mean, min and max, and how many top latents recur across the seeds.

    python stability.py                                  # the toy's default run, 5 seeds (~3½ minutes)
    python stability.py --run runs/<name> --seeds 3 --method atp
    python stability.py --compare ig,ig-error-held,ig-mean,atp --results   # the attribution methods
    python stability.py --seeds 2 --controls --results    # each headline check beside its negative control
    python stability.py --seeds 1 --revision-sets --results   # trained again over other sets of checkpoints

Each seed's run is RUN/stability/<arch>-seed<s>/ (the run itself for its own seed and arch), made by
the stages as subprocesses with the run's own arguments; a finished stage is kept, so a killed
command resumes. Writes RUN/stability/stability.json (stability-<arch>.json for an --arch other than
the run's) — `seeds`, `findings.<name>.per_seed / mean / min / max` (ablation_gap_last: top-k minus
random-k accuracy drop at the last revision, in points), `matched_top_k_fraction` — and, with
--compare, `methods.<method>.findings`; prints the table.

--controls: one negative control per headline check, each a copy of the run (RUN/stability/controls/)
that the stages run on — (a) decoder rows permuted across latents, (b) revision labels shuffled per
latent before RelIE, (c) random unit directions in place of the decoder, (d) a second crosscoder trained
on other revisions — written beside the real value and the null (`controls`); a check whose control does
not fail is reported as uninformative. --revision-sets: the run trained again over variants of its
revisions (RUN/stability/revision-sets/), its top latents matched into each (`revision_sets`). With
--results each writes its own RESULTS.md section (and leaves the seed table alone).
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment

from crosscoding import cli, defaults, lm, measures
from crosscoding.activations import make_cache, open_cache
from crosscoding.analysis import METHODS
from crosscoding.common import (
    UsageError,
    atomic_path,
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
    return {i: c for i, (_, c) in pairing(dec_a, act_a, dec_b, act_b).items()}


def pairing(dec_a, act_a, dec_b, act_b) -> dict:
    """partners with the partner named: latent of a → (latent of b, cosine); (−1, −1.0) where left over."""
    cos = (dec_a[act_a] @ dec_b[act_b].T).numpy()
    rows, cols = linear_sum_assignment(-cos)
    out = {int(i): (-1, -1.0) for i in act_a}
    out.update({int(act_a[r]): (int(act_b[c]), float(cos[r, c])) for r, c in zip(rows, cols)})
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
    p.add_argument("--controls", action="store_true",
                   help="also run the negative controls of the headline checks (decoder permuted, revision labels "
                        "shuffled, random directions, a crosscoder of other revisions) beside their real values")
    p.add_argument("--revision-sets", action="store_true",
                   help="also train the run's crosscoder again over variants of its revisions (each inner one "
                        "dropped, each scanned neighbour added, the set shifted one scan step) and report which top "
                        "latents keep their class and formed_at")
    p.add_argument("--control-revisions", default=None, metavar="REVS",
                   help="--controls: revisions of the matching control's crosscoder (default: as many as the run "
                        "has, the earliest scanned ones it does not use)")
    args = p.parse_args(argv)
    args.methods = list(dict.fromkeys([args.method, "ig"] + [m for m in (args.compare or "").split(",") if m]))
    for m in args.methods:
        if m not in METHODS:
            raise UsageError(f"--compare: unknown method {m!r}; valid: {', '.join(METHODS)}")
    return args


def main(argv=None):
    t0 = time.time()
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
    if args.controls:
        own = folders[seeds.index(run_args["seed"])] if run_args["seed"] in seeds else folders[0]
        print("controls: permuted decoder, shuffled revision labels, random directions, other revisions",
              file=sys.stderr, flush=True)
        result["controls"] = controls(own, f"{stem}-{args.method}-{args.select}", run_args, arch, Path.cwd(),
                                      next((f for f in folders if f != own), None), args.control_revisions)
    if args.revision_sets:
        own = folders[seeds.index(run_args["seed"])] if run_args["seed"] in seeds else folders[0]
        print("revision sets: train, evaluate and match over variants of the run's revisions", file=sys.stderr,
              flush=True)
        result["revision_sets"] = revision_sets(own, f"{stem}-{args.method}-{args.select}", run_args, arch,
                                                Path.cwd())
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
    if "controls" in result:
        print("\nnegative controls (" + result["controls"]["note"] + "):\n" + controls_table(result["controls"]))
    if "revision_sets" in result:
        print("\nrobust to the checkpoints chosen (top latents matched into each variant, null beside):\n"
              + revision_sets_table(result["revision_sets"]))
    if args.results:
        command = " ".join(["python stability.py"] + [a for a in (argv or sys.argv[1:]) if a != "--results"])
        # --controls / --revision-sets write their own sections only (a short --seeds run for them leaves the
        # seed table alone)
        if "controls" in result:
            update_results(f"controls-{arch}", controls_markdown(result["controls"], command, time.time() - t0),
                           HERE / "RESULTS.md")
        if "revision_sets" in result:
            update_results(f"revision-sets-{arch}", revision_sets_markdown(result["revision_sets"], command,
                                                                             time.time() - t0),
                           HERE / "RESULTS.md")
        if not {"controls", "revision_sets"} & set(result):
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


# ---------------------------------------------------------------------------------------------
# Negative controls (--controls): each headline check run where its claim is false. A control is a
# transformation of the run folder (a copy whose decoder or attribution is broken on purpose), and the
# normal stages run on it, so the real path is what is tested. A check whose control does not fail is
# reported as uninformative, not as a finding.

CONTROL_GAP = 5.0        # points: a top-k vs random-k gap no larger than this has vanished
NULL_DRAWS = 100         # random-latent draws behind the matching null's interval
NULL_PERMUTATIONS = 2000  # permutations behind the ρ null's interval


def relie_settings(folder, name) -> dict:
    """How relie.py and ablate.py ran on folder/relie/<name> and folder/ablation/<name>, to run them again,
    unchanged, on a control."""
    s = read_json(folder / "relie" / name / "summary.json", "attribution summary")
    a = read_json(folder / "ablation" / name / "DONE", "ablation")
    return dict(task=s["task"], method=s["method"], select=s["select"], threshold=s["threshold"], top_k=a["top_k"],
                draws=a["draws"], test_frac=s["split"]["test_frac"], split_seed=s["split"]["seed"],
                max_pairs=s["split"]["max_pairs"])


def attribution_stages(folder, name, st, device, cwd, relie=True):
    """relie.py (unless relie=False: the attribution is the control's own) and ablate.py on a control with the
    run's settings; finished stages are kept. Contexts are for reading only: one block."""
    if relie and not is_done(folder / "relie" / name):
        stage(["relie.py", "--run", folder, "--task", st["task"], "--method", st["method"], "--name", name,
               "--select", st["select"], "--threshold", st["threshold"], "--top-k", st["top_k"], "--test-frac",
               st["test_frac"], "--split-seed", st["split_seed"], "--context-blocks", 1, "--device", device]
              + (["--max-pairs", st["max_pairs"]] if st["max_pairs"] else []), cwd)
    if not is_done(folder / "ablation" / name):
        stage(["ablate.py", "--run", folder, "--task", st["task"], "--name", name, "--top-k", st["top_k"], "--draws",
               st["draws"], "--device", device], cwd)


def control_run(base, out, what, decoder=None, seed=0) -> Path:
    """out: the run's crosscoder, config and arguments, its decoder replaced by decoder(W_dec_FMd, generator)
    (None: kept) — a run folder the stages take as they take the run. Made again (with everything the stages
    wrote into it) when the run was trained after it."""
    out = Path(out)
    if is_done(out) and (out / "DONE").stat().st_mtime >= (base / "DONE").stat().st_mtime:
        return out
    if out.exists():
        shutil.rmtree(out)
    cc = CrossCoder.load(base)
    if decoder is not None:
        with torch.no_grad():
            cc.W_dec_FMd.copy_(decoder(cc.W_dec_FMd.detach().clone(), torch.Generator().manual_seed(seed)))
    out.mkdir(parents=True)
    cc.save(out, extra=cc.extra)
    if (base / "run_args.json").exists():
        shutil.copy(base / "run_args.json", out / "run_args.json")
    mark_done(out, control=what, source=str(base), seed=seed)
    return out


def permuted_rows(W_FMd, g):
    """Decoder rows permuted across latents: each latent still fires where it did (its encoder) but writes
    another latent's direction."""
    return W_FMd[torch.randperm(len(W_FMd), generator=g)]


def random_directions(W_FMd, g):
    """Random unit directions in place of the dictionary, each [i, m] row keeping its norm (so an ablation
    moves the residual stream as far as the real latent's would, in no learned direction)."""
    R_FMd = torch.randn(W_FMd.shape, generator=g)
    return R_FMd / R_FMd.norm(dim=-1, keepdim=True) * W_FMd.norm(dim=-1, keepdim=True)


def shuffle_revision_labels(base, name, out, revisions, seed=0):
    """out/relie/<name>: the run's attribution with each latent's revision labels permuted at random in ie.csv
    (all its sub-tasks alike), so RelIE no longer knows which revision an IE came from."""
    dst = out / "relie" / name
    if is_done(dst):
        return
    shutil.copytree(base / "relie" / name, dst, ignore=shutil.ignore_patterns("DONE"), dirs_exist_ok=True)
    ie = pd.read_csv(dst / "ie.csv")
    rng = np.random.default_rng(seed)
    perm = {lat: dict(zip(revisions, rng.permutation(revisions))) for lat in sorted(ie.latent.unique())}
    ie["revision"] = [perm[lat][r] for lat, r in zip(ie.latent, ie.revision)]
    with atomic_path(dst / "ie.csv") as tmp:
        ie.to_csv(tmp, index=False)
    mark_done(dst, control="revision labels shuffled per latent", seed=seed)


def ablation_findings(folder, name, revisions) -> dict:
    """At the last revision: the top-k vs random-k accuracy-drop gap (points, as findings_of), each random
    draw's drop minus their mean (the gap's own noise), the joint ablation's predicted and measured Δ, and
    each random-k set's Δ (the joint's null)."""
    abl = pd.read_csv(folder / "ablation" / name / "ablation.csv")
    last = abl[(abl.subtask == "all") & (abl.selected_at == revisions[-1]) & (abl.revision == revisions[-1])]
    top, rnd = last[last.kind == "top"], last[last.kind == "random"]
    joint = pd.read_csv(folder / "ablation" / name / "joint.csv")
    j = joint[(joint.selected_at == revisions[-1]) & (joint.revision == revisions[-1])]
    return dict(gap=float(100 * (top.acc_drop.mean() - rnd.acc_drop.mean())),
                gap_noise=(100 * (rnd.acc_drop - rnd.acc_drop.mean())).tolist(),
                joint_predicted=float(j.predicted.sum()), joint_measured=float(j.measured.sum()),
                random_delta=rnd.delta.tolist())


def rho_null(folder, name, n=NULL_PERMUTATIONS, seed=0) -> tuple[float, list]:
    """The consistency check's ρ (ablation ratio with RelIE, mean over pairs of revisions) recomputed from
    ablate.py's ratios.csv, and its permutation null: the ratios permuted across latents within each pair,
    n times (95% of the null's means lie in its interval)."""
    r = pd.read_csv(folder / "ablation" / name / "ratios.csv")
    groups = [g for _, g in r.groupby(["A", "B"], sort=False)]
    rng = np.random.default_rng(seed)
    real = float(np.mean([measures.spearman(g.ratio, g.relie) for g in groups]))
    null_nG = np.stack([measures.spearman_rows(np.stack([rng.permutation(g.ratio.to_numpy()) for _ in range(n)]),
                                               g.relie.to_numpy()) for g in groups], 1)
    return real, np.nanmean(null_nG, 1).tolist()


def match_with_null(folder_a, chosen, folder_b, draws=NULL_DRAWS) -> tuple[float, list]:
    """The fraction of folder_a's chosen latents whose one-to-one partner in folder_b has decoder cosine ≥ 0.9
    (matched_fractions), and one value of its null per draw (random active latents of matched frequency)."""
    top = matched_fractions([folder_a, folder_b], [chosen, []], draws=1)[0][0]
    null = [matched_fractions([folder_a, folder_b], [chosen, []], draws=1, seed=s)[1][0] for s in range(draws)]
    return top, null


def other_revisions(run_args, task, given=None, cwd=".") -> list:
    """Revisions for the matching control: given, else as many as the run has, the earliest scanned
    (cache_acts.py --scan) that the run does not use."""
    if given:
        other = given.split(",")
        if len(other) != len(run_args["revisions"]):
            raise UsageError(f"--control-revisions: {len(other)} revisions given; the run has "
                             f"{len(run_args['revisions'])}, and matching compares decoders over as many")
        return other
    scan = Path(cwd) / defaults.scan_path(lm.resolve(run_args["model"]).key, run_args["layer"], task)  # the stages'
    if not scan.exists():
        raise UsageError(f"--controls needs other revisions to train the matching control on: scan them "
                         f"(python cache_acts.py --scan --model {run_args['model']} --layer {run_args['layer']}) "
                         "or give --control-revisions")
    other = [r for r in pd.read_csv(scan).revision if r not in run_args["revisions"]][:len(run_args["revisions"])]
    if len(other) < 2:
        raise UsageError(f"{scan} holds fewer than 2 revisions the run does not use; give --control-revisions")
    return other


def _interval(values):
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) if len(v) else (float("nan"),) * 2


def control_row(check, control, real, value, null, lo, hi, fails, real_passes, **more) -> dict:
    return dict(check=check, control=control, real=real, value=value, null=null, null_lo=lo, null_hi=hi,
                fails=bool(fails), real_passes=bool(real_passes),
                verdict="fails: the check can fail" if fails else "does not fail: the check is UNINFORMATIVE",
                **more)


def controls(base, name, run_args, arch, cwd, seed_folder=None, control_revisions=None, eval_args=()) -> dict:
    """Every negative control of the run's headline checks (README "Controls"), each beside its real value
    and null; the control runs are RUN/stability/controls/<control>/."""
    st = relie_settings(base, name)
    revs, device = run_args["revisions"], run_args.get("device", "cpu")
    out = base / "stability" / "controls"
    real = ablation_findings(base, name, revs)
    rows = []
    gap_check = f"top-k minus random-k accuracy drop at {revs[-1]} (points)"
    gap_null = f"0 (gone when ≤ {CONTROL_GAP:g}; random-k draws' own spread {_span(real['gap_noise'])})"

    # (a) decoder rows permuted across latents: attribution and selection run anew on the copy
    a = control_run(base, out / "permuted-decoder", "decoder rows permuted across latents", permuted_rows)
    attribution_stages(a, name, st, device, cwd)
    fa = ablation_findings(a, name, revs)
    rows.append(control_row(gap_check, "(a) decoder rows permuted across latents", real["gap"], fa["gap"], gap_null,
                            -CONTROL_GAP, CONTROL_GAP, fa["gap"] <= CONTROL_GAP, real["gap"] > CONTROL_GAP,
                            folder=str(a)))

    # (b) revision labels shuffled per latent before RelIE; the ablations are measured anew on the test pairs
    b = control_run(base, out / "shuffled-revisions", "revision labels shuffled per latent before RelIE")
    shuffle_revision_labels(base, name, b, revs)
    attribution_stages(b, name, st, device, cwd, relie=False)
    rho_real, null_real = rho_null(base, name)
    rho_ctl, null_ctl = rho_null(b, name)
    lo, hi = _interval(null_ctl)
    rlo, rhi = _interval(null_real)
    rows.append(control_row("ρ of the single-ablation ratio with RelIE (mean over pairs of revisions)",
                            "(b) revision labels shuffled per latent before RelIE", rho_real, rho_ctl,
                            f"permutation null {_span([lo, hi])} (the real run's: {_span([rlo, rhi])})", lo, hi,
                            lo <= rho_ctl <= hi, not rlo <= rho_real <= rhi, folder=str(b),
                            consistency_csv_mean=float(pd.read_csv(base / "ablation" / name / "consistency.csv")
                                                       .rho_relie.mean())))

    # (c) random unit directions in place of the dictionary (norms and encoder kept)
    c = control_run(base, out / "random-directions", "random unit directions in place of the decoder (norms kept)",
                    random_directions)
    attribution_stages(c, name, st, device, cwd)
    fc = ablation_findings(c, name, revs)
    rows.append(control_row(gap_check, "(c) random unit directions in place of the decoder", real["gap"], fc["gap"],
                            gap_null, -CONTROL_GAP, CONTROL_GAP, fc["gap"] <= CONTROL_GAP,
                            real["gap"] > CONTROL_GAP, folder=str(c)))
    jlo, jhi = min(fc["random_delta"]), max(fc["random_delta"])
    rows.append(control_row(f"joint ablation of the top-k set at {revs[-1]}: measured Δ logit difference",
                            "(c) random unit directions in place of the decoder", real["joint_measured"],
                            fc["joint_measured"], f"random-k sets' Δ in the control {_span([jlo, jhi])} (the real "
                            f"run's: {_span([min(real['random_delta']), max(real['random_delta'])])})", jlo, jhi,
                            fc["joint_measured"] <= jhi, real["joint_measured"] > max(real["random_delta"]),
                            predicted_real=real["joint_predicted"], predicted_control=fc["joint_predicted"],
                            folder=str(c)))

    # (d) matching across crosscoders trained on different revisions' data (same arch, seed, size, tokens)
    chosen = read_json(base / "relie" / name / "summary.json")["chosen"]
    other = other_revisions(run_args, st["task"], control_revisions, cwd)
    d = out / "other-revisions"
    if not is_done(d):
        data = out / "other-revisions-data"
        view = cache_view(run_args, other, extra_cache(run_args, other, data), data)
        stage(train_args(dict(run_args, revisions=other, cache=view), arch, run_args["seed"], d) + ["--overwrite"],
              cwd)
    if not (d / "latents.csv").exists() or (d / "latents.csv").stat().st_mtime < (d / "DONE").stat().st_mtime:
        stage(["evaluate.py", "--run", d, *eval_args], cwd)
    m_ctl, null_ctl = match_with_null(base, chosen, d)
    lo, hi = _interval(null_ctl)
    m_real, null_real = match_with_null(base, chosen, seed_folder) if seed_folder else (float("nan"), [])
    rlo, rhi = _interval(null_real)
    rows.append(control_row("top-k latents matched one-to-one (decoder cosine ≥ 0.9) in a second crosscoder",
                            f"(d) the second crosscoder trained on {','.join(other)}", m_real, m_ctl,
                            f"random active latents of matched frequency {_span([lo, hi])} (the real pair's: "
                            f"{_span([rlo, rhi])})", lo, hi, lo <= m_ctl <= hi, m_real > rhi, folder=str(d),
                            real_pair=str(seed_folder) if seed_folder else None))
    return dict(attribution=name, rows=rows, gap_threshold=CONTROL_GAP, note=(
        "every value on the held-out test pairs of relie.py's split (the matching uses no pairs); the controls "
        "are transformations of the run folder run through the normal stages"))


def _span(v) -> str:
    return f"[{_num(min(v))}, {_num(max(v))}]" if len(v) and np.all(np.isfinite(v)) else "—"


def controls_table(ctl) -> str:
    lines = [f"{'check':<62} {'real':>7} {'control':>8}   control / null / verdict"]
    for r in ctl["rows"]:
        lines.append(f"{r['check']:<62} {_num(r['real']):>7} {_num(r['value']):>8}   {r['control']}\n"
                     f"{'':<80}null: {r['null']}\n{'':<80}{r['verdict']}"
                     + ("" if r["real_passes"] else "; the real value itself is within its null"))
    return "\n".join(lines)


def _took(seconds) -> str:
    return "" if seconds is None else (f" The command took {seconds:.0f} s on {os.cpu_count()} CPU cores (wall; "
                                       "stages an earlier run finished are reused, not timed).")


def controls_markdown(ctl, command, seconds=None) -> str:
    rows = "\n".join(f"| {r['check']} | {_num(r['real'])} | {r['control']} | {_num(r['value'])} | {r['null']} | "
                     f"{'fails' if r['fails'] else '**uninformative**'}"
                     f"{'' if r['real_passes'] else '; real value within its null'} |" for r in ctl["rows"])
    return (f"## Negative controls (`{command}`)\n\nEach headline check run where its claim is false: a copy of "
            f"the run with its decoder broken or its revision labels shuffled, or a second crosscoder trained on "
            f"other revisions, through the normal stages; every value on the held-out test pairs "
            f"(attribution `{ctl['attribution']}`). A check whose control does not fail is uninformative, not a "
            f"finding. A gap has vanished when it is at most {CONTROL_GAP:g} points; ρ and the match rate must "
            f"fall inside their null's 95% interval; the joint Δ at or under the largest random-k set's."
            + _took(seconds) + "\n\n"
            f"| check | real | control | control value | null | control |\n|---|---|---|---|---|---|\n{rows}")


# ---------------------------------------------------------------------------------------------
# Robust to the checkpoints chosen (--revision-sets): the crosscoder trained again over variants of the
# run's revisions, its top latents matched one-to-one in each variant over the revisions they share

def revision_variants(revisions, scanned) -> list[tuple[str, list]]:
    """(name, revisions) of each variant: each inner revision dropped; each scanned neighbour of a revision
    (the scanned revision just before or after it) added; the whole set shifted one scan step earlier and
    later, where the scan has room."""
    missing = [r for r in revisions if r not in scanned]
    if missing:
        raise UsageError(f"--revision-sets: revisions {missing} are not in the scan; scan them with cache_acts.py "
                         "--scan")
    idx = [scanned.index(r) for r in revisions]
    out = [(f"drop-{r}", [x for x in revisions if x != r]) for r in revisions[1:-1]]
    near = sorted({j for i in idx for j in (i - 1, i + 1) if 0 <= j < len(scanned) and scanned[j] not in revisions})
    out += [(f"add-{scanned[j]}", [scanned[i] for i in sorted(idx + [j])]) for j in near]
    for step, tag in ((-1, "earlier"), (1, "later")):
        if all(0 <= i + step < len(scanned) for i in idx):
            out.append((f"shift-{tag}", [scanned[i + step] for i in idx]))
    return out


def extra_cache(run_args, revisions, folder) -> Path | None:
    """The variants' revisions the run's cache lacks, cached once into folder/extra on the run's own tokens
    (the same text, blocks and split: their fingerprints must agree). None when there are none, or for a run
    trained from a live buffer (its variants then stream as it did)."""
    if not run_args.get("cache") or not revisions:
        return None
    base = open_cache(run_args["cache"]).meta
    extra = Path(make_cache(run_args["model"], run_args["layer"], list(revisions), folder / "extra", base["tokens"],
                            base["seq_len"], base["split"]["heldout_tokens"], base["text"],
                            run_args.get("device", "cpu"), base["dtype"], weights=base.get("weights", "hub")))
    meta = read_json(extra / "meta.json")
    if meta["fingerprint"] != base["fingerprint"] or meta["n_blocks"] != base["n_blocks"]:
        raise UsageError(f"{extra} was cached on other tokens than {run_args['cache']}; delete it")
    return extra


def cache_view(run_args, revisions, extra, folder) -> str | None:
    """A cache folder of `revisions` whose arrays are links into the run's cache and the extra one: what
    cache_acts.py would write for them (same tokens, per-revision scales), without caching any revision twice."""
    if not run_args.get("cache"):
        return None
    base = open_cache(run_args["cache"]).meta
    view = folder / f"cache-{'_'.join(revisions)}"
    if is_done(view):
        return str(view)
    view.mkdir(parents=True, exist_ok=True)
    src = {r: Path(run_args["cache"]) for r in base["revisions"]}
    scales = dict(base["scales"])
    if extra is not None:
        meta = read_json(extra / "meta.json")
        src |= {r: extra for r in meta["revisions"] if r not in src}
        scales |= {r: v for r, v in meta["scales"].items() if r not in base["scales"]}
    for name, target in [(f"{r}.bin", src[r] / f"{r}.bin") for r in revisions] + [
            ("tokens.npy", Path(run_args["cache"]) / "tokens.npy")]:
        (view / name).unlink(missing_ok=True)
        (view / name).symlink_to(target.resolve())
    write_json(view / "meta.json", dict(base, revisions=list(revisions), scales={r: scales[r] for r in revisions}))
    mark_done(view, revisions=list(revisions), linked_from=sorted({str(src[r]) for r in revisions}))
    return str(view)


def unit_decoders_over(folder, revisions) -> tuple[torch.Tensor, np.ndarray]:
    """Every latent's decoder over `revisions` (some of the run's), concatenated in the normalised space, unit
    norm [F, |revisions|·d], and its decoder norms over them [F, |revisions|]."""
    cc = CrossCoder.load(folder)
    idx = [cc.extra["revisions"].index(r) for r in revisions]
    dec = cc.decoder().detach()[:, idx]
    return torch.nn.functional.normalize(dec.flatten(1), dim=1), cc.decoder_norms().detach()[:, idx].numpy()


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
        dec_a, norm_a = unit_decoders_over(base, shared)
        dec_v, norm_v = unit_decoders_over(folder, list(vrevs) if shift else shared)
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
    lo, hi = _interval(null_all)
    return dict(variants=out, latents=latents, survive_all=float(all_top.mean()),
                survive_all_null=dict(mean=float(null_all.mean()), lo=lo, hi=hi),
                match_cos=MATCH_COS)


def revision_sets(base, name, run_args, arch, cwd, eval_args=()) -> dict:
    """--revision-sets: train the run's crosscoder (its arch, seed, size, data) again over every variant of its
    revisions (revision_variants; the scan gives the neighbours), evaluate each, and match the run's top latents
    into each (survival). The variants are RUN/stability/revision-sets/<variant>/."""
    t0 = time.time()
    task = read_json(base / "relie" / name / "summary.json")["task"]
    scan = Path(cwd) / defaults.scan_path(lm.resolve(run_args["model"]).key, run_args["layer"], task)
    if not scan.exists():
        raise UsageError(f"--revision-sets needs the scan of the run's model, {scan}: python cache_acts.py --scan "
                         f"--model {run_args['model']} --layer {run_args['layer']}")
    scanned = pd.read_csv(scan).revision.tolist()
    variants = revision_variants(run_args["revisions"], scanned)
    folder = base / "stability" / "revision-sets"
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


def revision_sets_table(rs) -> str:
    lines = [f"{'variant':<16} {'revisions':<38} {'matched':>8} {'null':>14} {'survive':>8} {'null':>14}"]
    for v in rs["variants"]:
        lines.append(f"{v['name']:<16} {','.join(v['revisions']):<38} {v['matched']:8.2f} "
                     f"{_span(v['matched_null']):>14} {v['survives']:8.2f} {_span(v['survives_null']):>14}")
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


def revision_sets_markdown(rs, command, seconds=None) -> str:
    rows = "\n".join(f"| {v['name']} | {', '.join(v['revisions'])} | {v['matched']:.2f} | {_span(v['matched_null'])} | "
                     f"{v['survives']:.2f} | {_span(v['survives_null'])} |" for v in rs["variants"])
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
            f"({NULL_DRAWS} draws: [2.5%, 97.5%])." + _took(seconds) + "\n\n| variant | revisions | top matched | "
            f"null | top survive | null |\n|---|---|---|---|---|---|\n{rows}\n\n"
            f"Top latents that survive every variant: **{rs['survive_all']:.2f}**; random active latents: "
            f"{n['mean']:.2f} [{n['lo']:.2f}, {n['hi']:.2f}].\n\n| latent | class | formed_at | "
            + " | ".join(names) + " |\n|" + "---|" * (3 + len(names)) + f"\n{lat}")


if __name__ == "__main__":
    run_main(main)
