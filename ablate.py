"""ablate.py — does removing the latents relie.py found break the task, and where?

    python relie.py  --run runs/toy-L0-step64_step128_step512-l1
    python ablate.py --run runs/toy-L0-step64_step128_step512-l1 --select positive --subtasks across_pp,across_rc

Latents are zeroed in crosscoder space with the error term kept, spliced into each revision:
- per revision m, its top-k latents by IE (relie's ie.csv, over --subtasks) all together, against
  --draws sets of k random latents of matched activation frequency (on the task's tokens);
- every latent of the union of those top-k sets alone.
Per revision: Δ = mean logit difference (correct − wrong; = log p_correct − log p_wrong) clean minus
ablated, and the accuracy drop. Per pair of revisions (A, B), over the union of A's and B's top-k
latents: Spearman ρ of |Δ_B|/|Δ_A| with the 2-way RelIE, the normalised RelIE and RelDec (the
paper's Table 7).

Writes runs/<name>/ablation/<task>.csv (every ablation × revision × sub-task) and
runs/<name>/ablation/<task>-spearman.csv, and prints both summaries.
"""
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import analysis
import relie
import tasks
from common import ArgumentParser, UsageError, atomic_path, positive, read_json, run_main


def selection_ie(relie_dir, revisions, subtasks):
    """Mean IE per pair over the chosen sub-tasks from relie's tables: [M, F-indexed dict] as a frame."""
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
    wn = ie.assign(w=ie.subtask.map(n) * ie.ie_norm).pivot_table(
        index="latent", columns="revision", values="w", aggfunc="sum", fill_value=0.0) / tot
    return wide.reindex(columns=revisions, fill_value=0.0), wn.reindex(columns=revisions, fill_value=0.0)


def top_sets(ie_wide, k, how):
    """Per revision, its top-k latents by IE (positive) or |IE| (abs)."""
    out = {}
    for r in ie_wide.columns:
        score = ie_wide[r] if how == "positive" else ie_wide[r].abs()
        score = score[score > 0].sort_values(ascending=False, kind="stable")
        out[r] = [int(i) for i in score.index[:k]]
    return out


def matched_random(freq_F, chosen, rng, exclude):
    """For each chosen latent, a random other latent among the 5 nearest in activation frequency."""
    pool = np.array([i for i in range(len(freq_F)) if i not in exclude])
    out = []
    for i in chosen:
        near = pool[np.argsort(np.abs(freq_F[pool] - freq_F[i]), kind="stable")[:5]]
        near = [j for j in near if j not in out] or list(near)
        out.append(int(rng.choice(near)))
    return out


