"""relie.py — which latents carry a task at which checkpoint: IE per latent per revision, RelIE.

    python relie.py --run runs/toy-L0-step64_step128_step512-l1                 # task: the model's own
    python relie.py --run runs/pythia-1b-L8-step512_step2000_step143000-l1 --task subjectverb clams_en

For each minimal pair and revision m, block L's output is spliced with W_dec[:,m] f + b_dec[m] + r_m
(the error term r_m kept) and the metric μ = logit(wrong) − logit(correct) at the last position is
attributed to the latents f by integrated gradients to a zero baseline (10 steps, all batched in one
forward/backward per revision and batch of pairs, through the blocks above L only):
IE_{m,i} = −f_i · mean_α ∂μ/∂f_i, summed over positions (padding and position 0 never count; per-token
|IE| ≤ --threshold zeroed), averaged over pairs. Positive IE = the latent supports the right answer.
Also --method atp (one step) and exact
(zero-ablate each latent). Beside the paper's RelIE, a scale-normalised one (IE_{m,i} / Σ_j |IE_{m,j}|:
later checkpoints have larger logits), and the error term's IE per revision and sub-task.

Writes runs/<name>/relie/<task>/: ie.csv (IE per sub-task, revision, latent), error.csv, latents.csv
(the annotation sheet for the union of the top-k latents per revision), contexts.json,
logit_effects.json, latents.html (self-contained, for reading contexts), summary.json, then DONE.
"""
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from crosscoding import analysis, cli, defaults, lm, measures, tasks
from crosscoding.analysis import attribute, faithfulness, pair_values
from crosscoding.common import (
    UsageError,
    atomic_path,
    mark_done,
    positive,
    read_json,
    run_main,
    unmark_done,
    write_json,
    write_text,
)

# ---------------------------------------------------------------------------------------------
# From IE to RelIE, classes and the annotation sheet

def mean_ie(att, subtasks=None):
    """Mean IE per pair over the chosen sub-tasks (default all): [M, F] and the error's [M]."""
    keep = [i for i, s in enumerate(att["subtasks"]) if subtasks is None or s in subtasks]
    if not keep:
        raise UsageError(f"no sub-task among {subtasks}; this task has {att['subtasks']}")
    n = att["n"][keep].sum()
    return (att["ie"][keep].sum(0) / n).numpy(), (att["err"][keep].sum(0) / n).numpy()


def select(ie_MF, k, how="abs"):
    """The union of the top-k latents per revision, by |IE| (the paper) or by positive IE."""
    chosen = []
    for row in ie_MF:
        score = np.abs(row) if how == "abs" else row
        order = np.argsort(-score, kind="stable")
        top = [int(i) for i in order[:k] if (score[i] > 0)]
        chosen += [i for i in top if i not in chosen]
    return chosen


