"""app.py — browse scans and crosscoder runs: when agreement is learned, which latents carry it at
which checkpoint, what they respond to, and what breaks without them.

    streamlit run app.py                                  # reads runs/ and scans/ here
    streamlit run app.py -- --runs /data/runs --scans /data/scans

Pages: Checkpoints (scans/), Training (log.jsonl, eval.json), Latents (the emergence map, contexts,
logit effects, annotations), Ablation. The app reads only inside its runs and scans roots, loads no
pickles, escapes every text it renders as HTML, and (by Streamlit's config here) listens on
127.0.0.1. Annotations go to runs/<name>/annotations.csv, which relie.py's exports pick up.
"""
import argparse
import html
import json
import os
import sys
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from crosscoding import measures  # noqa: E402  (numpy/pandas only: the viewer loads no torch)
from crosscoding.common import DONE  # noqa: E402


def roots():
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--runs", default=os.environ.get("CCT_RUNS", "runs"))
    p.add_argument("--scans", default=os.environ.get("CCT_SCANS", "scans"))
    args, _ = p.parse_known_args(sys.argv[1:])
    return Path(args.runs).resolve(), Path(args.scans).resolve()


def inside(root: Path, name: str) -> Path:
    """root/name for a plain child name; anything with a path or '..' is refused."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"refused name {name!r}: not a plain folder name inside {root}")
    path = (root / name).resolve()
    if path.parent != root:
        raise ValueError(f"refused name {name!r}: outside {root}")
    return path


# ---------------------------------------------------------------------------------------------
# Loaders (cached on path and modification time)

def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


@st.cache_data(show_spinner=False)
def read_csv(path: str, mtime: float) -> pd.DataFrame:
    return pd.read_csv(path)


@st.cache_data(show_spinner=False)
def read_json(path: str, mtime: float):
    return json.loads(Path(path).read_text())


@st.cache_data(show_spinner=False)
def read_log(path: str, mtime: float) -> pd.DataFrame:
    return pd.DataFrame([json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()])


@st.cache_data(show_spinner=False)
def decoder_table(folder: str, mtime: float) -> pd.DataFrame:
    """Every latent's RelDec from the crosscoder itself (safetensors), when evaluate.py has not run."""
    from safetensors.numpy import load_file
    t = load_file(str(Path(folder) / "crosscoder.safetensors"))
    cfg = json.loads((Path(folder) / "config.json").read_text())
    norms = np.linalg.norm(t["W_dec_FMd"], axis=-1) * t["scales_M"][None, :]
    rel = measures.rel(norms)
    df = pd.DataFrame({"latent": np.arange(len(rel))})
    for m, r in enumerate(cfg["revisions"]):
        df[f"dec_norm_{r}"] = norms[:, m]
    measures.add_shares(df, "reldec", rel, cfg["revisions"])
    return pd.concat([df, measures.timeline(norms, cfg["revisions"], cfg.get("revision_tokens"))], axis=1)


def csv_of(path: Path):
    return read_csv(str(path), _mtime(path)) if path.exists() else None


def json_of(path: Path):
    return read_json(str(path), _mtime(path)) if path.exists() else None


def missing(what: str, command: str):
    st.info(f"No {what} yet. Make it with:\n\n`{command}`")


# ---------------------------------------------------------------------------------------------
# Pages

