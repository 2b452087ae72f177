"""activations.py — layer-L activations of several revisions on the same tokens: computed, cached on
disk, and read back in batches.

- layer_acts / load_models: block L's output of each revision (position 0 dropped), one d for all.
- The cache (make_cache, run by cache_acts.py): cache/<model>-L<layer>-<revisions>/ holds
  `<revision>.bin`, raw [rows, d] bf16/fp16/fp32 rows, `tokens.npy` [n_blocks, T] token ids (row i of an
  array is block i // (T-1), position 1 + i % (T-1)), `meta.json` (the request, the split, the
  normalisation scales) and DONE, written last. open_cache reads only a finished cache.
- CacheBatches: seeded random batches [B, M, d] from a cache, a pure function of the step.
- LiveBuffer: the same without a cache, running the revisions on streamed text.
"""
import contextlib
import hashlib
import json
import math
import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from crosscoding import defaults, lm, tasks
from crosscoding.common import (
    UsageError,
    atomic_path,
    fault_point,
    folder_lock,
    is_done,
    mark_done,
    read_json,
    require_done,
    unmark_done,
    write_json,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------
# Activations of one model on token blocks

def layer_acts(model, layer, ids_BT, fp32=True) -> torch.Tensor:
    """Block `layer`'s output for full (unpadded) blocks, position 0 (BOS) dropped: [B*(T-1), d], in
    float32 or (fp32=False) the model's own dtype."""
    x_BTd = lm.run_to_layer(model, layer, ids_BT.to(model.device))
    x_Rd = x_BTd[:, 1:].reshape(-1, x_BTd.shape[-1])
    return x_Rd.float() if fp32 else x_Rd


def check_finite(x_Rd, revision, first_row, T):
    bad = (~torch.isfinite(x_Rd)).any(-1).nonzero()
    if len(bad):
        r = first_row + int(bad[0])
        raise UsageError(f"NaN/Inf activation in revision {revision} at block {r // (T - 1)}, "
                         f"position {1 + r % (T - 1)}: the checkpoint is broken or --model-dtype overflows")


def fingerprint(ids) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(ids, dtype=np.int64)).tobytes()).hexdigest()[:16]


def load_models(spec, revs, device, dtype, layer=None, weights="hub"):
    """Load each revision; all must share one hidden size (and have block `layer`)."""
    out = []
    for r in revs:
        model, tok = lm.load(spec, r, device=device, dtype=dtype, weights=weights)
        if layer is not None:
            lm.check_layer(model, layer, spec.key)
        if out and model.config.hidden_size != out[0][1].config.hidden_size:
            raise UsageError(f"revisions have different hidden sizes: {revs[0]} d={out[0][1].config.hidden_size}, "
                             f"{r} d={model.config.hidden_size}; one crosscoder needs one d")
        out.append((r, model, tok))
    return out


# ---------------------------------------------------------------------------------------------
# The cache on disk

def _to_disk(x, dtype):
    x = x.cpu()   # activations come from the model's device
    if dtype == "fp32":
        return x.numpy()
    return x.to(DTYPES[dtype]).view(torch.uint16 if dtype == "bf16" else torch.float16).numpy().view(np.uint16)


def _from_disk(a, dtype, fp32=True) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == "fp32":
        return t
    t = t.view(torch.bfloat16 if dtype == "bf16" else torch.float16)
    return t.float() if fp32 else t


def open_array(folder, revision, meta):
    rows = meta["n_blocks"] * (meta["seq_len"] - 1)
    arr = np.memmap(Path(folder) / f"{revision}.bin", mode="r", shape=(rows, meta["d"]),
                    dtype=np.float32 if meta["dtype"] == "fp32" else np.uint16)
    arr._mmap.madvise(mmap.MADV_RANDOM)   # training reads random rows: no readahead
    return arr


