"""
The crosscoder: one sparse dictionary learned over the residual streams of M revisions at once.

Shapes: B tokens, M revisions, d hidden size, F latents.
    f_BF     = ReLU(sum_m x_m W_enc[m] + b_enc)      one code shared by all revisions
    x_hat_m  = f W_dec[:, m] + b_dec[m]              one decoder per revision
Two sparsity regimes (DESIGN.md, "The model"):
  - "l1": the paper's. Penalty lambda(t) * sum_i f_i sum_m ||W_dec[i,m]||, lambda warmed up linearly.
    Summing per-revision norms (not one joint norm) is what lets a latent live in one revision only.
  - "batchtopk": keep the k*B largest scores f_i * sum_m ||W_dec[i,m]|| of the batch; at inference
    keep scores above a threshold theta (EMA of the smallest kept score); AuxK revives dead latents.

Normalisation: training runs on s_m * x_m. fold_scales() bakes the s_m into the weights so that the
result acts on raw activations; the folded-in scales are kept in the buffer scales_M so decoder
norms (RelDec, the BatchTopK score, the L1 penalty) are still measured in the normalised space,
which makes folding an exact change of units.

Files: a run folder holds crosscoder.safetensors (parameters and buffers) and config.json (the
config fields plus whatever the caller adds). Nothing is pickled.
"""

import copy
import json
import os
from dataclasses import asdict, dataclass, fields

import warnings

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

ARCHS = ("l1", "batchtopk")
WEIGHTS_FILE = "crosscoder.safetensors"
CONFIG_FILE = "config.json"

# -----------------------------------------------------------------------------
# config and schedules

