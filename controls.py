"""controls.py — can each headline check fail? Run it where what it credits is removed (a negative control),
with reconstruction kept, and give each check its verdict: holds, fails, or uninformative (its control holds too).

    python controls.py                                # the toy's default run (~6 minutes on 2 quiet cores)
    python controls.py --run runs/<name> --results    # ... and its RESULTS.md section

Each control is the run's crosscoder trained again (same arch, size, tokens, seeds) with one thing removed:
- shuffled-revisions: each token's M activations in a random order every step (`train.py --control`): no
  revision's label means anything to the crosscoder;
- untrained-lm: the same architecture with random weights (`train.py --weights random`; a run trained from a
  cache gets the untrained LMs cached on its tokens): no learned features;
- fixed-decoder: the decoder fixed at its random initialisation, the encoder trained against it
  (`train.py --control fixed-decoder`): no learned directions.
Every check then runs on every control through the normal stages (evaluate.py, relie.py, ablate.py with the
run's settings, on the same held-out test pairs), each control with its own top-k (a selection-matched null),
its FVU and L0 printed beside the run's. A check's verdict is the run's own (crosscoding/verdicts.py), turned
uninformative when a control that removes what the check credits holds too.

Writes RUN/stability/controls.json and the control runs RUN/stability/controls/<control>-seed<s>/; a finished
stage is kept, so a killed command resumes.
"""
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from crosscoding import cli, defaults, measures, verdicts
from crosscoding.activations import make_cache, open_cache
from crosscoding.analysis import METHODS
from crosscoding.common import read_json, run_main, update_results, write_json
from crosscoding.findings import num
from crosscoding.matching import NULL_DRAWS, active_latents, match_with_null, null_interval, random_like
from crosscoding.stages import ROOT, attribution_stages, relie_settings, run_args_of, seed_run, took

# control → (what it removes, what it changes of the run's RunConfig)
CONTROLS = {
    "shuffled-revisions": ("revision-specific structure", dict(control="shuffled-revisions")),
    "untrained-lm": ("learned features (the LMs untrained)", dict(weights="random", cache=None)),
    "fixed-decoder": ("learned directions (a fixed random decoder)", dict(control="fixed-decoder")),
}
# check → the controls that remove what it credits (a check that holds on one of them is uninformative)
CHECKS = {
    "top-k vs random-k": ("untrained-lm", "fixed-decoder"),
    "joint ablation": ("untrained-lm", "fixed-decoder"),
    "consistency ρ beyond membership": ("shuffled-revisions",),
    "seed matching": ("untrained-lm", "fixed-decoder"),
    "revision-specific top latents": ("shuffled-revisions",),
}
RECONSTRUCTION_FACTOR = 2.0   # a control keeps reconstruction when its FVU and L0 are within this factor of the run's


# ---------------------------------------------------------------------------------------------
# Each check on one crosscoder: (value, verdict, what the value is)

def check_topk(folder, name, revisions):
    """The last revision's top-k set against random-k sets there (ablate.py's verdict)."""
    v = pd.read_csv(folder / "ablation" / name / "verdicts.csv").set_index("revision").loc[revisions[-1]]
    return (float(v.excess_points), v.verdict, f"excess accuracy drop at {revisions[-1]} (points), Δ "
            f"{v.excess_delta:+.3f} [{v.excess_delta_lo:+.3f}, {v.excess_delta_hi:+.3f}]"
            + (f", accuracy at {v.flag}" if isinstance(v.flag, str) and v.flag else ""))


def check_joint(folder, name, revisions):
    """The last revision's top-k set ablated together against its summed IE (ablate.py's verdict)."""
    j = pd.read_csv(folder / "ablation" / name / "joint.csv")
    j = j[(j.selected_at == revisions[-1]) & (j.revision == revisions[-1])].iloc[0]
    ratio = j.measured / j.predicted if j.predicted else float("nan")
    return float(ratio), j.verdict, f"measured / predicted Δ at {revisions[-1]} ({j.measured:.3f} / {j.predicted:.3f})"