def page_checkpoints(scans: Path, run: Path | None, cfg: dict | None):
    st.header("Checkpoints: when is agreement learned?")
    files = sorted(p for p in scans.glob("*.csv") if not p.name.endswith("-cos.csv")) if scans.is_dir() else []
    if not files:
        return missing(f"scans in {scans}", "python cache_acts.py --scan --model toy --suggest")
    name = st.selectbox("scan", [p.name for p in files])
    df = csv_of(inside(scans, name))
    acc = [c for c in df.columns if c.startswith("acc_")]
    # a log axis cannot show step 0: it sits at half the first positive token count
    pos = df["tokens"][df["tokens"] > 0]
    df = df.assign(x=df["tokens"].where(df["tokens"] > 0, (pos.min() / 2) if len(pos) else 1).fillna(
        pos.max() if len(pos) else 1))
    long = df.melt(id_vars=["revision", "x"], value_vars=acc, var_name="sub-task", value_name="accuracy")
    chart = alt.Chart(long).mark_line(point=True).encode(
        x=alt.X("x:Q", scale=alt.Scale(type="log"), title="training tokens (log; step 0 at the left edge)"),
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])), color="sub-task:N",
        tooltip=["revision", "sub-task", "accuracy"])
    chosen = set(cfg["revisions"]) if cfg else set()
    marks = df[df.revision.isin(chosen)]
    if len(marks):
        chart = chart + alt.Chart(marks).mark_rule(strokeDash=[4, 4], color="gray").encode(
            x="x:Q", tooltip=["revision"])
        st.caption(f"dashed: the run's revisions ({', '.join(cfg['revisions'])})")
    st.altair_chart(chart, width="stretch")
    cos_path = scans / name.replace(".csv", "-cos.csv")
    if cos_path.exists():
        cos = csv_of(cos_path).rename(columns={"Unnamed: 0": "a"}).melt(id_vars="a", var_name="b", value_name="cos")
        order = list(df.revision)
        st.subheader("Layer-L activation similarity between revisions (mean per-token cosine)")
        st.altair_chart(alt.Chart(cos).mark_rect().encode(
            x=alt.X("a:N", sort=order), y=alt.Y("b:N", sort=order),
            color=alt.Color("cos:Q", scale=alt.Scale(scheme="viridis")),
            tooltip=["a", "b", alt.Tooltip("cos:Q", format=".3f")]), width="stretch")
    st.dataframe(df, width="stretch")


def page_training(run: Path):
    st.header("Training")
    log = run / "log.jsonl"
    cfg = json_of(run / "config.json") or {}
    imported = cfg.get("imported")
    if imported:   # convert.py --from: trained elsewhere, so no training log; its evaluation still shows below
        st.info(f"Imported, not trained here: {imported.get('format')} crosscoder from {imported.get('source')} "
                f"(sha256 {imported.get('sha256')}), by convert.py")
    if not log.exists() and not imported:
        return missing("training log", "python train.py")
    if log.exists():
        training_charts(log, cfg)
    ev = json_of(run / "eval.json")
    if ev is None:
        return missing("evaluation", f"python evaluate.py --run {run}")
    st.subheader("Evaluation (held-out tokens)")
    st.dataframe(pd.DataFrame(ev["revisions"]).T, width="stretch")
    st.caption(f"L0 {ev['l0']:.1f} · dead {100 * ev['dead_frac']:.1f}% · {ev['n_tokens']} tokens")


def training_charts(log: Path, cfg: dict):
    df = read_log(str(log), _mtime(log))
    revs = cfg.get("revisions") or [f"rev{i}" for i in range(len(df.val_fvu.iloc[0]))]
    fvu = pd.DataFrame([dict(step=s, revision=revs[m], fvu=v) for s, vals in zip(df.step, df.val_fvu)
                        for m, v in enumerate(vals)])
    c1, c2 = st.columns(2)
    c1.altair_chart(alt.Chart(df).mark_line().encode(x="step:Q", y=alt.Y("loss:Q", scale=alt.Scale(type="log")))
                    .properties(title="loss"),
                    width="stretch")
    c2.altair_chart(alt.Chart(fvu).mark_line().encode(x="step:Q", y="fvu:Q", color="revision:N").properties(
        title="validation FVU per revision"), width="stretch")
    c3, c4 = st.columns(2)
    c3.altair_chart(alt.Chart(df).mark_line().encode(x="step:Q", y=alt.Y("val_l0:Q", title="L0"))
                    .properties(title="L0"),
                    width="stretch")
    c4.altair_chart(alt.Chart(df).mark_line().encode(x="step:Q", y=alt.Y("val_dead_frac:Q", title="dead fraction"))
                    .properties(
        title="dead latents (validation)"), width="stretch")


def polygon(rel: np.ndarray) -> np.ndarray:
    """Barycentric placement: revision m is a vertex of a regular polygon (a line for 2)."""
    M = rel.shape[1]
    if M == 2:
        verts = np.array([[0.0, 0.0], [1.0, 0.0]])
    else:
        ang = np.pi / 2 + 2 * np.pi * np.arange(M) / M
        verts = np.stack([np.cos(ang), np.sin(ang)], 1)
    return rel @ verts


