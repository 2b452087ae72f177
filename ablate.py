"""ablate.py — does removing the latents relie.py found break the task, and where?

    python relie.py  --run runs/toy-L0-step64_step128_step512-l1
    python ablate.py --run runs/toy-L0-step64_step128_step512-l1
    python ablate.py --run runs/toy-L0-step64_step128_step512-l1 --subtasks across_pp,across_rc   # attractors only

Latents are zeroed in crosscoder space with the error term kept, spliced into each revision, on the
pairs relie.py held out (its split.csv: none of them was used to attribute or select the latents):
- per revision m, its top-k latents by IE (relie's ie.csv, over --subtasks) all together, against
  --draws sets of k random latents of matched activation frequency (measured on the selection pairs),
  drawn outside every revision's top-k set — with a verdict per revision (crosscoding/verdicts.py);
- each top-k set without each of its latents (which latents carry the set's effect), and how the sets overlap;
- each RelIE class of relie's latent sheet as a set, against random sets of its size;
- each top-k set's joint Δ against the summed IE of its set and the sum of its latents' exact single ablations
  (both from the selection pairs): the prediction the attribution makes, with a verdict;
- every latent of the union of the top-k sets alone.
Per revision: Δ = mean logit difference (correct − wrong; = log p_correct − log p_wrong) clean minus ablated,
and the accuracy drop; revisions at ceiling or near chance are flagged (there accuracy cannot show an effect
and Δ decides). Per pair of revisions (A, B), the consistency check (the paper's Table 7): Spearman ρ of
|Δ_B|/|Δ_A| of single-latent ablations with the 2-way RelIE, the normalised RelIE and RelDec, beside the ρ a
plain indicator of set membership (chosen at B only / both / A only) already reaches. Every interval is a 95%
bootstrap over the test pairs' groups of near-copies (each group drawn whole).

Writes runs/<name>/ablation/<task>/: ablation.csv (every ablation × revision × sub-task), verdicts.csv,
joint.csv, classes.csv, loo.csv, consistency.csv (and ratios.csv, the per-latent values its ρ are computed
from), summary.json, then DONE; and prints the summaries with their verdicts.
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from crosscoding import analysis, cli, defaults, lm, measures, tasks, verdicts
from crosscoding.common import (
    UsageError,
    atomic_path,
    mark_done,
    positive,
    read_json,
    require_done,
    run_main,
    unmark_done,
    write_json,
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


def class_sets(sheet, union) -> dict:
    """relie's RelIE classes (signed) as sets of latents, over the latents of the top-k sets."""
    keep = sheet[sheet.latent.isin(union)]
    return {c: [int(i) for i in g.latent] for c, g in keep.groupby("relie_class", sort=True)}


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
                   help="random-k sets per revision and per class (default: %(default)s)")
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
    relie_summary = read_json(relie_dir / "summary.json", "attribution summary")
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
    sheet = pd.read_csv(relie_dir / "latents.csv")
    classes = class_sets(sheet, union)

    models = run.load_models()
    batch, rows, groups, sel_batch = held_out_pairs(relie_dir, task, models[0][2], args.max_pairs, subtasks)
    # random sets are matched in activation frequency on the selection pairs: the test pairs decide nothing
    _, freq = task_codes(run, models, sel_batch, args.pair_batch)
    codes, _ = task_codes(run, models, batch, args.pair_batch)
    rng = np.random.default_rng(args.draw_seed)
    ablations = [("clean", "-", -1, [])]
    for r in run.revisions:
        ablations.append(("top", r, -1, sets[r]))
        ablations += [("random", r, d, measures.matched_random(freq, sets[r], rng, set(union)))
                      for d in range(args.draws)]
        ablations += [("without", r, i, [j for j in sets[r] if j != i]) for i in sets[r]]
    for c, lat in classes.items():
        ablations.append(("class", c, -1, lat))
        ablations += [("class_random", c, d, measures.matched_random(freq, lat, rng, set(union)))
                      for d in range(args.draws)]
    ablations += [("single", "-", -1, [i]) for i in union]
    ld_MPC = ablated(run, models, codes, [a[3] for a in ablations], len(batch))

    df = ablation_table(run.revisions, ablations, ld_MPC, batch.subtask, groups)
    verdict = verdict_table(run.revisions, ablations, ld_MPC, groups)
    joint = joint_table(run.revisions, ablations, ld_MPC, ie_wide, exact_sums(sheet, sets, run.revisions, subtasks),
                        groups)
    cls = class_table(run.revisions, ablations, ld_MPC, groups)
    loo = without_table(run.revisions, ablations, ld_MPC)
    ratios = []
    sp = consistency_table(run, ablations, ld_MPC, union, sets, ie_wide, nie_wide, groups, per_latent=ratios)
    overlap = {a: {b: len(set(sets[a]) & set(sets[b])) for b in run.revisions} for a in run.revisions}
    out = run.folder / "ablation" / name
    unmark_done(out)
    for fname, frame in (("ablation.csv", df), ("verdicts.csv", verdict), ("joint.csv", joint), ("classes.csv", cls),
                         ("loo.csv", loo), ("consistency.csv", sp), ("ratios.csv", pd.DataFrame(ratios))):
        with atomic_path(out / fname) as tmp:
            frame.to_csv(tmp, index=False)
    in_sample = bool(relie_summary.get("split", {}).get("in_sample"))
    write_json(out / "summary.json", dict(
        task=task, select=how, subtasks=subtasks, top_k=args.top_k, draws=args.draws, method=relie_summary["method"],
        ie_threshold=relie_summary["threshold"], n_test_pairs=len(batch), n_test_groups=len(set(groups)),
        in_sample=in_sample, sets=sets, overlap=overlap, classes=classes,
        verdicts=verdict.to_dict("records"), rules=dict(
            top_k=verdicts.TOPK_RULE, top_k_flagged=verdicts.TOPK_FLAGGED_RULE, joint=verdicts.JOINT_RULE,
            consistency=verdicts.above(0, "ρ(RelIE) − ρ(membership)")[1]),
        intervals=dict(level=measures.BOOTSTRAP_LEVEL, resamples=measures.BOOTSTRAP_N, seed=measures.BOOTSTRAP_SEED,
                       over="the test pairs' " + measures.BOOTSTRAP_OVER),
        random_sets="matched in activation frequency on the selection pairs, outside every top-k set"))
    mark_done(out, task=task, select=how, subtasks=subtasks, top_k=args.top_k, draws=args.draws,
              test_rows=[int(i) for i in rows], in_sample=in_sample)
    print_summary(run.revisions, df, verdict, sp, joint, cls, loo, overlap, subtasks, args.draws, len(batch),
                  len(set(groups)), in_sample, relie_summary)
    print(f"wrote {out}/")


