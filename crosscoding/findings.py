"""findings.py — a finished run's findings read back from its stages' files (eval.json, relie/, ablation/) as
plain numbers, summarised over seeds (mean, min, max), and formatted for tables. numpy and pandas only.
"""
import numpy as np
import pandas as pd

from crosscoding import measures, verdicts
from crosscoding.common import read_json


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
    # the verdicts (1 holds, 0 fails: a mean over seeds is the share of seeds in which the finding holds)
    ver = pd.read_csv(folder / "ablation" / name / "verdicts.csv").set_index("revision")
    for r in revisions:
        out[f"topk_holds_{r}"] = float(ver.verdict[r] == verdicts.HOLDS)
    out["topk_holds_last"] = out[f"topk_holds_{revisions[-1]}"]
    out["excess_delta_last"] = float(ver.excess_delta[revisions[-1]])
    joint = pd.read_csv(folder / "ablation" / name / "joint.csv")
    last = joint[(joint.selected_at == revisions[-1]) & (joint.revision == revisions[-1])]
    out["joint_predicted_last"], out["joint_measured_last"] = float(last.predicted.sum()), float(last.measured.sum())
    out["joint_holds_last"] = float((last.verdict == verdicts.HOLDS).all())
    for r, c in summary["coverage"].items():
        out[f"latents_share_{r}"] = c["latents_share"] if c["latents_share"] is not None else float("nan")
        out[f"latents_share_ie_{r}"] = c.get("latents_share_ie", float("nan"))
    out["latents_share_last"] = out[f"latents_share_{revisions[-1]}"]
    out["latents_share_min"] = min(out[f"latents_share_{r}"] for r in revisions)
    sp = pd.read_csv(folder / "ablation" / name / "consistency.csv")
    for row in sp.itertuples():
        out[f"rho_relie_{row.A}_{row.B}"] = row.rho_relie
        out[f"rho_reldec_{row.A}_{row.B}"] = row.rho_reldec
    out["rho_relie_mean"], out["rho_reldec_mean"] = float(sp.rho_relie.mean()), float(sp.rho_reldec.mean())
    out["rho_membership_mean"] = float(sp.rho_membership.mean())
    out["consistency_holds"] = float((sp.verdict == verdicts.HOLDS).all())
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


def table(findings: dict, keys=None) -> str:
    rows = [(k, v) for k, v in findings.items() if keys is None or k in keys]
    lines = [f"{'finding':<34} {'mean':>9} {'min':>9} {'max':>9}   per seed"]
    for k, v in rows:
        fmt = (lambda x: "—" if x is None else f"{x:9.3f}")
        lines.append(f"{k:<34} {fmt(v['mean'])} {fmt(v['min'])} {fmt(v['max'])}   "
                     + " ".join("—" if x is None else f"{x:.3f}" for x in v["per_seed"]))
    return "\n".join(lines)


def num(x):
    return "—" if x is None else f"{x:.3f}" if abs(x) < 0.1 else f"{x:.2f}"   # FVUs are 0.001–0.05


def fmt(v):
    return "—" if v["mean"] is None else f"{num(v['mean'])} [{num(v['min'])}, {num(v['max'])}]"


def span(v) -> str:
    return f"[{num(min(v))}, {num(max(v))}]" if len(v) and np.all(np.isfinite(v)) else "—"
