"""variants.py — the crosscoder's sparsity variants, each one whole piece, registered in ONE table.

A variant is everything that differs between sparse crosscoders (METHOD.md, "The model"): how the
training code is made from the pre-activations (its activation, dense and as an active set for the
fast path), its sparsity or auxiliary loss, its reconstruction loss where that is not the plain one,
its inference rule, its own state (registered on the crosscoder, so it is saved, loaded, checkpointed
and folded with the weights) and how that state is kept equal across DDP ranks. Everything else (the
encoder matmul, the decoder, the dead-latent counters, schedules, files) is crosscoder.py's, shared.

    register("jumprelu", JumpReLU, JumpReLUSettings)    # name, the class, its settings' dataclass

A variant's settings (JumpReLU's jumprelu_coeff, BatchTopK's k, …) are a small dataclass of its own, each field
made by `setting(default, help)`; crosscoder.CrossCoderConfig, training.RunConfig, train.py's flags (with their
--help) and config.json's keys are made from the registered ones, so a new hyperparameter is one line here. A
field's name is its config.json key and its flag (jumprelu_coeff: --jumprelu-coeff), one meaning per name.
The config checks, train.py/seeds.py's --arch, bench.py and the tests read this table; adding a variant is one
class (or anywhere: the tests register one of their own), its settings and one register() line. Nothing outside
a variant's class branches on its name: what others need of a variant is an attribute of its class.

Shapes as in crosscoder.py: B tokens, M revisions, d hidden size, F latents; n_F = Σ_m ‖W_dec[i,m]‖ in
the normalised space (the decoder norm sum every variant weighs codes by).
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn

from crosscoding import defaults, sparse

# -----------------------------------------------------------------------------
# settings: each variant's own hyperparameters


def setting(default, help, parse=None):
    """One of a variant's settings: its default, the line train.py --help shows for it, and how train.py reads
    the flag's text (parse; default: the default's type, or comma-separated numbers for a tuple)."""
    return field(default=default, metadata=dict(help=help, parse=parse))


@dataclass
class Settings:
    """A variant's settings (none here). A subclass adds fields (each `setting(...)`, its name unique over the
    table: it is also the config.json key and the flag) and may override
        check(cfg, bad)  fills its fields left None to follow the run (from total_steps, dict_size …), then
                         validates them (bad(name, what would be valid) raises); run on every config,
                         whatever the arch, on the flat config (cfg.k) where every variant's settings live."""

    @staticmethod
    def check(cfg, bad):
        pass


# -----------------------------------------------------------------------------
# schedules and selections shared by several variants


def l1_coeff_at(cfg, step):
    """lambda(t) = l1_coeff * min(1, t / (l1_warmup_frac * total_steps)); step None = end of warm-up."""
    return cfg.l1_coeff * warmup_at(cfg, step)


def warmup_at(cfg, step):
    """The sparsity penalties' warm-up factor, 0 -> 1 linearly over l1_warmup_frac of the run."""
    warmup = cfg.l1_warmup_frac * cfg.total_steps
    if step is None or warmup == 0:
        return 1.0
    return min(1.0, step / warmup)


def k_at(cfg, step):
    """BatchTopK's k(t): linear from k_start to k over k_anneal_steps; step None = the final k."""
    if step is None or cfg.k_anneal_steps == 0:
        return cfg.k
    frac = min(1.0, step / cfg.k_anneal_steps)
    return round(cfg.k_start + (cfg.k - cfg.k_start) * frac)


def batch_topk_mask(score_BF, k, group=None):
    """Keep the k*B largest scores of the whole batch: k latents per token on average, not each. With a
    process group (DDP), of the global batch (sparse.topk_cut)."""
    if group is not None:
        n = k * score_BF.shape[0] * torch.distributed.get_world_size(group)
        return score_BF >= sparse.topk_cut(score_BF.flatten(), n, group)
    n_keep = min(k * score_BF.shape[0], score_BF.numel())
    idx = score_BF.flatten().topk(n_keep, sorted=False).indices
    keep = torch.zeros(score_BF.numel(), dtype=torch.bool, device=score_BF.device)
    keep[idx] = True
    return keep.view_as(score_BF)