def check_consistency(folder, name, revisions):
    """ρ(RelIE) − ρ(set membership) of the single-ablation ratios, mean over pairs of revisions; holds when every
    pair's interval lies above 0."""
    sp = pd.read_csv(folder / "ablation" / name / "consistency.csv")
    ok = bool((sp.verdict == verdicts.HOLDS).all()) and len(sp) > 0
    return (float(sp.rho_diff_membership.mean()), verdicts.HOLDS if ok else verdicts.FAILS,
            f"ρ(RelIE) − ρ(membership), mean over {len(sp)} pairs of revisions (ρ(RelIE) {sp.rho_relie.mean():.2f})")


def check_matching(folder, name, other):
    """The top latents' one-to-one match rate in a second seed's crosscoder against random active latents of
    matched frequency."""
    chosen = read_json(folder / "relie" / name / "summary.json")["chosen"]
    top, null = match_with_null(folder, chosen, other)
    lo, hi = null_interval(null)
    return (top, verdicts.above(top - hi, "the match rate minus its null's 97.5% point")[0],
            f"top latents matched in seed {read_json(other / 'run_args.json')['seed']} (null [{lo:.2f}, {hi:.2f}])")


def check_specific(folder, name, draws=NULL_DRAWS, seed=0):
    """The share of top latents whose decoder norms make them specific to one revision (RelDec class), against
    the same share for random active latents of matched frequency."""
    chosen = read_json(folder / "relie" / name / "summary.json")["chosen"]
    lat = pd.read_csv(folder / "latents.csv").set_index("latent")
    specific = lat.reldec_class.astype(str).str.startswith("specific").to_numpy()
    share = float(specific[chosen].mean())
    rng = np.random.default_rng(seed)
    null = [float(specific[r].mean()) for r in random_like(active_latents(folder)[1], chosen, rng, draws)]
    lo, hi = null_interval(null)
    return (share, verdicts.above(share - hi, "the share minus its null's 97.5% point")[0],
            f"top latents specific to one revision by RelDec (null [{lo:.2f}, {hi:.2f}])")


def reconstruction(folder, revisions) -> dict:
    ev = read_json(folder / "eval.json", "evaluation")
    return dict(fvu=[ev["revisions"][r]["fvu"] for r in revisions], l0=ev["l0"], dead=ev["dead_frac"])


def checks_of(folder, other, name, revisions) -> dict:
    """Every headline check on one crosscoder (folder) and its second seed (other, for matching)."""
    return {"top-k vs random-k": check_topk(folder, name, revisions),
            "joint ablation": check_joint(folder, name, revisions),
            "consistency ρ beyond membership": check_consistency(folder, name, revisions),
            "seed matching": check_matching(folder, name, other),
            "revision-specific top latents": check_specific(folder, name)}


# ---------------------------------------------------------------------------------------------

def untrained_cache(run_args, folder) -> str:
    """The run's cache made again from untrained LMs (the same revisions' names, random weights): the same text,
    token count, blocks, split and dtype, so the control trains on what the run trained on, through other LMs."""
    base = open_cache(run_args["cache"]).meta
    return str(make_cache(run_args["model"], run_args["layer"], run_args["revisions"], folder, base["tokens"],
                          base["seq_len"], base["split"]["heldout_tokens"], base["text"], run_args.get("device", "cpu"),
                          base["dtype"], weights="random"))


