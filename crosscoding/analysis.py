"""analysis.py — what evaluate.py, relie.py and ablate.py share: opening a run folder with its
models and held-out text, splicing the crosscoder into a revision's forward, attributing a metric to
the latents (integrated gradients, AtP, exact ablation), and RelDec.

Splicing (METHOD.md): at every real position p ≥ 1 of block L's output, x_m is replaced by
x̂_m = W_dec[:, m] f + b_dec[m] (+ the error term r_m = x_m − x̂_m where it is kept). Position 0 (BOS)
and left padding always keep the model's own activation.
"""
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from crosscoding import cli, defaults, lm, measures, tasks
from crosscoding.common import UsageError, read_json, require_done
from crosscoding.crosscoder import CrossCoder
from crosscoding.measures import rel


@dataclass
class Run:
    folder: Path
    config: dict
    cc: CrossCoder                 # acts on raw activations (scales folded in)
    revisions: list
    layer: int
    spec: lm.ModelSpec
    device: str

    @property
    def preset(self) -> defaults.Preset:
        return self.spec.preset

    @property
    def data(self) -> dict:
        return self.config.get("data", {})

    @property
    def revision_tokens(self) -> list:
        """Tokens seen at each revision (None where its name and the model give none)."""
        return [lm.parse_revision(r, self.spec.tokens_per_step).tokens for r in self.revisions]

    def load_models(self, dtype=None):
        """[(revision, model, tokenizer)] for every revision of the run (random weights if it was trained so, drawn
        where they were then); dtype None: bf16 on a GPU, fp32 on a CPU, as train.py's LMs."""
        weights = self.data.get("weights", "hub")
        dtype = dtype or cli.dtype(None, self.device)
        drawn, here = self.data.get("random_on"), lm.drawn_on(weights, self.device)
        if drawn and drawn != here:
            raise UsageError(f"run {self.folder} was trained on random weights drawn on {drawn}; on {here} the same "
                             f"revision names draw other weights: run this stage on a device like the training's "
                             f"(--device {'cpu' if drawn == 'cpu' else 'cuda'})")
        if weights == "hub":
            avail = [a.name for a in lm.revisions(self.spec, quiet=True)]
            for r in self.revisions:
                if r not in avail:
                    raise UsageError(f"revision {r} of run {self.folder} no longer loads from {self.spec.repo}")
        return [(r, *lm.load(self.spec, r, device=self.device, dtype=dtype, weights=weights)) for r in self.revisions]

    def heldout_blocks(self, n_blocks, tok):
        """The first n_blocks of the run's held-out text (never trained on): evaluation, contexts."""
        d = self.data
        return tasks.text_blocks(d.get("text", self.spec.text), tok, n_blocks, d.get("seq_len", self.preset.seq_len),
                                 d.get("heldout_tokens", self.preset.heldout_tokens), "heldout")


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
    require_done(folder, "training run",
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


def spliced_forward(module, layer, ids_BT, mask_BT, x_BTd, new_BTd, **kw):
    """A forward of `module` (the LM, or its base model for hidden states) with block `layer`'s output
    x_BTd (the model's own) replaced by new_BTd at the splice positions. Only the blocks above `layer`
    run: x_BTd stands in for the blocks below."""
    where = splice_mask(torch.ones_like(ids_BT) if mask_BT is None else mask_BT)[..., None]
    with lm.start_at_layer(module, layer, torch.where(where, new_BTd.to(x_BTd.dtype), x_BTd)):
        return lm.forward(module, ids_BT, mask_BT, **kw)


def spliced_logits(model, layer, ids_BT, mask_BT, x_BTd, new_BTd, last_only=False):
    """Logits of the spliced forward (see spliced_forward)."""
    return spliced_forward(model, layer, ids_BT, mask_BT, x_BTd, new_BTd, last_only=last_only).logits


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


# ---------------------------------------------------------------------------------------------
# Attribution: the metric's indirect effect through each latent

def _metric(logits_BTV, batch):
    """m = logit(wrong) − logit(correct) at the last position, per pair."""
    return -tasks.logit_diff(logits_BTV, batch)


def pair_codes(run, models, batch):
    """Every revision's block-L output on the batch, its codes and errors."""
    with torch.no_grad():
        x_BTMd = run_acts(models, run.layer, batch.ids_BT, batch.mask_BT)
        B, T, M, d = x_BTMd.shape
        x_hat_RMd, f_RF = run.cc(x_BTMd.view(B * T, M, d))
    return x_BTMd, f_RF.view(B, T, -1), (x_BTMd - x_hat_RMd.view(B, T, M, d))


@dataclass(frozen=True)
class Method:
    """One attribution method (relie.py --method): how IE_{m,i} is computed. A gradient method integrates
    ∂μ/∂f along a straight path from its baseline to the clean codes at `steps` points (α = 0, 1/steps, …);
    an ablation method zero-ablates each latent. The error term's IE is the path's own where the error is
    scaled along it, else the exact effect of zeroing the error term (latents kept). `ie` computes one
    batch of pairs at one revision: (run, model, m, batch, x_BTd, f_BTF, r_BTd, path) → per pair IE of
    every latent [B, F], of the error term [B], and the clean metric μ [B]."""
    steps: int              # gradient points on the path; 0 for an ablation
    baseline: str           # where the path starts: "zero" or "mean" (the task's mean code); "-" for an ablation
    scale_error: bool       # the error term runs from 0 to r along the path (else it is held at r)
    about: str
    ie: Callable

    @property
    def error_by(self) -> str:
        return "the path's own gradient" if self.scale_error else "exact zero-ablation of the error term"


@dataclass
class Along:
    """What a method's `ie` needs beyond the batch: the path's points and baseline, the IE threshold, the
    latents an ablation method ablates."""
    alphas: list
    f_base_F: torch.Tensor | None
    threshold: float
    latents: list


def _by_gradient(how, run, model, m, b, x_BTd, f_BTF, r_BTd, path):
    """IG or AtP: per-token IE, |IE| ≤ threshold zeroed, summed over positions."""
    ie_BTF, err_BT, clean_B = ie_gradient(run, model, m, b, x_BTd, f_BTF, r_BTd, path.alphas, path.f_base_F,
                                          how.scale_error)
    ie_BTF = torch.where(ie_BTF.abs() > path.threshold, ie_BTF, torch.zeros_like(ie_BTF))
    err_B = err_BT.sum(1) if how.scale_error else ie_error_exact(run, model, m, b, x_BTd, f_BTF, r_BTd)
    return ie_BTF.sum(1).detach().cpu(), err_B.detach().cpu(), clean_B.cpu()


def _by_ablation(how, run, model, m, b, x_BTd, f_BTF, r_BTd, path):
    """Exact zero-ablation of each of path.latents (per pair |IE| ≤ threshold zeroed); the others get 0."""
    vals, clean_B = ie_exact(run, model, m, b, x_BTd, f_BTF, r_BTd, path.latents)
    vals = torch.where(vals.abs() > path.threshold, vals, torch.zeros_like(vals))
    ie_BF = torch.zeros(len(b), run.cc.cfg.dict_size)
    ie_BF[:, path.latents] = vals.cpu()
    return ie_BF, ie_error_exact(run, model, m, b, x_BTd, f_BTF, r_BTd).cpu(), clean_B.cpu()


# The table of attribution methods: a new one is one row here (with its own `ie`, or one of these two).
METHODS = {
    "ig": Method(defaults.IG_STEPS, "zero", True, "integrated gradients from the zero baseline, latents and "
                 "error term scaled together (the paper's)", _by_gradient),
    "ig-error-held": Method(defaults.IG_STEPS, "zero", False, "integrated gradients from the zero baseline, the "
                            "error term held", _by_gradient),
    "ig-mean": Method(defaults.IG_STEPS, "mean", False, "integrated gradients from the task's mean code, the error "
                      "term held", _by_gradient),
    "atp": Method(1, "zero", True, "attribution patching: one gradient at the clean codes", _by_gradient),
    "exact": Method(0, "-", False, "zero-ablate each latent, error kept (per pair |IE| ≤ --threshold zeroed)",
                    _by_ablation),
}


def ie_gradient(run, model, m, batch, x_BTd, f_BTF, r_BTd, alphas, f_base_F=None, scale_error=True):
    """IG/AtP for revision m: per-token IE of every latent [B, T, F] and of the error term [B, T].

    On the path the latents run from f_base (zero unless given) to f and the error term from 0 to r
    (scale_error) or stays r. Block L's spliced output is base_u + (1−α)·delta_u + b_dec, so one
    gradient g_α = ∂μ/∂u per step gives both ∂μ/∂f = g_α W_decᵀ and ∂μ/∂r = g_α, and the mean over α
    comes before the F-wide matmul. All α run in one forward/backward through the blocks above L only.
    IE_i = −(f_i − f_base,i) · mean_α ∂μ/∂f_i (positive = supports the right answer)."""
    A, B = len(alphas), len(batch)
    W, b = run.cc.W_dec_FMd[:, m], run.cc.b_dec_Md[m]
    delta_BTF = f_BTF if f_base_F is None else f_BTF - f_base_F
    base_BTd = torch.zeros_like(r_BTd) if f_base_F is None else (f_base_F @ W).expand_as(r_BTd)
    delta_BTd = delta_BTF @ W
    if scale_error:
        delta_BTd = delta_BTd + r_BTd
    else:
        base_BTd = base_BTd + r_BTd
    scale_A111 = (1 - torch.tensor(alphas, device=f_BTF.device)).view(A, 1, 1, 1)
    u_ABTd = (base_BTd + scale_A111 * delta_BTd).requires_grad_(True)
    big = batch.repeat(A)   # α-major copies of the batch
    logits = spliced_logits(model, run.layer, big.ids_BT, big.mask_BT, x_BTd.repeat(A, 1, 1),
                            (u_ABTd + b).flatten(0, 1), last_only=True)
    metric = _metric(logits, big)
    g_BTd = torch.autograd.grad(metric.sum(), u_ABTd)[0].mean(0)
    ie_BTF = -delta_BTF * (g_BTd @ W.T)
    ie_err_BT = -(r_BTd * g_BTd).sum(-1) if scale_error else torch.zeros_like(g_BTd[..., 0])
    return ie_BTF, ie_err_BT, metric.detach().view(A, B)[0]


def ie_exact(run, model, m, batch, x_BTd, f_BTF, r_BTd, latents):
    """Zero-ablate each latent (error kept): IE_i = m(f without i) − m(clean) = ld(clean) − ld(ablated),
    [B, len(latents)], and the clean metric per pair [B] (the unablated splice: x̂ + r = x)."""
    sets = [[]] + [[i] for i in latents]
    ld = ablated_logit_diffs(run, model, m, batch, x_BTd, f_BTF, r_BTd, sets)
    return ld[:, :1] - ld[:, 1:], -ld[:, 0]


def ie_error_exact(run, model, m, batch, x_BTd, f_BTF, r_BTd):
    """The error term's exact IE [B]: μ with the error term zeroed (latents kept) minus μ clean."""
    keep = ablated_logit_diffs(run, model, m, batch, x_BTd, f_BTF, r_BTd, [[]])
    drop = ablated_logit_diffs(run, model, m, batch, x_BTd, f_BTF, torch.zeros_like(r_BTd), [[]])
    return (keep - drop)[:, 0]


def exact_parts(run, models, batch, batch_size=16):
    """Per revision, the exact effect on the logit difference (clean − ablated, mean over pairs; positive = the
    part supports the right answer) of zeroing every latent (the error term kept) and of zeroing the error term
    (the latents kept): two [M] arrays. Coverage reads these beside the attribution's shares."""
    latents = list(range(run.cc.cfg.dict_size))
    lat, err = np.zeros(len(models)), np.zeros(len(models))
    for i in range(0, len(batch), batch_size):
        b = batch.slice(i, i + batch_size).to(run.device)
        x, f_BTF, r_BTMd = pair_codes(run, models, b)
        for m, (_, model, _) in enumerate(models):
            ld = ablated_logit_diffs(run, model, m, b, x[:, :, m], f_BTF, r_BTMd[:, :, m], [[], latents])
            no_err = ablated_logit_diffs(run, model, m, b, x[:, :, m], f_BTF, torch.zeros_like(r_BTMd[:, :, m]), [[]])
            lat[m] += float((ld[:, 0] - ld[:, 1]).sum())
            err[m] += float((ld[:, 0] - no_err[:, 0]).sum())
    return lat / len(batch), err / len(batch)


# ---------------------------------------------------------------------------------------------
# Attribution over a task, and its check against exact ablation

def mean_code(run, models, batch, batch_size=16):
    """The mean code over the task's spliced tokens [F]: ig-mean's baseline."""
    total, n = torch.zeros(run.cc.cfg.dict_size, device=run.device), 0
    for i in range(0, len(batch), batch_size):
        b = batch.slice(i, i + batch_size).to(run.device)
        _, f_BTF, _ = pair_codes(run, models, b)
        where = splice_mask(b.mask_BT)
        total += f_BTF[where].sum(0)
        n += int(where.sum())
    return total / max(n, 1)


def attribute(run, models, batch, method="ig", threshold=0.1, batch_size=16, latents=None, steps=None):
    """IE of every latent on every pair (METHODS), per revision. Returns sums per sub-task —
    'ie' [S, M, F], 'err' [S, M], 'clean' [S, M], 'n' [S], 'subtasks' — and per pair: 'pair_ie', per
    revision a sparse [P, F], and 'pair_err' [P, M]; 'steps', the gradient points actually used."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    how = METHODS[method]
    steps = how.steps if steps is None or how.steps <= 1 else steps
    subtasks = list(dict.fromkeys(batch.subtask))
    S, M, Fdim = len(subtasks), len(models), run.cc.cfg.dict_size
    ie, err, n = torch.zeros(S, M, Fdim), torch.zeros(S, M), torch.zeros(S)
    clean = torch.zeros(S, M)
    path = Along(alphas=[i / steps for i in range(steps)], threshold=threshold,
                 f_base_F=mean_code(run, models, batch, batch_size) if how.baseline == "mean" else None,
                 latents=list(range(Fdim)) if latents is None else list(latents))   # the ablated ones (exact)
    pair_ie, pair_err = [[] for _ in models], []
    for i in tqdm(range(0, len(batch), batch_size), desc=f"IE ({method})", unit="batch"):
        b = batch.slice(i, i + batch_size).to(run.device)
        s_idx = torch.tensor([subtasks.index(s) for s in b.subtask])
        x, f_BTF, r_BTMd = pair_codes(run, models, b)
        n.index_add_(0, s_idx, torch.ones(len(b)))
        errs = []
        for m, (_, model, _) in enumerate(models):
            ie_BF, err_B, clean_B = how.ie(how, run, model, m, b, x[:, :, m], f_BTF, r_BTMd[:, :, m], path)
            ie[:, m].index_add_(0, s_idx, ie_BF)
            err[:, m].index_add_(0, s_idx, err_B)
            clean[:, m].index_add_(0, s_idx, clean_B)
            pair_ie[m].append(ie_BF.to_sparse())
            errs.append(err_B)
        pair_err.append(torch.stack(errs, 1))
    return dict(ie=ie, err=err, n=n, clean=clean, subtasks=subtasks, method=method, steps=steps,
                pair_ie=[torch.cat(p, 0).coalesce() for p in pair_ie], pair_err=torch.cat(pair_err))


def pair_values(att, chosen) -> np.ndarray:
    """Per-pair IE of the chosen latents: [P, M, K]."""
    idx = torch.tensor(chosen, dtype=torch.long)
    return torch.stack([p.index_select(1, idx).to_dense() for p in att["pair_ie"]], 1).numpy()


def faithfulness(run, models, batch, chosen, ie_MK, method, threshold, pair_batch):
    """The attribution checked against exact single-latent ablation (error kept) of the chosen latents,
    and beside AtP: per revision and pooled Spearman ρ, and each (latent, revision) where they disagree
    in sign or by more than 2× (measures.disagree)."""
    def means(m_name):
        att = attribute(run, models, batch, m_name, threshold if m_name != "exact" else 0.0, pair_batch,
                        latents=chosen if m_name == "exact" else None)
        return (att["ie"].sum(0) / att["n"].sum()).numpy()[:, chosen]
    exact_MK = ie_MK if method == "exact" else means("exact")
    atp_MK = ie_MK if method == "atp" else means("atp")
    flags_MK = measures.disagree(ie_MK, exact_MK)
    revs = run.revisions
    out = dict(reference="exact zero-ablation of each chosen latent, error term kept", method=method,
               rho=measures.spearman(ie_MK.ravel(), exact_MK.ravel()),
               rho_by_revision={r: measures.spearman(ie_MK[m], exact_MK[m]) for m, r in enumerate(revs)},
               rho_atp=measures.spearman(atp_MK.ravel(), exact_MK.ravel()),
               n_flagged=int(flags_MK.sum()), n=int(flags_MK.size),
               flagged=[dict(latent=int(chosen[k]), revision=revs[m], ie=float(ie_MK[m, k]),
                             exact=float(exact_MK[m, k])) for m, k in zip(*np.nonzero(flags_MK))])
    return out, exact_MK, atp_MK, flags_MK


def reldec(cc) -> np.ndarray:
    """RelDec [F, M] on the normalised decoder."""
    return rel(cc.decoder_norms().detach().cpu().numpy())