@dataclass
class CrossCoderConfig:
    n_models: int                  # M: revisions crosscoded together
    d_model: int                   # d: hidden size at the layer
    dict_size: int = 16384         # F: number of latents
    arch: str = "l1"               # "l1" or "batchtopk"
    l1_coeff: float = 2.0          # lambda, the L1 penalty's final weight
    l1_warmup_frac: float = 0.05   # lambda goes 0 -> l1_coeff over this fraction of total_steps
    lr: float = 5e-5
    total_steps: int = 97_656      # the paper: 400M tokens in batches of 4096
    decay_start_frac: float = 0.8  # lr flat until here, then linear to 0
    dec_init_norm: float = 0.08    # norm of every W_dec[i, m] row at init
    k: int = 200                   # BatchTopK: final mean number of latents per token
    k_start: int = 1000            # ... annealed linearly from k_start to k
    k_anneal_steps: int = 5000
    threshold_start_step: int = 1000  # theta's EMA starts at this step
    threshold_beta: float = 0.999
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 10_000_000  # a latent silent for this many tokens is dead (AuxK target)
    aux_k: int = 512               # AuxK reconstructs the error from this many dead latents per token
    seed: int = 0

    def __post_init__(self):
        def bad(name, valid):
            raise ValueError(f"CrossCoderConfig.{name}={getattr(self, name)!r} is invalid: {valid}")
        sizes = ("n_models", "d_model", "dict_size", "total_steps", "k", "k_start", "aux_k", "dead_tokens")
        for name in sizes:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "must be an integer > 0")
        for name in ("k_anneal_steps", "threshold_start_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, "must be an integer >= 0")
        if self.arch not in ARCHS:
            bad("arch", f"must be one of {ARCHS}")
        for name in ("l1_warmup_frac", "decay_start_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, "must be in [0, 1]")
        if not 0.0 <= self.threshold_beta < 1.0:
            bad("threshold_beta", "must be in [0, 1)")
        for name in ("lr", "dec_init_norm"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")
        for name in ("l1_coeff", "auxk_alpha"):
            if not getattr(self, name) >= 0:
                bad(name, "must be >= 0")


def l1_coeff_at(cfg, step):
    """lambda(t) = l1_coeff * min(1, t / (l1_warmup_frac * total_steps)); step None = end of warm-up."""
    warmup = cfg.l1_warmup_frac * cfg.total_steps
    if step is None or warmup == 0:
        return cfg.l1_coeff
    return cfg.l1_coeff * min(1.0, step / warmup)


def k_at(cfg, step):
    """BatchTopK's k(t): linear from k_start to k over k_anneal_steps; step None = the final k."""
    if step is None or cfg.k_anneal_steps == 0:
        return cfg.k
    frac = min(1.0, step / cfg.k_anneal_steps)
    return round(cfg.k_start + (cfg.k - cfg.k_start) * frac)


def lr_factor(cfg, step):
    """Multiplier of the base lr: 1 until decay_start_frac * total_steps, then linear to 0 at total_steps."""
    decay_start = int(cfg.decay_start_frac * cfg.total_steps)
    if step < decay_start:
        return 1.0
    return max(0.0, (cfg.total_steps - step) / max(1, cfg.total_steps - decay_start))


def batch_topk_mask(score_BF, k):
    """Keep the k*B largest scores of the whole batch: k latents per token on average, not each."""
    n_keep = min(k * score_BF.shape[0], score_BF.numel())
    idx = score_BF.flatten().topk(n_keep, sorted=False).indices
    keep = torch.zeros(score_BF.numel(), dtype=torch.bool, device=score_BF.device)
    keep[idx] = True
    return keep.view_as(score_BF)

def _wide(t):
    """Losses are summed in at least float32, even when the model runs in bf16/fp16."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

# -----------------------------------------------------------------------------
# sparse codes: the training step's fast path
#
# Once training is past its first few percent, a code f_BF has ~1-3% of its entries set. Only the
# encoder's forward, x[B, M*d] @ W_enc[M*d, F], has to be dense: everything after the selection
# (ReLU, BatchTopK) touches the active entries (b, i) alone. With g = dL/dx_hat:
#   decode       x_hat[b] = sum_i f[b,i] W_dec[i]          [B,F]-sparse @ W_dec     (CSR matmul)
#   dL/dW_dec    sum_b f[b,i] g[b]                          [F,B]-sparse @ g         (CSR matmul)
#   dL/df[b,i]   g[b] . W_dec[i], at active entries only    sampled dot products     (sampled_addmm)
#   dL/dW_enc    sum_b x[b] dL/dpre[b,i]                    ([F,B]-sparse @ x)^T     (CSR matmul)
# An inactive entry gets no gradient, which is exact for every parameter: ReLU (pre <= 0) or the
# selection (not kept) cuts it anyway. Nothing of size [nnz, M*d] is ever gathered. Where codes are
# dense (early L1 training: the sparse kernels lose beyond ~12% active on 2 cores), the same
# functions use dense matmuls; both give the same numbers up to float rounding. On GPUs (cuBLAS in
# bf16/TF32 beats sparse kernels there), in half precision and under autocast, loss() takes its
# plain dense branch instead. At M=3, d=512, F=8192, batch 1024 on 2 cores: 2.7x (L1) and 3x
# (BatchTopK) the seed's step (bench.py).

SPARSE_MAX_DENSITY = 0.1        # sparse kernels up to this fraction of active entries (CPU, fp32/fp64)
ACTIVE_SET_DEVICES = ("cpu",)   # where loss() takes the active-set path (fp32/fp64, no autocast)
# ... and only from this size (n_models·d_model·dict_size) up: below it the plain branch is as fast.
# Both are bit-for-bit deterministic with several threads (no scatter-add whose order depends on the
# threads), so a run resumed from a checkpoint replays the uninterrupted one exactly.
ACTIVE_SET_MIN_SIZE = 1 << 20


class ActiveSet:
    """The active entries of a [B, F] code, in row-major order (flat = b * F + i, increasing), with
    the CSR index structures of the code and of its transpose (built on first use)."""

    def __init__(self, flat, B, F, dtype):
        self.flat, self.B, self.F = flat, B, F
        self.rows, self.cols = flat // F, flat % F
        self.sparse = (flat.device.type == "cpu" and dtype in (torch.float32, torch.float64)
                       and len(flat) <= SPARSE_MAX_DENSITY * B * F)
        self._crow = self._t = None

    @classmethod
    def where(cls, mask_BF, dtype):
        return cls(mask_BF.reshape(-1).nonzero().squeeze(1), *mask_BF.shape, dtype)

    def __len__(self):
        return len(self.flat)

    def dense(self, v_N):
        """The [B, F] tensor with v_N at the active entries, zeros elsewhere."""
        return v_N.new_zeros(self.B * self.F).index_put_((self.flat,), v_N).view(self.B, self.F)

    def csr(self, v_N):
        if self._crow is None:
            self._crow = _offsets(self.rows, self.B)
        return torch.sparse_csr_tensor(self._crow, self.cols, v_N, (self.B, self.F), check_invariants=False)

    def transposed(self):
        """The [F, B] transpose's structure: perm (row-major position of each entry, sorted by latent,
        so each W_dec row is read once), row offsets, token of each entry."""
        if self._t is None:
            # a stable counting/radix sort; numpy's is far quicker than torch.sort on 2 busy cores
            small = np.int16 if self.F <= 2**15 else np.int32
            perm = torch.from_numpy(np.argsort(self.cols.numpy().astype(small), kind="stable"))
            self._t = perm, _offsets(self.cols[perm], self.F), self.rows[perm]
        return self._t

    def csr_t(self, v_N):
        """The [F, B] transpose with values v_N (given in row-major order)."""
        perm, crow, rows = self.transposed()
        return torch.sparse_csr_tensor(crow, rows, v_N[perm], (self.F, self.B), check_invariants=False)

    def matmul(self, v_N, Y_FD):
        """(code with values v_N) @ Y: [B, D]."""
        if not self.sparse:
            return self.dense(v_N) @ Y_FD
        return _csr_mm(self.csr(v_N), Y_FD)

    def t_matmul(self, v_N, Y_BD, transpose=False):
        """(code with values v_N)^T @ Y: [F, D], or with transpose=True its transpose [D, F], contiguous."""
        if not self.sparse:
            return Y_BD.t() @ self.dense(v_N) if transpose else self.dense(v_N).t() @ Y_BD
        out_FD = _csr_mm(self.csr_t(v_N), Y_BD)
        if not transpose:
            return out_FD
        # one copy into a fresh contiguous [D, F]: ~3x quicker than .t().contiguous() or a blocked loop
        return Y_BD.new_empty(Y_BD.shape[1], self.F).copy_(out_FD.t())

    def sampled(self, G_BD, W_FD):
        """(G @ W^T) at the active entries only: [nnz]."""
        if not self.sparse:
            return (G_BD @ W_FD.t()).reshape(-1)[self.flat]
        perm = self.transposed()[0]
        pattern = self.csr_t(G_BD.new_zeros(len(self)))
        v_T = torch.sparse.sampled_addmm(pattern, W_FD, G_BD.t(), beta=0).values()
        return torch.empty_like(v_T).index_put_((perm,), v_T)


def _csr_mm(csr, Y):
    """csr @ Y through addmm into an empty output: torch's mm would zero-fill and copy it first."""
    out = Y.new_empty(csr.shape[0], Y.shape[1])
    return torch.addmm(out, csr, Y, beta=0, out=out)


def _offsets(sorted_idx, n):
    """CSR row offsets [n + 1] of sorted row indices."""
    out = torch.zeros(n + 1, dtype=torch.long, device=sorted_idx.device)
    torch.cumsum(torch.bincount(sorted_idx, minlength=n), 0, out=out[1:])
    return out


class _PreAt(torch.autograd.Function):
    """pre[b, i] = x[b] . W_enc[:, i] + b_enc[i] at the active entries, differentiable in x, W_enc and
    b_enc; pre_BF (the dense matmul, computed once without autograd) supplies the values."""

    @staticmethod
    def forward(ctx, x_BD, W_DF, b_F, pre_BF, act):
        ctx.save_for_backward(x_BD, W_DF)
        ctx.act = act
        return pre_BF.reshape(-1)[act.flat]

    @staticmethod
    def backward(ctx, g_N):
        x_BD, W_DF = ctx.saved_tensors
        act, need = ctx.act, ctx.needs_input_grad
        g_N, x_BD = g_N.to(W_DF.dtype), x_BD.to(W_DF.dtype)  # in the weights' dtype (autocast: no longer on)
        g_x = act.matmul(g_N, W_DF.t()) if need[0] else None
        g_W = act.t_matmul(g_N, x_BD, transpose=True) if need[1] else None
        g_b = g_N.new_zeros(act.F).index_add_(0, act.cols, g_N) if need[2] else None
        return g_x, g_W, g_b, None, None


class _Decode(torch.autograd.Function):
    """y[b] = sum_i v[b, i] W[i] over the active entries: [B, D], differentiable in v and W."""

    @staticmethod
    def forward(ctx, v_N, W_FD, act):
        ctx.save_for_backward(v_N, W_FD)
        ctx.act = act
        return act.matmul(v_N, W_FD)

    @staticmethod
    def backward(ctx, g_BD):
        v_N, W_FD = ctx.saved_tensors
        act, need = ctx.act, ctx.needs_input_grad
        g_BD, v_N = g_BD.contiguous().to(W_FD.dtype), v_N.to(W_FD.dtype)
        g_v = act.sampled(g_BD, W_FD) if need[0] else None
        g_W = act.t_matmul(v_N, g_BD) if need[1] else None
        return g_v, g_W, None


class _NormSum(torch.autograd.Function):
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


def _as_mask(fired, F):
    """A [F] bool mask from a mask or from latent indices (repeats allowed)."""
    if fired.dtype == torch.bool:
        return fired
    return torch.zeros(F, dtype=torch.bool, device=fired.device).index_fill_(0, fired, True)


def batch_topk_active(pre_BF, norms_F, k):
    """BatchTopK's active set: the k*B largest scores relu(pre) * norm among the positive pre-activations
    (a zero code is the same kept or not), and the smallest kept score (0 if none)."""
    B, F = pre_BF.shape
    flat = (pre_BF > 0).reshape(-1).nonzero().squeeze(1)
    score = pre_BF.reshape(-1)[flat] * norms_F[flat % F]
    if len(flat) > k * B:
        keep = torch.zeros(len(flat), dtype=torch.bool, device=flat.device)
        keep[score.topk(k * B, sorted=False).indices] = True  # a mask keeps the row-major order
        flat, score = flat[keep], score[keep]
    smallest = score.min() if len(score) else score.new_zeros(())
    return ActiveSet(flat, B, F, pre_BF.dtype), smallest

# -----------------------------------------------------------------------------
# the model

class CrossCoder(nn.Module):

    def __init__(self, cfg: CrossCoderConfig, init: bool = True):
        super().__init__()
        self.cfg = cfg
        M, d, F = cfg.n_models, cfg.d_model, cfg.dict_size
        self.W_enc_MdF = nn.Parameter(torch.empty(M, d, F))
        self.b_enc_F = nn.Parameter(torch.zeros(F))
        self.W_dec_FMd = nn.Parameter(torch.empty(F, M, d))
        self.b_dec_Md = nn.Parameter(torch.zeros(M, d))
        # theta for BatchTopK inference; negative means "not set yet" (scores are never negative)
        self.register_buffer("threshold", torch.tensor(-1.0))
        # per latent, tokens seen since it last fired: defines "dead" for AuxK and for logging
        self.register_buffer("tokens_since_active_F", torch.zeros(F, dtype=torch.long))
        # the input scales folded into the weights (1 = acts on the space it was trained in)
        self.register_buffer("scales_M", torch.ones(M))
        self.extra = {}  # the non-config entries of config.json, filled by load()
        if init:
            # a local generator: construction is deterministic and leaves the global RNG alone
            g = torch.Generator().manual_seed(cfg.seed)
            W_dec = torch.randn(F, M, d, generator=g)
            W_dec *= cfg.dec_init_norm / W_dec.norm(dim=-1, keepdim=True)
            with torch.no_grad():
                self.W_dec_FMd.copy_(W_dec)
                self.W_enc_MdF.copy_(W_dec.permute(1, 2, 0))  # W_enc[m, :, i] = W_dec[i, m, :]

    # DESIGN.md's names for the parameters
    W_enc = property(lambda self: self.W_enc_MdF)
    b_enc = property(lambda self: self.b_enc_F)
    W_dec = property(lambda self: self.W_dec_FMd)
    b_dec = property(lambda self: self.b_dec_Md)

    def decoder_norms(self, raw=False):
        """||W_dec[i, m]|| as [F, M], in the normalised space (the same as raw unless scales are folded)."""
        norms_FM = self.W_dec_FMd.norm(dim=-1)
        return norms_FM if raw else norms_FM * self.scales_M

    # ---- encode / decode

    def pre_acts(self, x_BMd):
        """sum_m x_m W_enc[m] + b_enc as one [B, M*d] @ [M*d, F] matmul."""
        B = x_BMd.shape[0]
        return torch.addmm(self.b_enc_F, x_BMd.reshape(B, -1), self.W_enc_MdF.view(-1, self.cfg.dict_size))

    def encode(self, x_BMd):
        """Inference code. BatchTopK keeps score > theta once theta is set, else the top k*B of the batch."""
        f_BF = torch.relu(self.pre_acts(x_BMd))
        if self.cfg.arch == "l1":
            return f_BF
        with torch.no_grad():
            score_BF = f_BF * self.decoder_norms().sum(1)
            if self.threshold >= 0:
                keep_BF = score_BF > self.threshold
            else:
                keep_BF = batch_topk_mask(score_BF, self.cfg.k)
        return f_BF * keep_BF

    def decode(self, f_BF, sparse=None):
        """x_hat_BMd = f W_dec + b_dec. sparse=True sums only the active rows of W_dec (ActiveSet), and
        gives f a gradient at its non-zero entries only; the default is sparse for BatchTopK."""
        B = f_BF.shape[0]
        M, d, F = self.cfg.n_models, self.cfg.d_model, self.cfg.dict_size
        W_dec = self.W_dec_FMd.view(F, M * d)
        if sparse is None:
            sparse = self.cfg.arch == "batchtopk"
        if sparse:
            act = ActiveSet.where(f_BF != 0, f_BF.dtype)
            y_BD = _Decode.apply(f_BF.reshape(-1)[act.flat], W_dec, act)
        else:
            y_BD = f_BF @ W_dec
        return y_BD.view(B, M, d) + self.b_dec_Md

    def forward(self, x_BMd):
        f_BF = self.encode(x_BMd)
        return self.decode(f_BF), f_BF

    # ---- training

    def loss(self, x_BMd, step=None):
        """Training loss and its parts. step=None means the end of every schedule. Buffers (theta, the
        dead-latent counters) are updated only when a step is given and the module is in training mode."""
        cfg = self.cfg
        update = step is not None and self.training
        B, F = x_BMd.shape[0], cfg.dict_size
        x_BD, W_enc, W_dec = x_BMd.reshape(B, -1), self.W_enc_MdF.view(-1, F), self.W_dec_FMd.view(F, -1)
        norms_F = _NormSum.apply(self.W_dec_FMd, self.scales_M.to(self.W_dec_FMd.dtype))
        k = k_at(cfg, step)
        dev = x_BMd.device.type
        if (dev in ACTIVE_SET_DEVICES and x_BMd.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled(dev) and x_BD.shape[1] * F >= ACTIVE_SET_MIN_SIZE):
            # the fast path: the code as its active entries, values f_N at act.flat ("sparse codes" above)
            with torch.no_grad():
                pre_BF = torch.addmm(self.b_enc_F, x_BD, W_enc)  # the one dense matmul
                if cfg.arch == "l1":
                    act = ActiveSet.where(pre_BF > 0, pre_BF.dtype)
                else:
                    act, smallest = batch_topk_active(pre_BF, norms_F, k)
            f_N = _PreAt.apply(x_BD, W_enc, self.b_enc_F, pre_BF, act)  # = ReLU(pre) there: all positive
            x_hat_BD = _Decode.apply(f_N, W_dec, act)
            # Σ_i norm_i · (Σ of latent i's codes): index_add_ sums in a fixed order, where the backward
            # of norms_F[act.cols] would scatter-add in a thread-dependent one
            l1_sum = _wide(f_N.new_zeros(F).index_add_(0, act.cols, f_N) * norms_F).sum()
            fired_F, n_active = act.cols, len(act)
            values_at = lambda a: _PreAt.apply(x_BD, W_enc, self.b_enc_F, pre_BF, a)  # noqa: E731
        else:
            # dense, straight from DESIGN.md: GPUs (cuBLAS beats sparse kernels there), half precision,
            # autocast, torch.compile
            pre_BF = torch.addmm(self.b_enc_F, x_BD, W_enc)
            post_BF = f_BF = torch.relu(pre_BF)
            if cfg.arch == "batchtopk":
                with torch.no_grad():
                    score_BF = f_BF * norms_F
                    keep_BF = batch_topk_mask(score_BF, k)
                    smallest = torch.where(keep_BF & (score_BF > 0), score_BF, torch.inf).min()
                    smallest = torch.where(torch.isinf(smallest), 0.0, smallest)
                f_BF = f_BF * keep_BF
            x_hat_BD = f_BF @ W_dec
            l1_sum = _wide(f_BF @ norms_F).sum()
            fired_F, n_active = (f_BF > 0).any(0), (f_BF > 0).sum()
            values_at = lambda a: post_BF.reshape(-1)[a.flat]  # noqa: E731
            pre_BF = pre_BF.detach()
        x_hat_BMd = x_hat_BD.view_as(x_BMd) + self.b_dec_Md
        if update:
            self.tokens_since_active_F.add_(B).masked_fill_(_as_mask(fired_F, F), 0)
            if cfg.arch == "batchtopk" and step >= cfg.threshold_start_step:
                self._update_threshold(smallest)

        out = {}
        sq_BMd = _wide(x_hat_BMd - x_BMd).pow(2)
        # "mse" is the paper's: summed over revisions and hidden dims, averaged over tokens
        mse = sq_BMd.sum() / B
        if cfg.arch == "l1":
            coeff = l1_coeff_at(cfg, step)
            sparsity = coeff * l1_sum / B
            out["l1_coeff"] = torch.tensor(coeff)
        else:
            out["k"] = torch.tensor(k)
            aux = self._auxk_active(pre_BF)  # the same entries as on ReLU(pre): positive ones only
            sparsity = _wide(x_hat_BMd.new_zeros(()))
            if aux is not None:
                sparsity = cfg.auxk_alpha * self._auxk_fvu(x_BMd, x_hat_BMd, values_at(aux), aux)

        with torch.no_grad():
            total_var_M = _wide(x_BMd).var(0, correction=0).sum(-1) * B
            out["fvu_M"] = sq_BMd.sum((0, 2)) / total_var_M
            out["l0"] = torch.as_tensor(n_active, dtype=torch.float32) / B
            out["dead_frac"] = (self.tokens_since_active_F >= cfg.dead_tokens).float().mean()
        out.update(loss=mse + sparsity, mse=mse.detach(), sparsity=sparsity.detach())
        return out

    @torch.no_grad()
    def _update_threshold(self, smallest):
        """EMA of the smallest kept POSITIVE score (0 when nothing positive was kept)."""
        smallest = smallest.float()
        beta = self.cfg.threshold_beta
        ema = beta * self.threshold + (1 - beta) * smallest
        # torch.where, not an if on .item(): no device sync
        self.threshold.copy_(torch.where(self.threshold < 0, smallest, ema))

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
        return ActiveSet.where(chosen_BF, post_BF.dtype)

    def _auxk_fvu(self, x_BMd, x_hat_BMd, a_N, act):
        e_BMd = (x_BMd - x_hat_BMd).detach()
        e_hat_BD = _Decode.apply(a_N, self.W_dec_FMd.view(self.cfg.dict_size, -1), act)
        num = _wide(e_hat_BD.view_as(e_BMd) - e_BMd).pow(2).sum((1, 2)).mean()
        den = _wide(e_BMd - e_BMd.mean(0)).pow(2).sum((1, 2)).mean()
        return (num / den).nan_to_num(0.0)

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

    # ---- units

    @torch.no_grad()
    def fold_scales(self, scales_M):
        """A new crosscoder for RAW activations, when this one takes s_m * x_m: W_enc[m] *= s_m,
        W_dec[:, m] /= s_m, b_dec[m] /= s_m. Codes, selection and theta are unchanged; outputs are raw."""
        s_M = torch.as_tensor(scales_M, dtype=self.W_enc_MdF.dtype, device=self.W_enc_MdF.device)
        if s_M.shape != (self.cfg.n_models,) or not bool((s_M > 0).all()):
            raise ValueError(f"scales_M must be {self.cfg.n_models} positive numbers, got {scales_M!r}")
        new = copy.deepcopy(self)
        new.W_enc_MdF.mul_(s_M[:, None, None])
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
        """Write run_dir/crosscoder.safetensors and run_dir/config.json (config fields + extra), each to a
        temporary name first and renamed into place, so a killed process never leaves half a file."""
        extra = dict(extra or {})
        meta = asdict(self.cfg)
        clash = sorted(set(extra) & set(meta))
        if clash:
            raise ValueError(f"extra keys {clash} collide with CrossCoderConfig fields")
        meta.update(extra)
        text = json.dumps(meta, indent=2)  # before touching the disk: unserialisable extras fail here
        os.makedirs(run_dir, exist_ok=True)
        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        path = os.path.join(run_dir, WEIGHTS_FILE)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file(tensors, tmp)
        os.replace(tmp, path)
        path = os.path.join(run_dir, CONFIG_FILE)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, run_dir, device="cpu"):
        """Read a run folder written by save(). Tensor shapes are checked against config.json."""
        with open(os.path.join(run_dir, CONFIG_FILE)) as fh:
            meta = json.load(fh)
        names = {f.name for f in fields(CrossCoderConfig)}
        cfg = CrossCoderConfig(**{k: v for k, v in meta.items() if k in names})
        with torch.device("meta"):  # no memory, no init: every tensor is replaced by the file's
            cc = cls(cfg, init=False)
        path = os.path.join(run_dir, WEIGHTS_FILE)
        tensors = load_file(path, device=str(device))
        expected = {name: tuple(t.shape) for name, t in cc.state_dict().items()}
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
        cc.extra = {k: v for k, v in meta.items() if k not in names}
        return cc