def held_out_pairs(relie_dir, task, tok, max_pairs, subtasks):
    """The pairs relie.py held out (its split.csv, side test — or both, for a run without a split), checked
    against the task as it tokenizes now, optionally only some sub-tasks: the batch, its rows, its groups of
    near-copies; and the selection pairs (whose codes give the random sets' activation frequencies)."""
    split = pd.read_csv(relie_dir / "split.csv")
    made_with = read_json(relie_dir / "summary.json", "attribution summary")["split"]["max_pairs"]
    if max_pairs is not None and max_pairs != made_with:
        raise UsageError(f"--max-pairs {max_pairs}: relie.py split this task with --max-pairs {made_with}; "
                         "give the same (or leave it out)")
    batch = tasks.tokenize_pairs(tasks.limit_pairs(tasks.load_task(task), made_with), tok, task)
    if len(batch) != len(split) or [p.prefix for p in batch.pairs] != split.prefix.fillna("").tolist():
        raise UsageError(f"{task} is not the pair set relie.py split ({relie_dir}/split.csv); run relie.py again")
    wanted = [not subtasks or s in subtasks for s in split.subtask]
    rows = [int(r) for r, side, w in zip(split.row, split.side, wanted) if side in ("test", "both") and w]
    sel = [int(r) for r, side, w in zip(split.row, split.side, wanted) if side in ("selection", "both") and w]
    if not rows:
        raise UsageError(f"no held-out pair of {subtasks or task} in {relie_dir}/split.csv")
    return batch.take(rows), rows, split.group.to_numpy()[rows], batch.take(sel)


def _deltas(ld_MPC):
    """Per pair Δ (clean − ablated logit difference) and accuracy drop (0/1 clean minus 0/1 ablated), [P, M, C]."""
    ld = ld_MPC.numpy()
    delta = (ld[:, :, :1] - ld).transpose(1, 0, 2)
    drop = ((ld[:, :, :1] > 0).astype(float) - (ld > 0)).transpose(1, 0, 2)
    return delta, drop


