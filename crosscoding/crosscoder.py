"""crosscoder.py — one sparse dictionary learned over the residual streams of M revisions at once.

Shapes: B tokens, M revisions, d hidden size, F latents (README, Conventions).
    f_BF     = ReLU(sum_m x_m W_enc[m] + b_enc)      one code shared by all revisions
    x_hat_m  = f W_dec[:, m] + b_dec[m]              one decoder per revision
Sparsity variants (METHOD.md, "The model"), each one class in variants.py, registered in VARIANTS:
  - "l1": the paper's. Penalty lambda(t) * sum_i f_i sum_m ||W_dec[i,m]||, lambda warmed up linearly.
  - "batchtopk": keep the k*B largest scores f_i * sum_m ||W_dec[i,m]|| of the batch; at inference
    keep scores above a threshold theta (EMA of the smallest kept score); AuxK revives dead latents.
  - "jumprelu": f_i = z_i H(z_i - theta_i), a learned per-latent threshold (straight-through estimator).
  - "matryoshka": BatchTopK whose nested prefixes of the dictionary each reconstruct x.
The crosscoder holds what they share and asks its variant (self.variant) for the rest.

Normalisation: training runs on s_m * x_m. fold_scales() bakes the s_m into the weights so that the
result acts on raw activations; the folded-in scales are kept in the buffer scales_M so decoder
norms (RelDec, the BatchTopK score, the L1 penalty) are still measured in the normalised space,
which makes folding an exact change of units.

The file reads top to bottom: config, schedules, the model, its loss, the training step, save/load.
The loss's math is the dense code below (loss and terms: the readable loss). Two seams, each chosen once,
keep the rest out of this file: sparse.py's FastPath (held as self.fast when the variant has fast-path hooks)
computes the same numbers faster on a CPU, and shards.ShardedCrossCoder (train.py --revision-shards) splits
the revisions over processes, overriding the few methods that sum over revisions.
Files: a run folder holds crosscoder.safetensors (parameters and buffers) and config.json (the
config fields plus whatever the caller adds). Nothing is pickled.
"""

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from crosscoding import defaults, sparse, variants
from crosscoding.common import atomic_path
from crosscoding.variants import VARIANTS, _wide, batch_topk_mask, k_at, l1_coeff_at  # noqa: F401 (re-exported)

ARCHS = tuple(VARIANTS)   # the built-in variants; the table itself (VARIANTS) is what the checks read
WEIGHTS_FILE = "crosscoder.safetensors"
CONFIG_FILE = "config.json"
ARCH_SETTINGS = "arch_settings"   # config.json's table of the settings the run's variant reads: name -> help

# -----------------------------------------------------------------------------
# config and schedules

# The fields every variant shares, with their defaults (the paper's). A variant's own settings (BatchTopK's k,
# JumpReLU's jumprelu_coeff, …) are declared with the variant (variants.py) and join these in CrossCoderConfig.
SHARED = dict(
    dict_size=defaults.PAPER.dict_size,   # F: number of latents
    arch="l1",                  # a key of variants.VARIANTS: "l1", "batchtopk", "jumprelu", "matryoshka", …
    l1_warmup_frac=0.05,        # the sparsity penalties (L1's λ, JumpReLU's λ_J) warm up 0 -> 1 over this fraction
    lr=defaults.PAPER.lr,
    total_steps=defaults.PAPER.tokens // defaults.PAPER.batch_size,
    batch_size=defaults.PAPER.batch_size,   # tokens per step (sets dead_tokens' default)
    decay_start_frac=0.8,       # lr flat until here, then linear to 0
    dec_init_norm=0.08,         # norm of every W_dec[i, m] row at init
    dead_tokens=None,           # silent this many tokens = dead (logs, AuxK); None: 2.5% of the run (10M)
    seed=0,
)


class ConfigError(ValueError):
    """A config field's value is invalid; .field names it (train.py names its flag)."""
    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


