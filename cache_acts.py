"""cache_acts.py — layer-L activations of several checkpoints: scan them, cache them, stream them.

Scan many revisions (accuracy per sub-task, and how similar layer L is between every two revisions),
so a triplet where the ability and the representation shift can be chosen:

    python cache_acts.py --scan --model toy --suggest          # → scans/toy-L0-toy_sva.csv (+ -cos.csv)

Cache the layer-L output of the chosen revisions on the SAME token blocks (position 0 excluded),
one memory-mapped array per revision, resumable after a kill:

    python cache_acts.py --model toy --revisions step64,step128,step512 --tokens 262144

On disk (cache/<model>-L<layer>-<revisions>/): `<revision>.bin` raw [N, d] bf16/fp16 rows, `tokens.npy`
[n_blocks, T] token ids (row i of an array is block i // (T-1), position 1 + i % (T-1)), `progress.json`
(blocks done per revision), `meta.json` (written first; `complete: true` and the normalisation scales
last — nothing reads an incomplete cache). `open_cache` and `LiveBuffer` feed train.py.
"""
import argparse
import hashlib
import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import lm
import tasks
from common import (ArgumentParser, UsageError, atomic_path, fault_point, folder_lock, positive, read_json,
                    run_main, write_json)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VAL_FRACTION = 0.05          # the last 5% of blocks are held out for validation


# ---------------------------------------------------------------------------------------------
# Activations of one model on token blocks

def layer_acts(model, layer, ids_BT) -> torch.Tensor:
    """Block `layer`'s output for full (unpadded) blocks, position 0 dropped: [B*(T-1), d] float32."""
    x_BTd = lm.run_to_layer(model, layer, ids_BT.to(model.device))
    return x_BTd[:, 1:].reshape(-1, x_BTd.shape[-1]).float()


def check_finite(x_Nd, revision, first_row, T):
    bad = (~torch.isfinite(x_Nd)).any(-1).nonzero()
    if len(bad):
        r = first_row + int(bad[0])
        raise UsageError(f"NaN/Inf activation in revision {revision} at block {r // (T - 1)}, "
                         f"position {1 + r % (T - 1)}: the checkpoint is broken or --dtype overflows")


def fingerprint(ids) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(ids, dtype=np.int64)).tobytes()).hexdigest()[:16]


def load_models(spec, revs, device, dtype, layer=None):
    """Load each revision; all must share one hidden size (and have block `layer`)."""
    out = []
    for r in revs:
        model, tok = lm.load(spec, r, device=device, dtype=dtype)
        if layer is not None:
            lm.check_layer(model, layer, spec.key)
        if out and model.config.hidden_size != out[0][1].config.hidden_size:
            raise UsageError(f"revisions have different hidden sizes: {revs[0]} d={out[0][1].config.hidden_size}, "
                             f"{r} d={model.config.hidden_size}; one crosscoder needs one d")
        out.append((r, model, tok))
    return out


# ---------------------------------------------------------------------------------------------
# The cache: write (resumable), open, read batches

def default_cache_dir(model_key, layer, revs) -> Path:
    name = Path(model_key).name if os.path.isdir(model_key) else model_key.replace("/", "_")
    return Path("cache") / f"{name}-L{layer}-{'_'.join(revs)}"