def _wide(t):
    """Losses are summed in at least float32, even when the model runs in bf16/fp16."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# -----------------------------------------------------------------------------
# the interface


class Variant:
    """The base: the ReLU code f = ReLU(pre), no state, no sparsity term. A subclass overrides what differs.

    Training (crosscoder.CrossCoder.terms, the readable loss):
        code(cc, pre_BF, norms_F, step)        -> (f_BF, info)   the training code, differentiable
    Loss (crosscoder.CrossCoder.loss):
        recon(cc, x_BMd, t, mse)               -> the reconstruction loss (default: the paper's mse)
        sparsity(cc, x_BMd, x_hat_BMd, t, step, out) -> its sparsity / auxiliary loss; may add to out
        update(cc, t, step)                    its buffers, after the loss (training mode, a step given)
    Inference: infer(cc, f_BF) -> the code from f_BF = ReLU(pre) (no grad needed through the selection)
    State: add_state(cc) registers buffers/parameters on the crosscoder; sync(cc, group) after each DDP step.
    Config: Settings, its own fields (register() sets it); check_chosen(cfg, bad) what the config must hold
    when this variant is the arch.
    The fast path's hooks (sparse.FastPath, a CPU only; the same numbers as code(), tests compare them): a
    variant opts in with fast_path = True and these, which the dense loss never calls. This base's give
    the ReLU code's; a variant that overrides code() overrides them too, or leaves fast_path False.
        fast_path                              True: the crosscoder holds a sparse.FastPath
        n_active_bound(cc, pre_BF, positive_BF, step) -> int     entries the active set will hold (≥)
        active(cc, pre_BF, norms_F, step, positive_BF) -> (ActiveSet, info)   which entries
        values(cc, z_N, act)                   -> f_N            the code there, from z_N = ReLU(pre) there
    What other code asks of a variant (class attributes, never its name):
        decode_active_only, state_names        (crosscoder.py, convert.py --to jumprelu)
        formats: the peers' formats that hold its crosscoder as it is (convert.py --to/--from)
        keeps_top_k: its codes are BatchTopK's selection, k latents per token (θ, the buffer `threshold`, at
            inference): convert.py writes k and θ, bench.py's reference selects so
        peer: the published trainer its training step is timed against (bench.Peer writes each out plainly)
        sized_by_l0: the setting with no rule that carries across data (a penalty's coefficient per unit of L0):
            planted.py sizes it to the L0 its data wants, from its default up
    """
    name = None                  # register() sets both
    Settings = Settings          # its settings' dataclass; this base's has none
    fast_path = False            # True: its fast-path hooks (below) compute code() on the active set
    decode_active_only = False   # decode()'s default: sum only the active rows of W_dec
    formats = ()
    keeps_top_k = False
    peer = None
    sized_by_l0 = None
    state_names = ()             # the tensors add_state registers (a conversion to another variant drops them)

    def __init__(self, cfg):
        self.cfg = cfg

    @staticmethod
    def check_chosen(cfg, bad):
        pass

    def add_state(self, cc):
        pass

    def sync(self, cc, group):
        """DDP: parameters need nothing (DDP averages their gradients, so every rank takes the same step)."""

    # ---- training code
    def code(self, cc, pre_BF, norms_F, step):
        return torch.relu(pre_BF), {}

    # ---- loss
    def recon(self, cc, x_BMd, t, mse):
        return mse

    def sparsity(self, cc, x_BMd, x_hat_BMd, t, step, out):
        return _wide(x_hat_BMd.new_zeros(()))

    def update(self, cc, t, step):
        pass

    # ---- inference
    def infer(self, cc, f_BF):
        return f_BF

    def pre_threshold(self, cc):
        """[F]: the per-latent threshold on ReLU(pre) that inference applies (f_i kept when above it), for
        per-token formats (SAELens' jumprelu, convert.py); None when inference keeps every positive code."""
        return None

    # ---- the fast path's hooks (sparse.FastPath): the ReLU code as its active entries
    def n_active_bound(self, cc, pre_BF, positive_BF, step):
        return int(torch.count_nonzero(positive_BF))

    def active(self, cc, pre_BF, norms_F, step, positive_BF):
        return sparse.ActiveSet.where(positive_BF, pre_BF.dtype), {}

    def values(self, cc, z_N, act):
        return z_N


# -----------------------------------------------------------------------------
# the paper's two

def _check_int(cfg, bad, name, low):
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        bad(name, f"must be an integer > {low - 1}" if low == 1 else f"must be an integer >= {low}")


def _check_finite(cfg, bad, name, strict):
    """A float setting: finite and > 0 (strict) or >= 0 (an inf or nan penalty would train a NaN run)."""
    v = getattr(cfg, name)
    if not (isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 if strict else v >= 0)):
        bad(name, f"must be a finite number {'>' if strict else '>='} 0")


@dataclass
class L1Settings(Settings):
    l1_coeff: float = setting(defaults.PAPER.l1_coeff, "λ, the L1 penalty's weight after its warm-up")

    @staticmethod
    def check(cfg, bad):
        _check_finite(cfg, bad, "l1_coeff", strict=False)


class L1(Variant):
    """The paper's: f = ReLU(pre), penalty lambda(t) * mean_b Σ_i f_i n_i, lambda warmed up linearly.
    Summing per-revision norms (not one joint norm) is what lets a latent live in one revision only."""
    fast_path = True
    formats = ("dictionary_learning", "ctt-paper")      # their plain CrossCoder: no k, no θ
    peer = "dictionary_learning CrossCoderTrainer"

    def sparsity(self, cc, x_BMd, x_hat_BMd, t, step, out):
        coeff = l1_coeff_at(self.cfg, step)
        out["l1_coeff"] = torch.tensor(coeff)
        return coeff * t.l1_sum / x_BMd.shape[0]


@dataclass
class BatchTopKSettings(Settings):
    k: int = setting(defaults.PAPER.k, "latents kept per token on average, at the end of the anneal")
    k_start: int | None = setting(None, "k at step 0, annealed linearly to k (default: 5k, at most F; the paper's "
                                        "1000)", parse=int)
    k_anneal_steps: int | None = setting(None, "steps of k's anneal (default: 5.12% of the run, the paper's 5000)",
                                         parse=int)
    threshold_start_step: int | None = setting(None, "θ's EMA starts at this step (default: 1.024% of the run, "
                                                     "the paper's 1000)", parse=int)
    threshold_beta: float = setting(0.999, "θ's EMA decay: θ ← β θ + (1 − β) · the smallest kept score")
    auxk_alpha: float = setting(1 / 32, "AuxK's weight (its loss is an FVU of the error it reconstructs)")
    aux_k: int = setting(512, "AuxK reconstructs the error from this many dead latents per token")

    @staticmethod
    def check(cfg, bad):
        """The schedules given as None follow the run's length as the paper's do (97,656 steps of 4096 tokens)."""
        for name in ("k", "aux_k"):
            _check_int(cfg, bad, name, 1)
        if cfg.k_start is None:
            cfg.k_start = min(5 * cfg.k, cfg.dict_size)
        if cfg.k_anneal_steps is None:
            cfg.k_anneal_steps = round(0.0512 * cfg.total_steps)
        if cfg.threshold_start_step is None:
            cfg.threshold_start_step = round(0.01024 * cfg.total_steps)
        _check_int(cfg, bad, "k_start", 1)
        for name in ("k_anneal_steps", "threshold_start_step"):
            _check_int(cfg, bad, name, 0)
        if not 0.0 <= cfg.threshold_beta < 1.0:
            bad("threshold_beta", "must be in [0, 1)")
        _check_finite(cfg, bad, "auxk_alpha", strict=False)


class BatchTopK(Variant):
    """Keep the k*B largest scores f_i * n_i of the batch (k annealed); at inference keep scores above θ
    (EMA of the smallest kept score, the buffer `threshold`); AuxK revives dead latents."""
    fast_path = True
    decode_active_only = True
    state_names = ("threshold",)
    formats = ("dictionary_learning", "ctt-paper")      # their BatchTopK crosscoder: k and θ
    keeps_top_k = True
    peer = "dictionary_learning BatchTopKCrossCoderTrainer"

    @staticmethod
    def check_chosen(cfg, bad):
        if cfg.k > cfg.dict_size:
            bad("k", f"must be at most dict_size={cfg.dict_size}")
        if cfg.k_start > cfg.dict_size:
            bad("k_start", f"must be at most dict_size={cfg.dict_size} (BatchTopK cannot keep more latents "
                           "than exist)")

    def add_state(self, cc):
        # θ for inference; negative means "not set yet" (scores are never negative)
        cc.register_buffer("threshold", torch.tensor(-1.0))

    def sync(self, cc, group):
        """Every rank applied the same EMA to its own smallest kept score (all ≥ the global cut); the EMA is
        monotone, so the minimum over ranks is the EMA of the global batch's smallest."""
        torch.distributed.all_reduce(cc.threshold, op=torch.distributed.ReduceOp.MIN, group=group)

    def code(self, cc, pre_BF, norms_F, step):
        f_BF = torch.relu(pre_BF)
        with torch.no_grad():
            score_BF = f_BF * norms_F
            keep_BF = batch_topk_mask(score_BF, k_at(self.cfg, step), cc.group)
            smallest = torch.where(keep_BF & (score_BF > 0), score_BF, torch.inf).min()
            smallest = torch.where(torch.isinf(smallest), 0.0, smallest)
        return f_BF * keep_BF, {"smallest": smallest}

    def n_active_bound(self, cc, pre_BF, positive_BF, step):
        return min(int(torch.count_nonzero(positive_BF)), k_at(self.cfg, step) * pre_BF.shape[0])

    def active(self, cc, pre_BF, norms_F, step, positive_BF):
        act, smallest = sparse.batch_topk_active(pre_BF, norms_F, k_at(self.cfg, step), cc.group, positive_BF)
        return act, {"smallest": smallest}

    def sparsity(self, cc, x_BMd, x_hat_BMd, t, step, out):
        """AuxK (crosscoder.auxk_loss), on the dead set this step started with."""
        out["k"] = torch.tensor(k_at(self.cfg, step))
        aux = cc._auxk_active(t.pre_BF)  # the same entries as on ReLU(pre): positive ones only
        if aux is None:
            return _wide(x_hat_BMd.new_zeros(()))
        return self.cfg.auxk_alpha * cc._auxk_fvu(x_BMd, x_hat_BMd, t.values_at(aux), aux)

    def update(self, cc, t, step):
        if step >= self.cfg.threshold_start_step:
            _ema_threshold(cc, t.info["smallest"], self.cfg.threshold_beta)

    def infer(self, cc, f_BF):
        with torch.no_grad():
            score_BF = f_BF * cc.norm_sum()
            if cc.threshold >= 0:
                keep_BF = score_BF > cc.threshold
            else:
                keep_BF = batch_topk_mask(score_BF, self.cfg.k)
        return f_BF * keep_BF

    @torch.no_grad()
    def pre_threshold(self, cc):
        """f_i n_i > θ  ⟺  f_i > θ / n_i (n_i in the normalised space, decoder_norms(); ∞ where n_i = 0, whose
        score 0 never beats θ ≥ 0). Computed in float64, so θ / n_i is rounded once."""
        if not cc.threshold >= 0:
            raise ValueError("this BatchTopK crosscoder has no threshold θ yet (it selects per batch)")
        n_F = cc.norm_sum().double()
        return torch.where(n_F > 0, cc.threshold.double() / n_F.clamp_min(1e-300), torch.inf)


@torch.no_grad()
def _ema_threshold(cc, smallest, beta):
    """EMA of the smallest kept POSITIVE score (0 when nothing positive was kept)."""
    smallest = smallest.float()
    ema = beta * cc.threshold + (1 - beta) * smallest
    # torch.where, not an if on .item(): no device sync
    cc.threshold.copy_(torch.where(cc.threshold < 0, smallest, ema))


# -----------------------------------------------------------------------------
# Matryoshka BatchTopK (Bussmann, Nabeshima, Karvonen, Nanda 2025)


def group_ends(cfg):
    """The end (exclusive) of each nested prefix of the dictionary: cumulative matryoshka_groups × F,
    rounded, the last = F."""
    ends, total = [], 0.0
    for frac in cfg.matryoshka_groups:
        total += frac
        ends.append(min(cfg.dict_size, round(total * cfg.dict_size)))
    ends[-1] = cfg.dict_size
    return ends


@dataclass
class MatryoshkaSettings(BatchTopKSettings):
    """BatchTopK's settings (Matryoshka selects as BatchTopK does) and the nested prefixes."""
    matryoshka_groups: tuple = setting((1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2),
                                       "the nested prefixes of the dictionary, comma-separated fractions of F "
                                       "summing to 1")

    @staticmethod
    def check(cfg, bad):
        BatchTopKSettings.check(cfg, bad)
        if isinstance(cfg.matryoshka_groups, list):    # as config.json and the flag hold it
            cfg.matryoshka_groups = tuple(cfg.matryoshka_groups)
        g = cfg.matryoshka_groups
        if (not isinstance(g, tuple) or not g or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         and v > 0 for v in g)
                or abs(sum(g) - 1.0) > 1e-6):
            bad("matryoshka_groups", "must be a non-empty list of fractions of dict_size, each > 0, summing to 1")


