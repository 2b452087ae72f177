"""analysis.py — what evaluate.py, relie.py and ablate.py share: opening a run folder with its
models and held-out text, splicing the crosscoder into a revision's forward, attributing a metric to
the latents (integrated gradients, AtP, exact ablation), and RelDec.

Splicing (METHOD.md): at every real position p ≥ 1 of block L's output, x_m is replaced by
x̂_m = W_dec[:, m] f + b_dec[m] (+ the error term r_m = x_m − x̂_m where it is kept). Position 0 (BOS)
and left padding always keep the model's own activation.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import defaults
import lm
import tasks
from common import UsageError, read_json, require_done
from crosscoder import CrossCoder
from measures import rel


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

    def load_models(self, dtype=None):
        """[(revision, model, tokenizer)] for every revision of the run (random weights if it was trained so)."""
        weights = self.data.get("weights", "hub")
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
        x_hat_NMd, f_NF = run.cc(x_BTMd.view(B * T, M, d))
    return x_BTMd, f_NF.view(B, T, -1), (x_BTMd - x_hat_NMd.view(B, T, M, d))


def ie_gradient(run, model, m, batch, x_BTd, f_BTF, r_BTd, alphas):
    """IG/AtP for revision m: per-token IE of every latent [B, T, F] and of the error term [B, T].

    On the path, block L's spliced output is (1−α)·u + b_dec with u = W_dec f + r, so one gradient
    g_α = ∂m/∂u per step gives both: ∂m/∂f = g_α W_decᵀ and ∂m/∂r = g_α, and the mean over α comes
    before the F-wide matmul. All α run in one forward/backward through the blocks above L only."""
    A, B = len(alphas), len(batch)
    W, b = run.cc.W_dec_FMd[:, m], run.cc.b_dec_Md[m]
    scale_A111 = (1 - torch.tensor(alphas, device=f_BTF.device)).view(A, 1, 1, 1)
    u_ABTd = (scale_A111 * (f_BTF @ W + r_BTd)).requires_grad_(True)
    big = batch.repeat(A)   # α-major copies of the batch
    logits = spliced_logits(model, run.layer, big.ids_BT, big.mask_BT, x_BTd.repeat(A, 1, 1),
                                     (u_ABTd + b).flatten(0, 1), last_only=True)
    metric = _metric(logits, big)
    g_BTd = torch.autograd.grad(metric.sum(), u_ABTd)[0].mean(0)
    ie_BTF = -f_BTF * (g_BTd @ W.T)
    ie_err_BT = -(r_BTd * g_BTd).sum(-1)
    return ie_BTF, ie_err_BT, metric.detach().view(A, B)[0]


def ie_exact(run, model, m, batch, x_BTd, f_BTF, r_BTd, latents):
    """Zero-ablate each latent (error kept): IE_i = m(f without i) − m(clean) = ld(clean) − ld(ablated),
    [B, len(latents)], and the clean metric per pair [B] (the unablated splice: x̂ + r = x)."""
    sets = [[]] + [[i] for i in latents]
    ld = ablated_logit_diffs(run, model, m, batch, x_BTd, f_BTF, r_BTd, sets)
    return ld[:, :1] - ld[:, 1:], -ld[:, 0]


def reldec(cc) -> np.ndarray:
    """RelDec [F, M] on the normalised decoder."""
    return rel(cc.decoder_norms().detach().cpu().numpy())
