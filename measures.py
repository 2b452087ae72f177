"""measures.py — the relative measures and their classes on plain tables: RelDec, RelIE (one-vs-all
and 2-way), the classes the paper draws from them, and the app's annotations file. numpy and pandas
only (no torch), so the viewer can use them without loading a model.
"""
import fcntl
import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from common import atomic_path

SPECIFIC, SHARED_MIN = 0.7, 0.3        # one-vs-all classes: > 0.7 specific, all ≥ 0.3 shared
LOW, HIGH = 0.3, 0.7                   # 2-way classes: < 0.3 discontinued, > 0.7 emerging


def rel(values_NM) -> np.ndarray:
    """|v_m| / Σ_m' |v_m'| per row; an all-zero row splits evenly (1/M)."""
    a = np.abs(np.asarray(values_NM, dtype=float))
    s = a.sum(1, keepdims=True)
    return np.where(s > 0, a / np.where(s > 0, s, 1), 1.0 / a.shape[1])


def classify(rel_NM, revisions) -> list[str]:
    """One-vs-all: 'specific:<rev>' when one share > 0.7, 'shared' when every share ≥ 0.3, else 'others'."""
    out = []
    for row in np.asarray(rel_NM):
        top = int(np.argmax(row))
        if row[top] > SPECIFIC:
            out.append(f"specific:{revisions[top]}")
        elif (row >= SHARED_MIN).all():
            out.append("shared")
        else:
            out.append("others")
    return out


def add_shares(df, name, rel_NM, revisions):
    """Columns <name>_<revision> (each revision's share) and <name>_class (one-vs-all) of a latent table."""
    for m, r in enumerate(revisions):
        df[f"{name}_{r}"] = rel_NM[:, m]
    df[f"{name}_class"] = classify(rel_NM, revisions)


def rel2(a_N, b_N) -> np.ndarray:
    """2-way: |B| / (|A| + |B|), 0.5 when both are 0."""
    a, b = np.abs(np.asarray(a_N, dtype=float)), np.abs(np.asarray(b_N, dtype=float))
    s = a + b
    return np.where(s > 0, b / np.where(s > 0, s, 1), 0.5)


def classify2(r_N) -> list[str]:
    return ["discontinued" if r < LOW else "emerging" if r > HIGH else "maintained" for r in np.asarray(r_N)]


def normalise(ie_MF):
    """Each revision's (mean) IE divided by its total |IE| over all latents: the normalised IE, which
    removes the logit scale (a later checkpoint's logits are larger). relie.py and ablate.py both use it."""
    ie_MF = np.asarray(ie_MF, dtype=float)
    tot = np.abs(ie_MF).sum(1, keepdims=True)
    return ie_MF / np.where(tot > 0, tot, 1)


def pairs_of(revisions):
    """Every (A, B) with A before B."""
    return list(itertools.combinations(range(len(revisions)), 2))


# ---------------------------------------------------------------------------------------------
# Annotations (runs/<name>/annotations.csv, written by the app)

def read_annotations(folder) -> pd.DataFrame:
    """runs/<name>/annotations.csv (written by the app): latent, description, tags."""
    path = Path(folder) / "annotations.csv"
    if not path.exists():
        return pd.DataFrame(columns=["latent", "description", "tags"])
    return pd.read_csv(path, dtype={"description": str, "tags": str}).fillna("")


def save_annotation(run: Path, latent: int, description: str, tags: str):
    with open(run / ".annotations.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        df = read_annotations(run)
        df = df[df.latent.astype(int) != latent]
        df = pd.concat([df, pd.DataFrame([dict(latent=latent, description=description, tags=tags)])])
        with atomic_path(run / "annotations.csv") as tmp:
            df.sort_values("latent").to_csv(tmp, index=False)