def latent_sheet(run, att, chosen, reldec_FM, annotations, flags):
    """One row per chosen latent: IE per revision, RelIE (paper's and normalised) and RelDec with their
    classes — the IE ones signed by the IE where the class is decided —, 2-way values, and timelines
    of the decoder norms, of |IE| and of |IE| as a share of each revision's total."""
    revs = run.revisions
    ie_MF, _ = mean_ie(att)
    nie_MF = measures.normalise(ie_MF)
    ie_KM, nie_KM = ie_MF[:, chosen].T, nie_MF[:, chosen].T
    # the columns are gathered first and framed once: M = 10 revisions make ~400 of them (45 pairs × 6), and
    # inserting them one by one fragments the frame (pandas warns on every insert past 100)
    cols = {"latent": chosen}
    for m, r in enumerate(revs):
        cols[f"ie_{r}"] = ie_KM[:, m]
    rd = reldec_FM[chosen]
    dominant = np.abs(ie_KM).argmax(1)
    measures.add_shares(cols, "relie", measures.rel(ie_KM), revs)
    measures.add_shares(cols, "relie_norm", measures.rel(nie_KM), revs)
    measures.add_shares(cols, "reldec", rd, revs)
    for name in ("relie_class", "relie_norm_class"):
        cols[name] = measures.signed(cols[name], measures.sign_at(ie_KM, dominant))
    for a, b in measures.pairs_of(revs):
        tag = f"{revs[a]}_{revs[b]}"
        sign2 = measures.sign_at(ie_KM, np.where(np.abs(ie_KM[:, b]) >= np.abs(ie_KM[:, a]), b, a))
        for name, vals in (("relie2", ie_KM), ("relie2_norm", nie_KM), ("reldec2", rd)):
            r2 = measures.rel2(vals[:, a], vals[:, b])
            cols[f"{name}_{tag}"] = r2
            cls = measures.classify2(r2)
            cols[f"{name}_class_{tag}"] = cls if name == "reldec2" else measures.signed(cls, sign2)
    tokens = run.revision_tokens
    ie_tl = measures.timeline(ie_KM, revs, tokens, prefix="ie_")
    ie_tl["ie_timeline_class"] = measures.signed(ie_tl["ie_timeline_class"],
                                                 measures.sign_at(ie_KM, np.abs(ie_KM).argmax(1)))
    norm_tl = measures.timeline(nie_KM, revs, tokens, prefix="ie_norm_")
    norm_tl["ie_norm_timeline_class"] = measures.signed(norm_tl["ie_norm_timeline_class"],
                                                        measures.sign_at(ie_KM, np.abs(nie_KM).argmax(1)))
    df = pd.concat([pd.DataFrame(cols), measures.timeline(run.cc.decoder_norms().detach().cpu().numpy()[chosen],
                                                          revs, tokens), ie_tl, norm_tl], axis=1)
    df["artifact"] = [bool(flags.get(i, False)) for i in chosen]
    df["description"] = [annotations.get(i, {}).get("description", "") for i in chosen]
    df["tags"] = [annotations.get(i, {}).get("tags", "") for i in chosen]
    return df


def add_intervals(df, pv_PMK, revisions, groups):
    """Columns ie_<rev>_lo/_hi (the mean IE's 95% bootstrap interval over the selection pairs' groups of
    near-copies),
    relie_<rev>_lo/_hi (the one-vs-all RelIE's, from the same resamples), and the bootstrap agreement of
    the signed RelIE class and |IE| timeline class (relie_class_agree, ie_timeline_class_agree: the
    fraction of resamples giving the same class; the app greys classes under 0.8). Returns the sheet with them,
    added at once (one by one, M = 32 revisions' 130 columns fragment the frame: pandas warns on every insert)."""
    means_nMK = measures.bootstrap_means(pv_PMK, groups=groups)
    ie_lo, ie_hi = measures.interval(means_nMK)
    rel_nMK = np.abs(means_nMK) / np.maximum(np.abs(means_nMK).sum(1, keepdims=True), 1e-300)
    rel_lo, rel_hi = measures.interval(rel_nMK)
    cols = {}
    for m, r in enumerate(revisions):
        cols[f"ie_{r}_lo"], cols[f"ie_{r}_hi"] = ie_lo[m], ie_hi[m]
        cols[f"relie_{r}_lo"], cols[f"relie_{r}_hi"] = rel_lo[m], rel_hi[m]
    n, M, K = means_nMK.shape
    ie_nKM = means_nMK.transpose(0, 2, 1).reshape(n * K, M)
    dominant = np.abs(ie_nKM).argmax(1)
    rel_cls = measures.signed(measures.classify(measures.rel(ie_nKM), revisions),
                              measures.sign_at(ie_nKM, dominant))
    tl_cls = measures.signed(measures.timeline(ie_nKM, revisions)["timeline_class"], measures.sign_at(ie_nKM, dominant))
    cols["relie_class_agree"] = measures.agreement(df["relie_class"], np.reshape(rel_cls, (n, K)))
    cols["ie_timeline_class_agree"] = measures.agreement(df["ie_timeline_class"], np.reshape(tl_cls, (n, K)))
    return pd.concat([df, pd.DataFrame(cols, index=df.index)], axis=1)