def latent_frame(run: Path, cfg: dict, task: str | None, source: str) -> pd.DataFrame:
    revs = cfg["revisions"]
    lat = csv_of(run / "latents.csv")
    if lat is None:
        lat = decoder_table(str(run), _mtime(run / "crosscoder.safetensors"))
    sheet = csv_of(run / "relie" / task / "latents.csv") if task else None
    df = lat.copy()
    if sheet is not None:
        keep = [c for c in sheet.columns if c.startswith(("ie_", "relie", "exact_", "atp_", "unfaithful_"))
                or c == "latent"]
        df = df.merge(sheet[keep], on="latent", how="left")
    ann = measures.read_annotations(run)
    df["annotated"] = df.latent.isin(ann.latent.astype(int)) if len(ann) else False
    prefix = {"RelDec": "reldec_", "RelIE": "relie_", "RelIE (normalised)": "relie_norm_"}[source]
    cols = [f"{prefix}{r}" for r in revs]
    if not all(c in df.columns for c in cols):
        return df.iloc[0:0]
    placed = df.dropna(subset=cols).copy()
    xy = polygon(placed[cols].to_numpy())
    placed["x"], placed["y"] = xy[:, 0], xy[:, 1]
    if len(revs) == 2:   # spread a 2-revision line by activation frequency (or decoder norm)
        placed["y"] = placed["freq"] if "freq" in placed else placed[f"dec_norm_{revs[-1]}"]
    cls = {"RelDec": "reldec_class", "RelIE": "relie_class", "RelIE (normalised)": "relie_norm_class"}[source]
    placed["class"] = placed[cls].fillna("not attributed")
    # a class that under 80% of the bootstrap resamples reproduce is shown greyed
    agree = f"{cls}_agree"
    placed["agree"] = placed[agree].fillna(1.0) if agree in placed else 1.0
    return placed


def show_trust(run: Path, task: str, summary: dict):
    """What the attribution covers and what its intervals resample, beside the seed spread where
    seeds.py measured one."""
    cov = summary.get("coverage") or {}
    shares = {r: c["latents_share"] for r, c in cov.items() if c.get("latents_share") is not None}
    if shares:
        st.caption("Latents' share of the task's IE (the rest is the error term): "
                   + ", ".join(f"{r} {100 * v:.0f}%" for r, v in shares.items()))
        for r, v in shares.items():
            if v < 0.5:
                st.warning(f"At {r} the error term carries {100 * (1 - v):.0f}% of the task's IE: the crosscoder "
                           "misses much of what the LM uses there (try another layer, a larger F or a lower λ).")
    split = summary.get("split") or {}
    where = ("no split: ablations are in-sample" if split.get("in_sample") else
             f"{split.get('n_selection')} pairs for selection, {split.get('n_test')} held out for ablation")
    stab = json_of(run / "stability" / "seeds.json") or {}
    gap = (stab.get("findings") or {}).get("ablation_gap_last") or {}
    seeds = (f"; over {len(stab.get('seeds', []))} crosscoder seeds the top-k − random-k gap at the last revision "
             f"ranged {gap['min']:.1f}–{gap['max']:.1f} points (seeds.py)" if gap.get("min") is not None else "")
    st.caption(f"Pairs: {where}. Intervals are 95% bootstrap over pairs; they do not cover the crosscoder's or the "
               f"LM's seed{seeds}. Classes greyed: under 80% of bootstrap resamples give the same class.")


def context_html(ctx: dict) -> str:
    top = max(ctx["max"], 1e-9)
    return "".join(
        f"<span style='background:rgba(255,120,0,{min(1.0, max(0.0, a / top)):.2f});padding:1px 2px;"
        f"border-radius:3px' title='{a:.3f}'>{html.escape(t)}</span>" for t, a in zip(ctx["tokens"], ctx["acts"]))


