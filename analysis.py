"""analysis.py — what evaluate.py, relie.py and ablate.py share: opening a run folder with its
models and held-out data, splicing the crosscoder into a revision's forward, and the relative
measures (RelDec, RelIE) with their classes.

Splicing (DESIGN.md): at every real position p ≥ 1 of block L's output, x_m is replaced by
x̂_m = W_dec[:, m] f + b_dec[m] (+ the error term r_m = x_m − x̂_m where it is kept). Position 0 and
left padding always keep the model's own activation.
"""
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import cache_acts
import lm
import tasks
from common import UsageError, read_json
from crosscoder import CrossCoder

SPECIFIC, SHARED_MIN = 0.7, 0.3        # one-vs-all classes: > 0.7 specific, all ≥ 0.3 shared
LOW, HIGH = 0.3, 0.7                   # 2-way classes: < 0.3 discontinued, > 0.7 emerging


@dataclass
class Run:
    folder: Path
    config: dict
    cc: CrossCoder                 # acts on raw activations (scales folded in)
    revisions: list
    layer: int
    spec: lm.ModelSpec
    device: str

    def load_models(self, dtype=None):
        """[(revision, model, tokenizer)] for every revision of the run."""
        avail = lm.revisions(self.spec, quiet=True)
        out = []
        for r in self.revisions:
            if r not in [a.name for a in avail]:
                raise UsageError(f"revision {r} of run {self.folder} no longer loads from {self.spec.repo}")
            out.append((r, *lm.load(self.spec, r, device=self.device, dtype=dtype)))
        return out

    def eval_blocks(self, n_blocks):
        """Held-out token blocks: the cache's validation split, or fresh text for a live-buffer run."""
        cache = self.config.get("data", {}).get("cache")
        if cache and Path(cache, "meta.json").exists():
            c = cache_acts.open_cache(cache)
            ids = c.tokens()[c.meta["split"]["train_blocks"]:]
            return ids[:n_blocks]
        _, tok = lm.load(self.spec, self.revisions[-1])
        data = self.config.get("data", {})
        return tasks.text_blocks(data.get("text", self.spec.text), tok, n_blocks, data.get("seq_len", 1024),
                                 seed=self.config.get("seed", 0) + 1)


def default_run() -> Path:
    """The run `python train.py` makes with no arguments (the toy's), for scripts run without --run."""
    import train
    args = train.parse_args([])
    return train.resolve_defaults(args, lm.resolve(args.model)).out


def open_run(folder, device="cpu") -> Run:
    folder = Path(folder)
    if not (folder / "crosscoder.safetensors").exists() or not (folder / "config.json").exists():
        raise UsageError(f"{folder} holds no trained crosscoder (crosscoder.safetensors + config.json); "
                         "train one with train.py")
    try:
        cc = CrossCoder.load(folder, device=device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except Exception as e:  # a truncated or corrupt safetensors file
        raise UsageError(f"{folder}/crosscoder.safetensors cannot be read ({type(e).__name__}: {e})") from None
    if not (folder / "DONE").exists():
        raise UsageError(f"{folder} is an unfinished training run (no DONE marker); "
                         f"finish it with `python train.py --out {folder} --resume` and the same arguments")
    cfg = read_json(folder / "config.json", "run config")
    for k in ("model", "revisions", "layer"):
        if k not in cfg:
            raise UsageError(f"{folder}/config.json lacks {k!r}: not a run folder made by train.py")
    cc.eval().requires_grad_(False)
    return Run(folder, cfg, cc, cfg["revisions"], cfg["layer"], lm.resolve(cfg["model"]), device)


def run_acts(models, layer, ids_BT, mask_BT=None) -> torch.Tensor:
    """Block `layer`'s output of every revision on the same ids: [B, T, M, d] float32."""
    return torch.stack([lm.run_to_layer(m, layer, ids_BT, mask_BT).float() for _, m, _ in models], 2)


def splice_mask(mask_BT) -> torch.Tensor:
    """Positions whose activation is replaced: real tokens, not position 0 of the sequence."""
    first = mask_BT.long().cumsum(1) == 1      # each row's first real token (after left padding)
    return mask_BT.bool() & ~first


def spliced_logits(model, layer, ids_BT, mask_BT, x_BTd, new_BTd, last_only=False):
    """Logits with block `layer`'s output x_BTd (the model's own) replaced by new_BTd at the splice
    positions. Only the blocks above `layer` run: x_BTd stands in for the blocks below."""
    where = splice_mask(torch.ones_like(ids_BT) if mask_BT is None else mask_BT)[..., None]
    with lm.start_at_layer(model, layer, torch.where(where, new_BTd.to(x_BTd.dtype), x_BTd)):
        return lm.forward(model, ids_BT, mask_BT, last_only=last_only).logits


@torch.no_grad()
def ablated_logit_diffs(run, model, m, batch, x_BTd, f_BTF, r_BTd, sets, chunk=16):
    """Logit difference (correct − wrong) per pair with each set of latents zeroed in crosscoder
    space, the error term kept, spliced into revision m: [B, len(sets)]. An empty set is the
    unablated splice, which equals the clean model (x̂ + r = x)."""
    W, b = run.cc.W_dec_FMd[:, m], run.cc.b_dec_Md[m]
    out = []
    for c0 in range(0, len(sets), chunk):
        group = sets[c0:c0 + chunk]
        C = len(group)
        f = f_BTF.unsqueeze(0).repeat(C, 1, 1, 1)
        for c, latents in enumerate(group):
            f[c, ..., list(latents)] = 0
        new = (f @ W + b + r_BTd).flatten(0, 1)
        big = batch.repeat(C)   # set-major copies of the batch
        logits = spliced_logits(model, run.layer, big.ids_BT, big.mask_BT, x_BTd.repeat(C, 1, 1), new,
                                last_only=True)
        out.append(tasks.logit_diff(logits, big).view(C, -1).T)
    return torch.cat(out, 1)


def read_annotations(folder) -> pd.DataFrame:
    """runs/<name>/annotations.csv (written by the app): latent, description, tags."""
    path = Path(folder) / "annotations.csv"
    if not path.exists():
        return pd.DataFrame(columns=["latent", "description", "tags"])
    return pd.read_csv(path, dtype={"description": str, "tags": str}).fillna("")


# ---------------------------------------------------------------------------------------------
# Relative measures and classes

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


def pairs_of(revisions):
    """Every (A, B) with A before B."""
    return list(itertools.combinations(range(len(revisions)), 2))


def reldec(cc) -> np.ndarray:
    """RelDec [F, M] on the normalised decoder."""
    return rel(cc.decoder_norms().detach().cpu().numpy())
