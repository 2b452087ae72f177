"""ablate.py — does removing the latents relie.py found break the task, and where?

    python relie.py  --run runs/toy-L0-step64_step128_step512-l1
    python ablate.py --run runs/toy-L0-step64_step128_step512-l1
    python ablate.py --run runs/toy-L0-step64_step128_step512-l1 --subtasks across_pp,across_rc   # attractors only

Latents are zeroed in crosscoder space with the error term kept, spliced into each revision, on the
pairs relie.py held out (its split.csv: none of them was used to attribute or select the latents):
- per revision m, its top-k latents by IE (relie's ie.csv, over --subtasks) all together, against
  --draws sets of k random latents of matched activation frequency (on the task's tokens), drawn
  outside every revision's top-k set; and the joint ablation's Δ against the summed IE of its set
  (the prediction the attribution makes) — the test the attribution is not computed from;
- every latent of the union of those top-k sets alone.
Per revision: Δ = mean logit difference (correct − wrong; = log p_correct − log p_wrong) clean minus
ablated, and the accuracy drop. Per pair of revisions (A, B), over the union of A's and B's top-k
latents, the consistency check (the paper's Table 7): Spearman ρ of |Δ_B|/|Δ_A| of single-latent
ablations with the 2-way RelIE, the normalised RelIE and RelDec — AtP approximates exactly this
ablation, so run it with relie.py --method ig too to see it as the paper did.

Writes runs/<name>/ablation/<task>/: ablation.csv (every ablation × revision × sub-task), joint.csv,
consistency.csv (and ratios.csv, the per-latent values its ρ are computed from), then DONE; and prints the
summaries.
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from crosscoding import analysis, cli, defaults, lm, measures, tasks
from crosscoding.common import (
    UsageError,
    atomic_path,
    mark_done,
    positive,
    read_json,
    require_done,
    run_main,
    unmark_done,
)


def selection_ie(relie_dir, revisions, subtasks):
    """Mean IE per pair over the chosen sub-tasks from relie's tables, and its normalised form
    (measures.normalise, as relie.py computes it): two [latent × revision] frames."""
    ie = pd.read_csv(relie_dir / "ie.csv")
    err = pd.read_csv(relie_dir / "error.csv")
    if subtasks:
        missing = set(subtasks) - set(ie.subtask) - set(err.subtask)
        if missing:
            raise UsageError(f"--subtasks {sorted(missing)} not in this task; valid: {sorted(set(err.subtask))}")
        ie, err = ie[ie.subtask.isin(subtasks)], err[err.subtask.isin(subtasks)]
    n = err.groupby("subtask").n_pairs.first()
    ie = ie.assign(w=ie.subtask.map(n) * ie.ie)
    tot = n.sum()
    wide = ie.pivot_table(index="latent", columns="revision", values="w", aggfunc="sum", fill_value=0.0) / tot
    wide = wide.reindex(columns=revisions, fill_value=0.0)
    return wide, pd.DataFrame(measures.normalise(wide.to_numpy().T).T, index=wide.index, columns=wide.columns)


def top_sets(ie_wide, k, how):
    """Per revision, its top-k latents by IE (positive) or |IE| (abs)."""
    out = {}
    for r in ie_wide.columns:
        score = ie_wide[r] if how == "positive" else ie_wide[r].abs()
        score = score[score > 0].sort_values(ascending=False, kind="stable")
        out[r] = [int(i) for i in score.index[:k]]
    return out


def task_codes(run, models, batch, pair_batch):
    """Every pair batch's block-L outputs, codes and errors (kept on the CPU, moved to the device one batch
    at a time), and each latent's activation frequency on the task's spliced tokens."""
    codes, fired, n_tok = [], torch.zeros(run.cc.cfg.dict_size), 0
    for i in range(0, len(batch), pair_batch):
        b = batch.slice(i, i + pair_batch).to(run.device)
        x, f, r = analysis.pair_codes(run, models, b)
        where = analysis.splice_mask(b.mask_BT)
        fired += (f[where] > 0).sum(0).cpu()
        n_tok += int(where.sum())
        codes.append((b.to("cpu"), x.cpu(), f.cpu(), r.cpu()))
    return codes, (fired / max(n_tok, 1)).numpy()


def ablated(run, models, codes, sets, n_pairs):
    """Logit difference (correct − wrong) per revision, pair and set of ablated latents: [M, P, C = len(sets)]."""
    ld_MPC = torch.zeros(len(models), n_pairs, len(sets))
    for m, (_, model, _) in enumerate(tqdm(models, desc="ablate", unit="rev")):
        row = 0
        for b, x, f, r in codes:
            b, x, f, r = b.to(run.device), x.to(run.device), f.to(run.device), r.to(run.device)
            ld_MPC[m, row:row + len(b)] = analysis.ablated_logit_diffs(run, model, m, b, x[:, :, m], f, r[:, :, m],
                                                                       sets).cpu()
            row += len(b)
    return ld_MPC


def parse_args(argv=None):
    run_dir, spec = cli.run_in(argv)
    p = cli.parser(__doc__.split("\n\n")[0], spec.preset)
    cli.add(p, "--run", "--task", "--top-k", "--max-pairs", "--pair-batch", "--device",
            run=str(run_dir), task=spec.task, top_k=defaults.TOP_K, pair_batch=64, device=defaults.default_device())
    summary = (run_dir / "relie" / (cli.given(argv, "--name") or Path(cli.given(argv, "--task") or spec.task).stem)
               / "summary.json")
    cli.add(p, "--select", select=json.loads(summary.read_text())["select"] if summary.exists() else defaults.SELECT)
    p.add_argument("--subtasks", default=None, help="comma-separated sub-tasks to select on and score (default: all)")
    p.add_argument("--draws", type=positive("--draws"), default=defaults.DRAWS,
                   help="random-k sets per revision (default: %(default)s)")
    p.add_argument("--draw-seed", type=int, default=0, help="seed of the random-k draws (default: %(default)s)")
    cli.add(p, "--name", name=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = analysis.open_run(args.run, args.device)
    task = args.task if cli.given(argv, "--task") else lm.default_task(run.spec, run.data.get("weights", "hub"))
    name = args.name or Path(task).stem
    relie_dir = run.folder / "relie" / name
    require_done(relie_dir, f"attribution of task {task}",
                 f"run `python relie.py --run {run.folder} --task {task}` first")
    how = args.select
    subtasks = args.subtasks.split(",") if args.subtasks else None
    ie_wide, nie_wide = selection_ie(relie_dir, run.revisions, subtasks)
    sets = top_sets(ie_wide, args.top_k, how)
    union = list(dict.fromkeys(i for r in run.revisions for i in sets[r]))
    if not union:
        raise UsageError(f"no latent has a {'positive' if how == 'positive' else 'non-zero'} IE on {subtasks or task}")
    for r in run.revisions:
        if len(sets[r]) < args.top_k:
            print(f"note: revision {r} has only {len(sets[r])} latents with a {how} IE; --top-k capped there")

    models = run.load_models()
    batch, rows = test_pairs(relie_dir, task, models[0][2], args.max_pairs, subtasks)
    codes, freq = task_codes(run, models, batch, args.pair_batch)
    rng = np.random.default_rng(args.draw_seed)
    ablations = [("clean", "-", -1, [])]
    for r in run.revisions:
        ablations.append(("top", r, -1, sets[r]))
        ablations += [("random", r, d, measures.matched_random(freq, sets[r], rng, set(union)))
                      for d in range(args.draws)]
    ablations += [("single", "-", -1, [i]) for i in union]
    ld_MPC = ablated(run, models, codes, [a[3] for a in ablations], len(batch))
    df = ablation_table(run.revisions, ablations, ld_MPC, batch.subtask)
    ratios = []
    sp = consistency_table(run, ablations, ld_MPC, union, sets, ie_wide, nie_wide, per_latent=ratios)
    joint = joint_table(run.revisions, ablations, ld_MPC, ie_wide)
    out = run.folder / "ablation" / name
    unmark_done(out)
    for name, frame in (("ablation.csv", df), ("consistency.csv", sp), ("joint.csv", joint),
                        ("ratios.csv", pd.DataFrame(ratios))):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False)
    split = read_json(relie_dir / "summary.json", "attribution summary").get("split", {})
    mark_done(out, task=task, select=how, subtasks=subtasks, top_k=args.top_k, draws=args.draws,
              test_rows=[int(i) for i in rows], in_sample=bool(split.get("in_sample")))
    print_summary(run.revisions, df, sp, joint, subtasks, args.draws, len(batch), bool(split.get("in_sample")))
    print(f"wrote {out}/")


def test_pairs(relie_dir, task, tok, max_pairs, subtasks):
    """The pairs relie.py held out (its split.csv, side test — or both, for a run without a split),
    checked against the task as it tokenizes now; optionally only some sub-tasks. Returns them and their rows."""
    split = pd.read_csv(relie_dir / "split.csv")
    made_with = read_json(relie_dir / "summary.json", "attribution summary")["split"]["max_pairs"]
    if max_pairs is not None and max_pairs != made_with:
        raise UsageError(f"--max-pairs {max_pairs}: relie.py split this task with --max-pairs {made_with}; "
                         "give the same (or leave it out)")
    batch = tasks.tokenize_pairs(tasks.limit_pairs(tasks.load_task(task), made_with), tok, task)
    if len(batch) != len(split) or [p.prefix for p in batch.pairs] != split.prefix.fillna("").tolist():
        raise UsageError(f"{task} is not the pair set relie.py split ({relie_dir}/split.csv); run relie.py again")
    rows = [int(r) for r, side, s in zip(split.row, split.side, split.subtask)
            if side in ("test", "both") and (not subtasks or s in subtasks)]
    if not rows:
        raise UsageError(f"no held-out pair of {subtasks or task} in {relie_dir}/split.csv")
    return batch.take(rows), rows


def ablation_table(revisions, ablations, ld_MPC, subtask_P) -> pd.DataFrame:
    """One row per ablation × revision × sub-task (and "all"): Δ and the accuracy drop, each with its 95%
    bootstrap interval over the pairs."""
    rows = []
    groups = {"all": list(range(len(subtask_P)))}
    for s in dict.fromkeys(subtask_P):
        groups[s] = [i for i, t in enumerate(subtask_P) if t == s]
    ld = ld_MPC.numpy()
    for g, idx in groups.items():
        clean_MPC = ld[:, idx, :1]
        delta_PMC = (clean_MPC - ld[:, idx]).transpose(1, 0, 2)
        drop_PMC = ((clean_MPC > 0).astype(float) - (ld[:, idx] > 0)).transpose(1, 0, 2)
        delta, d_lo, d_hi = measures.mean_interval(delta_PMC)
        drop, a_lo, a_hi = measures.mean_interval(drop_PMC)
        acc_clean = (ld[:, idx, 0] > 0).mean(1)
        for a_i, (kind, sel_rev, draw, lat) in enumerate(ablations):
            for m, rev in enumerate(revisions):
                rows.append(dict(kind=kind, selected_at=sel_rev, draw=draw, latents=" ".join(map(str, lat)),
                                 revision=rev, subtask=g, delta=delta[m, a_i], delta_lo=d_lo[m, a_i],
                                 delta_hi=d_hi[m, a_i], acc_clean=acc_clean[m],
                                 acc_ablated=acc_clean[m] - drop[m, a_i], acc_drop=drop[m, a_i],
                                 acc_drop_lo=a_lo[m, a_i], acc_drop_hi=a_hi[m, a_i]))
    order = {k: i for i, k in enumerate(groups)}
    df = pd.DataFrame(rows)
    return df.sort_values(by="subtask", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


def consistency_table(run, ablations, ld_MPC, union, sets, ie_wide, nie_wide, per_latent=None) -> pd.DataFrame:
    """The consistency check of the attribution against single-latent ablation (the paper's Table 7 test):
    Spearman ρ of |Δ_B| / |Δ_A| (single-latent ablations, on the test pairs) with 2-way RelIE / normalised
    RelIE / RelDec (from the selection pairs), per pair of revisions over the union of their top-k sets.
    AtP is the first-order approximation of exactly this ablation, and with --method exact on the same
    pairs the RelIE ρ is 1 by construction: it checks the attribution, not the model (joint_table does).
    Each ρ with its 95% bootstrap interval over
    the pairs (the Δ resampled; the RelIE and RelDec values held), and ρ(RelIE) − ρ(RelDec) with the
    interval of that difference from the same resamples. per_latent (a list), when given, receives one row
    per pair of revisions and latent with the values each ρ is computed from (ratios.csv, which
    controls.py's permutation null reads)."""
    revs = run.revisions
    col = {lat[0]: c for c, (kind, _, _, lat) in enumerate(ablations) if kind == "single"}
    cols = [col[i] for i in union]
    single_PMU = (ld_MPC[:, :, :1] - ld_MPC[:, :, cols]).numpy().transpose(1, 0, 2)   # per pair Δ, [P, M, U]
    delta_MU = single_PMU.mean(0)
    boot_nMU = measures.bootstrap_means(single_PMU)
    rd = analysis.reldec(run.cc)[union]
    ie_u, nie_u = ie_wide.reindex(union, fill_value=0.0).to_numpy(), nie_wide.reindex(union, fill_value=0.0).to_numpy()
    rows = []
    for a, b in measures.pairs_of(revs):
        keep = [j for j, i in enumerate(union) if i in sets[revs[a]] or i in sets[revs[b]]]

        def ratio(d_MU, a=a, b=b, keep=keep):   # [M, U] or [n, M, U] → [..., K]
            return np.abs(d_MU[..., b, keep]) / np.maximum(np.abs(d_MU[..., a, keep]), 1e-12)
        refs = dict(relie=measures.rel2(ie_u[keep, a], ie_u[keep, b]),
                    relie_norm=measures.rel2(nie_u[keep, a], nie_u[keep, b]),
                    reldec=measures.rel2(rd[keep, a], rd[keep, b]))
        row = dict(A=revs[a], B=revs[b], n=len(keep))
        if per_latent is not None:
            per_latent += [dict(A=revs[a], B=revs[b], latent=union[j], ratio=v, **{n: r[q] for n, r in refs.items()})
                           for q, (j, v) in enumerate(zip(keep, ratio(delta_MU)))]
        boot = {}
        for name, ref in refs.items():
            row[f"rho_{name}"] = measures.spearman(ratio(delta_MU), ref)
            boot[name] = measures.spearman_rows(ratio(boot_nMU), ref)
            row[f"rho_{name}_lo"], row[f"rho_{name}_hi"] = measures.interval(boot[name])
        row["rho_diff"] = row["rho_relie"] - row["rho_reldec"]
        row["rho_diff_lo"], row["rho_diff_hi"] = measures.interval(boot["relie"] - boot["reldec"])
        rows.append(row)
    return pd.DataFrame(rows)


def joint_table(revisions, ablations, ld_MPC, ie_wide) -> pd.DataFrame:
    """The test the attribution is not computed from: each revision's top-k set ablated together, its Δ
    per revision predicted by the summed IE of the set (selection pairs) against the measured Δ (test
    pairs, with its 95% bootstrap interval over them) and against the sum of the set's single-latent Δ
    (how far the model is from additive on this set)."""
    ld = ld_MPC.numpy()
    clean_MP1 = ld[:, :, :1]
    single = {lat[0]: c for c, (kind, _, _, lat) in enumerate(ablations) if kind == "single"}
    rows = []
    for c, (kind, sel_rev, _, lat) in enumerate(ablations):
        if kind != "top" or not lat:
            continue
        delta_PM = (clean_MP1[:, :, 0] - ld[:, :, c]).T
        mean, lo, hi = measures.mean_interval(delta_PM)
        singles_M = sum((clean_MP1[:, :, 0] - ld[:, :, single[i]]).mean(1) for i in lat)
        for m, r in enumerate(revisions):
            rows.append(dict(selected_at=sel_rev, revision=r, k=len(lat),
                             predicted=float(ie_wide.reindex(lat, fill_value=0.0)[r].sum()),
                             measured=mean[m], measured_lo=lo[m], measured_hi=hi[m], single_sum=float(singles_M[m])))
    return pd.DataFrame(rows)


def print_summary(revisions, df, sp, joint, subtasks, draws, n_pairs, in_sample):
    focus = df[df.subtask == "all"]
    top = focus[focus.kind == "top"].pivot_table(index="selected_at", columns="revision", values="acc_drop")
    rnd = focus[focus.kind == "random"].pivot_table(index="selected_at", columns="revision", values="acc_drop")
    where = ("ALL pairs, the ones the latents were selected on (relie.py --test-frac 0): in-sample" if in_sample
             else f"{n_pairs} held-out test pairs, none of which the latents were selected on")
    print(f"accuracy drop (points) on {', '.join(subtasks) if subtasks else 'all sub-tasks'}, {where}; rows: the "
          "revision whose top-k set is ablated, columns: the revision it is spliced into")
    print("top-k:\n" + (100 * top.reindex(index=revisions, columns=revisions)).round(1).to_string())
    print(f"random-k (mean of {draws}, matched frequency):\n"
          + (100 * rnd.reindex(index=revisions, columns=revisions)).round(1).to_string())
    print("joint ablation of each top-k set: Δ (logit difference, clean − ablated) predicted by the summed IE vs "
          "measured, and the sum of its single-latent Δ:\n"
          + joint.round(3).to_string(index=False))
    show = sp[["A", "B", "n", "rho_relie", "rho_relie_lo", "rho_relie_hi", "rho_reldec", "rho_reldec_lo",
               "rho_reldec_hi", "rho_diff", "rho_diff_lo", "rho_diff_hi"]]
    print("consistency check — Spearman ρ of |Δ_B|/|Δ_A| (single-latent ablations) with RelIE and RelDec; AtP "
          "linearises exactly this ablation, so with AtP it checks the attribution more than the model:\n"
          + show.round(2).to_string(index=False))
    print(f"intervals: {100 * measures.BOOTSTRAP_LEVEL:.0f}% bootstrap over the test pairs ({measures.BOOTSTRAP_N} "
          "resamples); the spread over crosscoder and LM seeds is seeds.py's, and is often wider")


if __name__ == "__main__":
    run_main(main)