def make_cache(model_key, layer, revs, out, n_tokens, seq_len, device="cpu", dtype="bf16",
               text=None, batch_blocks=32, seed=0, overwrite=False, model_dtype=None):
    """Cache layer `layer` of revisions `revs` on the same ~n_tokens tokens. Resumes a partial cache
    made with the same request; refuses one made with another. Returns the cache folder."""
    spec = lm.resolve(model_key)
    out = Path(out)
    avail = lm.revisions(spec, quiet=True)
    for r in revs:
        lm.check_revision(spec, r, avail)
    models = load_models(spec, revs, device, model_dtype, layer)
    tok = models[0][2]
    n_blocks = math.ceil(n_tokens / (seq_len - 1))
    ids = tasks.text_blocks(text or spec.text, tok, n_blocks, seq_len, seed=seed)
    d = models[0][1].config.hidden_size
    n_val = max(1, int(n_blocks * VAL_FRACTION))
    meta = dict(model=spec.key, repo=spec.repo, revisions=list(revs), layer=layer, text=text or spec.text,
                n_blocks=n_blocks, seq_len=seq_len, tokens=n_blocks * (seq_len - 1), d=d, dtype=dtype,
                split=dict(train_blocks=n_blocks - n_val, val_blocks=n_val), fingerprint=fingerprint(ids),
                position0="excluded")
    with folder_lock(out):
        if (out / "meta.json").exists() and not overwrite:
            old = read_json(out / "meta.json", "cache meta")
            for k, v in meta.items():
                if old.get(k) != v:
                    raise UsageError(f"cache {out} was made with {k}={old.get(k)!r}, this request has {k}={v!r}; "
                                     "use another --out or --overwrite")
            if old.get("complete"):
                return out
        else:
            for f in out.glob("*.bin"):
                f.unlink()
            (out / "progress.json").unlink(missing_ok=True)
            write_json(out / "meta.json", dict(meta, complete=False))
            with atomic_path(out / "tokens.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, ids.numpy().astype(np.int32))
        _fill(out, models, layer, ids, d, dtype, batch_blocks)
        scales = {r: _scale(open_array(out, r, meta), meta) for r in revs}
        fault_point("cache_done")               # killed here: every chunk written, not yet marked complete
        write_json(out / "meta.json", dict(meta, complete=True, scales=scales))
    return out


def _fill(out, models, layer, ids, d, dtype, batch_blocks):
    """Write each revision's rows chunk by chunk; progress.json is updated only after the chunk's
    data is flushed, so a kill loses at most the chunk in flight."""
    n_blocks, T = ids.shape
    rows_per_block = T - 1
    prog_path = out / "progress.json"
    progress = json.loads(prog_path.read_text()) if prog_path.exists() else {}
    for r, model, _ in models:
        done = progress.get(r, 0)
        if done >= n_blocks:
            continue
        path = out / f"{r}.bin"
        mm = np.memmap(path, dtype=np.uint16 if dtype != "fp32" else np.float32,
                       mode="r+" if path.exists() else "w+", shape=(n_blocks * rows_per_block, d))
        bar = tqdm(total=n_blocks, initial=done, desc=f"cache {r}", unit="block", leave=False)
        with torch.no_grad():
            for b0 in range(done, n_blocks, batch_blocks):
                b1 = min(b0 + batch_blocks, n_blocks)
                x = layer_acts(model, layer, ids[b0:b1])
                check_finite(x, r, b0 * rows_per_block, T)
                mm[b0 * rows_per_block:b1 * rows_per_block] = _to_disk(x, dtype)
                mm.flush()
                fault_point("cache_chunk")      # killed here: data written, progress not yet
                progress[r] = b1
                write_json(prog_path, progress)
                bar.update(b1 - b0)
        bar.close()
        del mm


def _to_disk(x, dtype):
    x = x.cpu()   # activations come from the model's device
    if dtype == "fp32":
        return x.numpy()
    return x.to(DTYPES[dtype]).view(torch.uint16 if dtype == "bf16" else torch.float16).numpy().view(np.uint16)


def _from_disk(a, dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == "fp32":
        return t
    return t.view(torch.bfloat16 if dtype == "bf16" else torch.float16).float()


def open_array(folder, revision, meta):
    rows = meta["n_blocks"] * (meta["seq_len"] - 1)
    arr = np.memmap(Path(folder) / f"{revision}.bin", mode="r", shape=(rows, meta["d"]),
                    dtype=np.float32 if meta["dtype"] == "fp32" else np.uint16)
    arr._mmap.madvise(mmap.MADV_RANDOM)   # training reads random rows: no readahead
    return arr


def norm_scale(x_Nd) -> float:
    """The normalisation scale s = √d / mean‖x‖: s·x has mean norm √d (DESIGN.md)."""
    return math.sqrt(x_Nd.shape[-1]) / x_Nd.norm(dim=-1).mean().item()


def _scale(mm, meta, max_rows=200_000):
    """norm_scale over (a sample of) the training rows."""
    train_rows = meta["split"]["train_blocks"] * (meta["seq_len"] - 1)
    idx = np.linspace(0, train_rows - 1, min(train_rows, max_rows)).astype(np.int64)
    return norm_scale(_from_disk(mm[idx], meta["dtype"]))


@dataclass
class Cache:
    """A complete cache, memory-mapped: batches of [B, M, d] float32 on raw (unnormalised) activations."""
    folder: Path
    meta: dict
    arrays: list

    @property
    def revisions(self):
        return self.meta["revisions"]

    @property
    def scales(self):
        return [self.meta["scales"][r] for r in self.revisions]

    def rows(self, split):
        T1 = self.meta["seq_len"] - 1
        tb = self.meta["split"]["train_blocks"]
        return (0, tb * T1) if split == "train" else (tb * T1, self.meta["n_blocks"] * T1)

    def get(self, idx, chunk=256) -> torch.Tensor:
        """Rows `idx` (sorted for locality on disk) of every revision: [B, M, d]. Read a chunk at a
        time and release its pages from the process (they stay in the OS page cache), so the
        process's memory never holds the cache however long it trains."""
        out = torch.empty(len(idx), len(self.arrays), self.meta["d"])
        for m, a in enumerate(self.arrays):
            for i in range(0, len(idx), chunk):
                out[i:i + chunk, m] = _from_disk(a[idx[i:i + chunk]], self.meta["dtype"])
                a._mmap.madvise(mmap.MADV_DONTNEED)
        return out

    def tokens(self):
        return torch.from_numpy(np.load(self.folder / "tokens.npy").astype(np.int64))


def open_cache(folder) -> Cache:
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"cache folder {folder} does not exist; make it with cache_acts.py")
    meta = read_json(folder / "meta.json", "cache meta")
    if not meta.get("complete"):
        raise UsageError(f"cache {folder} is incomplete (a killed run?): rerun cache_acts.py with the same "
                         "arguments to finish it")
    rows = meta["n_blocks"] * (meta["seq_len"] - 1)
    width = 4 if meta["dtype"] == "fp32" else 2
    for r in meta["revisions"]:
        f = folder / f"{r}.bin"
        if not f.exists() or f.stat().st_size != rows * meta["d"] * width:
            raise UsageError(f"cache file {f} is missing or has the wrong size for {rows}×{meta['d']} rows")
    return Cache(folder, meta, [open_array(folder, r, meta) for r in meta["revisions"]])


class LiveBuffer:
    """The seed's way, for runs too large to cache: all M revisions run on the same token blocks,
    filling a shuffled buffer of ~buffer_tokens rows, refilled from the next blocks when used up.
    batch_at(step) is a pure function of (seed, step), so a resumed run sees the same batches."""

    def __init__(self, models, layer, blocks_fn, buffer_tokens, seq_len, seed, device, chunk=8):
        self.models, self.layer, self.seed, self.device, self.chunk = models, layer, seed, device, chunk
        self.blocks_per_fill = max(1, buffer_tokens // (seq_len - 1))
        self.blocks_fn = blocks_fn       # () → a fresh iterator of [T] token blocks
        self.it, self.used, self.fill_no, self.buf = None, 0, -1, None

    def _fill(self, k):
        if self.it is None or k < self.fill_no:
            self.it, self.used = self.blocks_fn(), 0
        for _ in range((k - self.used // self.blocks_per_fill) * self.blocks_per_fill):
            next(self.it)  # resume: skip the blocks of earlier fills
        ids = torch.stack([next(self.it) for _ in range(self.blocks_per_fill)])
        self.used = (k + 1) * self.blocks_per_fill
        with torch.no_grad():
            xs = [torch.cat([layer_acts(m, self.layer, ids[i:i + self.chunk]) for i in range(0, len(ids), self.chunk)])
                  for _, m, _ in self.models]
        for (r, _, _), x in zip(self.models, xs):
            check_finite(x, r, 0, ids.shape[1])
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        perm = torch.randperm(len(xs[0]), generator=g)
        self.buf = torch.stack(xs, 1)[perm].to(self.device)
        self.fill_no = k

    def batch_at(self, step, batch_size):
        if self.buf is None:
            self._fill(0)
        per_fill = len(self.buf) // batch_size
        if per_fill == 0:
            raise UsageError(f"--buffer-tokens holds {len(self.buf)} rows, fewer than one batch of {batch_size}")
        k, j = divmod(step, per_fill)
        if k != self.fill_no:
            self._fill(k)
        return self.buf[j * batch_size:(j + 1) * batch_size]


# ---------------------------------------------------------------------------------------------
# Scan: accuracy and representation similarity over many revisions

def scan(model_key, layer, task, revs=None, n_tokens=2048, seq_len=None, device="cpu", metric="logit",
         out_dir="scans", model_dtype=None, text=None):
    spec = lm.resolve(model_key)
    avail = lm.revisions(spec)
    if revs:
        for r in revs:
            lm.check_revision(spec, r, avail)
        avail = [a for a in avail if a.name in revs]
    pairs = tasks.load_task(task)
    name = f"{Path(spec.key).name}-L{layer}-{Path(task).stem}"
    out_dir = Path(out_dir)
    rows, acts, ids = [], [], None
    for rev in tqdm(avail, desc="scan", unit="rev"):
        model, tok = lm.load(spec, rev.name, device=device, dtype=model_dtype)
        lm.check_layer(model, layer, spec.key)
        if ids is None:
            T = seq_len or (32 if spec.key == "toy" else 128)
            ids = tasks.text_blocks(text or spec.text, tok, math.ceil(n_tokens / (T - 1)), T)
        batch = tasks.tokenize_pairs(pairs, tok, task)
        score = (tasks.logit_diffs(model, batch, device) if metric == "logit"
                 else sentence_diffs(model, tok, batch.pairs, device))
        acc = tasks.by_subtask(score > 0, batch.subtask)
        with torch.no_grad():
            x = torch.cat([layer_acts(model, layer, ids[i:i + 16]) for i in range(0, len(ids), 16)])
        acts.append(torch.nn.functional.normalize(x, dim=-1).half())
        rows.append(dict(revision=rev.name, step=rev.step, tokens=rev.tokens,
                         **{f"acc_{k}": round(v, 4) for k, v in acc.items()},
                         acc_mean=round(sum(acc.values()) / len(acc), 4)))
        del model
    n = len(acts)
    cos = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            cos[i, j] = cos[j, i] = (acts[i].float() * acts[j].float()).sum(-1).mean().item()
    for i, r in enumerate(rows):
        r["cos_prev"] = round(cos[i, i - 1], 4) if i else None
        r["cos_last"] = round(cos[i, -1], 4)
    import pandas as pd
    df = pd.DataFrame(rows)
    with atomic_path(out_dir / f"{name}.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out_dir / f"{name}-cos.csv") as tmp:
        pd.DataFrame(cos, index=[r["revision"] for r in rows], columns=[r["revision"] for r in rows]).to_csv(tmp)
    return out_dir / f"{name}.csv"


def sentence_diffs(model, tok, pairs, device):
    """log p(prefix + good) − log p(prefix + bad) over whole sentences (lm-eval-harness BLiMP style)."""
    out = []
    for p in pairs:
        lps = []
        for ans in (p.good, p.bad):
            ids = torch.tensor([tok(p.prefix + ans)["input_ids"]], device=device)
            with torch.no_grad():
                logp = torch.log_softmax(lm.forward(model, ids).logits[0, :-1].float(), -1)
            lps.append(logp.gather(1, ids[0, 1:, None]).sum().item())
        out.append(lps[0] - lps[1])
    return torch.tensor(out)


def suggest(csv_path) -> list[str]:
    """Pick a triplet from a scan: (before, during, after) the ability.

    - during: where the sub-tasks disagree most (max − min sub-task accuracy): one kind of agreement
      is learned (simple) while another still fails (across attractors). The earliest revision
      within 90% of the largest disagreement, among all but the first and last revisions.
    - before: the last revision before `during` whose best sub-task is still near chance (≤ 0.65),
      else the first revision.
    - after: the last revision (the final model).
    """
    import pandas as pd
    df = pd.read_csv(csv_path)
    acc = df[[c for c in df.columns if c.startswith("acc_") and c != "acc_mean"]]
    if len(df) < 3:
        raise UsageError(f"{csv_path}: a triplet needs at least 3 scanned revisions, found {len(df)}")
    spread = (acc.max(axis=1) - acc.min(axis=1)).to_numpy()
    inner = spread[1:-1]
    mid = 1 + int(np.argmax(inner >= 0.9 * inner.max()))
    before = [i for i in range(mid) if acc.iloc[i].max() <= 0.65]
    first = before[-1] if before else 0
    return [df["revision"][first], df["revision"][mid], df["revision"].iloc[-1]]


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy")
    p.add_argument("--layer", type=int, default=None, help="block index (default: the model's)")
    p.add_argument("--revisions", default=None, help="comma-separated (default: the model's triplet; scan: all)")
    p.add_argument("--scan", action="store_true", help="scan accuracy and similarity over revisions")
    p.add_argument("--suggest", action="store_true", help="with --scan: name a triplet from the scan")
    p.add_argument("--task", default=None, help="scan task (default: the model's)")
    p.add_argument("--metric", choices=["logit", "sentence"], default="logit")
    p.add_argument("--tokens", type=positive("--tokens"), default=None,
                   help="tokens to cache per revision (default: toy 262144, else 10M); scan: 2048")
    p.add_argument("--seq-len", type=positive("--seq-len"), default=None, help="block length (toy 32, else 1024)")
    p.add_argument("--text", default=None, help="LM text: 'toy', a local file, or a HF dataset id[:config]")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="on-disk dtype")
    p.add_argument("--model-dtype", choices=list(DTYPES), default=None, help="dtype to run the LM in")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    spec = lm.resolve(args.model)
    layer = spec.layer if args.layer is None else args.layer
    if layer is None:
        raise UsageError(f"--layer is required for {args.model}")
    model_dtype = DTYPES[args.model_dtype] if args.model_dtype else None
    if args.suggest and not args.scan:
        raise UsageError("--suggest needs --scan")
    if args.scan:
        revs = args.revisions.split(",") if args.revisions else None
        csv = scan(args.model, layer, args.task or spec.task, revs, n_tokens=args.tokens or 2048,
                   seq_len=args.seq_len, device=args.device, metric=args.metric, out_dir=args.out or "scans",
                   model_dtype=model_dtype, text=args.text)
        print(f"wrote {csv}")
        if args.suggest:
            print("suggested triplet:", ",".join(suggest(csv)))
        return
    revs = args.revisions.split(",") if args.revisions else list(spec.revisions)
    if not revs:
        raise UsageError(f"--revisions is required for {args.model} (no default triplet)")
    out = args.out or default_cache_dir(args.model, layer, revs)
    toy = spec.key == "toy"
    folder = make_cache(args.model, layer, revs, out, args.tokens or (262_144 if toy else 10_000_000),
                        args.seq_len or (32 if toy else 1024), device=args.device, dtype=args.dtype,
                        text=args.text, overwrite=args.overwrite, model_dtype=model_dtype)
    meta = read_json(Path(folder) / "meta.json")
    print(f"cache {folder}: {meta['tokens']} tokens × {len(revs)} revisions, d={meta['d']}, scales={meta['scales']}")


if __name__ == "__main__":
    run_main(main)