def spearman(a, b) -> float:
    a, b = pd.Series(a).rank(), pd.Series(b).rank()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None, help="run folder made by train.py (default: the toy default run)")
    p.add_argument("--task", default=None, help="a task relie.py was run on (default: the model's own)")
    p.add_argument("--top-k", type=positive("--top-k"), default=10)
    p.add_argument("--select", choices=["abs", "positive"], default=None, help="default: relie's")
    p.add_argument("--subtasks", default=None, help="comma-separated sub-tasks to select on and score")
    p.add_argument("--draws", type=positive("--draws"), default=5, help="random-k draws")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive("--batch-size"), default=64)
    p.add_argument("--max-pairs", type=positive("--max-pairs"), default=None, help="per sub-task")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    run = analysis.open_run(args.run or analysis.default_run(), args.device)
    task = args.task or run.spec.task
    relie_dir = run.folder / "relie" / Path(task).stem
    if not (relie_dir / "summary.json").exists():
        raise UsageError(f"no attribution for task {task} in {run.folder}: run "
                         f"`python relie.py --run {run.folder} --task {task}` first")
    summ = read_json(relie_dir / "summary.json")
    how = args.select or summ["select"]
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
    pairs = tasks.load_task(task)
    if subtasks:
        pairs = [q for q in pairs if q.subtask in subtasks]
    if args.max_pairs:
        pairs = [q for s in dict.fromkeys(q.subtask for q in pairs)
                 for q in [x for x in pairs if x.subtask == s][:args.max_pairs]]
    batch = tasks.tokenize_pairs(pairs, models[0][2], task)

    # frequency of each latent on the task's (spliced) tokens, for matched random sets
    Fdim = run.cc.cfg.dict_size
    codes, fired, n_tok = [], torch.zeros(Fdim), 0
    for i in range(0, len(batch), args.batch_size):
        b = batch.slice(i, i + args.batch_size).to(run.device)
        x, f, r = relie.pair_codes(run, models, b)
        where = analysis.splice_mask(b.mask_BT)
        fired += (f[where] > 0).sum(0).cpu()
        n_tok += int(where.sum())
        codes.append((b, x, f, r))
    freq = (fired / max(n_tok, 1)).numpy()
    rng = np.random.default_rng(args.seed)
    ablations = [("clean", "-", -1, [])]
    for r in run.revisions:
        ablations.append(("top", r, -1, sets[r]))
        for d in range(args.draws):
            ablations.append(("random", r, d, matched_random(freq, sets[r], rng, set(sets[r]))))
    ablations += [("single", "-", -1, [i]) for i in union]

    # logit differences for every ablation, pair and revision
    ld = torch.zeros(len(run.revisions), len(batch), len(ablations))
    lat_sets = [a[3] for a in ablations]
    for m, (rev, model, _) in enumerate(tqdm(models, desc="ablate", unit="rev")):
        row = 0
        for b, x, f, r in codes:
            ld[m, row:row + len(b)] = analysis.ablated_logit_diffs(run, model, m, b, x[:, :, m], f, r[:, :, m],
                                                                   lat_sets).cpu()
            row += len(b)
    rows = []
    groups = {"all": list(range(len(batch)))}
    for s in dict.fromkeys(batch.subtask):
        groups[s] = [i for i, t in enumerate(batch.subtask) if t == s]
    for a_i, (kind, sel_rev, draw, lat) in enumerate(ablations):
        for m, rev in enumerate(run.revisions):
            for g, idx in groups.items():
                clean, abl = ld[m, idx, 0], ld[m, idx, a_i]
                rows.append(dict(kind=kind, selected_at=sel_rev, draw=draw, latents=" ".join(map(str, lat)),
                                 revision=rev, subtask=g, delta=float((clean - abl).mean()),
                                 acc_clean=float((clean > 0).float().mean()),
                                 acc_ablated=float((abl > 0).float().mean()),
                                 acc_drop=float((clean > 0).float().mean() - (abl > 0).float().mean())))
    df = pd.DataFrame(rows)
    out = run.folder / "ablation"
    with atomic_path(out / f"{Path(task).stem}.csv") as tmp:
        df.to_csv(tmp, index=False)

    # Spearman: |Δ_B| / |Δ_A| of single ablations against 2-way RelIE / normalised RelIE / RelDec
    single = df[(df.kind == "single") & (df.subtask == "all")]
    delta = single.pivot_table(index="latents", columns="revision", values="delta").reindex(columns=run.revisions)
    delta.index = delta.index.astype(int)
    delta = delta.reindex(union)
    rd = analysis.reldec(run.cc)[union]
    ie_u, nie_u = ie_wide.reindex(union, fill_value=0.0).to_numpy(), nie_wide.reindex(union, fill_value=0.0).to_numpy()
    srows = []
    for a, b in analysis.pairs_of(run.revisions):
        # over the union of the two revisions' top-k sets
        keep = [j for j, i in enumerate(union) if i in sets[run.revisions[a]] or i in sets[run.revisions[b]]]
        d = delta.iloc[keep].to_numpy()
        ratio = np.abs(d[:, b]) / np.maximum(np.abs(d[:, a]), 1e-12)
        srows.append(dict(A=run.revisions[a], B=run.revisions[b], n=len(keep),
                          rho_relie=spearman(ratio, analysis.rel2(ie_u[keep, a], ie_u[keep, b])),
                          rho_relie_norm=spearman(ratio, analysis.rel2(nie_u[keep, a], nie_u[keep, b])),
                          rho_reldec=spearman(ratio, analysis.rel2(rd[keep, a], rd[keep, b]))))
    sp = pd.DataFrame(srows)
    with atomic_path(out / f"{Path(task).stem}-spearman.csv") as tmp:
        sp.to_csv(tmp, index=False)

    focus = df[df.subtask == "all"]
    top = focus[focus.kind == "top"].pivot_table(index="selected_at", columns="revision", values="acc_drop")
    rnd = focus[focus.kind == "random"].pivot_table(index="selected_at", columns="revision", values="acc_drop")
    print(f"accuracy drop (points) on {', '.join(subtasks) if subtasks else 'all sub-tasks'}; rows: the revision "
          "whose top-k set is ablated, columns: the revision it is spliced into")
    print("top-k:\n" + (100 * top.reindex(index=run.revisions, columns=run.revisions)).round(1).to_string())
    print(f"random-k (mean of {args.draws}, matched frequency):\n"
          + (100 * rnd.reindex(index=run.revisions, columns=run.revisions)).round(1).to_string())
    print("Spearman ρ of |Δ_B|/|Δ_A| (single-latent ablations):\n" + sp.round(3).to_string(index=False))
    print(f"wrote {out}/{Path(task).stem}.csv")


if __name__ == "__main__":
    run_main(main)