def with_faithfulness(df, revisions, exact_MK, atp_MK, flags_MK):
    """The sheet with exact_<rev>, atp_<rev> and unfaithful_<rev> per revision, added at once."""
    cols = {f"{name}_{r}": v[m] for m, r in enumerate(revisions)
            for name, v in (("exact", exact_MK), ("atp", atp_MK), ("unfaithful", flags_MK))}
    return pd.concat([df, pd.DataFrame(cols, index=df.index)], axis=1)


def read_annotations(folder) -> dict:
    """The app's annotations as latent → {description, tags}."""
    df = measures.read_annotations(folder)
    return {int(r.latent): dict(description=r.description, tags=r.tags) for r in df.itertuples()}


def read_flags(folder) -> dict:
    path = Path(folder) / "latents.csv"
    if not path.exists():
        return {}
    df = pd.read_csv(path, usecols=["latent", "artifact"])
    return dict(zip(df.latent.astype(int), df.artifact.astype(bool)))


# ---------------------------------------------------------------------------------------------
# What annotators read: logit effects and top-activating contexts

@torch.no_grad()
def logit_effects(run, models, chosen, n=10):
    """Per latent and revision, the tokens its decoder vector promotes / suppresses directly:
    W_U · (norm(d) − norm(0)) through that revision's final norm and unembedding."""
    out = {}
    for m, (r, model, tok) in enumerate(models):
        norm, W_U = lm.final_norm(model), model.get_output_embeddings().weight.float()
        d_Kd = run.cc.W_dec_FMd[chosen, m].to(model.dtype)       # the norm runs in the LM's dtype (bf16 on a GPU)
        eff_KV = (norm(d_Kd) - norm(torch.zeros_like(d_Kd))).float() @ W_U.T
        for j, i in enumerate(chosen):
            up, down = eff_KV[j].topk(n), (-eff_KV[j]).topk(n)
            out.setdefault(str(i), {})[r] = dict(
                promoted=[[tok.decode([t]), round(v, 3)] for t, v in zip(up.indices.tolist(), up.values.tolist())],
                suppressed=[[tok.decode([t]), round(-v, 3)]
                            for t, v in zip(down.indices.tolist(), down.values.tolist())])
    return out


@torch.no_grad()
def top_contexts(run, models, chosen, n_blocks=64, n=8, before=20, after=3):
    """For each chosen latent, its n highest activations on held-out LM text, each with the window
    of tokens around it and the latent's activation on every token of the window. `before` reaches past
    a subject, a relative clause and its attractor ("the goose that the geese watch was"): the left context
    agreement depends on. A window cut short by its block's start (pos = max_at + 1) shows all the model saw."""
    tok = models[-1][2]
    ids = run.heldout_blocks(n_blocks, tok)
    acts = []
    for b0 in range(0, len(ids), 8):
        x = analysis.run_acts(models, run.layer, ids[b0:b0 + 8].to(run.device))
        B, T, M, d = x.shape
        f = run.cc.encode(x.view(B * T, M, d)).view(B, T, -1)[..., chosen]
        f[:, 0] = 0            # position 0 is excluded everywhere
        acts.append(f.cpu())
    f_BTK = torch.cat(acts)
    out = {}
    for j, i in enumerate(chosen):
        a = f_BTK[..., j]
        vals, flat = a.flatten().topk(min(n, a.numel()))
        ctx = []
        for v, k in zip(vals.tolist(), flat.tolist()):
            if v <= 0:
                break
            b, t = divmod(k, a.shape[1])
            lo, hi = max(1, t - before), min(a.shape[1], t + after + 1)
            ctx.append(dict(tokens=[tok.decode([x]) for x in ids[b, lo:hi].tolist()],
                            acts=[round(x, 4) for x in a[b, lo:hi].tolist()], max_at=t - lo, max=round(v, 4), pos=t))
        out[str(i)] = ctx
    return out


