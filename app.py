"""app.py — browse scans and crosscoder runs: when agreement is learned, which latents carry it at
which checkpoint, what they respond to, and what breaks without them.

    streamlit run app.py                                  # reads runs/ and scans/ here
    streamlit run app.py -- --runs /data/runs --scans /data/scans

Pages: Checkpoints (scans/), Training (the run's config, log.jsonl, eval.json), Latents (the emergence map,
coverage, faithfulness, contexts, logit effects, annotations), Timeline (every latent over the revisions in
training order, grouped by where it forms, under the accuracy curve; each formation revision's latents with their
verdicts), Ablation (each revision's top-k verdict; top-k against random-k, accuracy drops beside Δ, with
intervals and ceiling/chance flags; leave-one-out, overlaps, classes, the joint and consistency tables with their
verdicts), Checks (the verdicts of controls.py, checkpoint_sets.py and seeds.py). Runs are listed newest first. The app
reads only inside its runs and scans roots, loads no
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

from crosscoding import measures, verdicts  # noqa: E402  (numpy/pandas only: the viewer loads no torch)
from crosscoding.common import DONE  # noqa: E402
from crosscoding.findings import fmt, num, span  # noqa: E402


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
    """Every latent's RelDec, timeline and decoder cosines from the crosscoder itself (safetensors), when
    evaluate.py has not run."""
    from safetensors.numpy import load_file
    t = load_file(str(Path(folder) / "crosscoder.safetensors"))
    cfg = json.loads((Path(folder) / "config.json").read_text())
    revs = cfg["revisions"]
    norms = np.linalg.norm(t["W_dec_FMd"], axis=-1) * t["scales_M"][None, :]
    unit = t["W_dec_FMd"] / np.maximum(np.linalg.norm(t["W_dec_FMd"], axis=-1, keepdims=True), 1e-12)
    cols = {"latent": np.arange(len(norms))}
    for m, r in enumerate(revs):
        cols[f"dec_norm_{r}"] = norms[:, m]
    measures.add_shares(cols, "reldec", measures.rel(norms), revs)
    for a, b in measures.pairs_of(revs):
        cols[f"cos_{revs[a]}_{revs[b]}"] = (unit[:, a] * unit[:, b]).sum(-1)
    return pd.concat([pd.DataFrame(cols), measures.timeline(norms, revs, cfg.get("revision_tokens"))], axis=1)


def csv_of(path: Path):
    # a copy: the cache hands back its frame column by column, which pandas would warn is fragmented
    return read_csv(str(path), _mtime(path)).copy() if path.exists() else None


def json_of(path: Path):
    return read_json(str(path), _mtime(path)) if path.exists() else None


def missing(what: str, command: str):
    st.info(f"No {what} yet. Make it with:\n\n`{command}`")


def run_names(runs: Path) -> list[str]:
    """The run folders (those with a config.json), newest first."""
    if not runs.is_dir():
        return []
    found = [p for p in runs.iterdir() if (p / "config.json").exists()]
    return [p.name for p in sorted(found, key=lambda p: (-(p / "config.json").stat().st_mtime, p.name))]


def latent_table(run: Path) -> pd.DataFrame:
    """evaluate.py's latents.csv, else the same decoder columns read from the crosscoder."""
    lat = csv_of(run / "latents.csv")
    return lat if lat is not None else decoder_table(str(run), _mtime(run / "crosscoder.safetensors"))


def tasks_of(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "relie").iterdir() if (p / DONE).exists()) if (run / "relie").is_dir() else []


# Per-latent tables of an attribution (files under relie/<task>/ with a `latent` column), merged into every
# latent table the app shows; a later stage's per-latent verdicts join the pages by being listed here.
RELIE_LATENT_FILES = ("latents.csv",)


def attributed(run: Path, task: str | None) -> pd.DataFrame | None:
    """The attributed latents of a task: relie.py's sheet and every other file of RELIE_LATENT_FILES, one row
    per latent, with `disagree` (the revisions where the attribution and exact ablation disagree)."""
    frames = [f for f in (csv_of(run / "relie" / task / name) for name in RELIE_LATENT_FILES) if f is not None] \
        if task else []
    if not frames:
        return None
    df = frames[0]
    for f in frames[1:]:
        df = df.merge(f[["latent"] + [c for c in f.columns if c not in df.columns]], on="latent", how="left")
    flags = [c for c in df.columns if c.startswith("unfaithful_")]
    return df.assign(disagree=df[flags].fillna(False).astype(bool).sum(axis=1) if flags else np.nan)


def ordered(df: pd.DataFrame, column: str, revs) -> pd.DataFrame:
    """Rows sorted by a revision column in training order (never alphabetically)."""
    return df.sort_values(column, key=lambda s: s.map({r: i for i, r in enumerate(revs)}), kind="stable")


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


def config_table(cfg: dict) -> pd.DataFrame:
    """What defines the run, one row each: the settings its variant reads are the ones config.json's
    arch_settings names (name -> help, written with the run)."""
    data = cfg.get("data") or {}
    own = cfg.get("arch_settings")
    settings = ([(f"{help} (--{name.replace('_', '-')})", cfg.get(name)) for name, help in own.items()]
                if own is not None else [("the variant's settings", "not listed (config.json has no arch_settings)")])
    rows = [("model", cfg.get("model")), ("layer", cfg.get("layer")),
            ("revisions", f"{len(cfg.get('revisions', []))}: {', '.join(cfg.get('revisions', []))}"),
            ("architecture (--arch)", cfg.get("arch", "l1")), ("F, latents (--dict-size)", cfg.get("dict_size")),
            *settings,
            ("training tokens (--tokens)", cfg.get("tokens")), ("steps × batch", f"{cfg.get('steps')} × "
                                                                                  f"{cfg.get('batch_size')}"),
            ("lr", cfg.get("lr")), ("seed", cfg.get("seed")),
            ("data", data.get("cache") or data.get("text")), ("weights", data.get("weights", "hub"))]
    return pd.DataFrame(rows, columns=["setting", "value"]).astype(str)


def page_training(run: Path):
    st.header("Training")
    log = run / "log.jsonl"
    cfg = json_of(run / "config.json") or {}
    imported = cfg.get("imported")
    if imported:   # convert.py --from: trained elsewhere, so no training log; its evaluation still shows below
        st.info(f"Imported, not trained here: {imported.get('format')} crosscoder from {imported.get('source')} "
                f"(sha256 {imported.get('sha256')}), by convert.py")
    st.subheader(f"Run {run.name}" + ("" if (run / DONE).exists() else " — unfinished (no DONE)"))
    st.table(config_table(cfg).set_index("setting"))   # a static table: every value whole
    if not log.exists() and not imported:
        return missing("training log", "python train.py")
    if log.exists():
        training_charts(log, cfg)
    ev = json_of(run / "eval.json")
    if ev is None:
        return missing("evaluation", f"python evaluate.py --run {run}")
    st.subheader("Evaluation (held-out tokens)")
    table = pd.DataFrame(ev["revisions"]).T
    st.dataframe(table.reindex([r for r in cfg.get("revisions", table.index) if r in table.index]), width="stretch")
    warning = measures.fvu_warning({r: s["fvu"] for r, s in ev["revisions"].items()}, "held-out FVU")
    if warning:
        st.warning(warning.removeprefix("warning: "))
    st.caption(f"L0 {ev['l0']:.1f} · dead {100 * ev['dead_frac']:.1f}% · {ev['n_tokens']} tokens")


def training_charts(log: Path, cfg: dict):
    df = read_log(str(log), _mtime(log))
    revs = cfg.get("revisions") or [f"rev{i}" for i in range(len(df.val_fvu.iloc[0]))]
    fvu = pd.DataFrame([dict(step=s, revision=revs[m], fvu=v) for s, vals in zip(df.step, df.val_fvu)
                        for m, v in enumerate(vals)])
    warning = measures.fvu_warning(dict(zip(revs, df.val_fvu.iloc[-1])), "the last validation FVU")
    if warning:
        st.warning(warning.removeprefix("warning: "))
    c1, c2 = st.columns(2)
    c1.altair_chart(alt.Chart(df).mark_line().encode(x="step:Q", y=alt.Y("loss:Q", scale=alt.Scale(type="log")))
                    .properties(title="loss"), width="stretch")
    c2.altair_chart(alt.Chart(fvu).mark_line().encode(
        x="step:Q", y="fvu:Q", color=alt.Color("revision:N", sort=revs, scale=alt.Scale(domain=revs)),
        tooltip=["step", "revision", alt.Tooltip("fvu:Q", format=".3f")]).properties(
        title="validation FVU per revision"), width="stretch")
    c3, c4 = st.columns(2)
    c3.altair_chart(alt.Chart(df).mark_line().encode(x="step:Q", y=alt.Y("val_l0:Q", title="L0"))
                    .properties(title="L0"), width="stretch")
    c4.altair_chart(alt.Chart(df).mark_line().encode(x="step:Q", y=alt.Y("val_dead_frac:Q", title="dead fraction"))
                    .properties(title="dead latents (validation)"), width="stretch")


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
    df = latent_table(run).copy()
    sheet = attributed(run, task)
    if sheet is not None:
        keep = [c for c in sheet.columns if c.startswith(("ie_", "relie", "exact_", "atp_", "unfaithful_"))
                or c in ("latent", "disagree")]
        df = df.merge(sheet[keep], on="latent", how="left").copy()   # copied: one block per dtype again
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
    """What the attribution's intervals resample, beside the seed spread where seeds.py measured one."""
    split = summary.get("split") or {}
    where = ("no split: ablations are in-sample" if split.get("in_sample") else
             f"{split.get('n_selection')} pairs for selection, {split.get('n_test')} held out for ablation")
    stab = json_of(run / "stability" / "seeds.json") or {}
    gap = (stab.get("findings") or {}).get("ablation_gap_last") or {}
    seeds = (f"; over {len(stab.get('seeds', []))} crosscoder seeds the top-k − random-k gap at the last revision "
             f"ranged {gap['min']:.1f}–{gap['max']:.1f} points (seeds.py)" if gap.get("min") is not None else "")
    st.caption(f"Pairs: {where}. Intervals are 95% bootstrap over pairs; they do not cover the crosscoder's or the "
               f"LM's seed{seeds}. Classes greyed: under 80% of bootstrap resamples give the same class.")