def controls(base, name, run_args, cwd, other_seed) -> dict:
    """Train, evaluate, attribute and ablate every control (two seeds each, for matching) with the run's settings;
    every check on the run and on each control; the verdicts."""
    st = relie_settings(base, name)
    revs, arch, device = run_args["revisions"], run_args["arch"], run_args.get("device", "cpu")
    real_other = base / "stability" / f"{arch}-seed{other_seed}"
    seed_run(real_other, run_args, arch, other_seed, [], st["task"], st["select"], st["threshold"], cwd)
    runs = {"run": (base, real_other)}
    for c, (_, change) in CONTROLS.items():
        if change.get("weights") == "random" and run_args.get("cache"):
            # a run trained from a cache: the untrained LMs cached on the same tokens, trained on as the run was
            cache = untrained_cache(run_args, base / "stability" / "controls" / "untrained-lm-cache")
            change = dict(change, cache=cache)
        print(f"   control {c}: train (seeds {run_args['seed']}, {other_seed}), evaluate, relie, ablate",
              file=sys.stderr, flush=True)
        folders = []
        for seed in (run_args["seed"], other_seed):
            folder = base / "stability" / "controls" / f"{c}-seed{seed}"
            folders.append(seed_run(folder, dict(run_args, **change), arch, seed, [], st["task"], st["select"],
                                    st["threshold"], cwd))
        attribution_stages(folders[0], name, st, device, cwd)
        runs[c] = tuple(folders)
    values = {k: checks_of(a, b, name, revs) for k, (a, b) in runs.items()}
    rec = {k: reconstruction(a, revs) for k, (a, _) in runs.items()}
    real = rec["run"]
    for c in CONTROLS:
        r = rec[c]
        r["matched"] = bool(all(1 / RECONSTRUCTION_FACTOR <= f / g <= RECONSTRUCTION_FACTOR
                                for f, g in zip(r["fvu"], real["fvu"]))
                            and 1 / RECONSTRUCTION_FACTOR <= r["l0"] / real["l0"] <= RECONSTRUCTION_FACTOR)
    rows = []
    for check, designated in CHECKS.items():
        value, own, about = values["run"][check]
        final = own
        for c in designated:
            final = verdicts.with_control(final, values[c][check][1])
        rows.append(dict(check=check, about=about, real=value, real_verdict=own, verdict=final,
                         uninformative_by=[c for c in designated if own == verdicts.HOLDS
                                           and values[c][check][1] == verdicts.HOLDS],
                         controls={c: dict(value=values[c][check][0], verdict=values[c][check][1],
                                           about=values[c][check][2], designated=c in designated)
                                   for c in CONTROLS}))
    return dict(attribution=name, rows=rows, reconstruction=rec, controls={c: d for c, (d, _) in CONTROLS.items()},
                folders={k: [str(a), str(b)] for k, (a, b) in runs.items()},
                factor=RECONSTRUCTION_FACTOR, rules=dict(
                    top_k=verdicts.TOPK_RULE, joint=verdicts.JOINT_RULE,
                    control="a check that holds where a control removed what it credits is uninformative"),
                note=("every ablation on the held-out test pairs of relie.py's split; each control's top-k is its own "
                      "(selected on the same selection pairs); intervals over the test pairs' "
                      + measures.BOOTSTRAP_OVER))


def controls_table(ctl) -> str:
    names = list(ctl["controls"])
    rec = ctl["reconstruction"]
    lines = ["reconstruction (FVU per revision, L0, dead) — a control must keep it to fail for the right reason:",
             f"  {'run':<20} FVU {'/'.join(f'{v:.3f}' for v in rec['run']['fvu'])}, L0 {rec['run']['l0']:.1f}, "
             f"dead {rec['run']['dead']:.2f}"]
    for c in names:
        r = rec[c]
        lines.append(f"  {c:<20} FVU {'/'.join(f'{v:.3f}' for v in r['fvu'])}, L0 {r['l0']:.1f}, dead {r['dead']:.2f}"
                     f" — {'within' if r['matched'] else 'NOT within'} {ctl['factor']:g}× of the run's")
    lines.append(f"\n{'check':<32} {'run':>16}   " + "   ".join(f"{c:>22}" for c in names) + "   verdict")
    for r in ctl["rows"]:
        cells = []
        for c in names:
            v = r["controls"][c]
            cells.append(f"{num(v['value']):>9} {v['verdict']:<8}{'*' if v['designated'] else ' '}   ")
        lines.append(f"{r['check']:<32} {num(r['real']):>7} {r['real_verdict']:<8}   " + " ".join(
            f"{x:>22}" for x in cells) + f"   {r['verdict'].upper()}"
            + (f" (its control {', '.join(r['uninformative_by'])} holds too)" if r["uninformative_by"] else ""))
        lines.append(f"{'':<32}   {r['about']}")
    lines.append("* a control that removes what the check credits: the check is uninformative when it holds there too")
    return "\n".join(lines)