def render_html(task, sheet, contexts, effects, revisions) -> str:
    """A self-contained page: one section per latent, its values, contexts shaded by activation.
    Every data- or user-provided string is escaped."""
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{e(task)} latents</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
             ".tok{padding:1px 2px;border-radius:3px}.ctx{font-family:monospace;margin:2px 0}"
             "table{border-collapse:collapse}td,th{padding:2px 6px;border:1px solid #ddd}</style>",
             f"<h1>{e(task)}: {len(sheet)} latents</h1>"]
    for row in sheet.to_dict("records"):
        i = int(row["latent"])
        parts.append(f"<h2 id='latent-{i}'>latent {i}</h2><p>RelIE class <b>{e(str(row['relie_class']))}</b>, "
                     f"normalised <b>{e(str(row['relie_norm_class']))}</b>, RelDec class "
                     f"<b>{e(str(row['reldec_class']))}</b>"
                     f"{' — <i>likely L1 artifact</i>' if row['artifact'] else ''}</p>")
        if row.get("description"):
            parts.append(f"<p>Description: {e(str(row['description']))}</p>")
        parts.append("<table><tr><th>revision</th><th>IE</th><th>RelIE</th><th>RelDec</th><th>promotes</th>"
                     "<th>suppresses</th></tr>")
        for r in revisions:
            eff = effects.get(str(i), {}).get(r, {})
            prom = " ".join(e(t) for t, _ in eff.get("promoted", [])[:6])
            sup = " ".join(e(t) for t, _ in eff.get("suppressed", [])[:6])
            parts.append(f"<tr><td>{e(r)}</td><td>{row[f'ie_{r}']:.4f}</td><td>{row[f'relie_{r}']:.2f}</td>"
                         f"<td>{row[f'reldec_{r}']:.2f}</td><td>{prom}</td><td>{sup}</td></tr>")
        parts.append("</table>")
        for c in contexts.get(str(i), []):
            top = max(c["max"], 1e-9)
            toks = "".join(f"<span class='tok' style='background:rgba(255,120,0,{min(1, max(0, a / top)):.2f})' "
                           f"title='{a:.3f}'>{e(t)}</span>" for t, a in zip(c["tokens"], c["acts"]))
            parts.append(f"<div class='ctx'>{toks}</div>")
    return "\n".join(parts) + "\n"


def parse_args(argv=None):
    run_dir, spec = cli.run_in(argv)
    pre = spec.preset
    p = cli.parser(__doc__.split("\n\n")[0], pre)
    cli.add(p, "--run", "--top-k", "--select", "--max-pairs", "--pair-batch", "--device",
            run=str(run_dir), top_k=defaults.TOP_K, select=defaults.SELECT, pair_batch=16,
            device=defaults.default_device())
    p.add_argument("--task", nargs="+", default=[spec.task], help=cli.FLAGS["--task"]["help"])
    p.add_argument("--method", choices=list(analysis.METHODS), default=defaults.METHOD,
                   help="; ".join(f"{k}: {v.about}" for k, v in analysis.METHODS.items())
                   + " (default: %(default)s; README: the methods compared)")
    cli.add(p, "--threshold", "--test-frac", "--split-seed", threshold=pre.ie_threshold, test_frac=defaults.TEST_FRAC,
            split_seed=0)
    p.add_argument("--latents", default=None, help="--method exact: comma-separated latents to ablate (default: all)")
    p.add_argument("--context-blocks", type=positive("--context-blocks"), default=pre.context_blocks,
                   help="held-out text blocks searched for top-activating contexts (default: %(default)s)")
    cli.add(p, "--name", name=None)
    args = p.parse_args(argv)
    if args.name and len(args.task) > 1:
        raise UsageError(f"--name names one output folder; {len(args.task)} tasks were given")
    if args.latents and args.method != "exact":
        raise UsageError("--latents only applies to --method exact")
    return args