class Matryoshka(BatchTopK):
    """BatchTopK's selection, θ, inference and AuxK, with the Matryoshka loss: the latents are split into
    nested prefixes 0:e_1 ⊂ 0:e_2 ⊂ … ⊂ 0:F (matryoshka_groups, fractions of F) and EACH prefix alone must
    reconstruct x: recon = (1/G) Σ_g mean_b Σ_m ‖x_m − b_dec[m] − Σ_{i<e_g} f_i W_dec[i,m]‖² over the G prefixes.
    The mean, as Bussmann et al.'s and dictionary_learning's trainers take it (the paper's Eq. 2 writes the sum,
    a constant factor Adam ignores): AuxK is weighed against ONE reconstruction term, as in BatchTopK, so
    auxk_alpha means the same in both; the sum weakens it G times, which on planted features leaves more of
    them merged into the small prefixes' latents. The larger cause is the prefixes' sizes: a prefix with fewer
    latents than the data has features must merge them to reconstruct, and the default's smallest is F/16; with
    every prefix at least as large as the features planted, recovery nears BatchTopK's (FINDINGS.md
    `planted-recovery`, which measures each cause). The last prefix is the whole dictionary, so its term is
    BatchTopK's mse; "mse" in the logs stays that one (comparable)."""
    formats = ()        # a peer would read it back as BatchTopK, trained otherwise
    peer = "dictionary_learning MatryoshkaBatchTopKTrainer"

    @staticmethod
    def check_chosen(cfg, bad):
        BatchTopK.check_chosen(cfg, bad)
        ends = group_ends(cfg)
        if any(b <= a for a, b in zip([0] + ends, ends)):
            bad("matryoshka_groups", f"must give every group at least one latent at dict_size={cfg.dict_size} "
                                     f"(prefix ends {ends})")

    def recon(self, cc, x_BMd, t, mse):
        B = x_BMd.shape[0]
        r_BD = (x_BMd - cc.b_dec_Md).flatten(1)     # what the codes must reconstruct
        ends = group_ends(self.cfg)
        total, start = 0.0, 0
        for end in ends[:-1]:
            r_BD = r_BD - t.decode_cols(start, end)  # the residual after prefix 0:end
            total = total + _wide(r_BD).pow(2).sum() / B
            start = end
        return (total + mse) / len(ends)             # the last prefix: the whole dictionary


