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

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

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
        """x_hat_BMd = f W_dec + b_dec. sparse=True sums only the active rows of W_dec (embedding_bag);
        the default is sparse for BatchTopK, whose codes have ~k of F entries set."""
        B = f_BF.shape[0]
        M, d, F = self.cfg.n_models, self.cfg.d_model, self.cfg.dict_size
        W_dec = self.W_dec_FMd.view(F, M * d)
        if sparse is None:
            sparse = self.cfg.arch == "batchtopk"
        if sparse:
            b_idx, i_idx = f_BF.nonzero(as_tuple=True)  # row-major, so each token's latents are contiguous
            counts_B = torch.bincount(b_idx, minlength=B)
            offsets_B = counts_B.cumsum(0) - counts_B
            y_BD = torch.nn.functional.embedding_bag(
                i_idx, W_dec, offsets_B, mode="sum", per_sample_weights=f_BF[b_idx, i_idx])
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
        post_BF = torch.relu(self.pre_acts(x_BMd))  # before BatchTopK's selection; AuxK draws on it
        f_BF = post_BF
        norms_F = self.decoder_norms().sum(1)
        out = {}
        if cfg.arch == "batchtopk":
            k = k_at(cfg, step)
            with torch.no_grad():
                score_BF = f_BF * norms_F
                keep_BF = batch_topk_mask(score_BF, k)
                if update and step >= cfg.threshold_start_step:
                    self._update_threshold(score_BF, keep_BF)
            f_BF = f_BF * keep_BF
            out["k"] = torch.tensor(k)
        x_hat_BMd = self.decode(f_BF)
        if update:
            fired_F = (f_BF > 0).any(0)
            self.tokens_since_active_F.add_(x_BMd.shape[0]).masked_fill_(fired_F, 0)

        err_BMd = _wide(x_hat_BMd - x_BMd)
        # "mse" is the paper's: summed over revisions and hidden dims, averaged over tokens
        mse = err_BMd.pow(2).sum((1, 2)).mean()
        if cfg.arch == "l1":
            coeff = l1_coeff_at(cfg, step)
            sparsity = coeff * _wide(f_BF @ norms_F).mean()
            out["l1_coeff"] = torch.tensor(coeff)
        else:
            sparsity = cfg.auxk_alpha * self.auxk_loss(x_BMd, x_hat_BMd, post_BF)

        with torch.no_grad():
            total_var_M = _wide(x_BMd - x_BMd.mean(0)).pow(2).sum((0, 2))
            out["fvu_M"] = err_BMd.pow(2).sum((0, 2)) / total_var_M
            out["l0"] = (f_BF > 0).float().sum(1).mean()
            out["dead_frac"] = (self.tokens_since_active_F >= cfg.dead_tokens).float().mean()
        out.update(loss=mse + sparsity, mse=mse.detach(), sparsity=sparsity.detach())
        return out

    @torch.no_grad()
    def _update_threshold(self, score_BF, keep_BF):
        # smallest kept POSITIVE score: a zero "kept" only because the batch had too few actives says nothing
        kept_BF = keep_BF & (score_BF > 0)
        smallest = torch.where(kept_BF, score_BF, torch.inf).min().float()
        smallest = torch.where(torch.isinf(smallest), 0.0, smallest)
        beta = self.cfg.threshold_beta
        ema = beta * self.threshold + (1 - beta) * smallest
        # torch.where, not an if on .item(): no device sync
        self.threshold.copy_(torch.where(self.threshold < 0, smallest, ema))

    def auxk_loss(self, x_BMd, x_hat_BMd, f_BF):
        """AuxK (Gao et al. 2024): the top aux_k dead latents OF EACH TOKEN (by their ReLU'd pre-activation)
        reconstruct the detached error e = x - x_hat, decoded without b_dec. Normalised by e's variance
        over the batch, so the loss is an FVU and alpha means the same at every scale. Target is +e."""
        dead_F = self.tokens_since_active_F >= self.cfg.dead_tokens
        n_dead = int(dead_F.sum())
        if n_dead == 0:
            return _wide(x_hat_BMd.new_zeros(()))
        e_BMd = (x_BMd - x_hat_BMd).detach()
        acts_BK, idx_BK = f_BF.masked_fill(~dead_F, -torch.inf).topk(min(self.cfg.aux_k, n_dead), dim=1)
        F = self.cfg.dict_size
        e_hat_BD = torch.nn.functional.embedding_bag(
            idx_BK, self.W_dec_FMd.view(F, -1), mode="sum", per_sample_weights=acts_BK)
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