def page_latents(run: Path, cfg: dict):
    st.header("Latents: which feature matters at which checkpoint?")
    revs = cfg["revisions"]
    tasks_done = sorted(p.name for p in (run / "relie").iterdir() if (p / DONE).exists()) \
        if (run / "relie").is_dir() else []
    c1, c2, c3 = st.columns(3)
    task = c1.selectbox("task", tasks_done) if tasks_done else None
    source = c2.radio("place latents by", ["RelDec", "RelIE", "RelIE (normalised)"] if task else ["RelDec"],
                      horizontal=True)
    if not task:
        c3.info(f"RelIE needs `python relie.py --run {run}`")
    df = latent_frame(run, cfg, task, source)
    f1, f2, f3 = st.columns(3)
    classes = sorted(df["class"].unique()) if len(df) else []
    pick = f1.multiselect("class", classes, default=classes)
    art = (f2.selectbox("latent-scaling artifact", ["all", "flagged only", "hide flagged"])
           if "artifact" in df else "all")
    ann = f3.selectbox("annotated", ["all", "annotated", "not annotated"])
    view = df[df["class"].isin(pick)]
    if art != "all":
        view = view[view.artifact == (art == "flagged only")]
    if ann != "all":
        view = view[view.annotated == (ann == "annotated")]
    left, right = st.columns([3, 2])
    tip = ["latent", "class"] + [c for c in view.columns if c.startswith(("reldec_", "relie_")) and c[-1] != "s"][:6]
    chart = alt.Chart(view).mark_circle(opacity=0.7).encode(
        x=alt.X("x:Q", axis=None), y=alt.Y("y:Q", axis=None),
        color=alt.condition("datum.agree < 0.8", alt.value("lightgray"), alt.Color("class:N")),
        size=alt.Size("freq:Q", legend=None) if "freq" in view else alt.value(40),
        tooltip=[c for c in tip if c in view.columns]).properties(
        title=f"emergence map: {len(view)} latents placed by {source} "
              f"(vertices: {', '.join(revs)})", height=420)
    corners = pd.DataFrame(polygon(np.eye(len(revs))), columns=["x", "y"]).assign(revision=revs)
    chart = chart + alt.Chart(corners).mark_text(fontWeight="bold", dy=-12).encode(x="x:Q", y="y:Q", text="revision:N")
    if len(revs) <= 3:
        left.altair_chart(chart, width="stretch")
    else:   # a polygon of M > 3 vertices loses the training order
        left.info(f"{len(revs)} revisions: the Timeline page shows each latent's curve over them in training order.")
    if task:
        summary = json_of(run / "relie" / task / "summary.json") or {}
        faith = summary.get("faithfulness")
        if faith:
            st.caption(f"Attribution: {summary.get('method')} · faithfulness against exact ablation of the "
                       f"{len(summary.get('chosen', []))} chosen latents: Spearman ρ {faith['rho']:.2f} (AtP "
                       f"{faith['rho_atp']:.2f}); {faith['n_flagged']} of {faith['n']} (latent, revision) disagree")
        show_trust(run, task, summary)
        err = csv_of(run / "relie" / task / "error.csv")
        share = err.groupby("revision").apply(
            lambda g: (g.ie_error.abs() * g.n_pairs).sum() /
                      max(((g.ie_error.abs() + g.ie_latents_abs) * g.n_pairs).sum(), 1e-12),
            include_groups=False).reindex(revs).rename("error share of |IE|").reset_index()
        right.subheader("Error term's share of the IE")
        right.altair_chart(alt.Chart(share).mark_bar().encode(x=alt.X("revision:N", sort=revs),
                           y=alt.Y("error share of |IE|:Q", scale=alt.Scale(domain=[0, 1]))), width="stretch")
        right.dataframe(err, width="stretch", height=200)
    st.dataframe(view.drop(columns=["x", "y"]), width="stretch", height=260)
    if not len(view):
        return
    by = [f"ie_{r}" for r in revs if f"ie_{r}" in view.columns] or ["latent"]
    ids = [int(i) for i in view.sort_values(by, ascending=False).latent]
    latent = st.selectbox("latent", ids, key="latent")
    latent_detail(run, cfg, task, df[df.latent == latent].iloc[0], latent)