# -----------------------------------------------------------------------------
# JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead"; as in Ge et al. ICLR 2026)


class JumpReLUFn(torch.autograd.Function):
    """f = z · H(z − θ), with θ's gradient by a straight-through estimator (Rajamanoharan et al. 2024, Eq. 11):
        ∂f/∂z = H(z − θ)                       (exact off the jump)
        ∂f/∂θ = −(θ/ε) K((z − θ)/ε),  K(u) = 1{|u| < 1/2}   (the rectangle kernel of bandwidth ε)
    The pseudo-derivative is taken only where z > 0 (z = ReLU(pre): at z = 0 the code is 0 whatever θ, and
    the active-set path holds positive entries only). θ is [F] (summed over tokens) or per entry, as z."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        g_z = g * (z > theta) if ctx.needs_input_grad[0] else None
        g_theta = None
        if ctx.needs_input_grad[1]:
            band = ((z - theta).abs() < eps / 2) & (z > 0)
            g_theta = -(theta / eps) * band * g
            if theta.dim() < g_theta.dim():
                g_theta = g_theta.sum(0)
        return g_z, g_theta, None


@dataclass
class JumpReLUSettings(Settings):
    jumprelu_coeff: float = setting(4e-4, "the tanh-L0 penalty's weight per unit of M·d (λ_J / (M·d)), warmed up as λ; "
                                          "chosen on the toy, other data may need another (size it by the L0 it "
                                          "trains to)")
    jumprelu_tanh_c: float = setting(1.0, "c in tanh(c · f_i · Σ_m ‖W_dec[i,m]‖)")
    jumprelu_bandwidth: float = setting(1e-3, "ε, the straight-through estimator's rectangle kernel width")
    jumprelu_threshold_init: float = setting(1e-3, "θ at init, every latent (Rajamanoharan et al.'s, "
                                                   "dictionary_learning's)")

    @staticmethod
    def check(cfg, bad):
        for name in ("jumprelu_bandwidth", "jumprelu_threshold_init", "jumprelu_tanh_c"):
            _check_finite(cfg, bad, name, strict=True)
        _check_finite(cfg, bad, "jumprelu_coeff", strict=False)


class JumpReLU(Variant):
    """f_i = z_i · H(z_i − θ_i), z = ReLU(pre), θ_i = exp(log_threshold_F[i]) learned (a parameter: DDP
    averages its gradient like any weight's, so every rank keeps the same θ). θ is applied once, in the code
    (dictionary_learning issue #55 is applying it a second time). Sparsity: lambda_J(t) · mean_b Σ_i
    tanh(c · f_i · n_i), a tanh-smoothed L0 weighted by the decoder norm sum (Anthropic's crosscoder JumpReLU,
    Lindsey et al. 2025). Why tanh and not H(z − θ)·n_i through the STE: the product f·n is unchanged when a
    decoder row shrinks by s and its encoder row, bias and θ grow by s, but H·n falls by s, so an L0 weighted
    by the decoder norm alone could be driven to 0 by shrinking decoders; tanh(c·f·n) counts a latent ≈ 1
    once its contribution is well above 1/c, keeps the per-revision norm sum (a latent of one revision pays
    for that revision only) and gives the encoder an L1-like pull on small codes. Its θ-gradient passes
    through the STE of f. lambda_J = jumprelu_coeff · M · d: per unit of L0 in units of E‖x‖² (M·d in the
    normalised space), so one value serves every width; warmed up over l1_warmup_frac as lambda is.
    The fast path holds the entries with z > θ − ε/2 (the active ones and those in the STE's band below θ,
    whose f is 0 but whose θ-gradient is not)."""
    fast_path = True
    decode_active_only = True
    state_names = ("log_threshold_F",)
    sized_by_l0 = "jumprelu_coeff"
    peer = "dictionary_learning JumpReluTrainer"

    def add_state(self, cc):
        F = self.cfg.dict_size
        cc.log_threshold_F = nn.Parameter(torch.full((F,), math.log(self.cfg.jumprelu_threshold_init)))

    def theta(self, cc):
        return cc.log_threshold_F.exp()

    def coeff_at(self, step):
        cfg = self.cfg
        return cfg.jumprelu_coeff * cfg.n_models * cfg.d_model * warmup_at(cfg, step)

    def code(self, cc, pre_BF, norms_F, step):
        theta_F = self.theta(cc).to(pre_BF.dtype)
        return JumpReLUFn.apply(torch.relu(pre_BF), theta_F, self.cfg.jumprelu_bandwidth), {}

    def _candidates(self, cc, pre_BF, positive_BF):
        with torch.no_grad():
            low_F = (self.theta(cc) - self.cfg.jumprelu_bandwidth / 2).to(pre_BF.dtype)
            return positive_BF & (pre_BF > low_F)

    def n_active_bound(self, cc, pre_BF, positive_BF, step):
        return int(torch.count_nonzero(self._candidates(cc, pre_BF, positive_BF)))

    def active(self, cc, pre_BF, norms_F, step, positive_BF):
        return sparse.ActiveSet.where(self._candidates(cc, pre_BF, positive_BF), pre_BF.dtype), {}

    def values(self, cc, z_N, act):
        theta_N = sparse.TakeAt.apply(self.theta(cc).to(z_N.dtype), act.cols)
        return JumpReLUFn.apply(z_N, theta_N, self.cfg.jumprelu_bandwidth)

    def sparsity(self, cc, x_BMd, x_hat_BMd, t, step, out):
        coeff = self.coeff_at(step)
        out["jumprelu_coeff"] = torch.tensor(coeff)
        c = self.cfg.jumprelu_tanh_c
        return coeff * t.score_sum(lambda s: torch.tanh(c * s)) / x_BMd.shape[0]

    def infer(self, cc, f_BF):
        with torch.no_grad():
            keep_BF = f_BF > self.theta(cc).to(f_BF.dtype)
        return f_BF * keep_BF

    @torch.no_grad()
    def pre_threshold(self, cc):
        return self.theta(cc).detach()


# -----------------------------------------------------------------------------
# the table

VARIANTS = {}    # name -> the variant's class (its settings: the class's Settings)


def register(name, variant, settings=Settings):
    """Add a variant to the table: its class and its settings' dataclass (a Settings subclass). A setting's name
    means one thing: a name another variant declares must be that same field (Matryoshka's k is BatchTopK's)."""
    known = settings_fields()
    for f in fields(settings):
        if f.name in known and known[f.name] is not f:
            owner = next(n for n, cls in VARIANTS.items() if f.name in {g.name for g in fields(cls.Settings)})
            raise ValueError(f"variant {name!r} declares setting {f.name!r}, which {owner!r} declares too: give it "
                             "another name")
    variant.name, variant.Settings = name, settings
    VARIANTS[name] = variant


def settings_fields() -> dict:
    """name -> dataclasses.Field of every registered variant's settings, each once (Matryoshka's repeat
    BatchTopK's, which they inherit)."""
    out = {}
    for cls in VARIANTS.values():
        for f in fields(cls.Settings):
            out.setdefault(f.name, f)
    return out


def settings_classes() -> list:
    """Every registered variant's Settings class, once each (their check() hooks run on every config)."""
    return list(dict.fromkeys(cls.Settings for cls in VARIANTS.values()))


register("l1", L1, L1Settings)
register("batchtopk", BatchTopK, BatchTopKSettings)
register("jumprelu", JumpReLU, JumpReLUSettings)
register("matryoshka", Matryoshka, MatryoshkaSettings)


# -----------------------------------------------------------------------------
# BatchTopK -> JumpReLU at inference


@torch.no_grad()
def batchtopk_to_jumprelu(cc):
    """A JumpReLU crosscoder with the same codes as this BatchTopK (or Matryoshka) one's θ inference rule.
    BatchTopK keeps latent i when f_i · n_i > θ, n_i = Σ_m ‖W_dec[i,m]‖ in the NORMALISED space
    (decoder_norms(): with scales folded in, the stored rows are divided by s_m, and scales_M restores them),
    i.e. when f_i > θ / n_i: JumpReLU's rule with θ_i = θ / n_i (∞ where n_i = 0: such a latent never
    counts, as its score 0 never beats θ ≥ 0). The weights, scales and counters are copied; the codes agree
    up to the float rounding of θ / n_i (tests/test_variants.py checks them equal). The config keeps every
    field but arch; the training-only JumpReLU fields are its defaults (this crosscoder was not trained so)."""
    if not isinstance(cc.variant, BatchTopK):
        raise ValueError(f"only a BatchTopK-selecting crosscoder converts to JumpReLU, this one is {cc.cfg.arch!r}")
    theta_F = cc.variant.pre_threshold(cc)
    cfg = cc.cfg.replace(arch=JumpReLU.name)
    new = type(cc)(cfg, init=False).to(cc.W_enc_FMd.device)
    state = {k: v for k, v in cc.state_dict().items() if k not in cc.variant.state_names}
    state["log_threshold_F"] = theta_F.log().to(cc.W_enc_FMd.dtype)
    new.load_state_dict(state)
    return new