def ablation_table(revisions, ablations, ld_MPC, subtask_P, groups) -> pd.DataFrame:
    """One row per ablation × revision × sub-task (and "all"): Δ and the accuracy drop, each with its 95%
    bootstrap interval over the test pairs' groups, and the revision's clean accuracy and its flag."""
    rows = []
    by = {"all": list(range(len(subtask_P)))}
    for s in dict.fromkeys(subtask_P):
        by[s] = [i for i, t in enumerate(subtask_P) if t == s]
    delta_PMC, drop_PMC = _deltas(ld_MPC)
    for g, idx in by.items():
        delta, d_lo, d_hi = measures.mean_interval(delta_PMC[idx], groups=groups[idx])
        drop, a_lo, a_hi = measures.mean_interval(drop_PMC[idx], groups=groups[idx])
        acc_clean = (ld_MPC.numpy()[:, idx, 0] > 0).mean(1)
        for a_i, (kind, sel_rev, draw, lat) in enumerate(ablations):
            for m, rev in enumerate(revisions):
                rows.append(dict(kind=kind, selected_at=sel_rev, draw=draw, latents=" ".join(map(str, lat)),
                                 revision=rev, subtask=g, delta=delta[m, a_i], delta_lo=d_lo[m, a_i],
                                 delta_hi=d_hi[m, a_i], acc_clean=acc_clean[m],
                                 flag=verdicts.accuracy_flag(acc_clean[m]),
                                 acc_ablated=acc_clean[m] - drop[m, a_i], acc_drop=drop[m, a_i],
                                 acc_drop_lo=a_lo[m, a_i], acc_drop_hi=a_hi[m, a_i]))
    return pd.DataFrame(rows)


def _cols(ablations, kind, selected_at):
    return [c for c, (k, s, _, _) in enumerate(ablations) if k == kind and s == selected_at]


def excess(delta_PMC, drop_PMC, set_col, null_cols, m, groups):
    """A set's per-pair Δ and accuracy drop at revision m minus the mean of its null sets', with group-bootstrap
    intervals: ((Δ, lo, hi), (points, lo, hi))."""
    d = delta_PMC[:, m, set_col] - delta_PMC[:, m, null_cols].mean(-1)
    a = 100 * (drop_PMC[:, m, set_col] - drop_PMC[:, m, null_cols].mean(-1))
    return ([float(v) for v in measures.mean_interval(d, groups=groups)],
            [float(v) for v in measures.mean_interval(a, groups=groups)])


def verdict_table(revisions, ablations, ld_MPC, groups) -> pd.DataFrame:
    """Per revision, its own top-k set against its random-k sets there: the excess Δ and accuracy drop with
    intervals, the clean accuracy and its flag, and the verdict with its rule (verdicts.topk_vs_random)."""
    delta_PMC, drop_PMC = _deltas(ld_MPC)
    ld_clean_MP = ld_MPC.numpy()[:, :, 0]
    rows = []
    for m, r in enumerate(revisions):
        (top,) = _cols(ablations, "top", r)
        (d, d_lo, d_hi), (a, a_lo, a_hi) = excess(delta_PMC, drop_PMC, top, _cols(ablations, "random", r), m, groups)
        acc = float((ld_clean_MP[m] > 0).mean())
        scale = float(np.abs(ld_clean_MP[m]).mean())
        flag = verdicts.accuracy_flag(acc)
        v, rule = verdicts.topk_vs_random(a, a_lo, d, d_lo, scale, flag)
        rows.append(dict(revision=r, acc_clean=acc, flag=flag, margin=scale,
                         top_delta=float(delta_PMC[:, m, top].mean()), excess_delta=d, excess_delta_lo=d_lo,
                         excess_delta_hi=d_hi, top_drop=100 * float(drop_PMC[:, m, top].mean()), excess_points=a,
                         excess_points_lo=a_lo, excess_points_hi=a_hi, verdict=v, rule=rule))
    return pd.DataFrame(rows)