def latent_detail(run: Path, cfg: dict, task: str | None, row, latent: int):
    revs = cfg["revisions"]
    flagged = " — flagged: likely L1 artifact (latent scaling)" if row.get("artifact") is True else ""
    st.subheader(f"Latent {latent}{flagged}")
    per = pd.DataFrame(dict(revision=revs, decoder_norm=[row[f"dec_norm_{r}"] for r in revs],
                            IE=[row.get(f"ie_{r}", np.nan) for r in revs],
                            lo=[row.get(f"ie_{r}_lo", np.nan) for r in revs],
                            hi=[row.get(f"ie_{r}_hi", np.nan) for r in revs]))
    c1, c2 = st.columns(2)
    c1.altair_chart(alt.Chart(per).mark_bar().encode(x=alt.X("revision:N", sort=revs), y="decoder_norm:Q").properties(
        title="decoder norm per revision"), width="stretch")
    if per.IE.notna().any():
        bars = alt.Chart(per.fillna(0)).mark_bar().encode(x=alt.X("revision:N", sort=revs), y="IE:Q")
        if per.lo.notna().any():
            bars = bars + alt.Chart(per.fillna(0)).mark_rule(color="black").encode(
                x=alt.X("revision:N", sort=revs), y="lo:Q", y2="hi:Q")
        c2.altair_chart(bars.properties(title=f"IE per revision ({task}), 95% interval over pairs"), width="stretch")
    if f"exact_{revs[0]}" in row.index and pd.notna(row.get(f"exact_{revs[0]}")):
        check = pd.DataFrame({"revision": revs, "IE": [row[f"ie_{r}"] for r in revs],
                              "exact ablation": [row[f"exact_{r}"] for r in revs],
                              "AtP": [row[f"atp_{r}"] for r in revs],
                              "disagrees": [bool(row[f"unfaithful_{r}"]) for r in revs]})
        st.markdown("**Faithfulness**: this latent's IE beside exact zero-ablation of it (error term kept) and "
                    "AtP; *disagrees* = opposite sign or more than 2× apart")
        st.dataframe(check, width="stretch", hide_index=True)
    cos = {c[4:]: row[c] for c in row.index if c.startswith("cos_")}
    if cos and len(revs) <= 3:
        st.write("decoder cosine between revisions: "
                 + ", ".join(f"{k.replace('_', ' vs ', 1)}: {v:.2f}" for k, v in cos.items()))
    elif cos:
        cosine_heatmap(row, revs, "decoder cosine between revisions")
    if task:
        eff = (json_of(run / "relie" / task / "logit_effects.json") or {}).get(str(latent))
        ctx = (json_of(run / "relie" / task / "contexts.json") or {}).get(str(latent))
        if eff:
            st.markdown("**Logit effects** (direct path through each revision's final norm and unembedding)")
            st.dataframe(pd.DataFrame({r: dict(promoted=" ".join(t for t, _ in e["promoted"]),
                                               suppressed=" ".join(t for t, _ in e["suppressed"]))
                                       for r, e in eff.items()}).T, width="stretch")
        if ctx:
            st.markdown("**Top-activating contexts** (held-out LM text, shaded by activation)")
            for c in ctx:
                st.markdown(f"<div style='font-family:monospace' class='cct-context'>{context_html(c)}</div>",
                            unsafe_allow_html=True)
        elif ctx is None:
            st.caption("contexts and logit effects are computed by relie.py for its selected latents")
    ann = measures.read_annotations(run)
    old = ann[ann.latent.astype(int) == latent]
    # keyed by run and latent: a widget's kept state would show (and save) another run's annotation
    with st.form(f"annotate-{run.name}-{latent}"):
        desc = st.text_area("description", value=old.description.iloc[0] if len(old) else "",
                            key=f"desc-{run.name}-{latent}")
        tags = st.text_input("tags (comma-separated)", value=old.tags.iloc[0] if len(old) else "",
                             key=f"tags-{run.name}-{latent}")
        if st.form_submit_button("save annotation"):
            measures.save_annotation(run, latent, desc, tags)
            st.success(f"saved to {run.name}/annotations.csv")


def log_positions(tokens) -> np.ndarray:
    """x positions on a log token axis: step 0 (0 tokens) sits at half the first positive count; a revision
    without a token count (main) one log-step past the last."""
    t = pd.Series(tokens, dtype=float)
    pos = t[t > 0]
    first, last = (pos.min(), pos.max()) if len(pos) else (1.0, 1.0)
    t = t.where(~(t <= 0), first / 2)
    return t.fillna(last * 2).to_numpy()