def norm_scale(x_Rd) -> float:
    """The normalisation scale s = √d / mean‖x‖: s·x has mean norm √d."""
    return math.sqrt(x_Rd.shape[-1]) / x_Rd.float().norm(dim=-1).mean().item()


PRELOAD_BYTES = 256 << 20     # a cache this small is read into memory once: a batch is then one gather


@dataclass
class Cache:
    """A finished cache: batches of [B, M, d] float32 on raw (unnormalised) activations. Rows of the
    training blocks come first, then those of the held-out (validation) blocks. Memory-mapped, or held
    in memory (in its on-disk dtype) when it is at most PRELOAD_BYTES."""
    folder: Path
    meta: dict
    arrays: list
    held: torch.Tensor | None = None      # [rows, M, d] in the on-disk dtype, when preloaded

    def preload(self):
        if sum(a.nbytes for a in self.arrays) <= PRELOAD_BYTES:
            self.held = torch.stack([_from_disk(np.array(a), self.meta["dtype"], fp32=False) for a in self.arrays], 1)
        return self

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
        if self.held is not None:
            return self.held[torch.as_tensor(idx)].float()
        out = torch.empty(len(idx), len(self.arrays), self.meta["d"])
        for m, a in enumerate(self.arrays):
            for i in range(0, len(idx), chunk):
                out[i:i + chunk, m] = _from_disk(a[idx[i:i + chunk]], self.meta["dtype"])
                a._mmap.madvise(mmap.MADV_DONTNEED)
        return out

    def val(self, n_rows) -> torch.Tensor:
        """Up to n_rows held-out rows, evenly spread: [n, M, d]."""
        lo, hi = self.rows("val")
        return self.get(np.linspace(lo, hi - 1, min(n_rows, hi - lo)).astype(np.int64))

    def tokens(self):
        return torch.from_numpy(np.load(self.folder / "tokens.npy").astype(np.int64))


def open_cache(folder) -> Cache:
    folder = Path(folder)
    require_done(folder, "cache", "make or finish it by running cache_acts.py with the same arguments")
    meta = read_json(folder / "meta.json", "cache meta")
    rows = meta["n_blocks"] * (meta["seq_len"] - 1)
    width = 4 if meta["dtype"] == "fp32" else 2
    for r in meta["revisions"]:
        f = folder / f"{r}.bin"
        if not f.exists() or f.stat().st_size != rows * meta["d"] * width:
            raise UsageError(f"cache file {f} is missing or has the wrong size for {rows}×{meta['d']} rows")
    return Cache(folder, meta, [open_array(folder, r, meta) for r in meta["revisions"]]).preload()


class CacheBatches:
    """Random batches from a cache: a seeded permutation of the training rows per epoch."""

    def __init__(self, cache, batch_size, seed, rank=0, world=1):
        self.cache, self.B, self.seed, self.rank, self.world = cache, batch_size, seed, rank, world
        self.lo, self.hi = cache.rows("train")
        self.per_epoch = (self.hi - self.lo) // batch_size
        if self.per_epoch == 0:
            raise UsageError(f"cache {cache.folder} has {self.hi - self.lo} training rows, fewer than one "
                             f"batch of {batch_size}")
        self.epoch, self.perm = -1, None

    def batch_at(self, step):
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            g = np.random.default_rng([self.seed, epoch])
            self.perm, self.epoch = self.lo + g.permutation(self.hi - self.lo), epoch
        idx = np.sort(self.perm[j * self.B:(j + 1) * self.B][self.rank::self.world])
        return self.cache.get(idx)


# ---------------------------------------------------------------------------------------------
# The cache: written chunk by chunk, resumable