def exact_sums(sheet, sets, revisions, subtasks) -> dict:
    """Per set (by the revision it was chosen at) and revision, the sum of its latents' exact single ablations on
    the selection pairs (relie's exact_<rev> columns): the additive prediction. None under --subtasks (relie
    measured them over every sub-task) or where relie has no such column."""
    if subtasks or not all(f"exact_{r}" in sheet for r in revisions):
        return {}
    ex = sheet.set_index("latent")
    return {(s, r): float(ex.reindex(lat)[f"exact_{r}"].sum()) for s, lat in sets.items() for r in revisions}


def joint_table(revisions, ablations, ld_MPC, ie_wide, exact, groups) -> pd.DataFrame:
    """The test the attribution is not computed from: each revision's top-k set ablated together, its Δ per
    revision predicted by the summed IE of the set (selection pairs) and by the sum of its latents' exact single
    ablations (selection pairs) against the measured Δ (test pairs, with its interval) and the sum of the set's
    single-latent Δ (test pairs: how far the model is from additive on this set); a verdict per predictor."""
    delta_PMC, _ = _deltas(ld_MPC)
    single = {lat[0]: c for c, (kind, _, _, lat) in enumerate(ablations) if kind == "single"}
    rows = []
    for c, (kind, sel_rev, _, lat) in enumerate(ablations):
        if kind != "top" or not lat:
            continue
        mean, lo, hi = measures.mean_interval(delta_PMC[:, :, c], groups=groups)
        singles_M = sum(delta_PMC[:, :, single[i]].mean(0) for i in lat)
        for m, r in enumerate(revisions):
            pred = float(ie_wide.reindex(lat, fill_value=0.0)[r].sum())
            pred_exact = exact.get((sel_rev, r), float("nan"))
            rows.append(dict(selected_at=sel_rev, revision=r, k=len(lat), predicted=pred, predicted_exact=pred_exact,
                             measured=mean[m], measured_lo=lo[m], measured_hi=hi[m], single_sum=float(singles_M[m]),
                             verdict=verdicts.joint(pred, mean[m])[0],
                             verdict_exact=verdicts.joint(pred_exact, mean[m])[0] if np.isfinite(pred_exact) else ""))
    return pd.DataFrame(rows)


def class_table(revisions, ablations, ld_MPC, groups) -> pd.DataFrame:
    """Each RelIE class ablated as a set at every revision, against random sets of its size and matched
    frequency: Δ and accuracy drop with the excess over random and its interval (a class read by its latents,
    not by where a set was chosen)."""
    delta_PMC, drop_PMC = _deltas(ld_MPC)
    rows = []
    for c, (kind, name, _, lat) in enumerate(ablations):
        if kind != "class":
            continue
        null = _cols(ablations, "class_random", name)
        for m, r in enumerate(revisions):
            (d, d_lo, d_hi), (a, a_lo, a_hi) = excess(delta_PMC, drop_PMC, c, null, m, groups)
            rows.append(dict(relie_class=name, n=len(lat), latents=" ".join(map(str, lat)), revision=r,
                             delta=float(delta_PMC[:, m, c].mean()), acc_drop=100 * float(drop_PMC[:, m, c].mean()),
                             excess_delta=d, excess_delta_lo=d_lo, excess_delta_hi=d_hi, excess_points=a,
                             excess_points_lo=a_lo, excess_points_hi=a_hi))
    return pd.DataFrame(rows)


def without_table(revisions, ablations, ld_MPC) -> pd.DataFrame:
    """Leave-one-out within each top-k set: per latent and revision, how much of the set's Δ and accuracy drop is
    lost when that latent is left un-ablated (the set's minus the set-without-it's)."""
    delta_PMC, drop_PMC = _deltas(ld_MPC)
    d_MC, a_MC = delta_PMC.mean(0), 100 * drop_PMC.mean(0)
    rows = []
    for c, (kind, sel_rev, latent, _) in enumerate(ablations):
        if kind != "without":
            continue
        (top,) = _cols(ablations, "top", sel_rev)
        for m, r in enumerate(revisions):
            rows.append(dict(selected_at=sel_rev, latent=latent, revision=r, set_delta=d_MC[m, top],
                             carried_delta=d_MC[m, top] - d_MC[m, c], set_points=a_MC[m, top],
                             carried_points=a_MC[m, top] - a_MC[m, c]))
    return pd.DataFrame(rows)