class CrossCoderConfig:
    """The crosscoder's config, every field a plain attribute: n_models (M, revisions crosscoded together),
    d_model (d, hidden size at the layer), the SHARED fields above, and every registered variant's own settings
    (variants.settings_fields(): cfg.k, cfg.jumprelu_coeff, …; a variant reads its own). The schedules given
    as None follow the run's length as the paper's do (its run: 97,656 steps of 4096 tokens). config.json
    holds the fields flat, one key each (to_dict)."""

    def __init__(self, n_models, d_model, **given):
        own = {name: f.default for name, f in variants.settings_fields().items()}
        unknown = sorted(set(given) - set(SHARED) - set(own))
        if unknown:
            raise TypeError(f"CrossCoderConfig has no fields {unknown}")
        self.n_models, self.d_model = n_models, d_model
        for name, default in {**SHARED, **own}.items():
            setattr(self, name, given.get(name, default))
        self._check()

    @staticmethod
    def names() -> list:
        return ["n_models", "d_model", *SHARED, *variants.settings_fields()]

    def to_dict(self) -> dict:
        return dict(vars(self))

    def replace(self, **changes) -> "CrossCoderConfig":
        return CrossCoderConfig(**{**vars(self), **changes})

    def __eq__(self, other):
        return isinstance(other, CrossCoderConfig) and vars(self) == vars(other)

    def __repr__(self):
        return f"CrossCoderConfig({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def _check(self):
        def bad(name, valid):
            raise ConfigError(name, f"CrossCoderConfig.{name}={getattr(self, name)!r} is invalid: {valid}")
        for name in ("n_models", "d_model", "dict_size", "total_steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "must be an integer > 0")
        if self.dead_tokens is None:
            self.dead_tokens = max(self.batch_size, round(0.025 * self.total_steps * self.batch_size))
        v = self.dead_tokens
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            bad("dead_tokens", "must be an integer > 0")
        if self.arch not in VARIANTS:
            bad("arch", f"must be one of {tuple(VARIANTS)}")
        for name in ("l1_warmup_frac", "decay_start_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, "must be in [0, 1]")
        for name in ("lr", "dec_init_norm"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")
        for settings in variants.settings_classes():   # each variant's settings, whatever the arch
            settings.check(self, bad)
        VARIANTS[self.arch].check_chosen(self, bad)


def lr_factor(cfg, step):
    """Multiplier of the base lr: 1 until decay_start_frac * total_steps, then linear to 0 at total_steps."""
    decay_start = int(cfg.decay_start_frac * cfg.total_steps)
    if step < decay_start:
        return 1.0
    return max(0.0, (cfg.total_steps - step) / max(1, cfg.total_steps - decay_start))


def clip_grad_norm(params, max_norm, total=None):
    """torch.nn.utils.clip_grad_norm_'s clipping, the same numbers, but no pass over the gradients when the
    norm is within max_norm (torch multiplies them by a coefficient clamped to 1.0 every step). total: the
    norm when these are not all the gradients (a revision shard's: shards.grad_norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    if total is None:
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    coef = max_norm / (total + 1e-6)
    if total.device.type != "cpu":
        torch._foreach_mul_(grads, coef.clamp(max=1.0))     # no host sync on a GPU
    elif coef < 1:
        torch._foreach_mul_(grads, coef)
    return total


# -----------------------------------------------------------------------------
# the model

@dataclass
class Terms:
    """What CrossCoder.loss needs of a batch's code, however it was computed (terms() below, or the fast path's
    sparse.active_terms); the variants' loss hooks read it."""
    x_hat_BD: torch.Tensor        # f W_dec, flattened over revisions (b_dec not added)
    l1_sum: torch.Tensor          # Σ_b Σ_i f[b,i] Σ_m ‖W_dec[i,m]‖
    fired_F: torch.Tensor         # [F] bool: the latent was active on some token
    n_active: object              # number of active entries (f > 0)
    info: dict                    # the variant's by-products of the selection (BatchTopK: "smallest" kept score)
    pre_BF: torch.Tensor          # pre-activations, detached (AuxK ranks dead latents by them)
    values_at: Callable           # ActiveSet -> ReLU(pre) there, differentiable (AuxK's codes)
    score_sum: Callable           # fn -> Σ_b Σ_i fn(f[b,i] n_i), fn(0) = 0, differentiable (JumpReLU's tanh-L0)
    decode_cols: Callable         # (lo, hi) -> Σ_{lo ≤ i < hi} f[:, i] W_dec[i]: [B, M*d] (Matryoshka's prefixes)


class NormSum(torch.autograd.Function):
    """sum_m s_m ||W_dec[i, m]|| as [F]: decoder_norms().sum(1) with a backward of one pass over W_dec."""

    @staticmethod
    def forward(ctx, W_FMd, s_M):
        norms_FM = W_FMd.norm(dim=-1)
        ctx.save_for_backward(W_FMd, norms_FM, s_M)
        return (norms_FM * s_M).sum(1)

    @staticmethod
    def backward(ctx, g_F):
        W_FMd, norms_FM, s_M = ctx.saved_tensors
        coef_FM = torch.where(norms_FM > 0, g_F[:, None] * s_M / norms_FM, 0.0)  # as torch: 0 at a zero row
        return W_FMd * coef_FM[..., None].to(W_FMd.dtype), None


class CrossCoder(nn.Module):
    Terms = Terms    # what loss() needs of a code; the fast path (sparse.py) builds it too, through this

    def __init__(self, cfg: CrossCoderConfig, init: bool = True, revisions: range | None = None):
        """`revisions`: the ones this module holds (a revision shard's: shards.ShardedCrossCoder); default all M."""
        super().__init__()
        self.cfg = cfg
        self.revisions = range(cfg.n_models) if revisions is None else revisions
        M, d, F = len(self.revisions), cfg.d_model, cfg.dict_size
        self.W_enc_FMd = nn.Parameter(torch.empty(F, M, d))   # stored latent-major: W_enc[m][:, i] = W_enc_FMd[i, m]
        self.b_enc_F = nn.Parameter(torch.zeros(F))
        self.W_dec_FMd = nn.Parameter(torch.empty(F, M, d))
        self.b_dec_Md = nn.Parameter(torch.zeros(M, d))
        # per latent, tokens seen since it last fired: defines "dead" for AuxK and for logging
        self.register_buffer("tokens_since_active_F", torch.zeros(F, dtype=torch.long))
        # the input scales folded into the weights (1 = acts on the space it was trained in)
        self.register_buffer("scales_M", torch.ones(M))
        self.extra = {}  # the non-config entries of config.json, filled by load()
        self.group = None  # under DDP, the process group BatchTopK selects over (train.py sets it)
        # the sparsity variant: its activation, losses, inference rule; its state is registered here, on
        # the module, so it is saved, loaded, checkpointed, folded and moved with the weights
        self.variant = VARIANTS[cfg.arch](cfg)
        self.variant.add_state(self)
        # the loss's fast path (sparse.py: the same numbers on a CPU, from the variant's fast-path hooks)
        self.fast = sparse.FastPath() if self.variant.fast_path else None
        if init:
            # a local generator: construction is deterministic and leaves the global RNG alone; a revision
            # shard draws the whole [F, M, d] and keeps its slice, so it starts where one process does
            g = torch.Generator().manual_seed(cfg.seed)
            W_dec = torch.randn(F, cfg.n_models, d, generator=g)[:, self.revisions.start:self.revisions.stop]
            W_dec *= cfg.dec_init_norm / W_dec.norm(dim=-1, keepdim=True)
            with torch.no_grad():
                self.W_dec_FMd.copy_(W_dec)
                self.W_enc_FMd.copy_(W_dec)  # W_enc[m, :, i] = W_dec[i, m, :]

    # METHOD.md's names for the parameters
    W_enc = property(lambda self: self.W_enc_FMd.permute(1, 2, 0))   # [M, d, F], a view
    b_enc = property(lambda self: self.b_enc_F)
    W_dec = property(lambda self: self.W_dec_FMd)
    b_dec = property(lambda self: self.b_dec_Md)

    def decoder(self, raw=False):
        """W_dec as [F, M, d] in the normalised space (raw: as stored, acting on raw activations)."""
        return self.W_dec_FMd if raw else self.W_dec_FMd * self.scales_M[None, :, None]

    def decoder_norms(self, raw=False):
        """||W_dec[i, m]|| as [F, M], in the normalised space (the same as raw unless scales are folded)."""
        norms_FM = self.W_dec_FMd.norm(dim=-1)
        return norms_FM if raw else norms_FM * self.scales_M

    def norm_sum(self):
        """n_F = Σ_m ‖W_dec[i, m]‖ over every revision, in the normalised space; differentiable (NormSum)."""
        return self.over_revisions(NormSum.apply(self.W_dec_FMd, self.scales_M.to(self.W_dec_FMd.dtype)))

    def over_revisions(self, t):
        """A sum over revisions of per-revision partial sums: t itself, as this module holds every revision
        (a revision shard's are summed over the shards: shards.ShardedCrossCoder)."""
        return t

    # ---- encode / decode

    def pre_acts(self, x_BMd):
        """sum_m x_m W_enc[m] + b_enc as one [B, M*d] @ [M*d, F] matmul."""
        W_FD = self.W_enc_FMd.view(self.cfg.dict_size, -1)
        return torch.addmm(self.b_enc_F, x_BMd.reshape(x_BMd.shape[0], -1), W_FD.t())

    def encode(self, x_BMd):
        """Inference code: the variant's rule on ReLU(pre) (BatchTopK: score > theta once theta is set, else the
        top k*B of the batch; JumpReLU: z > theta_i; L1: ReLU(pre) itself)."""
        return self.variant.infer(self, torch.relu(self.pre_acts(x_BMd)))

    def decode(self, f_BF, active_only=None):
        """x_hat_BMd = f W_dec + b_dec. active_only=True sums only the active rows of W_dec (sparse.ActiveSet),
        and gives f a gradient at its non-zero entries only; the default for the variants with sparse codes."""
        B = f_BF.shape[0]
        M, d, F = len(self.revisions), self.cfg.d_model, self.cfg.dict_size
        W_dec = self.W_dec_FMd.view(F, M * d)
        if active_only is None:
            active_only = self.variant.decode_active_only
        if active_only:
            act = sparse.ActiveSet.where(f_BF != 0, f_BF.dtype)
            y_BD = sparse.Decode.apply(f_BF.reshape(-1)[act.flat], W_dec, act)
        else:
            y_BD = f_BF @ W_dec
        return y_BD.view(B, M, d) + self.b_dec_Md

    def forward(self, x_BMd):
        f_BF = self.encode(x_BMd)
        return self.decode(f_BF), f_BF

    # ---- training

    def loss(self, x_BMd, step=None, metrics=True):
        """Training loss and its parts: the variant's reconstruction loss (the paper's mse: squared error
        summed over revisions and hidden dims, averaged over tokens) + its sparsity / auxiliary loss.
        step=None means the end of every schedule. Buffers (theta, the dead-latent counters) are updated only
        when a step is given and the module is in training mode. metrics=False leaves out the per-revision
        FVU (a batch variance: train.py wants it on log steps only)."""
        cfg, variant = self.cfg, self.variant
        update = step is not None and self.training
        B = x_BMd.shape[0]
        # the code and what the loss needs of it: the fast path's where the variant has one (sparse.FastPath, the
        # same numbers; it answers None off a CPU, in half precision or autocast), else the dense terms below
        t = self.fast.terms(self, x_BMd, step) if self.fast is not None else None
        if t is None:
            t = self.terms(self.pre_acts(x_BMd), step)
        x_hat_BMd = t.x_hat_BD.view_as(x_BMd) + self.b_dec_Md

        out = {}
        sq_BMd = _wide(x_hat_BMd - x_BMd).pow(2)
        mse = sq_BMd.sum() / B
        recon = variant.recon(self, x_BMd, t, mse)
        sparsity = self.sparsity(x_BMd, x_hat_BMd, t, step, out)

        # the buffers move after the loss: AuxK's dead set is the one this step started with (so DDP
        # ranks, whose counters are synced between steps, all use the same one)
        if update:
            self.tokens_since_active_F.add_(B).masked_fill_(t.fired_F, 0)
            variant.update(self, t, step)
        with torch.no_grad():
            if metrics:
                total_var_M = _wide(x_BMd).var(0, correction=0).sum(-1) * B
                out["fvu_M"] = sq_BMd.sum((0, 2)) / total_var_M
            out["l0"] = torch.as_tensor(t.n_active, dtype=torch.float32) / B
            out["dead_frac"] = (self.tokens_since_active_F >= cfg.dead_tokens).float().mean()
        out.update(loss=recon + sparsity, mse=mse.detach(), sparsity=sparsity.detach())
        return out

    def terms(self, pre_BF, step) -> Terms:
        """The readable loss's code, dense, straight from the formulas (GPUs, half precision, autocast, the
        first, dense steps of L1 training, and every variant without a fast path):
            f_BF   = the variant's code of pre_BF (ReLU; BatchTopK's selection; JumpReLU's jump)
            x_hat  = f_BF @ W_dec                          (b_dec added by loss)
            l1_sum = Σ_b Σ_i f[b,i] n_i,  n_i = Σ_m ‖W_dec[i,m]‖"""
        W_dec_FD, norms_F = self.W_dec_FMd.view(self.cfg.dict_size, -1), self.norm_sum()
        f_BF, info = self.variant.code(self, pre_BF, norms_F, step)
        post_BF = torch.relu(pre_BF)
        active_BF = f_BF > 0
        return Terms(
            x_hat_BD=f_BF @ W_dec_FD, l1_sum=_wide(f_BF @ norms_F).sum(), fired_F=active_BF.any(0),
            n_active=active_BF.sum(), info=info, pre_BF=pre_BF.detach(),
            values_at=lambda act: post_BF.reshape(-1)[act.flat],
            score_sum=lambda fn: _wide(fn(f_BF * norms_F)).sum(),
            decode_cols=lambda lo, hi: f_BF[:, lo:hi] @ W_dec_FD[lo:hi])

    def sparsity(self, x_BMd, x_hat_BMd, t, step, out):
        """The variant's sparsity / auxiliary loss (a revision shard takes its share: shards.ShardedCrossCoder)."""
        return self.variant.sparsity(self, x_BMd, x_hat_BMd, t, step, out)

    @torch.no_grad()
    def sync_buffers(self, world, B_local, group=None):
        """After each DDP step, one state on every rank, as one process over the whole batch would have it
        (DDP itself only averages gradients, which keeps the parameters, JumpReLU's thresholds among them,
        equal). Dead-latent counters: a latent fired if it fired on any rank (the minimum), and the tokens
        since then count every rank's (B_local·world per step). Then the variant's own state
        (variant.sync: BatchTopK's θ by its minimum)."""
        dist = torch.distributed
        group = group if group is not None else self.group
        since_F = self.tokens_since_active_F      # each rank: its previous (shared) value + B_local, or 0
        dist.all_reduce(since_F, op=dist.ReduceOp.MIN, group=group)
        since_F.add_((since_F > 0) * B_local * (world - 1))
        self.variant.sync(self, group)

    def auxk_loss(self, x_BMd, x_hat_BMd, f_BF):
        """AuxK (Gao et al. 2024): the top aux_k dead latents OF EACH TOKEN (by their ReLU'd pre-activation
        f_BF) reconstruct the detached error e = x - x_hat, decoded without b_dec. Normalised by e's
        variance over the batch, so the loss is an FVU and alpha means the same at every scale. Target is +e."""
        act = self._auxk_active(f_BF.detach())
        if act is None:
            return _wide(x_hat_BMd.new_zeros(()))
        return self._auxk_fvu(x_BMd, x_hat_BMd, f_BF.reshape(-1)[act.flat], act)

    @torch.no_grad()
    def _auxk_active(self, post_BF):
        """AuxK's entries: per token the aux_k dead latents with the largest post_BF, where positive
        (a zero one adds nothing to the reconstruction, and ReLU gives it no gradient). The same for
        pre-activations as for their ReLU."""
        dead_F = self.tokens_since_active_F >= self.cfg.dead_tokens
        n_dead = int(dead_F.sum())
        if n_dead == 0:
            return None
        acts_BK, idx_BK = post_BF.masked_fill(~dead_F, -torch.inf).topk(min(self.cfg.aux_k, n_dead), dim=1)
        chosen_BF = torch.zeros_like(post_BF, dtype=torch.bool).scatter_(1, idx_BK, acts_BK > 0)
        return sparse.ActiveSet.where(chosen_BF, post_BF.dtype)

    def _auxk_fvu(self, x_BMd, x_hat_BMd, a_N, act):
        e_BMd = (x_BMd - x_hat_BMd).detach()
        e_hat_BD = sparse.Decode.apply(a_N, self.W_dec_FMd.view(self.cfg.dict_size, -1), act)
        num = self.over_revisions(_wide(e_hat_BD.view_as(e_BMd) - e_BMd).pow(2).sum((1, 2)).mean())
        e = _wide(e_BMd)
        if self.group is None:
            den = (e - e.mean(0)).pow(2).sum((1, 2)).mean()
        else:   # under DDP, e's variance over the global batch (DDP averages num's gradient over the ranks)
            stats = torch.cat([e.sum(0).flatten(), e.pow(2).sum().view(1), e.new_tensor([len(e)])])
            torch.distributed.all_reduce(stats, group=self.group)
            n = stats[-1]
            den = (stats[-2] - stats[:-2].pow(2).sum() / n) / n
        return (num / self.over_revisions(den)).nan_to_num(0.0)

    def make_optimizer(self, lr=None):
        """Adam, betas (0.9, 0.999); the fused kernel where the device has one, else foreach."""
        lr = self.cfg.lr if lr is None else lr
        params = list(self.parameters())
        try:
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
        except (RuntimeError, ValueError):
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), foreach=True)

    def make_scheduler(self, opt):
        cfg = self.cfg
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg, step))

    def train_step(self, opt, sched, x_BMd, step, loss_fn=None, autocast=False, metrics=True):
        """One optimisation step, the paper's: loss, backward, grad-norm clip 1.0, Adam, the lr schedule.
        loss_fn(x, step) defaults to self.loss (train.py passes its DDP wrapper); autocast runs the loss's
        matmuls in bf16 on a GPU (the sums stay fp32). Used by train.py, bench.py and the tests."""
        with torch.autocast(x_BMd.device.type, torch.bfloat16, enabled=autocast):
            out = (loss_fn or self.loss)(x_BMd, step, metrics)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.clip_grads(1.0)
        opt.step()
        if sched is not None:
            sched.step()
        return out

    def clip_grads(self, max_norm):
        """The gradients' norm clipped to max_norm (a revision shard first completes its gradients:
        shards.ShardedCrossCoder)."""
        clip_grad_norm(self.parameters(), max_norm)

    # ---- units

    @torch.no_grad()
    def fold_scales(self, scales_M):
        """A new crosscoder for RAW activations, when this one takes s_m * x_m: W_enc[m] *= s_m,
        W_dec[:, m] /= s_m, b_dec[m] /= s_m. Codes, selection and theta are unchanged; outputs are raw."""
        s_M = torch.as_tensor(scales_M, dtype=self.W_enc_FMd.dtype, device=self.W_enc_FMd.device)
        if s_M.shape != (len(self.revisions),) or not bool((s_M > 0).all()):
            raise ValueError(f"scales_M must be {len(self.revisions)} positive numbers, got {scales_M!r}")
        group, self.group = self.group, None   # a process group cannot be copied
        try:
            new = copy.deepcopy(self)
        finally:
            self.group = group
        new.W_enc_FMd.mul_(s_M[None, :, None])
        new.W_dec_FMd.div_(s_M[None, :, None])
        new.b_dec_Md.div_(s_M[:, None])
        new.scales_M.mul_(s_M.to(new.scales_M.dtype))
        return new

    def unfold_scales(self, scales_M=None):
        """The inverse of fold_scales; by default undoes every scale folded in so far."""
        s_M = self.scales_M if scales_M is None else torch.as_tensor(scales_M, dtype=torch.float64)
        return self.fold_scales(1.0 / s_M)

    # ---- files

    def save(self, run_dir, extra=None):
        """Write run_dir/crosscoder.safetensors and run_dir/config.json (config fields + ARCH_SETTINGS + extra),
        each to a temporary name first, fsynced and renamed into place (common.atomic_path)."""
        # ARCH_SETTINGS is made from this crosscoder's variant, never copied (a converted run's config.json holds
        # the variant it was made from)
        extra = {k: v for k, v in (extra or {}).items() if k != ARCH_SETTINGS}
        meta = self.cfg.to_dict()
        # which settings this run's variant reads, each with its help: a plain table for readers without the
        # package (app.py imports no torch)
        meta[ARCH_SETTINGS] = {f.name: f.metadata["help"] for f in fields(self.variant.Settings)}
        clash = sorted(set(extra) & set(meta))
        if clash:
            raise ValueError(f"extra keys {clash} collide with CrossCoderConfig fields")
        meta.update(extra)
        text = json.dumps(meta, indent=2)  # before touching the disk: unserialisable extras fail here
        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        with atomic_path(os.path.join(run_dir, WEIGHTS_FILE)) as tmp:
            save_file(tensors, str(tmp))
        with atomic_path(os.path.join(run_dir, CONFIG_FILE)) as tmp:
            tmp.write_text(text + "\n")

    @classmethod
    def load(cls, run_dir, device="cpu"):
        """Read a run folder written by save(). Tensor shapes are checked against config.json."""
        with open(os.path.join(run_dir, CONFIG_FILE)) as fh:
            meta = json.load(fh)
        names = set(CrossCoderConfig.names())
        cfg = CrossCoderConfig(**{k: v for k, v in meta.items() if k in names})
        with torch.device("meta"):  # no memory, no init: every tensor is replaced by the file's
            cc = cls(cfg, init=False)
        path = os.path.join(run_dir, WEIGHTS_FILE)
        tensors = load_file(path, device=str(device))
        if "W_enc_MdF" in tensors:      # written before the encoder was stored latent-major
            tensors["W_enc_FMd"] = tensors.pop("W_enc_MdF").permute(2, 0, 1).contiguous()
        expected = {name: tuple(t.shape) for name, t in cc.state_dict().items()}
        if "threshold" in tensors and "threshold" not in expected:
            # written when every crosscoder carried BatchTopK's θ buffer (unset, -1, in an L1 run)
            tensors.pop("threshold")
        sizes = f"n_models={cfg.n_models}, d_model={cfg.d_model}, dict_size={cfg.dict_size}"
        for name, shape in expected.items():
            if name not in tensors:
                raise ValueError(f"{path}: tensor {name} is missing")
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"config.json says {shape} ({sizes})")
        unexpected = sorted(set(tensors) - set(expected))
        if unexpected:
            raise ValueError(f"{path}: unexpected tensors {unexpected}")
        cc.load_state_dict(tensors, assign=True)
        cc.extra = {k: v for k, v in meta.items() if k not in names and k != ARCH_SETTINGS}
        return cc