def cell_edges(x) -> tuple[np.ndarray, np.ndarray]:
    """Left and right edges of a heatmap cell around each x on a log axis: midway (geometrically) to the
    neighbours."""
    lx = np.log(np.asarray(x, dtype=float))
    mids = (lx[1:] + lx[:-1]) / 2
    step = np.diff(lx).min() if len(lx) > 1 else 1.0
    left = np.concatenate([[lx[0] - step / 2], mids])
    right = np.concatenate([mids, [lx[-1] + step / 2]])
    return np.exp(left), np.exp(right)


def scan_for(scans: Path, cfg: dict) -> pd.DataFrame | None:
    """The scan of this run's model and layer (any task), if there is one."""
    if not scans.is_dir():
        return None
    stem = f"{Path(cfg['model']).name if '/' in cfg['model'] else cfg['model']}-L{cfg['layer']}-"
    files = sorted(p for p in scans.glob(f"{stem}*.csv") if not p.name.endswith("-cos.csv"))
    return csv_of(files[0]) if files else None


def page_timeline(run: Path, cfg: dict, scans: Path):
    st.header("Timeline: when does each feature form, peak and fade?")
    revs = cfg["revisions"]
    tokens = cfg.get("revision_tokens") or [None] * len(revs)
    x = log_positions(tokens)
    left, right = cell_edges(x)
    # altair's alt.X(...).scale is a setter, not the value: keep scale and title as plain objects
    x_scale = alt.Scale(type="log", domain=[float(left[0]), float(right[-1])])
    x_title = "training tokens (log; step 0 at the left edge)"
    axis = alt.X("x:Q", scale=x_scale, title=x_title)
    scan = scan_for(scans, cfg)
    if scan is not None:
        acc = [c for c in scan.columns if c.startswith("acc_") and c != "acc_mean"]
        scan = scan.assign(x=log_positions(scan["tokens"]))
        keep = scan[(scan.x >= left[0]) & (scan.x <= right[-1])]
        long = keep.melt(id_vars=["revision", "x"], value_vars=acc, var_name="sub-task", value_name="accuracy")
        st.altair_chart(alt.Chart(long).mark_line(point=True).encode(
            x=axis, y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])), color="sub-task:N",
            tooltip=["revision", "sub-task", "accuracy"]).properties(title="task accuracy per sub-task", height=180),
            width="stretch")
    else:
        st.info("No scan of this model and layer yet (it gives the accuracy curve): "
                "`python cache_acts.py --scan --model …`")
    lat = csv_of(run / "latents.csv")
    if lat is None:
        lat = decoder_table(str(run), _mtime(run / "crosscoder.safetensors"))
    tasks_done = sorted(p.name for p in (run / "relie").iterdir() if (p / DONE).exists()) \
        if (run / "relie").is_dir() else []
    c1, c2, c3, c4 = st.columns(4)
    task = c1.selectbox("task", tasks_done, key="tl-task") if tasks_done else None
    sheet = csv_of(run / "relie" / task / "latents.csv") if task else None
    sources = ["decoder norm"] + (["|IE|", "|IE| share of its revision"] if sheet is not None else [])
    source = c2.radio("curve", sources, horizontal=True, key="tl-source")
    scale = st.radio("colour", ["fraction of the latent's own peak", "share over revisions"], horizontal=True,
                     key="tl-scale")
    if source == "|IE|":
        df = sheet.copy()
        share_cols, cls_col, formed_col = [f"relie_{r}" for r in revs], "ie_timeline_class", "ie_formed_at"
    elif source != "decoder norm":
        df = sheet.copy()
        share_cols, cls_col = [f"relie_norm_{r}" for r in revs], "ie_norm_timeline_class"
        formed_col = "ie_norm_formed_at"
    else:
        df = lat.copy()
        share_cols, cls_col, formed_col = [f"reldec_{r}" for r in revs], "timeline_class", "formed_at"
        if sheet is not None:
            df = df.merge(sheet[["latent"] + [c for c in sheet.columns if c.startswith("ie_")]], on="latent",
                          how="left")
    ann = measures.read_annotations(run)
    df["annotated"] = df.latent.isin(ann.latent.astype(int)) if len(ann) else False
    present = set(df[cls_col].fillna(""))   # the IE classes carry a sign (+/−)
    classes = [c for t in measures.TIMELINE_CLASSES for c in (t, measures.PLUS + t, measures.MINUS + t) if c in present]
    # widgets whose options depend on the run are keyed by it: a kept selection would hide new classes
    pick = c3.multiselect("class", classes, default=classes, key=f"tl-class-{run.name}-{source}")
    which = c4.selectbox("annotated", ["all", "annotated", "not annotated"], key="tl-ann")
    mask = df[cls_col].isin(pick).to_numpy()
    if which != "all":
        mask &= (df.annotated == (which == "annotated")).to_numpy()
    order = {r: i for i, r in enumerate(revs)}
    view = df[mask].assign(_formed=df[mask][formed_col].map(order), _peak=df[mask][formed_col.replace(
        "formed", "peak")].map(order))
    view = view.sort_values(["_formed", "_peak", "latent"], kind="stable")
    n_max = st.slider("latents shown (in formed_at order)", 10, max(10, len(view)), min(200, max(10, len(view))),
                      key=f"tl-n-{run.name}-{source}")
    view = view.head(n_max)
    shares = view[share_cols].to_numpy()
    if scale.startswith("fraction"):   # each row by its own peak: formation reads as a staircase at any M
        shares = measures.peak_fraction(shares)
    cells = pd.DataFrame([dict(rank=k, latent=int(l), revision=r, x=float(x[m]), x0=float(left[m]),
                               x1=float(right[m]), share=float(shares[k, m]), cls=c)
                          for k, (l, c) in enumerate(zip(view.latent, view[cls_col])) for m, r in enumerate(revs)])
    if not len(cells):
        return st.info("No latent of the chosen classes.")
    heat = alt.Chart(cells).mark_rect().encode(
        x=alt.X("x0:Q", scale=x_scale, title=x_title), x2="x1:Q",
        y=alt.Y("rank:O", axis=None, title="latents by formed_at"),
        color=alt.Color("share:Q", scale=alt.Scale(scheme="viridis"), title=f"{source}: {scale}"),
        tooltip=["latent", "revision", alt.Tooltip("share:Q", format=".2f"), "cls"]).properties(
        title=f"timeline: {len(view)} latents × {len(revs)} revisions, sorted by formed_at ({source})",
        height=min(900, 4 * len(view) + 60))
    st.altair_chart(heat, width="stretch")
    st.caption("classes from the curve: kept (formed at the first revision, never fades), emerging (forms "
               "later), discontinued (fades), transient (forms later and fades); formed = half the maximum")
    latent = st.selectbox("latent", [int(i) for i in view.latent], key=f"tl-latent-{run.name}")
    row = df[df.latent == latent].iloc[0]
    curves = pd.DataFrame([dict(x=float(x[m]), revision=r, what="decoder norm (share of its max)",
                                value=float(row[f"reldec_{r}"] / max(row[[f"reldec_{q}" for q in revs]].max(), 1e-12)))
                           for m, r in enumerate(revs) if f"reldec_{r}" in row.index])
    if f"ie_{revs[0]}" in row.index and pd.notna(row[f"ie_{revs[0]}"]):
        top = max(abs(row[[f"ie_{q}" for q in revs]]).max(), 1e-12)
        curves = pd.concat([curves, pd.DataFrame([dict(x=float(x[m]), revision=r, what="|IE| (share of its max)",
                                                       value=abs(float(row[f"ie_{r}"])) / top)
                                                  for m, r in enumerate(revs)])])
    if scan is not None:
        curves = pd.concat([curves, keep.assign(what="accuracy (mean of sub-tasks)", value=keep["acc_mean"])[
            ["x", "revision", "what", "value"]]])
    st.altair_chart(alt.Chart(curves).mark_line(point=True).encode(
        x=axis, y=alt.Y("value:Q", scale=alt.Scale(domain=[0, 1])), color="what:N",
        tooltip=["revision", "what", alt.Tooltip("value:Q", format=".2f")]).properties(
        title=f"latent {latent}: its curves against the accuracy curve", height=220), width="stretch")
    cosine_heatmap(row, revs, f"latent {latent}: decoder cosine between revisions")