def make_cache(model_key, layer, revs, out, n_tokens, seq_len, heldout_tokens, text=None, device="cpu",
               cache_dtype="bf16", model_dtype=None, weights="hub", batch_blocks=32, overwrite=False,
               val_rows=defaults.VAL_ROWS):
    """Cache layer `layer` of revisions `revs` on the same ~n_tokens training tokens (and val_rows
    held-out ones). Resumes a partial cache made with the same request; refuses one made with another."""
    spec = lm.resolve(model_key)
    out = Path(out)
    if weights == "hub":
        avail = lm.revisions(spec, quiet=True)
        for r in revs:
            lm.check_revision(spec, r, avail)
    models = load_models(spec, revs, device, model_dtype, layer, weights)
    tok, text = models[0][2], text or lm.default_text(spec, weights)
    n_train = math.ceil(n_tokens / (seq_len - 1))
    n_val = math.ceil(val_rows / (seq_len - 1))
    ids = torch.cat([tasks.text_blocks(text, tok, n_train, seq_len, heldout_tokens, "train"),
                     tasks.text_blocks(text, tok, n_val, seq_len, heldout_tokens, "heldout", min_blocks=1)])
    n_val = len(ids) - n_train
    d = models[0][1].config.hidden_size
    meta = dict(model=spec.key, repo=spec.repo, weights=weights, revisions=list(revs), layer=layer, text=text,
                n_blocks=n_train + n_val, seq_len=seq_len, tokens=n_train * (seq_len - 1), d=d, dtype=cache_dtype,
                split=dict(train_blocks=n_train, val_blocks=n_val, heldout_tokens=heldout_tokens),
                fingerprint=fingerprint(ids), position0="excluded")
    if weights == "random":
        meta["random_on"] = lm.drawn_on(weights, device)
    with folder_lock(out):
        if (out / "meta.json").exists() and not overwrite:
            old = read_json(out / "meta.json", "cache meta")
            for k, v in meta.items():
                if old.get(k) != v:
                    raise UsageError(f"cache {out} was made with {k}={old.get(k)!r}, this request has {k}={v!r}; "
                                     "use another --out or --overwrite")
            if is_done(out):
                return out
        else:
            unmark_done(out)
            for f in out.glob("*.bin"):
                f.unlink()
            (out / "progress.json").unlink(missing_ok=True)
            write_json(out / "meta.json", meta)
            with atomic_path(out / "tokens.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, ids.numpy().astype(np.int32))
        _fill(out, models, layer, ids, d, cache_dtype, batch_blocks)
        # the scales from the held-out rows (of the finished arrays), then the marker
        meta["scales"] = {r: norm_scale(x) for r, x in zip(revs, _val_rows(out, meta, val_rows).unbind(1))}
        write_json(out / "meta.json", meta)
        fault_point("cache_done")               # killed here: every chunk written, not yet marked done
        mark_done(out, tokens=meta["tokens"], revisions=list(revs))
    return out


def _val_rows(out, meta, n):
    """The held-out rows of a cache whose arrays are all written (DONE or not)."""
    cache = Cache(out, meta, [open_array(out, r, meta) for r in meta["revisions"]])
    return cache.val(n)


def _fill(out, models, layer, ids, d, cache_dtype, batch_blocks):
    """Write each revision's rows chunk by chunk; progress.json is updated only after the chunk's
    data is flushed, so a kill loses at most the chunk in flight."""
    n_blocks, T = ids.shape
    T1 = T - 1
    prog_path = out / "progress.json"
    progress = json.loads(prog_path.read_text()) if prog_path.exists() else {}
    for r, model, _ in models:
        done = progress.get(r, 0)
        if done >= n_blocks:
            continue
        path = out / f"{r}.bin"
        mm = np.memmap(path, dtype=np.uint16 if cache_dtype != "fp32" else np.float32,
                       mode="r+" if path.exists() else "w+", shape=(n_blocks * T1, d))
        bar = tqdm(total=n_blocks, initial=done, desc=f"cache {r}", unit="block", leave=False)
        with torch.no_grad():
            for b0 in range(done, n_blocks, batch_blocks):
                b1 = min(b0 + batch_blocks, n_blocks)
                x_Rd = layer_acts(model, layer, ids[b0:b1])
                check_finite(x_Rd, r, b0 * T1, T)
                mm[b0 * T1:b1 * T1] = _to_disk(x_Rd, cache_dtype)
                mm.flush()
                fault_point("cache_chunk")      # killed here: data written, progress not yet
                progress[r] = b1
                write_json(prog_path, progress)
                bar.update(b1 - b0)
        bar.close()
        del mm


# ---------------------------------------------------------------------------------------------
# The live buffer: no cache, the revisions run on streamed training text

def to_device(t, device):
    """A CPU tensor on `device`; to a GPU through pinned memory, asynchronously: a copy from pageable memory
    makes the host wait for everything queued on the stream first."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Laps:
    """Seconds per named phase, summed: lap(name) books the time since the previous lap (or the start) to
    `name`. On a GPU a lap is a CUDA event on the current stream, resolved only when read, so timing adds no
    host sync; each phase is then the stream's time between two marks, idle time included. On a CPU, the clock."""

    def __init__(self, device):
        self.gpu = torch.device(device).type == "cuda"
        self.sums, self.pending = {}, []
        self.last = self._mark()

    def _mark(self):
        if not self.gpu:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def lap(self, name):
        now = self._mark()
        if self.gpu:
            self.pending.append((name, self.last, now))
        else:
            self.sums[name] = self.sums.get(name, 0.0) + now - self.last
        self.last = now

    def read(self) -> dict:
        """The sums so far (waits for the marks still on the GPU's queue)."""
        for name, a, b in self.pending:
            b.synchronize()
            self.sums[name] = self.sums.get(name, 0.0) + a.elapsed_time(b) / 1e3
        self.pending = []
        return dict(self.sums)


class LiveBuffer:
    """Batches [B, M, d] from all M revisions run on the same training blocks, mixed across fills.

    The training text is cut into chunks of chunk_blocks blocks. Each chunk's rows are shuffled (seeded
    by the chunk) into n parts (n_parts = 4); window w serves part c − w of each chunk c = w … w+n−1,
    shuffled together (seeded by the window), in batches. So a batch mixes rows of n consecutive chunks
    (≈ 1.6× the resident rows for n = 4) and no fill boundary cuts the data; every row is served once
    (the first n−1 chunks' early parts excepted). Only unserved parts stay resident: n(n+1)/2 parts of
    rows/n, stored in the models' dtype. batch_at(step) is a pure function of (seed, step), and a
    resumed run needs only chunks w … w+n−1, recomputed from the text position `state()` recorded.
    When the whole run fits the buffer, one window holds all of it (n_parts = 1).

    Refills: each new window needs one new chunk, w+n−1. Synchronously (overlap=False) it is computed when
    the window starts, and the training loop waits for it. With overlap=True a producer thread computes
    chunk w+n (on a GPU in a CUDA stream of its own) while window w trains, so it is ready when window w+1
    starts; it holds n more parts meanwhile. Every chunk is then computed in that thread (with the loop's
    thread count), in the same order, on the same blocks: the batches are the same as without overlap.
    `times` sums where a refill's time goes: the LMs' forwards and the shuffle of their rows into parts."""

    def __init__(self, models, layer, blocks, seq_len, buffer_tokens, run_rows, seed, device, lm_batch=8,
                 start=None, overlap=False):
        self.models, self.layer, self.seed, self.device, self.lm_batch = models, layer, seed, device, lm_batch
        self.blocks = blocks                 # (TextPos | None) -> iterator of (block [T], TextPos)
        T1 = seq_len - 1
        if run_rows <= buffer_tokens:        # the whole run fits: one window, every row mixed with every other
            self.n_parts, self.chunk_blocks = 1, math.ceil(run_rows / T1)
        else:
            self.n_parts = 4
            self.chunk_blocks = max(1, 2 * buffer_tokens // ((self.n_parts + 1) * T1))
        self.part = self.chunk_blocks * T1 // self.n_parts
        self.run_rows = run_rows
        self.start = start or {"chunk": 0, "pos": None}
        self.window, self.parts, self.pos, self.it, self.peeked = None, {}, {}, None, None
        self.next_chunk = self.start["chunk"]
        self.times = {"lm_forward": 0.0, "refill_copy": 0.0}
        self.overlap = overlap and self.n_parts > 1      # one window for the whole run: nothing to refill
        self.pool, self.pending, self.stream = None, None, None
        if self.overlap:
            self.pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
            if torch.device(device).type == "cuda":
                self.stream = torch.cuda.Stream(device)

    def per_window(self, batch_size):
        n = self.n_parts * self.part // batch_size
        if n == 0:
            raise UsageError(f"--buffer-tokens gives windows of {self.n_parts * self.part} rows, fewer than one "
                             f"batch of {batch_size}; raise --buffer-tokens")
        return n

    def blocks_needed(self, steps, batch_size) -> int:
        """Training blocks a run of `steps` batches reads, from its start (chunk 0)."""
        windows = math.ceil(steps / self.per_window(batch_size))
        return (windows + self.n_parts - 1) * self.chunk_blocks

    def resident_bytes(self, d) -> int:
        item = next(self.models[0][1].parameters()).element_size()
        parts = self.n_parts * (self.n_parts + 1) // 2 + (self.n_parts if self.overlap else 0)
        return parts * self.part * len(self.models) * d * item

    def state(self, step, batch_size) -> dict:
        """What a checkpoint at `step` records: the first chunk that step's window needs, and where it starts."""
        c = step // self.per_window(batch_size)
        if c not in self.pos and self.pending is not None:
            self._install(self._take(self.pending[0]))   # the producer reads ahead: let it finish first
        if c not in self.pos and self.peeked is not None and c == self.next_chunk:
            self.pos[c] = self.peeked[1]   # not read yet: it starts at the block after the last one read
        return {"chunk": c, "pos": self.pos.get(c)}

    def _chunk(self, c):
        """Chunk c: read its blocks (the text, in chunk order), run every revision on them and shuffle the rows
        into the parts still to be served from the window it is first needed in. (c, parts, where it starts in
        the text, seconds of LM forwards and of shuffling)."""
        got = [self.peeked] + [next(self.it, None) for _ in range(self.chunk_blocks)]
        got, self.peeked = got[:-1], got[-1]   # one block ahead: where the next chunk starts
        if any(g is None for g in got):
            n = c * self.chunk_blocks + sum(g is not None for g in got)
            raise UsageError(f"the training text ran out after {n} blocks; this run needs more: give a longer "
                             "--text, or fewer --tokens (a checkpoint, if any, resumes with --resume)")
        ids = torch.stack([b for b, _ in got])
        T1 = ids.shape[1] - 1
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + c)
        slot = torch.empty(len(ids) * T1, dtype=torch.long)
        slot[torch.randperm(len(slot), generator=g)] = torch.arange(len(slot))   # row → shuffled position
        first_window = max(self.start["chunk"], c - self.n_parts + 1)
        keep = [p for p in range(self.n_parts) if c - p >= first_window]
        d = self.models[0][1].config.hidden_size
        dtype = next(self.models[0][1].parameters()).dtype
        with torch.no_grad(), (torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext()):
            laps = Laps(self.device)
            ids = to_device(ids, self.device)
            parts = {p: torch.empty(self.part, len(self.models), d, dtype=dtype, device=self.device) for p in keep}
            bad = []                         # per LM batch and revision, its rows that are not finite
            for b0 in range(0, len(ids), self.lm_batch):
                rows = slot[b0 * T1:(b0 + self.lm_batch) * T1]
                p_R, off_R = rows // self.part, rows % self.part
                for m, (_, model, _) in enumerate(self.models):
                    x_Rd = layer_acts(model, self.layer, ids[b0:b0 + self.lm_batch], fp32=False)
                    laps.lap("lm_forward")
                    bad.append(~torch.isfinite(x_Rd).all(-1))
                    for p in keep:
                        sel = (p_R == p).nonzero().squeeze(1)
                        x_Sd = x_Rd[to_device(sel, x_Rd.device)].to(self.device)
                        parts[p][to_device(off_R[sel], self.device), m] = x_Sd
                    laps.lap("refill_copy")
            self._check_finite(bad, c, T1)   # one read-back per chunk
        return c, parts, got[0][1], laps.read()

    def _check_finite(self, bad, c, T1):
        flags = torch.stack([b.any() for b in bad]).cpu()
        if flags.any():
            i = int(flags.nonzero()[0])
            b0, m = (i // len(self.models)) * self.lm_batch, i % len(self.models)
            r = c * self.chunk_blocks * T1 + b0 * T1 + int(bad[i].nonzero()[0])
            raise UsageError(f"NaN/Inf activation in revision {self.models[m][0]} at training block {r // T1} of this "
                             f"run's text, position {1 + r % T1}: the checkpoint is broken or --model-dtype overflows")

    def _run(self, c):
        return self.pool.submit(self._chunk, c).result() if self.overlap else self._chunk(c)

    def _take(self, c):
        """Chunk c: the producer's, when it is the one in flight (waiting for it), else computed now."""
        if self.pending is not None and self.pending[0] == c:
            future, self.pending = self.pending[1], None
            return future.result()
        return self._run(c)

    def _install(self, result):
        c, parts, pos, times = result
        for p, t in parts.items():
            if self.stream is not None:
                t.record_stream(torch.cuda.current_stream(self.device))   # read on the loop's stream from now on
            self.parts[(c, p)] = t
        self.pos[c] = pos
        for k, v in times.items():
            self.times[k] += v
        self.next_chunk = c + 1

    def ready(self, step, batch_size):
        """Make `step`'s window resident: the first window's chunks, or the next window's new chunk."""
        per = self.per_window(batch_size)
        w = step // per
        if w == self.window:
            return
        if self.window is None:          # first window of this process: from the start, or a checkpoint's state
            if w != self.start["chunk"]:
                raise ValueError(f"LiveBuffer starts at window {self.start['chunk']}, asked for {w}")
            self.it = self.blocks(self.start["pos"])
            self.peeked = next(self.it, None)
            for c in range(w, w + self.n_parts):
                self._install(self._run(c))
        elif w == self.window + 1:
            for k in range(self.n_parts):
                self.parts.pop((self.window + k, k), None)
            if w + self.n_parts - 1 >= self.next_chunk:          # not installed early by state()
                self._install(self._take(w + self.n_parts - 1))
        else:
            raise ValueError(f"LiveBuffer moves forward one window at a time ({self.window} → {w})")
        self.window = w
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 999_983 * (w + 1))
        self.order = torch.randperm(self.n_parts * self.part, generator=g)
        last = math.ceil(self.run_rows // batch_size / per) + self.n_parts - 2    # the run's last chunk
        if self.overlap and w + self.n_parts <= last:
            self.pending = (w + self.n_parts, self.pool.submit(self._chunk, w + self.n_parts))

    def batch_at(self, step, batch_size):
        w, j = divmod(step, self.per_window(batch_size))
        self.ready(step, batch_size)
        idx = self.order[j * batch_size:(j + 1) * batch_size]
        k_B, off_B = idx // self.part, idx % self.part
        out = torch.empty(batch_size, len(self.models), self.models[0][1].config.hidden_size, device=self.device)
        for k in range(self.n_parts):
            sel = (k_B == k).nonzero().squeeze(1)
            out[to_device(sel, self.device)] = self.parts[(w + k, k)][to_device(off_B[sel], self.device)].float()
        return out

    def close(self):
        """Stop the producer (a chunk it is computing is finished first)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