def consistency_table(run, ablations, ld_MPC, union, sets, ie_wide, nie_wide, groups, per_latent=None) -> pd.DataFrame:
    """The consistency check of the attribution against single-latent ablation (the paper's Table 7 test):
    Spearman ρ of |Δ_B| / |Δ_A| (single-latent ablations, on the test pairs) with 2-way RelIE / normalised
    RelIE / RelDec (from the selection pairs), per pair of revisions over the union of their top-k sets, and
    with a plain indicator of set membership (1 chosen at B only, ½ at both, 0 at A only): the ρ a measure
    reaches by knowing only where a latent was chosen. AtP is the first-order approximation of exactly this
    ablation, and with --method exact on the same pairs the RelIE ρ is 1 by construction: it checks the
    attribution, not the model (joint_table does). Each ρ with its 95% bootstrap interval over the test pairs'
    groups (the Δ resampled; the RelIE, RelDec and membership values held), and ρ(RelIE) − ρ(RelDec),
    ρ(RelIE) − ρ(membership) with the intervals of those differences from the same resamples, and a verdict on
    the latter. per_latent (a list), when given, receives one row per pair of revisions and latent with the
    values each ρ is computed from (ratios.csv, which controls.py's permutation null reads)."""
    revs = run.revisions
    col = {lat[0]: c for c, (kind, _, _, lat) in enumerate(ablations) if kind == "single"}
    cols = [col[i] for i in union]
    single_PMU = (ld_MPC[:, :, :1] - ld_MPC[:, :, cols]).numpy().transpose(1, 0, 2)   # per pair Δ, [P, M, U]
    delta_MU = single_PMU.mean(0)
    boot_nMU = measures.bootstrap_means(single_PMU, groups=groups)
    rd = analysis.reldec(run.cc)[union]
    ie_u, nie_u = ie_wide.reindex(union, fill_value=0.0).to_numpy(), nie_wide.reindex(union, fill_value=0.0).to_numpy()
    rows = []
    for a, b in measures.pairs_of(revs):
        keep = [j for j, i in enumerate(union) if i in sets[revs[a]] or i in sets[revs[b]]]

        def ratio(d_MU, a=a, b=b, keep=keep):   # [M, U] or [n, M, U] → [..., K]
            return np.abs(d_MU[..., b, keep]) / np.maximum(np.abs(d_MU[..., a, keep]), 1e-12)
        member = np.array([1.0 if union[j] not in sets[revs[a]] else 0.0 if union[j] not in sets[revs[b]] else 0.5
                           for j in keep])
        refs = dict(relie=measures.rel2(ie_u[keep, a], ie_u[keep, b]),
                    relie_norm=measures.rel2(nie_u[keep, a], nie_u[keep, b]),
                    reldec=measures.rel2(rd[keep, a], rd[keep, b]), membership=member)
        row = dict(A=revs[a], B=revs[b], n=len(keep))
        if per_latent is not None:
            per_latent += [dict(A=revs[a], B=revs[b], latent=union[j], ratio=v, **{n: r[q] for n, r in refs.items()})
                           for q, (j, v) in enumerate(zip(keep, ratio(delta_MU)))]
        boot = {}
        for name, ref in refs.items():
            row[f"rho_{name}"] = measures.spearman(ratio(delta_MU), ref)
            boot[name] = measures.spearman_rows(ratio(boot_nMU), ref)
            row[f"rho_{name}_lo"], row[f"rho_{name}_hi"] = measures.interval(boot[name])
        for other in ("reldec", "membership"):
            row[f"rho_diff_{other}"] = row["rho_relie"] - row[f"rho_{other}"]
            row[f"rho_diff_{other}_lo"], row[f"rho_diff_{other}_hi"] = measures.interval(boot["relie"] - boot[other])
        row["verdict"] = verdicts.above(row["rho_diff_membership_lo"], "ρ(RelIE) − ρ(membership)")[0]
        rows.append(row)
    return pd.DataFrame(rows)


def _flagged(revisions, verdict) -> list:
    """Column labels that carry each revision's accuracy flag: 'step512 (ceiling)'."""
    f = dict(zip(verdict.revision, verdict.flag))
    return [f"{r} ({f[r]})" if f[r] else r for r in revisions]