def coverage_frame(summary: dict, revs) -> pd.DataFrame:
    """Per revision, relie.py's coverage: the latents' and the error term's shares of the task, measured (zeroing
    every latent against zeroing the error term: latents_share) and by the attribution (Σ_i |IE_i| against
    |IE_error|: latents_share_ie)."""
    cov = summary.get("coverage") or {}
    rows = []
    for r in revs:
        c = cov.get(r) or {}
        if c.get("latents_share") is None:
            continue
        by_ie = c.get("latents_share_ie")
        error_by_ie = np.nan if by_ie is None else 1 - by_ie
        rows += [dict(revision=r, part="latents", share=c["latents_share"], error_by_ie=error_by_ie),
                 dict(revision=r, part="error term", share=1 - c["latents_share"], error_by_ie=error_by_ie)]
    return pd.DataFrame(rows)


def coverage_figure(summary: dict, revs, where):
    """One coverage figure: per revision the latents' and the error term's measured shares of the task as bars,
    the error term's share by the attribution as a diamond, and what tells the two apart."""
    cov = coverage_frame(summary, revs)
    if not len(cov):
        return
    where.subheader("Coverage: how much of the task goes through the latents")
    x = alt.X("revision:N", sort=revs, scale=alt.Scale(domain=revs), title=None)
    share = alt.Tooltip("share:Q", format=".2f", title="measured share")
    by_ie = alt.Tooltip("error_by_ie:Q", format=".2f", title="error term's share by the attribution")
    bars = alt.Chart(cov).mark_bar().encode(
        x=x, y=alt.Y("share:Q", stack=True, scale=alt.Scale(domain=[0, 1]), title="share of the task"),
        color=alt.Color("part:N", sort=["latents", "error term"], scale=alt.Scale(range=["#4c78a8", "#d62728"]),
                        legend=alt.Legend(orient="top", title=None, labelLimit=600)),
        tooltip=["revision", "part", share, by_ie])
    dots = alt.Chart(cov.drop_duplicates("revision").dropna(subset=["error_by_ie"])).mark_point(
        shape="diamond", filled=True, color="black", size=60).encode(x=x, y="error_by_ie:Q",
                                                                     tooltip=["revision", by_ie])
    half = alt.Chart(pd.DataFrame({"y": [0.5]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y:Q")
    where.altair_chart((bars + dots + half).properties(height=220), width="stretch")
    where.caption(
        "Bars: the measured split (relie.py's coverage), the change of the logit difference when every latent is "
        "zeroed (the error term kept) against when the error term is zeroed (the latents kept), |Δ_latents| / "
        "(|Δ_latents| + |Δ_error|). Black diamonds: the error term's share by the attribution, |IE_error| / "
        "(|IE_error| + Σ_i |IE_i|), the number the latents' IEs suggest. They differ where the attribution, a "
        "first-order estimate, credits the latents with large IEs that cancel when they are removed together: "
        "the bars are what removing them does. Dashed: half.")
    low = {r: g for r, g in cov[cov.part == "error term"].set_index("revision").iterrows()
           if g.share > 0.5 or g.error_by_ie > 0.5}
    if low:
        where.warning("The error term carries more than half of the task at "
                      + ", ".join(f"{r} ({100 * g.share:.0f}% measured"
                                  + ("" if pd.isna(g.error_by_ie) else f", {100 * g.error_by_ie:.0f}% by IE") + ")"
                                  for r, g in low.items())
                      + ": the crosscoder misses much of what the LM uses there, and latent-level findings at those "
                        "revisions cover only part of the task (try another layer, a larger F or a lower λ).")


def context_html(ctx: dict) -> str:
    """A context as tokens shaded by the latent's activation, each value printed under its token; the
    activating token boxed; a window that reaches its text block's start says so (the model saw no more)."""
    top = max(ctx["max"], 1e-9)
    start = ("<span class='cct-start' title='start of the text block: the model saw nothing before it' "
             "style='color:#888;margin-right:4px;vertical-align:top'>⟨block start⟩</span>"
             if ctx.get("pos") is not None and ctx["pos"] - ctx["max_at"] <= 1 else "")
    cells = []
    for j, (t, a) in enumerate(zip(ctx["tokens"], ctx["acts"])):
        shade = min(1.0, max(0.0, a / top))
        border = "outline:2px solid #c04000;" if j == ctx["max_at"] else ""
        value = f"{a:.2f}" if a > 0 else "&nbsp;"
        cells.append(f"<span class='cct-tok' style='display:inline-block;vertical-align:top;text-align:center;"
                     f"margin:1px;padding:0 2px;border-radius:3px;background:rgba(255,120,0,{shade:.2f});{border}'>"
                     f"{html.escape(t).replace(' ', '&nbsp;') or '&nbsp;'}<br>"
                     f"<span class='cct-act' style='font-size:70%;color:#333'>{value}</span></span>")
    return start + "".join(cells)


def context_text(ctx: dict) -> str:
    """A context as one line of text, the activating token in ⟦ ⟧ with its activation."""
    spaced = any(t[:1].isspace() for t in ctx["tokens"])
    toks = [f"⟦{t.strip()}⟧ {ctx['max']:.2f}" if j == ctx["max_at"] else t for j, t in enumerate(ctx["tokens"])]
    return ("" if spaced else " ").join(toks).strip()


def show_contexts(contexts: list | None):
    if contexts:
        st.markdown("**Top-activating contexts** (held-out LM text; each token shaded by the latent's activation, "
                    "its value under it; boxed: the activation the context is chosen for)")
        for c in contexts:
            st.markdown(f"<div style='font-family:monospace;line-height:1.1' class='cct-context'>{context_html(c)}"
                        "</div>", unsafe_allow_html=True)
    else:
        st.caption("contexts and logit effects are computed by relie.py for its selected latents")


def badge(row, M: int) -> str:
    """' ⚠ …' for a latent whose attribution disagrees with exact ablation of it at some revision."""
    n = row.get("disagree")
    return f" ⚠ disagrees with exact ablation at {int(n)} of {M} revisions" if pd.notna(n) and n > 0 else ""


def latent_order(view: pd.DataFrame, revs) -> list[int]:
    """Latents to offer first: attributed before not attributed, faithful (the attribution agrees with exact
    ablation at every revision) before unfaithful, then by their largest |IE|; without IE, by latent."""
    ie = [f"ie_{r}" for r in revs if f"ie_{r}" in view.columns]
    if not ie:
        return [int(i) for i in view.latent]
    key = pd.DataFrame({"latent": view.latent.to_numpy(), "none": view[ie].isna().all(axis=1).to_numpy(),
                        "bad": (view["disagree"].fillna(0) > 0).to_numpy() if "disagree" in view else False,
                        "size": -view[ie].abs().max(axis=1).fillna(0).to_numpy()})
    return [int(i) for i in key.sort_values(["none", "bad", "size", "latent"]).latent]


def page_latents(run: Path, cfg: dict):
    st.header("Latents: which feature matters at which checkpoint?")
    revs = cfg["revisions"]
    tasks_done = tasks_of(run)
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
        color=alt.condition("datum.agree < 0.8", alt.value("lightgray"),
                            alt.Color("class:N", legend=alt.Legend(labelLimit=600, titleLimit=600))),
        size=alt.Size("freq:Q", legend=None) if "freq" in view else alt.value(40),
        tooltip=[c for c in tip if c in view.columns]).properties(
        title=f"emergence map: {len(view)} latents placed by {source} "
              f"(vertices: {', '.join(revs)})", height=420)
    corners = pd.DataFrame(polygon(np.eye(len(revs))), columns=["x", "y"]).assign(revision=revs)
    chart = chart + alt.Chart(corners).mark_text(fontWeight="bold", dy=-12).encode(x="x:Q", y="y:Q", text="revision:N")
    if len(revs) <= 3:
        left.altair_chart(chart, width="stretch")
    else:   # a polygon of M > 3 vertices loses the training order
        left.info(f"{len(revs)} revisions: the Timeline page shows each latent's curve over them in training order, "
                  "and its latents by formation revision with their contexts.")
    if task:
        summary = json_of(run / "relie" / task / "summary.json") or {}
        faith = summary.get("faithfulness")
        if faith:
            st.caption(f"Attribution: {summary.get('method')} · faithfulness against exact ablation of the "
                       f"{len(summary.get('chosen', []))} chosen latents: Spearman ρ {faith['rho']:.2f} (AtP "
                       f"{faith['rho_atp']:.2f}); {faith['n_flagged']} of {faith['n']} (latent, revision) disagree. "
                       "Latents marked ⚠ disagree somewhere; they are listed after the others.")
        show_trust(run, task, summary)
        coverage_figure(summary, revs, right if len(revs) <= 3 else st)
    front = [c for c in ("latent", "class", "disagree", "freq", "artifact", "annotated") if c in view.columns]
    st.dataframe(view[front + [c for c in view.columns if c not in front + ["x", "y"]]], width="stretch",
                 height=260, hide_index=True)
    if not len(view):
        return
    rows = view.set_index("latent")
    ids = latent_order(view, revs)
    latent = st.selectbox("latent (faithful first, by largest |IE|)", ids, key="latent",
                          format_func=lambda i: f"{i}{badge(rows.loc[i], len(revs))}")
    latent_detail(run, cfg, task, df[df.latent == latent].iloc[0], latent)


def latent_detail(run: Path, cfg: dict, task: str | None, row, latent: int):
    revs = cfg["revisions"]
    flagged = " — flagged: likely L1 artifact (latent scaling)" if row.get("artifact") is True else ""
    st.subheader(f"Latent {latent}{flagged}")
    checks = latent_verdicts(run, task, revs, attributed(run, task))
    if checks is not None and latent in checks.index:
        st.markdown(" · ".join(f"**{c}**: {v}" for c, v in checks.loc[latent].items() if isinstance(v, str) and v))
    if badge(row, len(revs)):
        st.warning(f"Unfaithful: {badge(row, len(revs)).strip(' ⚠')} (the table below); its IE here is not what "
                   "removing it does.")
    per = pd.DataFrame(dict(revision=revs, decoder_norm=[row[f"dec_norm_{r}"] for r in revs],
                            IE=[row.get(f"ie_{r}", np.nan) for r in revs],
                            lo=[row.get(f"ie_{r}_lo", np.nan) for r in revs],
                            hi=[row.get(f"ie_{r}_hi", np.nan) for r in revs]))
    x = alt.X("revision:N", sort=revs, scale=alt.Scale(domain=revs))
    c1, c2 = st.columns(2)
    c1.altair_chart(alt.Chart(per).mark_bar().encode(x=x, y="decoder_norm:Q").properties(
        title="decoder norm per revision"), width="stretch")
    if per.IE.notna().any():
        bars = alt.Chart(per.fillna(0)).mark_bar().encode(x=x, y="IE:Q")
        if per.lo.notna().any():
            bars = bars + alt.Chart(per.fillna(0)).mark_rule(color="black").encode(x=x, y="lo:Q", y2="hi:Q")
        c2.altair_chart(bars.properties(title=f"IE per revision ({task}), 95% interval over pairs"), width="stretch")
    if f"exact_{revs[0]}" in row.index and pd.notna(row.get(f"exact_{revs[0]}")):
        check = pd.DataFrame({"revision": revs, "IE": [row[f"ie_{r}"] for r in revs],
                              "exact ablation": [row[f"exact_{r}"] for r in revs],
                              "AtP": [row[f"atp_{r}"] for r in revs],
                              "disagrees": [bool(row[f"unfaithful_{r}"]) for r in revs]})
        st.markdown("**Faithfulness**: this latent's IE beside exact zero-ablation of it (error term kept) and "
                    "AtP; *disagrees* = opposite sign or more than 2× apart")
        st.dataframe(check, width="stretch", hide_index=True)
    cosine_view(row, revs, "decoder cosine between revisions")
    if task:
        eff = (json_of(run / "relie" / task / "logit_effects.json") or {}).get(str(latent))
        if eff:
            st.markdown("**Logit effects** (direct path through each revision's final norm and unembedding)")
            st.dataframe(pd.DataFrame({r: dict(promoted=" ".join(t for t, _ in e["promoted"]),
                                               suppressed=" ".join(t for t, _ in e["suppressed"]))
                                       for r, e in eff.items()}).T.reindex([r for r in revs if r in eff]),
                         width="stretch")
        show_contexts((json_of(run / "relie" / task / "contexts.json") or {}).get(str(latent)))
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


def cosine_view(row, revs, title):
    """A latent's decoder cosines: a line of numbers for up to 3 revisions, else a revision × revision heatmap
    (nothing when the row holds none)."""
    cos = cosine_matrix(row, revs)
    if cos is None:
        return
    if len(revs) <= 3:
        st.write(f"{title}: " + ", ".join(f"{a} vs {b}: {v:.2f}" for a, b, v in zip(cos.a, cos.b, cos.cos)
                                           if revs.index(a) < revs.index(b)))
        return
    st.altair_chart(alt.Chart(cos).mark_rect().encode(
        x=alt.X("a:N", sort=revs, scale=alt.Scale(domain=revs), title=None),
        y=alt.Y("b:N", sort=revs, scale=alt.Scale(domain=revs), title=None),
        color=alt.Color("cos:Q", scale=alt.Scale(domain=[-1, 1], scheme="redblue"), legend=alt.Legend(title="cosine")),
        tooltip=["a", "b", alt.Tooltip("cos:Q", format=".2f")]).properties(   # sizes hold the axes too
        title=title, width=110 + 28 * len(revs), height=80 + 28 * len(revs)),
        width="content")


# ---------------------------------------------------------------------------------------------
# Timeline: latents over M revisions in training order, grouped by the revision where they form

# curve → (columns of its per-revision values as shares, its timeline class, its formed_at; the raw values)
TIMELINE_SOURCES = {"decoder norm": ("reldec_", "timeline_class", "formed_at", "dec_norm_"),
                    "|IE|": ("relie_", "ie_timeline_class", "ie_formed_at", "ie_"),
                    "|IE| share of its revision": ("relie_norm_", "ie_norm_timeline_class", "ie_norm_formed_at", "ie_")}
ROW_BUDGET = 1000   # heatmap rows drawn at most; a larger group is thinned to its strongest, never dropped


def timeline_width(M: int) -> int:
    """Pixels of every chart that shares the Timeline's x-axis: 70 a revision, within [420, 1000]."""
    return min(1000, max(420, 70 * M))


def scan_for(scans: Path, cfg: dict) -> pd.DataFrame | None:
    """The scan of this run's model and layer (any task), if there is one."""
    if not scans.is_dir():
        return None
    stem = f"{Path(cfg['model']).name if '/' in cfg['model'] else cfg['model']}-L{cfg['layer']}-"
    files = sorted(p for p in scans.glob(f"{stem}*.csv") if not p.name.endswith("-cos.csv"))
    return csv_of(files[0]) if files else None


def group_caps(sizes: dict, budget: int) -> dict:
    """Rows drawn per group within the budget: every group gets an equal share, a small group all of its rows
    and what it leaves to the larger ones (so no group is ever cut to nothing)."""
    caps, left = {}, budget
    for n_left, (g, n) in zip(range(len(sizes), 0, -1), sorted(sizes.items(), key=lambda kv: kv[1])):
        caps[g] = min(n, max(1, left // n_left))
        left -= caps[g]
    return caps


def timeline_rows(view: pd.DataFrame, formed: str, revs, budget=ROW_BUDGET) -> tuple[pd.DataFrame, dict]:
    """The heatmap's rows: grouped by formed_at in training order, each group by peak_at, faded_at and strength;
    a group over its share of the budget keeps its strongest rows. Returns the rows (with `group`) and, per
    thinned group, (rows drawn, rows in it)."""
    order = {r: i for i, r in enumerate(revs)}
    peak, faded = formed.replace("formed", "peak"), formed.replace("formed", "faded")
    v = view.assign(group=view[formed], _g=view[formed].map(order), _p=view[peak].map(order),
                    _f=view[faded].map(order).fillna(len(revs)))
    sizes = v.group.value_counts().to_dict()
    caps = group_caps(sizes, budget)
    v = v.sort_values(["_g", "strength"], ascending=[True, False], kind="stable")
    v = pd.concat([g.head(caps[name]) for name, g in v.groupby("group", sort=False)])
    v = v.sort_values(["_g", "_p", "_f", "latent"], kind="stable").reset_index(drop=True)
    return v, {g: (caps[g], n) for g, n in sizes.items() if caps[g] < n}


def row_layout(group_N, label_px=16, target_px=700):
    """Where each heatmap row sits, for rows ordered by group: (y0, y1) in row units, the total, and pixels
    per row unit. A group shorter than its label gets taller rows, so every group and its label show."""
    n = len(group_N)
    px = float(np.clip(target_px / max(n, 1), 2, 12))
    y0, y1, start = np.zeros(n), np.zeros(n), 0.0
    for g in dict.fromkeys(group_N):
        idx = np.flatnonzero(group_N == g)
        extent = max(len(idx), label_px / px)
        y0[idx] = start + extent / len(idx) * np.arange(len(idx))
        y1[idx] = y0[idx] + extent / len(idx)
        start += extent
    return y0, y1, start, px


def timeline_chart(values, px, revs, scan_rows, colour_title, what, groups_mean):
    """Accuracy, the formation groups' mean and every drawn latent (`values`: one cell per latent and revision,
    its rows [row, row_end) from row_layout, px pixels a row), stacked on ONE shared x scale of the revisions (a
    band per revision, names on the axis): each column sits under its accuracy point."""
    M, n = len(revs), values.latent.nunique()
    width = timeline_width(M)
    x = alt.X("revision:N", sort=revs, scale=alt.Scale(domain=revs), title="revision (training order)",
              axis=alt.Axis(labelAngle=-40 if M > 6 else 0, labelLimit=600, orient="bottom", domain=True))
    legend = dict(titleLimit=600, labelLimit=600)
    charts = []
    if scan_rows is not None and len(scan_rows):
        charts.append(alt.Chart(scan_rows).mark_line(point=True).encode(
            x=x, y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("sub-task:N", legend=alt.Legend(title="task accuracy", **legend)),
            tooltip=["revision", "sub-task", alt.Tooltip("accuracy:Q", format=".3f"), "tokens"]).properties(
            width=width, height=150, title="task accuracy at the run's revisions (the scan)"))
    colour = alt.Color("value:Q", scale=alt.Scale(scheme="viridis", domain=[0, 1]),
                       legend=alt.Legend(title=colour_title, **legend))
    G = groups_mean.group.nunique()
    charts.append(alt.Chart(groups_mean).mark_rect().encode(
        x=x, y=alt.Y("label:N", sort=list(dict.fromkeys(groups_mean.label)), title="formed at · latents",
                     axis=alt.Axis(labelLimit=600, labelOverlap=False)),
        color=colour, tooltip=["label", "revision", alt.Tooltip("value:Q", format=".2f")]).properties(
        width=width, height=max(40, 20 * G), title=f"mean per formation revision ({what})"))
    bounds = values.groupby("group", sort=False).agg(top=("row", "min"), bottom=("row_end", "max"),
                                                       size=("latent", "nunique"))
    total = float(bounds.bottom.max())
    mids = {float((t + b) / 2): f"{g} · {int(s)}" for g, (t, b, s) in bounds.iterrows()}
    label = " : ".join(f"datum.value == {m!r} ? {json.dumps(t)}" for m, t in mids.items()) + " : ''"
    y = alt.Y("row:Q", scale=alt.Scale(domain=[0, total], reverse=True, nice=False, zero=False),
              title="latents, grouped by formed_at",
              axis=alt.Axis(values=list(mids), labelExpr=label, grid=False, ticks=False, labelLimit=600,
                            labelOverlap=False))
    heat = alt.Chart(values).mark_rect().encode(
        x=x, y=y, y2="row_end:Q", color=colour,
        tooltip=["latent", "revision", alt.Tooltip("value:Q", format=".2f"), "group", "cls"])
    rules = alt.Chart(pd.DataFrame({"row": bounds.top.to_numpy()[1:]})).mark_rule(
        color="white", strokeWidth=1.5).encode(y=alt.Y("row:Q"))
    charts.append((heat + rules).properties(width=width, height=int(max(120, min(2400, px * total))),
                                            title=f"timeline: {n} latents × {M} revisions, grouped by formed_at "
                                                  f"({what})"))
    # svg: the rendered marks can be measured (the tests check that the columns sit under their points)
    return alt.vconcat(*charts, spacing=12).resolve_scale(x="shared", color="shared").properties(
        usermeta={"embedOptions": {"renderer": "svg", "actions": False}})


def page_timeline(run: Path, cfg: dict, scans: Path):
    st.header("Timeline: when does each feature form, peak and fade?")
    revs = cfg["revisions"]
    lat = latent_table(run)
    tasks_done = tasks_of(run)
    c1, c2, c3, c4 = st.columns(4)
    task = c1.selectbox("task", tasks_done, key="tl-task") if tasks_done else None
    sheet = attributed(run, task)
    sources = ["decoder norm"] + (["|IE|", "|IE| share of its revision"] if sheet is not None else [])
    source = c2.radio("curve", sources, horizontal=True, key="tl-source")
    scale = st.radio("colour", ["fraction of the latent's own peak", "share over revisions"], horizontal=True,
                     key="tl-scale")
    share_prefix, cls_col, formed_col, raw = TIMELINE_SOURCES[source]
    if source == "decoder norm":
        df = lat.copy()
        if sheet is not None:
            df = df.merge(sheet[["latent", "disagree"] + [c for c in sheet.columns if c.startswith("ie_")]],
                          on="latent", how="left")
    else:
        extra = [c for c in lat.columns if c.startswith(("cos_", "dec_norm_", "freq")) and c not in sheet.columns]
        df = sheet.merge(lat[["latent"] + extra], on="latent", how="left")
    ann = measures.read_annotations(run)
    df["annotated"] = df.latent.isin(ann.latent.astype(int)) if len(ann) else False
    df["strength"] = df[[f"{raw}{r}" for r in revs]].abs().max(axis=1)
    present = set(df[cls_col].fillna(""))   # the IE classes carry a sign (+/−)
    classes = [c for t in measures.TIMELINE_CLASSES for c in (t, measures.PLUS + t, measures.MINUS + t) if c in present]
    # widgets whose options depend on the run are keyed by it: a kept selection would hide new classes
    pick = c3.multiselect("class", classes, default=classes, key=f"tl-class-{run.name}-{source}")
    which = c4.selectbox("annotated", ["all", "annotated", "not annotated"], key="tl-ann")
    mask = df[cls_col].isin(pick).to_numpy()
    if which != "all":
        mask &= (df.annotated == (which == "annotated")).to_numpy()
    if "freq" in df and (df.freq == 0).any():
        dead = int(((df.freq == 0) & mask).sum())
        if st.checkbox(f"hide the {dead} dead latents (never active on the held-out tokens; their decoder barely "
                       "left its initialisation)", value=False, key=f"tl-dead-{run.name}"):
            mask &= (df.freq > 0).to_numpy()
    view = df[mask]
    if not len(view):
        return st.info("No latent of the chosen classes.")
    rows, thinned = timeline_rows(view, formed_col, revs)
    shares = rows[[f"{share_prefix}{r}" for r in revs]].to_numpy()
    if scale.startswith("fraction"):   # each row by its own peak: formation reads as a staircase at any M
        shares = measures.peak_fraction(shares)
    y0, y1, _, px = row_layout(rows.group.to_numpy())
    values = pd.DataFrame([dict(row=y0[k], row_end=y1[k], latent=int(l), revision=r, value=float(shares[k, m]),
                                group=g, cls=c)
                           for k, (l, g, c) in enumerate(zip(rows.latent, rows.group, rows[cls_col]))
                           for m, r in enumerate(revs)])
    every = view[[f"{share_prefix}{r}" for r in revs]].to_numpy()
    every = measures.peak_fraction(every) if scale.startswith("fraction") else every
    counts = view[formed_col].value_counts()
    label = {g: f"{g} · {counts[g]}" for g in counts.index}
    groups_mean = pd.DataFrame([dict(group=g, label=label[g], revision=r, value=float(every[(view[formed_col] == g)
                                                                                             .to_numpy(), m].mean()))
                                for g in revs if g in counts.index for m, r in enumerate(revs)])
    scan = scan_for(scans, cfg)
    scan_rows = None
    if scan is not None:
        acc = [c for c in scan.columns if c.startswith("acc_")]
        scan_rows = scan[scan.revision.isin(revs)].melt(id_vars=["revision", "tokens"], value_vars=acc,
                                                        var_name="sub-task", value_name="accuracy")
        if not len(scan_rows):
            st.info("The scan holds none of this run's revisions: no accuracy curve.")
    else:
        st.info("No scan of this model and layer yet (it gives the accuracy curve): "
                "`python cache_acts.py --scan --model …`")
    colour_title = "fraction of its own peak" if scale.startswith("fraction") else "share over revisions"
    st.altair_chart(timeline_chart(values, px, revs, scan_rows, colour_title, source, groups_mean), width="content")
    st.caption("Every latent of the chosen classes is drawn, grouped by the revision where it forms (the labels: "
               "formed_at · count), and within a group by peak and fade. Classes: kept (formed at the first "
               "revision, never fades), emerging (forms later), discontinued (fades), transient (forms later and "
               "fades); formed = from where it stays at ≥ half its maximum.")
    if thinned:
        st.warning("Groups thinned to their strongest latents to keep the chart drawable: "
                   + ", ".join(f"{g} {a} of {b}" for g, (a, b) in thinned.items())
                   + ". Every latent of a group is listed below.")
    formation_groups(run, cfg, task, view, formed_col, cls_col, sheet, scan, counts)


def formation_groups(run, cfg, task, view, formed_col, cls_col, sheet, scan, counts):
    """Per formation revision, its latents with class, faithfulness and top context, and one latent's curves."""
    revs = cfg["revisions"]
    st.subheader("Latents by formation revision")
    groups = [r for r in revs if r in counts.index]
    later = [i for i, g in enumerate(groups) if g != revs[0]]
    group = st.radio("formed at", groups, index=later[0] if later else 0, horizontal=True,
                     format_func=lambda g: f"{g} ({counts[g]})", key=f"tl-group-{run.name}-{formed_col}")
    peak, faded = formed_col.replace("formed", "peak"), formed_col.replace("formed", "faded")
    members = ordered(view[view[formed_col] == group].sort_values("strength", ascending=False), peak, revs)
    contexts = (json_of(run / "relie" / task / "contexts.json") or {}) if task else {}
    table = pd.DataFrame({"latent": members.latent.astype(int), "class": members[cls_col], "peak at": members[peak],
                          "fades at": members[faded].fillna("")})
    if "freq" in members:
        table["active on"] = members.freq.map(lambda f: f"{100 * f:.2f}% of tokens")
    if sheet is not None:
        info = sheet.set_index("latent")
        table["|IE| class"] = members.latent.map(info.get("ie_timeline_class", pd.Series(dtype=str))).fillna(
            "not attributed")
        table["faithful"] = members.latent.map(info["disagree"]).map(
            lambda n: "" if pd.isna(n) else "yes" if n == 0 else f"⚠ no: {int(n)} of {len(revs)} revisions")
    checks = latent_verdicts(run, task, revs, sheet)
    if checks is not None:
        for c in checks.columns:
            table[c] = members.latent.map(checks[c]).fillna("")
        held = table["in top-k set of (its verdict)"].str.contains(verdicts.HOLDS).sum()
        st.markdown(f"{held} of these {len(table)} latents are in a top-k set whose revision's verdict holds "
                    f"(ablate.py).")
    table["top context"] = members.latent.map(lambda i: context_text(contexts[str(i)][0])
                                              if contexts.get(str(i)) else "")
    wide = {c: st.column_config.TextColumn(width="large") for c in table.columns if checks is not None
            and c in checks.columns}
    st.dataframe(table, width="stretch", hide_index=True, column_config=wide)
    st.caption(f"{len(table)} latents form at {group}; the top context (relie.py's, for the latents it attributes) "
               "marks the activating token ⟦so⟧ with its activation."
               + (" In top-k set of: the revisions whose top-k set holds the latent, each with that revision's verdict "
                  "(its top-k set against random-k on the test pairs). Its RelIE class ablated: the class's latents "
                  "zeroed together at the revision the class names (else where the latent's |IE| peaks), their excess "
                  "accuracy drop and Δ over random sets of its size with 95% intervals; ✔ / ✘ by the top-k rule."
                  if checks is not None else ""))
    latent = st.selectbox("latent", [int(i) for i in members.latent], key=f"tl-latent-{run.name}-{group}",
                          format_func=lambda i: f"{i}{badge(members.set_index('latent').loc[i], len(revs))}")
    row = view[view.latent == latent].iloc[0]
    curves = [dict(revision=r, what="decoder norm (share of its max)", value=float(row[f"dec_norm_{r}"]))
              for r in revs if f"dec_norm_{r}" in row.index]
    if f"ie_{revs[0]}" in row.index and pd.notna(row[f"ie_{revs[0]}"]):
        curves += [dict(revision=r, what="|IE| (share of its max)", value=abs(float(row[f"ie_{r}"]))) for r in revs]
    curves = pd.DataFrame(curves)
    if len(curves):
        curves["value"] = curves.value / curves.groupby("what").value.transform("max").clip(lower=1e-12)
    if scan is not None:
        curves = pd.concat([curves, scan[scan.revision.isin(revs)].assign(what="accuracy (mean of sub-tasks)")
                            .rename(columns={"acc_mean": "value"})[["revision", "what", "value"]]])
    st.altair_chart(alt.Chart(curves).mark_line(point=True).encode(
        x=alt.X("revision:N", sort=revs, scale=alt.Scale(domain=revs)),
        y=alt.Y("value:Q", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("what:N", legend=alt.Legend(labelLimit=600, title=None)),
        tooltip=["revision", "what", alt.Tooltip("value:Q", format=".2f")]).properties(
        title=f"latent {latent}: its curves against the accuracy curve", height=220), width="stretch")
    cosine_view(row, revs, f"latent {latent}: decoder cosine between revisions")
    show_contexts(contexts.get(str(latent)))


# ---------------------------------------------------------------------------------------------
# Verdicts: each check's holds / fails / uninformative as the stage that applied its rule wrote it

# verdict → (mark, text colour, background); "mixed": a finding that holds in some seeds and not in others
VERDICT_STYLE = {verdicts.HOLDS: ("✔", "#116329", "#dafbe1"), verdicts.FAILS: ("✘", "#a40e26", "#ffebe9"),
                 verdicts.UNINFORMATIVE: ("?", "#7d4e00", "#fff8c5"), "mixed": ("◐", "#7d4e00", "#fff1e5")}
NOT_HOLD = "the latent-level finding does not hold at this revision"


def verdict_badge(verdict, rule: str = "", label: str | None = None) -> str:
    """A verdict as a coloured badge (HTML, escaped), the rule it applied as its hover text."""
    v = verdict if isinstance(verdict, str) and verdict else "no verdict"
    mark, fg, bg = VERDICT_STYLE.get(v, ("·", "#57606a", "#f6f8fa"))
    return (f"<span class='cct-verdict' title='{html.escape(str(rule or ''), quote=True)}' style='display:inline-block;"
            f"padding:0 7px;border-radius:9px;font-weight:600;white-space:nowrap;color:{fg};background:{bg};"
            f"border:1px solid {fg}'>{mark} {html.escape(label or v)}</span>")


def verdict_lines(lines, where=st):
    """(badge, text) pairs as one block of lines; text is HTML whose data parts the caller escaped."""
    if lines:
        where.markdown("".join(f"<div class='cct-verdict-row' style='margin:4px 0'>{b} {t}</div>" for b, t in lines),
                       unsafe_allow_html=True)


def esc(x) -> str:
    return html.escape(str(x))


def ci(v, lo, hi, f="+.1f") -> str:
    """A value with its interval: '+26.0 [+21.6, +30.6]'."""
    return f"{v:{f}} [{lo:{f}}, {hi:{f}}]"


def flag_of(x) -> str:
    """A revision's accuracy flag (ablate.py: 'ceiling', 'chance'); '' where none (read back from CSV as NaN)."""
    return x if isinstance(x, str) else ""


def flags_of(df: pd.DataFrame) -> dict:
    """revision → accuracy flag, from a table with `revision` and `flag` columns (none when it has no flags)."""
    if df is None or "flag" not in df:
        return {}
    return {r: flag_of(f) for r, f in df.groupby("revision", sort=False).flag.first().items()}


def revision_x(revs, flags: dict, title) -> alt.X:
    """The revisions on x in training order, each label carrying its accuracy flag: 'step512 (ceiling)'."""
    expr = "".join(f"datum.value == {json.dumps(r)} ? {json.dumps(f'{r} ({f})')} : " for r, f in flags.items() if f)
    axis = alt.Axis(labelExpr=expr + "datum.value", labelLimit=600, labelAngle=-90 if len(revs) > 6 else 0,
                    labelOverlap=False)
    return alt.X("revision:N", sort=revs, scale=alt.Scale(domain=revs), title=title, axis=axis)


def diverging(values) -> alt.Scale:
    """Red for a positive effect, blue for a negative one, white at 0, equally deep for equal sizes."""
    lim = float(np.nanmax(np.abs(values))) if len(values) and np.isfinite(values).any() else 1.0
    return alt.Scale(scheme="redblue", reverse=True, domain=[-lim, lim] if lim > 0 else [-1, 1])


def topk_verdict_lines(ver: pd.DataFrame, revs) -> list:
    """ablate.py's verdicts.csv, one line per revision: its own top-k set against random-k sets there."""
    lines = []
    for r in in_order(ver, revs).itertuples():
        flag = flag_of(r.flag)
        acc = f"clean accuracy {r.acc_clean:.2f}" + (f" (at {flag}: accuracy can hardly move there; Δ decides)"
                                                     if flag else "")
        text = (f"<b>{esc(r.revision)}</b> — {acc}; its top-k set against random-k sets: excess accuracy drop "
                f"{ci(r.excess_points, r.excess_points_lo, r.excess_points_hi)} points, excess Δ "
                f"{ci(r.excess_delta, r.excess_delta_lo, r.excess_delta_hi, '+.3f')}")
        if r.verdict != verdicts.HOLDS:
            text += f" — <b>{NOT_HOLD}</b>"
        lines.append((verdict_badge(r.verdict, r.rule), text))
    return lines


def show_topk_verdicts(ver: pd.DataFrame, revs, summary: dict):
    held = [r for r, v in zip(ver.revision, ver.verdict) if v == verdicts.HOLDS]
    st.subheader(f"Verdict per revision: its top-k latents carry the task at {len(held)} of {len(ver)} revisions")
    verdict_lines(topk_verdict_lines(ver, revs))
    rules = summary.get("rules") or {}
    st.caption("Each revision's own top-k set ablated against random-k sets of matched activation frequency, on the "
               "held-out test pairs; excess = top − random, 95% intervals over the test pairs' groups of near-copies. "
               f"Rule (ablate.py): {rules.get('top_k', verdicts.TOPK_RULE)}; "
               f"{rules.get('top_k_flagged', verdicts.TOPK_FLAGGED_RULE)}. Hover a badge for the rule as applied.")


def class_mark(row, revision: str, margin: dict, flags: dict) -> str:
    """✔ / ✘: a class's set (a row of classes.csv) judged at a revision by the top-k rule (verdicts.topk_vs_random)
    against random sets of its size; '' where the revision's margin is unknown."""
    if revision not in margin:
        return ""
    v, _ = verdicts.topk_vs_random(row.excess_points, row.excess_points_lo, row.excess_delta, row.excess_delta_lo,
                                   margin[revision], flags.get(revision, ""))
    return VERDICT_STYLE[v][0]


def class_cell(row, revision: str, margin: dict, flags: dict) -> str:
    return (f"{ci(row.excess_points, row.excess_points_lo, row.excess_points_hi)} pts · Δ "
            f"{ci(row.excess_delta, row.excess_delta_lo, row.excess_delta_hi, '+.3f')} "
            f"{class_mark(row, revision, margin, flags)}").strip()


def latent_verdicts(run: Path, task: str | None, revs, sheet: pd.DataFrame | None) -> pd.DataFrame | None:
    """Per latent of ablate.py's sets: the revisions whose top-k set holds it, each with that revision's verdict
    (verdicts.csv), and its RelIE class ablated as a set (classes.csv) at the revision the class names, else where
    the latent's |IE| peaks. None where the task has no finished ablation."""
    folder = run / "ablation" / task if task else None
    if folder is None or not (folder / DONE).exists():
        return None
    summary = json_of(folder / "summary.json") or {}
    ver = csv_of(folder / "verdicts.csv")
    verdict_at = dict(zip(ver.revision, ver.verdict)) if ver is not None else {}
    member = {}
    for r in revs:
        for i in (summary.get("sets") or {}).get(r, []):
            v = verdict_at.get(r, "no verdict")
            member.setdefault(int(i), []).append(f"{r} {VERDICT_STYLE.get(v, ('·',))[0]} {v}")
    out = pd.DataFrame({"in top-k set of (its verdict)": {i: "; ".join(v) for i, v in member.items()}}, dtype=object)
    cls = csv_of(folder / "classes.csv")
    if cls is None or not len(cls):
        return out
    margin = dict(zip(ver.revision, ver.margin)) if ver is not None and "margin" in ver else {}
    flags = flags_of(ver)
    peak = (sheet.set_index("latent")["ie_peak_at"] if sheet is not None and "ie_peak_at" in sheet
            else pd.Series(dtype=object))
    by = cls.set_index(["relie_class", "revision"])
    text = {}
    for c, latents in cls.drop_duplicates("relie_class").set_index("relie_class").latents.items():
        named = measures.unsigned(c).partition(":")[2]
        for i in map(int, str(latents).split()):
            at = named if named in revs else peak.get(i) if isinstance(peak.get(i), str) and peak.get(i) else revs[-1]
            if (c, at) in by.index:
                row = by.loc[(c, at)]
                text[i] = f"{c} ({int(row.n)}) at {at}: {class_cell(row, at, margin, flags)}"
    return out.join(pd.Series(text, name="its RelIE class ablated", dtype=object), how="outer")


def class_order(names, revs) -> list:
    """RelIE classes ordered by the revision they name (training order), then the others."""
    rank = {r: i for i, r in enumerate(revs)}
    return sorted(names, key=lambda c: (rank.get(measures.unsigned(c).partition(":")[2], len(revs)),
                                        measures.unsigned(c), c))


def show_classes(cls: pd.DataFrame, revs, margin: dict, flags: dict):
    st.subheader("Each RelIE class ablated as a set, against random sets of its size")
    order = class_order(list(dict.fromkeys(cls.relie_class)), revs)
    heat = cls.assign(label=[f"{c} ({n})" for c, n in zip(cls.relie_class, cls.n)])
    labels = list(dict.fromkeys(heat.set_index("relie_class").loc[order].label))
    st.altair_chart(alt.Chart(heat).mark_rect().encode(
        x=revision_x(revs, flags, "ablated at"),
        y=alt.Y("label:N", sort=labels, title="RelIE class (latents)", axis=alt.Axis(labelLimit=600)),
        color=alt.Color("excess_points:Q", scale=diverging(heat.excess_points),
                        legend=alt.Legend(title="excess accuracy drop (points)", titleLimit=600)),
        tooltip=["relie_class", "n", "latents", "revision", alt.Tooltip("excess_points:Q", format="+.1f"),
                 alt.Tooltip("excess_points_lo:Q", format="+.1f"), alt.Tooltip("excess_points_hi:Q", format="+.1f"),
                 alt.Tooltip("excess_delta:Q", format="+.3f"), alt.Tooltip("excess_delta_lo:Q", format="+.3f"),
                 alt.Tooltip("excess_delta_hi:Q", format="+.3f")]).properties(
        height=max(220, 80 + 28 * len(labels)), title="excess accuracy drop of each class's set over random sets"),
        width="stretch")
    table = pd.DataFrame({r: {c: class_cell(row, r, margin, flags)
                              for c, row in cls[cls.revision == r].set_index("relie_class").iterrows()}
                          for r in revs if r in set(cls.revision)}).reindex(order)
    table.insert(0, "latents", cls.drop_duplicates("relie_class").set_index("relie_class").latents.reindex(order))
    st.dataframe(table, width="stretch")
    st.caption("Each class of relie.py's sheet (over the latents of the top-k sets) zeroed together at every revision, "
               "on the test pairs, against random sets of its size and matched frequency: excess accuracy drop "
               "(points) and excess Δ, each with its 95% interval. ✔ / ✘: the class's set passes / fails the top-k "
               "rule at that revision. A class is read here by its latents, not by where a set was chosen.")


def show_carriers(loo: pd.DataFrame, top_of: str, revs):
    sel = loo[loo.selected_at == top_of]
    if not len(sel):
        return
    st.subheader(f"Which latents carry the top-k set of {top_of} (leave-one-out)")
    cols = [r for r in revs if r in set(sel.revision)]
    whole = sel.drop_duplicates("revision").set_index("revision")
    c1, c2 = st.columns(2)
    for where, value, total, title in ((c1, "carried_delta", "set_delta", "Δ lost without the latent"),
                                       (c2, "carried_points", "set_points", "accuracy points lost without it")):
        t = sel.pivot_table(index="latent", columns="revision", values=value).reindex(columns=cols)
        t = t.sort_values(top_of, ascending=False) if top_of in t else t
        t.index = [f"latent {int(i)}" for i in t.index]
        t.loc["whole set"] = whole[total].reindex(cols)
        where.markdown(f"**{title}**")
        where.dataframe(t.round(3), width="stretch")
    st.caption(f"Per latent of {top_of}'s top-k set and revision: the set's Δ (accuracy drop) minus the Δ of the set "
               "without that latent, on the test pairs. One latent that carries most of a set's effect elsewhere "
               "makes the set's off-diagonal drops a statement about that latent.")


def joint_lines(joint: pd.DataFrame, revs) -> list:
    """Each top-k set at its own revision: the Δ its summed IE (and its summed exact single ablations) predicts
    against the measured Δ, each prediction with its verdict."""
    lines = []
    for r in in_order(joint[joint.selected_at == joint.revision], revs).itertuples():
        exact = (f"; by its summed exact single ablations {r.predicted_exact:+.3f} "
                 f"{verdict_badge(r.verdict_exact, verdicts.JOINT_RULE)}"
                 if isinstance(getattr(r, "verdict_exact", None), str) and r.verdict_exact else "")
        lines.append((verdict_badge(r.verdict, verdicts.JOINT_RULE),
                      f"<b>top-k of {esc(r.revision)}</b>: measured Δ "
                      f"{ci(r.measured, r.measured_lo, r.measured_hi, '+.3f')}"
                      f", predicted by its summed IE {r.predicted:+.3f}{exact}"))
    return lines


def consistency_lines(sp: pd.DataFrame, revs) -> list:
    """Per pair of revisions: ρ with RelIE against ρ with set membership alone, and the verdict on the difference."""
    lines = []
    for r in in_order(sp, revs).itertuples():
        diff = ci(r.rho_diff_membership, r.rho_diff_membership_lo, r.rho_diff_membership_hi, '+.2f')
        lines.append((verdict_badge(r.verdict, "holds when the interval of ρ(RelIE) − ρ(membership) lies above 0"),
                      f"<b>{esc(r.A)} → {esc(r.B)}</b> ({r.n} latents): ρ(RelIE) "
                      f"{ci(r.rho_relie, r.rho_relie_lo, r.rho_relie_hi, '.2f')}, ρ(RelDec) "
                      f"{ci(r.rho_reldec, r.rho_reldec_lo, r.rho_reldec_hi, '.2f')}, ρ(membership) "
                      f"{ci(r.rho_membership, r.rho_membership_lo, r.rho_membership_hi, '.2f')}; ρ(RelIE) − "
                      f"ρ(membership) {diff}"))
    return lines


# The ablation folder's tables shown under its charts, in this order: (file, title, what it says, the columns shown
# first, its verdict lines or None). A later stage's table appears by being listed here.
ABLATION_TABLES = (
    ("joint.csv", "Joint ablation of each top-k set: predicted Δ against measured Δ",
     "Each revision's top-k set ablated together. predicted: the set's summed IE; predicted_exact: the sum of its "
     "latents' exact single ablations (both on the selection pairs); measured: the logit-difference change on the test "
     "pairs, with its 95% bootstrap interval over their groups; single_sum: the sum of the set's single-latent Δ (how "
     "far from additive the set is). verdict / verdict_exact: " + verdicts.JOINT_RULE + ". The command line prints "
     "the same table.",
     ("selected_at", "revision", "k", "verdict", "verdict_exact", "predicted", "predicted_exact", "measured",
      "measured_lo", "measured_hi"), joint_lines),
    ("consistency.csv", "Spearman ρ of |Δ_B|/|Δ_A| with RelIE, RelDec and set membership alone",
     "Single-latent ablations per pair of revisions (A before B), each ρ with its 95% interval over the test pairs' "
     "groups. ρ(membership): what a plain indicator of where a latent was chosen (at B only / both / A only) already "
     "reaches; the verdict holds when ρ(RelIE) − ρ(membership) has its interval above 0. AtP linearises exactly this "
     "ablation, so with AtP it checks the attribution more than the model.",
     ("A", "B", "n", "verdict", "rho_relie", "rho_relie_lo", "rho_relie_hi", "rho_membership", "rho_membership_lo",
      "rho_membership_hi", "rho_diff_membership", "rho_diff_membership_lo", "rho_diff_membership_hi", "rho_reldec",
      "rho_reldec_lo", "rho_reldec_hi"), consistency_lines),
)
MANY_LINES = 12   # more verdict lines than this (45 pairs of revisions at M = 10) fold into an expander


def in_order(df: pd.DataFrame, revs) -> pd.DataFrame:
    """A table's revision columns (revision, selected_at, A, B) sorted in training order, rows kept otherwise."""
    keys = [c for c in ("selected_at", "A", "B", "revision") if c in df.columns]
    rank = {r: i for i, r in enumerate(revs)}
    return df.sort_values(keys, key=lambda s: s.map(rank).fillna(-1), kind="stable") if keys else df


def front(df: pd.DataFrame, first) -> pd.DataFrame:
    """The columns `first` (those present) first, then the rest in their order."""
    head = [c for c in first if c in df.columns]
    return df[head + [c for c in df.columns if c not in head]]


def ablation_bars(d: pd.DataFrame, revs, top_of: str, flags: dict, value="acc_drop"):
    """Top-k against random-k at one selection revision, spliced into every revision: bars with intervals, the
    accuracy drop (points) or Δ."""
    scale, what = (100, "accuracy drop (points)") if value == "acc_drop" else (1, "Δ logit difference")
    cols = [value, f"{value}_lo", f"{value}_hi"]
    sel = d[d.selected_at == top_of]
    top = sel[sel.kind == "top"][["revision"] + cols].assign(kind="top-k")
    rnd = sel[sel.kind == "random"].groupby("revision", as_index=False).agg(
        **{value: (value, "mean"), cols[1]: (cols[1], "min"), cols[2]: (cols[2], "max")}).assign(kind="random-k")
    both = pd.concat([top, rnd])
    both[cols] = both[cols] * scale
    x = revision_x(revs, flags, "spliced into")
    enc = dict(x=x, xOffset=alt.XOffset("kind:N", sort=["top-k", "random-k"]))
    tip = ["kind", "revision"] + [alt.Tooltip(f"{c}:Q", format=".3f") for c in cols]
    bars = alt.Chart(both).mark_bar().encode(
        y=alt.Y(f"{value}:Q", title=what), color=alt.Color("kind:N", sort=["top-k", "random-k"],
                                                          legend=alt.Legend(title=None)), tooltip=tip, **enc)
    ticks = alt.Chart(both).mark_rule(color="black").encode(y=f"{cols[1]}:Q", y2=f"{cols[2]}:Q", **enc)
    return (bars + ticks).properties(title=f"top-k of {top_of} vs random-k: {what}", height=300)


def gap_heatmaps(sets: pd.DataFrame, revs, flags: dict):
    """Top-k minus random-k (the mean of its draws) for every selection revision × revision spliced into: the
    accuracy drop in points beside Δ."""
    g = sets.groupby(["selected_at", "revision", "kind"])[["acc_drop", "delta"]].mean().unstack("kind")
    if ("acc_drop", "top") not in g or ("acc_drop", "random") not in g:
        return
    gap = pd.DataFrame({"points": 100 * (g["acc_drop", "top"] - g["acc_drop", "random"]),
                        "delta": g["delta", "top"] - g["delta", "random"]}).reset_index()
    titles = ("accuracy drop (points)", "Δ logit difference")
    for where, value, title in zip(st.columns(2), ("points", "delta"), titles):
        where.altair_chart(alt.Chart(gap).mark_rect().encode(
            x=revision_x(revs, flags, "spliced into"),
            y=alt.Y("selected_at:N", sort=revs, scale=alt.Scale(domain=revs), title="top-k of",
                    axis=alt.Axis(labelOverlap=False)),
            color=alt.Color(f"{value}:Q", scale=diverging(gap[value]),
                            legend=alt.Legend(title=None)),
            tooltip=["selected_at", "revision", alt.Tooltip("points:Q", format="+.1f"),
                     alt.Tooltip("delta:Q", format="+.3f")]).properties(
            title=f"top-k minus random-k: {title}", height=max(200, 60 + 30 * len(revs))), width="stretch")


def page_ablation(run: Path, cfg: dict):
    st.header("Ablation: what breaks without them?")
    revs = cfg["revisions"]
    folder = run / "ablation"
    done = sorted(p.name for p in folder.iterdir() if (p / DONE).exists()) if folder.is_dir() else []
    if not done:
        return missing("ablations", f"python ablate.py --run {run}")
    name = st.selectbox("task", done)
    here = inside(folder, name)
    summary = json_of(here / "summary.json") or {}
    if summary.get("in_sample"):
        st.warning("These ablations are in-sample: relie.py ran with --test-frac 0, so the latents were selected on "
                   "the very pairs they are tested on.")
    ver = csv_of(here / "verdicts.csv")
    if ver is not None:
        show_topk_verdicts(ver, revs, summary)
    else:
        st.info(f"No verdicts.csv in {name}: this ablation predates the verdicts; run ablate.py again.")
    df = csv_of(here / "ablation.csv")
    sub = st.selectbox("sub-task", list(dict.fromkeys(df.subtask)))
    d = df[df.subtask == sub]
    flags = flags_of(d)
    if any(flags.values()):
        st.caption("Clean accuracy on these pairs: " + ", ".join(
            f"{r} {a:.2f}" + (f" ({flags[r]})" if flags.get(r) else "")
            for r, a in d.groupby("revision").acc_clean.first().reindex(revs).dropna().items())
            + ". At ceiling or near chance accuracy can hardly move: read Δ there (axes mark those revisions).")
    sets = d[d.kind.isin(["top", "random"])]
    gap_heatmaps(sets, revs, flags)
    chosen = [r for r in revs if r in set(sets.selected_at)]
    top_of = st.selectbox("top-k of", chosen, index=len(chosen) - 1, key=f"abl-top-{run.name}") if chosen else None
    if top_of:
        c1, c2 = st.columns(2)
        c1.altair_chart(ablation_bars(d, revs, top_of, flags), width="stretch")
        if "delta_lo" in d:
            c2.altair_chart(ablation_bars(d, revs, top_of, flags, "delta"), width="stretch")
        st.caption("Bars: on the held-out test pairs, the accuracy drop (left) and the change of the logit "
                   "difference Δ (right). Top-k: its 95% bootstrap interval over the test pairs' groups. Random-k: the "
                   "mean over the random draws of matched frequency; its line spans the lowest to the highest bound "
                   "of the draws' own intervals.")
        loo = csv_of(here / "loo.csv")
        if loo is not None:
            show_carriers(loo, top_of, revs)
    overlap = summary.get("overlap")
    if overlap:
        st.subheader("Overlap of the top-k sets (latents in common)")
        table = pd.DataFrame(overlap).T.reindex(index=[r for r in revs if r in overlap],
                                                columns=[r for r in revs if r in overlap])
        st.dataframe(table.rename_axis("top-k of"), width="stretch")
    cls = csv_of(here / "classes.csv")
    if cls is not None and len(cls):
        margin = dict(zip(ver.revision, ver.margin)) if ver is not None and "margin" in ver else {}
        show_classes(cls, revs, margin, flags_of(ver))
    for file, title, about, first, lines in ABLATION_TABLES:
        table = csv_of(here / file)
        if table is None:
            continue
        st.subheader(title)
        if lines is not None and "verdict" in table:
            found = lines(table, revs)
            if len(found) > MANY_LINES:
                held = sum(verdicts.HOLDS in b for b, _ in found)
                st.markdown(f"**{held} of {len(found)} hold.**")
                verdict_lines(found, st.expander(f"all {len(found)} verdicts"))
            else:
                verdict_lines(found)
        st.dataframe(front(in_order(table, revs), first), width="stretch", hide_index=True)
        st.caption(about)
    single = d[d.kind == "single"].astype({"latents": int}).pivot_table(index="latents", columns="revision",
                                                                        values="delta")
    st.subheader("Single-latent ablations: Δ logit difference per revision")
    st.dataframe(single.reindex(columns=[r for r in revs if r in single.columns]), width="stretch")


# ---------------------------------------------------------------------------------------------
# Checks: every finding's verdict beside the checks that could have failed (controls.py, checkpoint_sets.py,
# seeds.py), each file read defensively (a stage's json may gain or rename keys)

def ablation_verdicts(run: Path, revs):
    """Every ablated task's per-revision verdicts, one line each."""
    folder = run / "ablation"
    done = sorted(p.name for p in folder.iterdir() if (p / DONE).exists()) if folder.is_dir() else []
    lines = []
    for name in done:
        ver = csv_of(folder / name / "verdicts.csv")
        if ver is None:
            continue
        ver = in_order(ver, revs)
        badges = " ".join(verdict_badge(v, rule, f"{r}: {v}")
                          for r, v, rule in zip(ver.revision, ver.verdict, ver.rule))
        held = int((ver.verdict == verdicts.HOLDS).sum())
        lines.append(("", f"<b>{esc(name)}</b> — its top-k latents carry the task at {held} of {len(ver)} revisions: "
                          f"{badges}"))
    if lines:
        st.subheader("Top-k against random-k, per revision (ablate.py; the Ablation page has the numbers)")
        verdict_lines(lines)


def show_controls(ctl: dict, revs):
    st.subheader("Negative controls (controls.py)")
    names = list(ctl.get("controls") or {})
    st.caption("The run's crosscoder trained again with one thing removed: " + "; ".join(
        f"{c}: {d}" for c, d in (ctl.get("controls") or {}).items()) + ". A check holds by its own rule and is "
        "uninformative when a control that removes what it credits (*) holds too. " + str(ctl.get("note", "")))
    lines, rows = [], []
    for r in ctl.get("rows") or []:
        by = r.get("uninformative_by") or []
        ctrl = r.get("controls") or {}
        text = (f"<b>{esc(r.get('check'))}</b> — run {esc(num(r.get('real')))} ({esc(r.get('real_verdict'))} by its "
                "own rule); " + "; ".join(f"{esc(c)} {esc(num(v.get('value')))} {esc(v.get('verdict'))}"
                                          f"{'*' if v.get('designated') else ''}" for c, v in ctrl.items()))
        if by:
            text += f" — <b>uninformative</b>: its control {esc(', '.join(by))} holds too"
        lines.append((verdict_badge(r.get("verdict"), (ctl.get("rules") or {}).get("control", "")),
                      text + f"<br><span style='color:#57606a;font-size:90%'>{esc(r.get('about', ''))}</span>"))
        rows.append(dict(check=r.get("check"), verdict=r.get("verdict"),
                         run=f"{num(r.get('real'))} {r.get('real_verdict')}",
                         **{c: f"{num(v.get('value'))} {v.get('verdict')}" + ("*" if v.get("designated") else "")
                            for c, v in ctrl.items()}, uninformative_by=", ".join(by)))
    verdict_lines(lines)
    if rows:
        st.dataframe(pd.DataFrame(rows), width="stretch", hide_index=True)
    rec = ctl.get("reconstruction") or {}
    if rec:
        table = []
        for k in ["run"] + [c for c in names if c in rec]:
            fvu = rec[k].get("fvu") or []
            named = len(fvu) == len(revs)
            row = dict(crosscoder=k, **{(revs[m] if named else f"FVU {m}"): v for m, v in enumerate(fvu)},
                       L0=rec[k].get("l0"), dead=rec[k].get("dead"))
            row["reconstruction kept"] = "—" if k == "run" else ("yes" if rec[k].get("matched") else "NO")
            table.append(row)
        st.markdown(f"**Reconstruction of each control** (held-out FVU per revision, L0, dead fraction): a control "
                    f"must keep it, within {ctl.get('factor', '?')}× of the run's, to fail for the right reason")
        st.dataframe(pd.DataFrame(table).set_index("crosscoder"), width="stretch")


def _ci_of(c) -> str:
    """A {top, lo, hi} comparison (checkpoint_sets.py) as 'top [lo, hi]'."""
    c = c or {}
    vals = [c.get(k) for k in ("top", "lo", "hi")]
    ok = all(isinstance(v, (int, float)) and np.isfinite(v) for v in vals)
    return f"{vals[0]:.2f} [{vals[1]:.2f}, {vals[2]:.2f}]" if ok else "—"


def _null_of(c) -> str:
    c = c or {}
    vals = [c.get(k) for k in ("null_mean", "null_lo", "null_hi")]
    ok = all(isinstance(v, (int, float)) and np.isfinite(v) for v in vals)
    return f"{vals[0]:.2f} [{vals[1]:.2f}, {vals[2]:.2f}]" if ok else "—"


def _fate(v: dict, cos: str) -> str:
    """A top latent's fate in one variant: kept, cannot tell, or why not."""
    kept = (v.get("kept") or {}).get(cos, v.get("survives"))
    if kept is None:
        return "cannot tell" if "kept" in v else "—"
    if kept:
        return "kept"
    if v.get("cos", 1.0) < float(cos or 0):
        return f"unmatched {v.get('cos', float('nan')):.2f}"
    if v.get("class_variant") != v.get("class_shared"):
        return f"→ {v.get('class_variant')}"
    return f"formed {v.get('formed_variant')}"


def show_checkpoint_sets(rs: dict):
    st.subheader("Robust to the checkpoints chosen (checkpoint_sets.py)")
    vd = rs.get("verdict")
    if isinstance(vd, dict):
        finding = vd.get("finding", "the top latents' timelines are robust to the checkpoints chosen")
        verdict_lines([(verdict_badge(vd.get("verdict"), vd.get("rule", "")),
                        f"<b>{esc(finding)}</b> (decoder cosine ≥ {esc(vd.get('cos', rs.get('match_cos')))}): "
                        f"{esc(vd.get('why', ''))}")])
        st.caption(f"Rule: {vd.get('rule', '')}")
    else:
        st.info("This checkpoint_sets.json carries no verdict (made before graded survival): its conjunction 'kept in "
                "every variant' has little power; run checkpoint_sets.py again.")
    h = f"{rs.get('match_cos', 0.9):g}"
    for key, title in (("graded", "drop / add variants"), ("shifts", "shifts, on their own")):
        g = rs.get(key)
        if isinstance(g, dict) and g.get("by_cos"):
            st.markdown(f"**Graded survival over the {title}** ({esc(', '.join(g.get('variants', [])))}): per top "
                        "latent, the fraction of the variants that can tell in which it is kept, averaged; beside the "
                        "null (random active latents of the same timeline class and matched frequency)")
            st.dataframe(pd.DataFrame([{"decoder cosine ≥": c, "top latents kept [95%]": _ci_of(x),
                                        "null [95%]": _null_of(x), "verdict": x.get("verdict", ""),
                                        "why": x.get("why", ""), "top matched": _ci_of(x.get("matched")),
                                        "null matched": _null_of(x.get("matched"))}
                                       for c, x in g["by_cos"].items()]), width="stretch", hide_index=True)
    rows = []
    for v in rs.get("variants") or []:
        row = {"variant": v.get("name"), "revisions": ", ".join(v.get("revisions") or [])}
        if isinstance(v.get("by_cos"), dict):
            row.update({"n": v.get("n"), "matched": (v["by_cos"].get(h) or {}).get("matched"),
                        "class kept": v.get("class_kept"), "formed agrees": v.get("formed_agrees")})
            for c, x in v["by_cos"].items():
                row[f"kept @{c}"], row[f"null @{c}"] = _ci_of(x), _null_of(x)
        else:   # one rate per variant beside its null's range
            row.update({"matched": v.get("matched"), "null matched": span(v.get("matched_null") or []),
                        "survives": v.get("survives"), "null survives": span(v.get("survives_null") or [])})
        rows.append(row)
    if rows:
        st.markdown("**Per variant**")
        st.dataframe(pd.DataFrame(rows), width="stretch", hide_index=True)
    every = rs.get("every") or ({"top": rs["survive_all"], **{f"null_{k}": v for k, v in
                                                              (rs.get("survive_all_null") or {}).items()}}
                                if "survive_all" in rs else None)
    if every:
        top = every.get("top")
        st.caption(f"Kept in every variant (a conjunction: little power over many variants): top "
                   f"{'—' if top is None else format(top, '.2f')}, null {_null_of(every)}.")
    lat = rs.get("latents") or []
    if lat:
        names = [v.get("name") for v in rs.get("variants") or []]
        st.markdown(f"**Per top latent** (decoder cosine ≥ {h})")
        st.dataframe(pd.DataFrame([{"latent": r.get("latent"), "class": r.get("timeline_class"),
                                    "formed_at": r.get("formed_at"),
                                    **{n: _fate((r.get("variants") or {}).get(n) or {}, h) for n in names}}
                                   for r in lat]), width="stretch", hide_index=True)


def holds_badge(v: dict, rule: str = "") -> str:
    """A verdict over seeds (per seed 1 holds, 0 fails): holds / fails in every seed, else mixed."""
    per = [x for x in (v.get("per_seed") or []) if x is not None]
    k = int(sum(x == 1 for x in per))
    verdict = verdicts.HOLDS if per and k == len(per) else verdicts.FAILS if k == 0 else "mixed"
    return verdict_badge(verdict, rule, f"holds in {k} of {len(per)}")


def findings_frame(f: dict, keys=None) -> pd.DataFrame:
    rows = [(k, v) for k, v in f.items() if isinstance(v, dict) and (keys is None or k in keys)]
    return pd.DataFrame([{"finding": k, "mean [min, max]": fmt(v),
                          "per seed": " ".join(num(x) for x in v.get("per_seed") or [])} for k, v in rows])


def findings_tables(f: dict, over: str):
    """The headline findings (mean [min, max], per seed) and, folded, every finding."""
    if f:
        head = findings_frame(f, SEED_HEADLINES)
        if len(head):
            st.dataframe(head, width="stretch", hide_index=True)
        with st.expander(f"every finding over {over} ({len(f)})"):
            st.dataframe(findings_frame(f), width="stretch", hide_index=True)


SEED_HEADLINES = ("ablation_gap_last", "top_drop_last", "excess_delta_last", "joint_predicted_last",
                  "joint_measured_last", "latents_share_last", "latents_share_min", "rho_relie_mean", "rho_reldec_mean",
                  "rho_membership_mean", "faithfulness_rho", "l0", "dead_frac")


def holds_lines(f: dict, revs, what: str) -> list:
    """A line per verdict-valued finding (topk_holds_<rev>, joint_holds_last, consistency_holds) over seeds."""
    about = {**{f"topk_holds_{r}": f"the top-k set of {r} against random-k there" for r in revs},
             "topk_holds_last": "the last revision's top-k set against random-k there",
             "joint_holds_last": "the last revision's joint ablation predicted by its summed IE",
             "consistency_holds": "consistency ρ(RelIE) beyond set membership, every pair of revisions"}
    return [(holds_badge(f[k]), f"{esc(about[k])} ({what})") for k in about if isinstance(f.get(k), dict)]


def show_seeds(name: str, res: dict):
    revs = res.get("revisions") or []
    seeds = res.get("seeds") or []
    st.subheader(f"Over {len(seeds)} crosscoder seeds ({name}: seeds.py, {res.get('arch', '')}, attribution "
                 f"{res.get('method', '')})")
    f = res.get("findings") or {}
    verdict_lines(holds_lines(f, revs, f"seeds {', '.join(map(str, seeds))}"))
    findings_tables(f, "the seeds")
    m, n = res.get("matched_top_k_fraction") or {}, res.get("matched_random_fraction") or {}
    if m.get("mean") is not None:
        st.caption(f"Top-k latents matched one-to-one in every other seed: {fmt(m)}; random active latents of matched "
                   f"frequency (the null): {fmt(n) if n.get('mean') is not None else '—'}. "
                   + str(res.get("pairs", "")))
    split = res.get("split_seeds")
    if isinstance(split, dict):
        st.markdown(f"**Over split seeds {esc(split.get('seeds'))} of the pairs** (relie.py --split-seed; the run's "
                    "own crosscoder attributed and ablated on each split)")
        verdict_lines(holds_lines(split.get("findings") or {}, revs, "split seeds"))
        findings_tables(split.get("findings") or {}, "the split seeds")
    lm = res.get("lm_seeds")
    if isinstance(lm, dict):
        st.markdown(f"**Over LM seeds {esc(lm.get('seeds'))}** (the toy LM pretrained with each seed, each crosscoded "
                    "on the revisions its own scan suggests): per LM, the last revision's top-k set against random-k")
        lines = []
        for v in lm.get("verdicts") or []:
            flag = flag_of(v.get("flag"))
            text = (f"<b>LM seed {esc(v.get('seed'))}</b>, {esc(v.get('revision'))}: clean accuracy "
                    f"{v.get('acc_clean', float('nan')):.2f}{f' ({esc(flag)})' if flag else ''}; excess accuracy drop "
                    f"{ci(v['excess_points'], v['excess_points_lo'], v['excess_points_hi'])} points, excess Δ "
                    f"{ci(v['excess_delta'], v['excess_delta_lo'], v['excess_delta_hi'], '+.3f')}")
            if v.get("verdict") != verdicts.HOLDS:
                text += f" — <b>{NOT_HOLD}</b>"
            lines.append((verdict_badge(v.get("verdict"), verdicts.TOPK_RULE), text))
        verdict_lines(lines)
        findings_tables(lm.get("findings") or {}, "the LM seeds")
    methods = res.get("methods") or {}
    if len(methods) > 1:
        st.markdown("**Attribution methods on the same seeds**")
        keys = ("faithfulness_rho", "ablation_gap_last", "rho_relie_mean", "rho_reldec_mean")
        st.dataframe(pd.DataFrame([{"method": k, **{c: fmt(v["findings"][c]) for c in keys
                                                    if c in v.get("findings", {})},
                                    "top-k matched": fmt(v["matched_top_k_fraction"])
                                    if v.get("matched_top_k_fraction") else "—"}
                                   for k, v in methods.items()]), width="stretch", hide_index=True)


def page_checks(run: Path, cfg: dict):
    st.header("Checks: does each finding hold, and could its check have failed?")
    st.caption("Every finding with the verdict its stage printed — holds, fails, or uninformative (a negative control "
               "that removes what the check credits holds too) — and the rule it applied (crosscoding/verdicts.py). "
               "Each section shows only when its file exists.")
    revs = cfg["revisions"]
    ablation_verdicts(run, revs)
    stab = run / "stability"
    ctl = json_of(stab / "controls.json")
    if ctl:
        show_controls(ctl, revs)
    else:
        missing("negative controls", f"python controls.py --run {run}")
    rs = json_of(stab / "checkpoint_sets.json")
    if rs:
        show_checkpoint_sets(rs)
    else:
        missing("checkpoint-set robustness", f"python checkpoint_sets.py --run {run}")
    files = sorted(stab.glob("seeds*.json"), key=lambda p: (p.name != "seeds.json", p.name)) if stab.is_dir() else []
    for path in files:
        show_seeds(path.name, json_of(path) or {})
    if not files:
        missing("seed spreads", f"python seeds.py --run {run}")


PAGES = ["Checkpoints", "Training", "Latents", "Timeline", "Ablation", "Checks"]


def main():
    st.set_page_config(page_title="crosscoding through time", layout="wide")
    runs, scans = roots()
    names = run_names(runs)
    page = st.sidebar.radio("page", PAGES, key="page")
    # a radio shows every name whole (a selectbox cuts long ones), newest first: it opens on the latest run
    name = st.sidebar.radio("run (newest first)", names, key="run",
                            format_func=lambda n: n if (runs / n / DONE).exists() else f"{n} (unfinished)") \
        if names else None
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
    elif page == "Ablation":
        page_ablation(run, cfg)
    else:
        page_checks(run, cfg)


if __name__ == "__main__":   # streamlit runs the script as __main__; importing it runs nothing
    main()
