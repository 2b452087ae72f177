"""cache_acts.py — scan many checkpoints to choose a few, and cache layer L of the chosen ones.

Scan (accuracy per sub-task, and how similar layer L is between every two revisions), so that the
revisions where the ability and the representation shift can be chosen:

    python cache_acts.py --scan --model toy --suggest        # → scans/toy-L0-toy_sva.csv (+ -cos.csv)
    python cache_acts.py --scan --model toy --suggest 5      # five revisions over the phase change

Cache the layer-L output of the chosen revisions on the SAME token blocks (position 0 excluded),
one memory-mapped array per revision, resumable after a kill:

    python cache_acts.py --model toy --revisions step64,step128,step512

The cache's training blocks come from the text's training split, its validation blocks (and the
normalisation scales s_m = √d / mean‖x_m‖) from the held-out split. The format is activations.py's;
meta.json is written first, DONE last, and progress.json says how far each revision got.
"""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from crosscoding import cli, defaults, lm, tasks
from crosscoding.activations import layer_acts, make_cache, open_cache
from crosscoding.common import UsageError, atomic_path, positive, run_main

# ---------------------------------------------------------------------------------------------
# Scan: accuracy and representation similarity over many revisions

def scan(model_key, layer, task, revs, n_tokens, seq_len, heldout_tokens, device="cpu", metric="logit",
         out=None, model_dtype=None, text=None, weights="hub"):
    """Per revision: accuracy per sub-task, and layer L's mean per-token cosine with every other revision
    on the same held-out text. Writes scans/<model>-L<layer>-<task>.csv and its -cos.csv."""
    spec = lm.resolve(model_key)
    names = revs or [r.name for r in lm.revisions(spec)]
    if weights == "hub":
        avail = lm.revisions(spec, quiet=True)
        for r in names:
            lm.check_revision(spec, r, avail)
    info = {r.name: r for r in (lm.revisions(spec, quiet=True) if weights == "hub" else [])}
    pairs = tasks.load_task(task)
    out = Path(out) if out else defaults.scan_path(spec.key, layer, task)
    rows, acts, ids = [], [], None
    for name in tqdm(names, desc="scan", unit="rev"):
        model, tok = lm.load(spec, name, device=device, dtype=model_dtype, weights=weights)
        lm.check_layer(model, layer, spec.key)
        if ids is None:
            ids = tasks.text_blocks(text or lm.default_text(spec, weights), tok, math.ceil(n_tokens / (seq_len - 1)),
                                    seq_len, heldout_tokens, "heldout")
        batch = tasks.tokenize_pairs(pairs, tok, task)
        score = (tasks.logit_diffs(model, batch, device) if metric == "logit"
                 else sentence_diffs(model, tok, batch.pairs, device))
        acc = tasks.by_subtask(score > 0, batch.subtask)
        with torch.no_grad():
            x_Rd = torch.cat([layer_acts(model, layer, ids[i:i + 16]) for i in range(0, len(ids), 16)])
        acts.append(torch.nn.functional.normalize(x_Rd, dim=-1).half())
        rev = info.get(name) or lm.parse_revision(name, spec.tokens_per_step)
        rows.append(dict(revision=name, step=rev.step, tokens=rev.tokens,
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
    with atomic_path(out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    names = [r["revision"] for r in rows]
    with atomic_path(out.with_name(out.stem + "-cos.csv")) as tmp:
        pd.DataFrame(cos, index=names, columns=names).to_csv(tmp)
    return out


@torch.no_grad()
def sentence_diffs(model, tok, pairs, device):
    """log p(good sentence) − log p(bad sentence), each scored whole after BOS (lm-eval-harness's BLiMP
    metric); pairs from sources without sentences score prefix + answer."""
    out = []
    for p in pairs:
        lps = []
        for sentence in p.sentences():
            ids = torch.tensor([[lm.bos_id(tok)] + tok(sentence, add_special_tokens=False)["input_ids"]], device=device)
            logp = torch.log_softmax(lm.forward(model, ids).logits[0, :-1].float(), -1)
            lps.append(logp.gather(1, ids[0, 1:, None]).sum().item())
        out.append(lps[0] - lps[1])
    return torch.tensor(out)


def suggest(csv_path, k=3) -> list[str]:
    """k revisions from a scan, in training order, spread over the phase change:

    - during: where the sub-tasks disagree most (max − min sub-task accuracy): one kind of agreement
      is learned (simple) while another still fails (across attractors). The earliest revision
      within 90% of the largest disagreement, among all but the first and last revisions.
    - before: the last revision before `during` whose best sub-task is still near chance (≤ 0.65),
      else the first revision.
    - after: the last revision (the final model).
    - k > 3: the rest where the scan changes fastest from the revision before (the largest sub-task
      accuracy change plus 1 − the layer-L cosine with it). k = 2: before and after.
    """
    df = pd.read_csv(csv_path)
    acc = df[[c for c in df.columns if c.startswith("acc_") and c != "acc_mean"]]
    if len(df) < max(3, k):
        raise UsageError(f"{csv_path}: --suggest {k} needs at least {max(3, k)} scanned revisions, found {len(df)}")
    spread = (acc.max(axis=1) - acc.min(axis=1)).to_numpy()
    inner = spread[1:-1]
    mid = 1 + int(np.argmax(inner >= 0.9 * inner.max()))
    before = [i for i in range(mid) if acc.iloc[i].max() <= 0.65]
    first = before[-1] if before else 0
    chosen = [first, len(df) - 1] if k == 2 else [first, mid, len(df) - 1]
    cos_prev = df["cos_prev"] if "cos_prev" in df else pd.Series(1.0, index=df.index)
    change = acc.diff().abs().max(axis=1).fillna(0).to_numpy() + (1 - cos_prev.fillna(1).to_numpy())
    for i in np.argsort(-change, kind="stable"):
        if len(chosen) >= k:
            break
        if int(i) not in chosen:
            chosen.append(int(i))
    return [df["revision"][i] for i in sorted(chosen)]


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    spec = cli.model_in(argv)
    pre = spec.preset
    p = cli.parser(__doc__.split("\n\n")[0], pre)
    cli.add(p, "--model", "--layer", "--revisions", "--weights", "--text", "--seq-len", "--heldout-tokens", "--tokens",
            "--device", "--model-dtype", "--task", "--out", "--overwrite",
            model=spec.key, layer=spec.layer, revisions=",".join(spec.revisions) or None, weights="hub",
            text=spec.text, seq_len=pre.seq_len, heldout_tokens=pre.heldout_tokens, tokens=pre.cache_tokens,
            device=defaults.default_device(), task=spec.task, out=None)
    p.add_argument("--cache-dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="dtype of the cached activations on disk (default: %(default)s)")
    p.add_argument("--scan", action="store_true", help="scan accuracy and layer-L similarity over revisions "
                                                       "(all of them unless --revisions is given)")
    p.add_argument("--scan-tokens", type=positive("--scan-tokens"), default=pre.scan_tokens,
                   help="--scan: held-out token positions whose layer-L similarity is compared (default: %(default)s)")
    p.add_argument("--suggest", type=positive("--suggest"), nargs="?", const=3, default=None, metavar="K",
                   help="with --scan: name K revisions (default 3) over the phase change")
    p.add_argument("--metric", choices=["logit", "sentence"], default="logit",
                   help="--scan: a pair is right when the answer token's logit is higher (logit) or the whole "
                        "sentence is likelier (sentence, lm-eval-harness's BLiMP metric) (default: %(default)s)")
    args = p.parse_args(argv)
    if args.layer is None:
        raise UsageError(f"--layer is required for {args.model}")
    if args.suggest and not args.scan:
        raise UsageError("--suggest needs --scan")
    return args, spec


def main(argv=None):
    args, spec = parse_args(argv)
    model_dtype = cli.dtype(args.model_dtype, args.device)
    text = cli.given(argv, "--text")       # else the model's (the toy grammar's with --weights random)
    if args.scan:
        revs = args.revisions if cli.given(argv, "--revisions") else None   # else all of them
        csv = scan(args.model, args.layer, args.task, revs, args.scan_tokens, args.seq_len, args.heldout_tokens,
                   args.device, args.metric, args.out, model_dtype, text, args.weights)
        chosen = suggest(csv, args.suggest) if args.suggest else []
        table = pd.read_csv(csv)
        if chosen:
            table.insert(0, "", ["*" if r in chosen else "" for r in table.revision])
        print(table.to_string(index=False))
        print(f"wrote {csv}")
        if chosen:
            print(f"suggested revisions ({args.suggest}, marked *):", ",".join(chosen))
        return
    if not args.revisions:
        raise UsageError(f"--revisions is required for {args.model} (no default revisions)")
    revs = args.revisions
    out = args.out or defaults.cache_dir(args.model, args.layer, revs)
    folder = make_cache(args.model, args.layer, revs, out, args.tokens, args.seq_len, args.heldout_tokens, text,
                        args.device, args.cache_dtype, model_dtype, args.weights, overwrite=args.overwrite)
    c = open_cache(folder)
    print(f"cache {folder}: {c.meta['tokens']} training tokens × {len(revs)} revisions, d={c.meta['d']}, "
          f"scales={c.meta['scales']}")


if __name__ == "__main__":
    run_main(main)