def print_summary(revisions, df, verdict, sp, joint, cls, loo, overlap, subtasks, draws, n_pairs, n_groups, in_sample,
                  relie_summary):
    focus = df[df.subtask == "all"]
    cols = _flagged(revisions, verdict)

    def grid(kind, value):
        t = focus[focus.kind == kind].pivot_table(index="selected_at", columns="revision", values=value)
        t = t.reindex(index=revisions, columns=revisions)
        t.columns = cols
        return t
    where = ("ALL pairs, the ones the latents were selected on (relie.py --test-frac 0): in-sample" if in_sample
             else f"{n_pairs} held-out test pairs in {n_groups} groups of near-copies, none of which the latents were "
                  "selected on")
    print(f"ablations on {', '.join(subtasks) if subtasks else 'all sub-tasks'}, {where}; latents attributed by "
          f"{relie_summary['method']} (per-token |IE| threshold {relie_summary['threshold']:g}, absolute); rows: the "
          "revision whose top-k set is ablated, columns: the revision it is spliced into (ceiling / chance: accuracy "
          "cannot show an effect there; read Δ)")
    print("accuracy drop (points), top-k:\n" + (100 * grid("top", "acc_drop")).round(1).to_string())
    print(f"accuracy drop (points), random-k (mean of {draws}, matched frequency):\n"
          + (100 * grid("random", "acc_drop")).round(1).to_string())
    print("Δ logit difference (clean − ablated), top-k:\n" + grid("top", "delta").round(3).to_string())
    print("Δ, random-k:\n" + grid("random", "delta").round(3).to_string())
    print("overlap of the top-k sets (latents in common):\n"
          + pd.DataFrame(overlap).reindex(index=revisions, columns=revisions).to_string())
    print("verdict per revision — its own top-k set against random-k sets there (excess = top − random):")
    for v in verdict.itertuples():
        print(f"  {v.revision:>10}: clean accuracy {v.acc_clean:.2f}{' (' + v.flag + ')' if v.flag else ''}; excess "
              f"{v.excess_points:+.1f} [{v.excess_points_lo:+.1f}, {v.excess_points_hi:+.1f}] points, Δ "
              f"{v.excess_delta:+.3f} [{v.excess_delta_lo:+.3f}, {v.excess_delta_hi:+.3f}] → {v.verdict.upper()}"
              + ("" if v.verdict == verdicts.HOLDS else ": the latent-level finding does not hold at this revision"))
    print(f"  rules: {verdicts.TOPK_RULE}; {verdicts.TOPK_FLAGGED_RULE} (per revision: "
          + ", ".join(f"{v.revision} {v.margin:.3g}" for v in verdict.itertuples() if v.flag) + ")")
    print("joint ablation of each top-k set: Δ predicted by the summed IE and by the summed exact single ablations "
          "(selection pairs) vs measured (test pairs), and the sum of its single-latent Δ; verdict: "
          + verdicts.JOINT_RULE + ":\n" + joint.round(3).to_string(index=False))
    if len(cls):
        t = cls.pivot_table(index=["relie_class", "n"], columns="revision", values="excess_points", sort=False)
        print("each RelIE class ablated as a set: excess accuracy drop over random sets of its size (points):\n"
              + t.reindex(columns=revisions).round(1).to_string())
    mine = loo[loo.selected_at == loo.revision].sort_values(
        ["selected_at", "carried_delta"], key=lambda c: c.map(revisions.index) if c.name == "selected_at" else -c)
    print("which latents carry each set at its own revision (leave-one-out: the set's Δ lost without the latent), "
          "top 3:\n" + mine.groupby("selected_at", sort=False).head(3).round(3).to_string(index=False))
    show = sp[["A", "B", "n", "rho_relie", "rho_relie_lo", "rho_relie_hi", "rho_reldec", "rho_membership",
               "rho_diff_membership", "rho_diff_membership_lo", "rho_diff_membership_hi", "verdict"]]
    print("consistency check — Spearman ρ of |Δ_B|/|Δ_A| (single-latent ablations) with RelIE, RelDec and set "
          "membership alone (chosen at B only / both / A only); AtP linearises exactly this ablation, so with AtP it "
          "checks the attribution more than the model; verdict: holds when ρ(RelIE) − ρ(membership) has its interval "
          "above 0:\n" + show.round(2).to_string(index=False))
    print(f"intervals: {100 * measures.BOOTSTRAP_LEVEL:.0f}% bootstrap over the test pairs' {measures.BOOTSTRAP_OVER} "
          f"({measures.BOOTSTRAP_N} resamples); the spread over crosscoder and LM seeds is seeds.py's, and is "
          "often wider")


if __name__ == "__main__":
    run_main(main)