def main(argv=None):
    args = parse_args(argv)
    run = analysis.open_run(args.run, args.device)
    latents = [int(x) for x in args.latents.split(",")] if args.latents else None
    if latents and not all(0 <= i < run.cc.cfg.dict_size for i in latents):
        raise UsageError(f"--latents must lie in 0..{run.cc.cfg.dict_size - 1}")
    models = run.load_models()
    for task in args.task if cli.given(argv, "--task") else [lm.default_task(run.spec, run.data.get("weights", "hub"))]:
        relie_task(run, models, task, args, args.threshold, latents)


def coverage(ie_MF, err_M, exact_lat_M, exact_err_M, revisions, fvu=None) -> dict:
    """Per revision, how much of the task goes through the latents rather than the error term, as shares of
    magnitudes (a ratio of signed sums can exceed the truth when latents cancel): latents_share, from the exact
    effects of zeroing every latent (the error kept) and of zeroing the error term (the latents kept),
    |Δ_latents| / (|Δ_latents| + |Δ_error|); and latents_share_ie, the attribution's Σ_i |IE_i| against
    |IE_error|. The first is the headline: a first-order attribution cannot tell a decoder of random directions
    from a learned one (their large, cancelling IEs share as much as real ones), exact ablation can. Beside them
    the run's FVU there (evaluate.py's eval.json, when present)."""
    out = {}
    for m, r in enumerate(revisions):
        lat, err = float(np.abs(ie_MF[m]).sum()), abs(float(err_M[m]))
        xl, xe = abs(float(exact_lat_M[m])), abs(float(exact_err_M[m]))
        out[r] = dict(latents_share=xl / (xl + xe) if xl + xe > 0 else None,
                      latents_share_ie=lat / (lat + err) if lat + err > 0 else None,
                      exact_latents_delta=float(exact_lat_M[m]), exact_error_delta=float(exact_err_M[m]),
                      latents_abs_ie=lat, error_abs_ie=err, latents_ie=float(ie_MF[m].sum()), error_ie=float(err_M[m]),
                      fvu=None if fvu is None else fvu.get(r))
    return out


def warn_coverage(cov, task):
    """A warning per revision where the error term carries more than half of the task, by either measure."""
    for r, c in cov.items():
        by = [f"{100 * (1 - c['latents_share']):.0f}% of the exact effect" if (c["latents_share"] or 1) < 0.5 else "",
              f"{100 * (1 - c['latents_share_ie']):.0f}% of the summed |IE|" if (c["latents_share_ie"] or 1) < 0.5
              else ""]
        if any(by):
            print(f"warning: at {r} the error term carries {' and '.join(b for b in by if b)} of {task} (FVU "
                  f"{'not evaluated' if c['fvu'] is None else format(c['fvu'], '.3f')}): the crosscoder misses much of "
                  "what the LM uses there, and findings about its latents at that revision cover only part of the "
                  "task; try another --layer, a larger --dict-size or a lower --l1-coeff")


def split_table(batch, sel_rows, test_rows, groups) -> pd.DataFrame:
    """split.csv: every tokenized pair with its group of near-copies and its side."""
    sel, test = set(sel_rows), set(test_rows)
    side = ["both" if i in sel and i in test else "selection" if i in sel else "test" for i in range(len(batch))]
    return pd.DataFrame(dict(row=range(len(batch)), subtask=batch.subtask, prefix=[p.prefix for p in batch.pairs],
                             good=[p.good for p in batch.pairs], bad=[p.bad for p in batch.pairs], group=groups,
                             side=side))