def cosine_matrix(row, revs) -> pd.DataFrame | None:
    """A latent's decoder cosines (latents.csv's cos_<a>_<b>) as a revision × revision table."""
    vals = []
    for i, a in enumerate(revs):
        for j, b in enumerate(revs):
            key = f"cos_{a}_{b}" if i < j else f"cos_{b}_{a}"
            v = 1.0 if i == j else row.get(key, np.nan)
            vals.append(dict(a=a, b=b, cos=v))
    out = pd.DataFrame(vals)
    return None if out.cos.isna().all() else out


def cosine_heatmap(row, revs, title):
    """A latent's decoder cosines as a revision × revision heatmap (nothing when latents.csv has none)."""
    cos = cosine_matrix(row, revs)
    if cos is not None:
        st.altair_chart(alt.Chart(cos).mark_rect().encode(
            x=alt.X("a:N", sort=revs), y=alt.Y("b:N", sort=revs),
            color=alt.Color("cos:Q", scale=alt.Scale(domain=[-1, 1], scheme="redblue")),
            tooltip=["a", "b", alt.Tooltip("cos:Q", format=".2f")]).properties(title=title, height=260),
            width="content")


def page_ablation(run: Path):
    st.header("Ablation: what breaks without them?")
    folder = run / "ablation"
    done = sorted(p.name for p in folder.iterdir() if (p / DONE).exists()) if folder.is_dir() else []
    if not done:
        return missing("ablations", f"python ablate.py --run {run}")
    name = st.selectbox("task", done)
    df = csv_of(inside(folder, name) / "ablation.csv")
    sub = st.selectbox("sub-task", list(dict.fromkeys(df.subtask)))
    d = df[df.subtask == sub]
    sets = d[d.kind.isin(["top", "random"])].groupby(["kind", "selected_at", "revision"], as_index=False)[
        ["delta", "acc_drop"]].mean()
    st.altair_chart(alt.Chart(sets).mark_bar().encode(
        x=alt.X("kind:N", title=None), y=alt.Y("acc_drop:Q", title="accuracy drop"), color="kind:N",
        column=alt.Column("revision:N", title="spliced into"), row=alt.Row("selected_at:N", title="top-k of"),
        tooltip=["kind", "selected_at", "revision", "acc_drop", "delta"]), width="content")
    single = d[d.kind == "single"].pivot_table(index="latents", columns="revision", values="delta")
    st.subheader("Single-latent ablations: Δ logit difference per revision")
    st.dataframe(single, width="stretch")
    sp = csv_of(inside(folder, name) / "consistency.csv")
    if sp is not None:
        st.subheader("Spearman ρ of |Δ_B|/|Δ_A| with 2-way RelIE, normalised RelIE and RelDec")
        st.dataframe(sp, width="stretch")


def main():
    st.set_page_config(page_title="crosscoding through time", layout="wide")
    runs, scans = roots()
    names = sorted(p.name for p in runs.iterdir() if (p / "config.json").exists()) if runs.is_dir() else []
    page = st.sidebar.radio("page", ["Checkpoints", "Training", "Latents", "Timeline", "Ablation"])
    name = st.sidebar.selectbox("run", names) if names else None
    st.sidebar.caption(f"runs: {runs}\n\nscans: {scans}")
    run = cfg = None
    if name:
        try:
            run = inside(runs, name)
        except ValueError as e:
            st.error(str(e))
            return
        cfg = json_of(run / "config.json")
    if page == "Checkpoints":
        return page_checkpoints(scans, run, cfg)
    if run is None:
        return missing(f"runs in {runs}", "python train.py   (or: bash pipeline.sh)")
    if page == "Training":
        page_training(run)
    elif page == "Latents":
        page_latents(run, cfg)
    elif page == "Timeline":
        page_timeline(run, cfg, scans)
    else:
        page_ablation(run)


if __name__ == "__main__":   # streamlit runs the script as __main__; importing it runs nothing
    main()
