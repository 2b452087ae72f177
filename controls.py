"""controls.py — can each headline check fail? Run it where its claim is false (a negative control) and
report the check, its real value, the control's value and the null, and a verdict.

    python controls.py                                # the toy's default run (~3 minutes on 2 cores)
    python controls.py --run runs/<name> --results    # ... and its RESULTS.md section

Each control is a run folder under RUN/stability/controls/ that the normal stages (relie.py, ablate.py,
train.py, evaluate.py) run on, on the same held-out test pairs; a finished stage is kept, so a killed command
resumes. Writes RUN/stability/controls.json and prints the table.
"""
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from crosscoding import cli, defaults, lm, measures
from crosscoding.analysis import METHODS
from crosscoding.common import (
    UsageError,
    atomic_path,
    is_done,
    mark_done,
    read_json,
    require_done,
    run_main,
    update_results,
    write_json,
)
from crosscoding.crosscoder import CrossCoder
from crosscoding.findings import num, span
from crosscoding.matching import match_with_null, null_interval
from crosscoding.stages import (
    ROOT,
    attribution_stages,
    cache_view,
    extra_cache,
    relie_settings,
    seed_run,
    stage,
    took,
    train_args,
)

CONTROL_GAP = 5.0        # points: a top-k vs random-k gap no larger than this has vanished
NULL_PERMUTATIONS = 2000  # permutations behind the ρ null's interval


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
    gap_null = f"0 (gone when ≤ {CONTROL_GAP:g}; random-k draws' own spread {span(real['gap_noise'])})"

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
    lo, hi = null_interval(null_ctl)
    rlo, rhi = null_interval(null_real)
    rows.append(control_row("ρ of the single-ablation ratio with RelIE (mean over pairs of revisions)",
                            "(b) revision labels shuffled per latent before RelIE", rho_real, rho_ctl,
                            f"permutation null {span([lo, hi])} (the real run's: {span([rlo, rhi])})", lo, hi,
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
                            fc["joint_measured"], f"random-k sets' Δ in the control {span([jlo, jhi])} (the real "
                            f"run's: {span([min(real['random_delta']), max(real['random_delta'])])})", jlo, jhi,
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
    lo, hi = null_interval(null_ctl)
    m_real, null_real = match_with_null(base, chosen, seed_folder) if seed_folder else (float("nan"), [])
    rlo, rhi = null_interval(null_real)
    rows.append(control_row("top-k latents matched one-to-one (decoder cosine ≥ 0.9) in a second crosscoder",
                            f"(d) the second crosscoder trained on {','.join(other)}", m_real, m_ctl,
                            f"random active latents of matched frequency {span([lo, hi])} (the real pair's: "
                            f"{span([rlo, rhi])})", lo, hi, lo <= m_ctl <= hi, m_real > rhi, folder=str(d),
                            real_pair=str(seed_folder) if seed_folder else None))
    return dict(attribution=name, rows=rows, gap_threshold=CONTROL_GAP, note=(
        "every value on the held-out test pairs of relie.py's split (the matching uses no pairs); the controls "
        "are transformations of the run folder run through the normal stages"))


def controls_table(ctl) -> str:
    lines = [f"{'check':<62} {'real':>7} {'control':>8}   control / null / verdict"]
    for r in ctl["rows"]:
        lines.append(f"{r['check']:<62} {num(r['real']):>7} {num(r['value']):>8}   {r['control']}\n"
                     f"{'':<80}null: {r['null']}\n{'':<80}{r['verdict']}"
                     + ("" if r["real_passes"] else "; the real value itself is within its null"))
    return "\n".join(lines)


def controls_markdown(ctl, command, seconds=None) -> str:
    rows = "\n".join(f"| {r['check']} | {num(r['real'])} | {r['control']} | {num(r['value'])} | {r['null']} | "
                     f"{'fails' if r['fails'] else '**uninformative**'}"
                     f"{'' if r['real_passes'] else '; real value within its null'} |" for r in ctl["rows"])
    return (f"## Negative controls (`{command}`)\n\nEach headline check run where its claim is false: a copy of "
            f"the run with its decoder broken or its revision labels shuffled, or a second crosscoder trained on "
            f"other revisions, through the normal stages; every value on the held-out test pairs "
            f"(attribution `{ctl['attribution']}`). A check whose control does not fail is uninformative, not a "
            f"finding. A gap has vanished when it is at most {CONTROL_GAP:g} points; ρ and the match rate must "
            f"fall inside their null's 95% interval; the joint Δ at or under the largest random-k set's."
            + took(seconds) + "\n\n"
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


def parse_args(argv=None):
    run_dir, spec = cli.run_in(argv)
    p = cli.parser(__doc__.split("\n\n")[0], spec.preset)
    cli.add(p, "--run", "--task", "--select", "--threshold", run=str(run_dir), task=spec.task, select=defaults.SELECT,
            threshold=spec.preset.ie_threshold)
    p.add_argument("--method", choices=list(METHODS), default=defaults.METHOD,
                   help="the attribution whose checks are controlled (default: %(default)s)")
    p.add_argument("--control-revisions", default=None, metavar="REVS",
                   help="revisions of the matching control's crosscoder (default: as many as the run has, the "
                        "earliest scanned ones it does not use)")
    p.add_argument("--results", action="store_true", help="write the table into RESULTS.md")
    return p.parse_args(argv)


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    base = Path(args.run)
    require_done(base, "training run", "train it with train.py first")
    run_args = read_json(base / "run_args.json", "run arguments")
    arch = run_args["arch"]
    name = f"{Path(args.task).stem}-{args.method}-{args.select}"
    other_seed = 1 if run_args["seed"] != 1 else 0
    print(f"the run and crosscoder seed {other_seed}: train, evaluate, relie, ablate", file=sys.stderr, flush=True)
    for seed, folder in ((run_args["seed"], base), (other_seed, base / "stability" / f"{arch}-seed{other_seed}")):
        seed_run(folder, run_args, arch, seed, [args.method], args.task, args.select, args.threshold, Path.cwd(),
                 own=folder == base)
    print("controls: permuted decoder, shuffled revision labels, random directions, other revisions",
          file=sys.stderr, flush=True)
    ctl = controls(base, name, run_args, arch, Path.cwd(), base / "stability" / f"{arch}-seed{other_seed}",
                   args.control_revisions)
    write_json(base / "stability" / "controls.json", ctl)
    print("negative controls (" + ctl["note"] + "):\n" + controls_table(ctl))
    if args.results:
        command = " ".join(["python controls.py"] + [a for a in (argv or sys.argv[1:]) if a != "--results"])
        update_results(f"controls-{arch}", controls_markdown(ctl, command, time.time() - t0), ROOT / "RESULTS.md")
    print(f"wrote {base / 'stability' / 'controls.json'}")


if __name__ == "__main__":
    run_main(main)