def relie_task(run, models, task, args, threshold, latents):
    pairs = tasks.limit_pairs(tasks.load_task(task), args.max_pairs)
    batch = tasks.tokenize_pairs(pairs, models[0][2], task)
    out = run.folder / "relie" / (args.name or Path(task).stem)
    unmark_done(out)
    # attribution, RelIE and the top-k choice see the selection half only; ablate.py tests on the rest
    sel_rows, test_rows, groups = tasks.split_pairs(batch.pairs, args.test_frac, args.split_seed)
    split = split_table(batch, sel_rows, test_rows, groups)
    batch = batch.take(sel_rows)
    att = attribute(run, models, batch, args.method, threshold, args.pair_batch, latents)
    ie_MF, err_M = mean_ie(att)
    nonzero = int((np.abs(ie_MF) > 0).any(0).sum())
    k = args.top_k
    if k > nonzero:
        print(f"note: --top-k {k} capped at {nonzero}, the number of latents with a non-zero IE")
        k = max(1, nonzero)
    chosen = select(ie_MF, k, args.select)
    if not chosen:
        raise UsageError(f"no latent has {'a positive' if args.select == 'positive' else 'a non-zero'} IE on {task} "
                         f"with --threshold {threshold}; lower --threshold (0 keeps every IE)"
                         + (" or rank by --select abs" if args.select == "positive" else ""))
    sheet = latent_sheet(run, att, chosen, analysis.reldec(run.cc), read_annotations(run.folder),
                         read_flags(run.folder))
    sheet = add_intervals(sheet, pair_values(att, chosen), run.revisions, np.asarray(groups)[sel_rows])
    faith, exact_MK, atp_MK, flags_MK = faithfulness(run, models, batch, chosen, ie_MF[:, chosen], args.method,
                                                     threshold, args.pair_batch)
    sheet = with_faithfulness(sheet, run.revisions, exact_MK, atp_MK, flags_MK)
    effects = logit_effects(run, models, chosen)
    contexts = top_contexts(run, models, chosen, args.context_blocks)
    # long tables: IE per sub-task / revision / latent, and the error term
    rows, erows = [], []
    for s_i, s in enumerate(att["subtasks"]):
        ie_s, err_s = mean_ie(att, [s])
        nie_s = measures.normalise(ie_s)
        tot = np.abs(ie_s).sum(1)
        for m, r in enumerate(run.revisions):
            nz = np.nonzero(ie_s[m])[0]
            rows += [(s, r, int(i), float(ie_s[m, i]), float(nie_s[m, i])) for i in nz]
            clean = float(att["clean"][s_i, m] / att["n"][s_i])
            erows.append((s, r, float(err_s[m]), float(ie_s[m].sum()), float(tot[m]),
                          abs(err_s[m]) / (abs(err_s[m]) + tot[m]) if (abs(err_s[m]) + tot[m]) > 0 else 0.0,
                          -clean, int(att["n"][s_i])))
    ie_df = pd.DataFrame(rows, columns=["subtask", "revision", "latent", "ie", "ie_norm"])
    err_df = pd.DataFrame(erows, columns=["subtask", "revision", "ie_error", "ie_latents_sum", "ie_latents_abs",
                                          "error_share", "clean_logit_diff", "n_pairs"])
    exact_lat_M, exact_err_M = analysis.exact_parts(run, models, batch, args.pair_batch)
    ev = run.folder / "eval.json"
    fvu = {r: v["fvu"] for r, v in read_json(ev)["revisions"].items()} if ev.exists() else None
    cov = coverage(ie_MF, err_M, exact_lat_M, exact_err_M, run.revisions, fvu)
    how = analysis.METHODS[args.method]
    summary = dict(task=task, method=args.method, threshold=threshold, steps=att["steps"], baseline=how.baseline,
                   error_ie_by=how.error_by, select=args.select, top_k=k, n_pairs=len(batch),
                   subtasks=att["subtasks"], revisions=run.revisions, chosen=chosen,
                   error_ie=dict(zip(run.revisions, map(float, err_M))), coverage=cov,
                   classes=sheet["relie_class"].value_counts().to_dict(),
                   classes_norm=sheet["relie_norm_class"].value_counts().to_dict(), faithfulness=faith,
                   split=dict(test_frac=args.test_frac, seed=args.split_seed, group_key=tasks.SPLIT_KEY,
                              max_pairs=args.max_pairs, n_selection=len(sel_rows), n_test=len(test_rows),
                              n_groups=len(set(groups)), in_sample=args.test_frac == 0),
                   intervals=dict(level=measures.BOOTSTRAP_LEVEL, resamples=measures.BOOTSTRAP_N,
                                  over=f"the selection pairs' {measures.BOOTSTRAP_OVER} (not the crosscoder's or the "
                                       "LM's seed: seeds.py)",
                                  seed=measures.BOOTSTRAP_SEED))
    for name, df in (("ie.csv", ie_df), ("error.csv", err_df), ("latents.csv", sheet), ("split.csv", split)):
        with atomic_path(out / name) as tmp:
            df.to_csv(tmp, index=False)
    write_text(out / "contexts.json", json.dumps(contexts))
    write_text(out / "logit_effects.json", json.dumps(effects))
    write_text(out / "latents.html", render_html(task, sheet, contexts, effects, run.revisions))
    write_json(out / "summary.json", summary)
    mark_done(out, task=task)                   # last: the folder is complete
    print(f"IE by {args.method} on {len(sel_rows)} selection pairs; per-token |IE| ≤ {threshold:g} zeroed (absolute "
          "logit units, the same at every revision, though later revisions' logits are larger)")
    print(sheet[["latent"] + [f"ie_{r}" for r in run.revisions] + ["relie_class", "relie_norm_class",
                                                                     "reldec_class", "ie_timeline_class"]
                ].to_string(index=False))
    print("classes: relie/reldec one-vs-all (the paper's; at many revisions mostly ±others); ie_timeline_class: "
          "when the IE forms, peaks and fades (kept, emerging, discontinued, transient; latents.csv has formed_at, "
          "peak_at, faded_at; the app's Timeline page draws them)")
    print("error-term IE per revision:", {r: round(float(v), 4) for r, v in zip(run.revisions, err_M)},
          f"({how.error_by})")
    print("coverage per revision — the latents' share of the task against the error term's: exact (the Δ of zeroing "
          "every latent vs of zeroing the error term, |Δ_latents| / (|Δ_latents| + |Δ_error|)) and by the attribution "
          "(Σ|IE| of the latents vs |IE| of the error term); FVU:")
    for r, c in cov.items():
        show = lambda v, f=".2f": "—" if v is None else format(v, f)  # noqa: E731
        print(f"  {r:>10}: exact {show(c['latents_share'])} (Δ all latents {c['exact_latents_delta']:+.3f}, error term "
              f"{c['exact_error_delta']:+.3f}); by IE {show(c['latents_share_ie'])}; FVU {show(c['fvu'], '.3f')}")
    warn_coverage(cov, task)
    print(f"pairs: {len(sel_rows)} for selection, {len(test_rows)} held out for ablate.py "
          f"({len(set(groups))} groups of near-copies, each on one side)" if args.test_frac > 0 else
          "pairs: no split (--test-frac 0): every finding ablate.py reports is then measured on the pairs it was "
          "selected on")
    print(f"intervals: {100 * measures.BOOTSTRAP_LEVEL:.0f}% bootstrap over the selection pairs' "
          f"{measures.BOOTSTRAP_OVER}; the spread over "
          "crosscoder and LM seeds is seeds.py's")
    print(f"faithfulness ({args.method} vs exact ablation of these latents): Spearman ρ {faith['rho']:.2f} "
          f"(AtP: {faith['rho_atp']:.2f}); {faith['n_flagged']} of {faith['n']} (latent, revision) disagree in "
          "sign or by more than 2×")
    print(f"wrote {out}/")


if __name__ == "__main__":
    run_main(main)