def controls_markdown(ctl, command, seconds=None) -> str:
    names = list(ctl["controls"])
    rec = ctl["reconstruction"]
    recon = "\n".join(f"| {k} | {' / '.join(f'{v:.3f}' for v in rec[k]['fvu'])} | {rec[k]['l0']:.1f} | "
                      f"{rec[k]['dead']:.2f} | {'—' if k == 'run' else ('yes' if rec[k]['matched'] else '**no**')} |"
                      for k in ["run"] + names)
    rows = "\n".join(
        f"| {r['check']} | {num(r['real'])} {r['real_verdict']} | "
        + " | ".join(f"{num(r['controls'][c]['value'])} {r['controls'][c]['verdict']}"
                     + ("*" if r["controls"][c]["designated"] else "") for c in names)
        + f" | **{r['verdict']}** | {r['about']} |" for r in ctl["rows"])
    return (f"## Negative controls (`{command}`)\n\nThe run's crosscoder trained again with one thing removed — "
            + "; ".join(f"{c}: {d}" for c, d in ctl["controls"].items())
            + f" — and every headline check run on each through the normal stages (attribution `{ctl['attribution']}`"
            f", each control with its own top-k and its own null, ablations on the held-out test pairs; the null shown "
            f"is the run's). A check holds by its own rule "
            f"(crosscoding/verdicts.py) and is uninformative when a control marked * (one that removes what the check "
            f"credits) holds too. A control keeps reconstruction when its FVU and L0 are within {ctl['factor']:g}× of "
            "the run's; one that does not may fail a check for the wrong reason (it breaks more than the check "
            "credits), so its `fails` weighs less: a fixed random decoder, for one, cannot reconstruct at the run's "
            "sparsity."
            + took(seconds) + "\n\n| crosscoder | FVU per revision | L0 | dead | reconstruction kept |\n"
            f"|---|---|---|---|---|\n{recon}\n\n| check | run | " + " | ".join(names) + " | verdict | value |\n|"
            + "---|" * (4 + len(names)) + f"\n{rows}")


def parse_args(argv=None):
    run_dir, spec = cli.run_in(argv)
    p = cli.parser(__doc__.split("\n\n")[0], spec.preset)
    cli.add(p, "--run", "--task", "--select", "--threshold", "--results", run=str(run_dir), task=spec.task,
            select=defaults.SELECT, threshold=spec.preset.ie_threshold)
    p.add_argument("--method", choices=list(METHODS), default=defaults.METHOD,
                   help="the attribution whose checks are controlled (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    base, run_args = run_args_of(args.run)
    name = f"{Path(args.task).stem}-{args.method}-{args.select}"
    other_seed = 1 if run_args["seed"] != 1 else 0
    print("the run: evaluate, relie, ablate", file=sys.stderr, flush=True)
    seed_run(base, run_args, run_args["arch"], run_args["seed"], [args.method], args.task, args.select,
             args.threshold, Path.cwd(), own=True)
    ctl = controls(base, name, run_args, Path.cwd(), other_seed)
    write_json(base / "stability" / "controls.json", ctl)
    print("negative controls (" + ctl["note"] + "):\n" + controls_table(ctl))
    if args.results:
        command = cli.command("controls.py", argv)
        update_results(f"controls-{run_args['arch']}", controls_markdown(ctl, command, time.time() - t0),
                       ROOT / "FINDINGS.md")
    print(f"wrote {base / 'stability' / 'controls.json'}")


if __name__ == "__main__":
    run_main(main)
