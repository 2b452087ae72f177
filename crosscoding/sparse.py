"""sparse.py — the training step's fast path: a crosscoder's code as its active entries.

crosscoder.py holds the math (CrossCoder.loss and terms, dense, straight from the formulas); this module
only makes the same numbers cheaper on a CPU, and tests/test_crosscoder.py checks it against the dense
math and a naive per-revision loop. A crosscoder whose variant has fast-path hooks holds a FastPath
(the seam, at the end of this file), which CrossCoder.loss asks first: it takes `active_terms` where it
pays (fp32/fp64 on a CPU, no autocast, codes at most ACTIVE_MAX_DENSITY dense). Which entries are active,
and the code's value there, is the variant's to say (variants.py: its fast-path hooks active() and
values()); nothing here knows one variant from another.
"""
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# # Once training is past its first few percent, a code f_BF has ~1-3% of its entries set. Only the
# encoder's forward, x[B, M*d] @ W_enc[F, M*d]ᵀ, has to be dense: everything after the selection
# (ReLU, BatchTopK) touches the active entries (b, i) alone. With g = dL/dx_hat:
#   decode       x_hat[b] = sum_i f[b,i] W_dec[i]          [B,F]-sparse @ W_dec     (CSR matmul)
#   dL/dW_dec    sum_b f[b,i] g[b]                          [F,B]-sparse @ g         (CSR matmul)
#   dL/df[b,i]   g[b] . W_dec[i], at active entries only    sampled dot products     (sampled_addmm)
#   dL/dW_enc    sum_b x[b] dL/dpre[b,i]                    [F,B]-sparse @ x         (CSR matmul)
# An inactive entry gets no gradient, which is exact for every parameter: ReLU (pre <= 0) or the
# selection (not kept) cuts it anyway. Nothing of size [nnz, M*d] is ever gathered. Where codes are
# dense (early L1 training: the sparse kernels lose beyond ~12% active on 2 cores), the same
# functions use dense matmuls; both give the same numbers up to float rounding. On GPUs (cuBLAS in
# bf16/TF32 beats sparse kernels there), in half precision and under autocast, loss() takes the
# readable dense terms instead. At M=3, d=512, F=8192, batch 1024 on 2 cores: 2.7x (L1) and 3x
# (BatchTopK) a dense einsum step (bench.py).

SPARSE_MAX_DENSITY = 0.1        # sparse kernels up to this fraction of active entries (CPU, fp32/fp64)
ACTIVE_SET_DEVICES = ("cpu",)   # where FastPath may take the active-set path (fp32/fp64, no autocast) ...
ACTIVE_MAX_DENSITY = 0.1        # ... for a batch whose code has at most this fraction of active entries:
# every trained crosscoder (1-6% at the toy's shape and the paper's), not the first steps of L1 (codes ~50%
# dense at init, where dense matmuls win). The choice is made per step from this batch's pre-activations,
# so a resumed run takes the same path as the uninterrupted one. Both paths are bit-for-bit
# deterministic with several threads (no scatter-add whose order depends on the threads).


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

    def t_matmul(self, v_N, Y_BD):
        """(code with values v_N)^T @ Y: [F, D]."""
        if not self.sparse:
            return self.dense(v_N).t() @ Y_BD
        return _csr_mm(self.csr_t(v_N), Y_BD)

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


class PreAt(torch.autograd.Function):
    """pre[b, i] = x[b] . W_enc[i] + b_enc[i] at the active entries, differentiable in x, W_enc and
    b_enc; pre_BF (the dense matmul, computed once without autograd) supplies the values."""

    @staticmethod
    def forward(ctx, x_BD, W_FD, b_F, pre_BF, act):
        ctx.save_for_backward(x_BD, W_FD)
        ctx.act = act
        return pre_BF.reshape(-1)[act.flat]

    @staticmethod
    def backward(ctx, g_N):
        x_BD, W_FD = ctx.saved_tensors
        act, need = ctx.act, ctx.needs_input_grad
        g_N, x_BD = g_N.to(W_FD.dtype), x_BD.to(W_FD.dtype)  # in the weights' dtype (autocast: no longer on)
        g_x = act.matmul(g_N, W_FD) if need[0] else None
        g_W = act.t_matmul(g_N, x_BD) if need[1] else None
        g_b = g_N.new_zeros(act.F).index_add_(0, act.cols, g_N) if need[2] else None
        return g_x, g_W, g_b, None, None


class Decode(torch.autograd.Function):
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


def topk_cut(v_N, n, group):
    """The n-th largest value over every rank's v_N (group: a torch.distributed process group), -inf when
    all ranks together hold fewer than n: under DDP, BatchTopK keeps the k·B largest scores of the GLOBAL
    batch, so its cut, θ and L0 do not depend on the number of ranks."""
    import torch.distributed as dist
    top = torch.full((n,), -torch.inf, dtype=v_N.dtype, device=v_N.device)
    m = min(n, len(v_N))
    top[:m] = v_N.topk(m, sorted=False).values
    every = [torch.empty_like(top) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, top, group=group)
    return torch.cat(every).topk(n, sorted=False).values.min()


def batch_topk_active(pre_BF, norms_F, k, group=None, positive_BF=None):
    """BatchTopK's active set: the k*B largest scores relu(pre) * norm among the positive pre-activations
    (a zero code is the same kept or not), and the smallest kept score (0 if none). With a process group,
    B is the global batch (topk_cut). positive_BF: pre_BF > 0, when the caller has it."""
    B, F = pre_BF.shape
    positive_BF = pre_BF > 0 if positive_BF is None else positive_BF
    flat = positive_BF.reshape(-1).nonzero().squeeze(1)
    score = pre_BF.reshape(-1)[flat] * norms_F[flat % F]
    if group is not None:
        keep = score >= topk_cut(score, k * B * torch.distributed.get_world_size(group), group)
        flat, score = flat[keep], score[keep]
    elif len(flat) > k * B:
        keep = torch.zeros(len(flat), dtype=torch.bool, device=flat.device)
        keep[score.topk(k * B, sorted=False).indices] = True  # a mask keeps the row-major order
        flat, score = flat[keep], score[keep]
    smallest = score.min() if len(score) else score.new_zeros(())
    return ActiveSet(flat, B, F, pre_BF.dtype), smallest


class TakeAt(torch.autograd.Function):
    """v_F[idx_N] with a backward that sums by index_add_ (a fixed order), where indexing's backward would
    scatter-add in a thread-dependent one: per-entry values of a per-latent vector (JumpReLU's θ, the norms)."""

    @staticmethod
    def forward(ctx, v_F, idx_N):
        ctx.save_for_backward(idx_N)
        ctx.n = v_F.shape[0]
        return v_F[idx_N]

    @staticmethod
    def backward(ctx, g_N):
        idx_N, = ctx.saved_tensors
        return g_N.new_zeros(ctx.n).index_add_(0, idx_N, g_N), None


def active_set_device(x_BD) -> bool:
    """Where the active-set path may run: on a CPU in fp32/fp64 without autocast."""
    dev = x_BD.device.type
    return (dev in ACTIVE_SET_DEVICES and x_BD.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(dev))


class PreDense(torch.autograd.Function):
    """pre = x W + b, given as pre_BF (computed once without autograd), differentiable in x, W and b: the
    dense branch's pre-activations when the active-set path was considered and not taken."""

    @staticmethod
    def forward(ctx, x_BD, W_FD, b_F, pre_BF):
        ctx.save_for_backward(x_BD, W_FD)
        return pre_BF.clone()

    @staticmethod
    def backward(ctx, g_BF):
        x_BD, W_FD = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (g_BF @ W_FD if need[0] else None, g_BF.t() @ x_BD if need[1] else None,
                g_BF.sum(0) if need[2] else None, None)


class FastPath:
    """The crosscoder's fast path: CrossCoder.loss asks it for the batch's terms first (the crosscoder holds one
    when its variant has fast-path hooks, variants.Variant.fast_path). terms() is None where the readable dense
    terms run instead (GPUs, half precision, autocast); on a CPU it computes the pre-activations once and takes
    the active set where the variant's bound says the code is sparse enough, else the dense terms on them."""

    def terms(self, cc, x_BMd, step):
        x_BD = x_BMd.reshape(x_BMd.shape[0], -1)
        if not active_set_device(x_BD):
            return None
        F = cc.cfg.dict_size
        W_enc_FD, W_dec_FD = cc.W_enc_FMd.view(F, -1), cc.W_dec_FMd.view(F, -1)
        with torch.no_grad():
            pre_BF = torch.addmm(cc.b_enc_F, x_BD, W_enc_FD.t())   # the one matmul both paths need
        positive_BF = pre_BF > 0
        if cc.variant.n_active_bound(cc, pre_BF, positive_BF, step) > ACTIVE_MAX_DENSITY * pre_BF.numel():
            return cc.terms(PreDense.apply(x_BD, W_enc_FD, cc.b_enc_F, pre_BF), step)
        return active_terms(cc, x_BD, W_enc_FD, W_dec_FD, cc.norm_sum(), step, pre_BF, positive_BF)


def active_terms(cc, x_BD, W_enc_FD, W_dec_FD, norms_F, step, pre_BF, positive_BF):
    """cc.Terms (crosscoder.Terms: this module cannot import crosscoder.py, which imports it) from the code as its
    active entries, values f_N at act.flat: one dense matmul (pre_BF, computed by the caller without autograd, with
    its mask positive_BF = pre_BF > 0), the rest sparse. The variant
    (cc.variant) says which entries (its active()) and the code there (its values() of z = ReLU(pre))."""
    F, variant, b_enc_F = W_enc_FD.shape[0], cc.variant, cc.b_enc_F
    with torch.no_grad():
        act, info = variant.active(cc, pre_BF, norms_F, step, positive_BF)
    z_N = PreAt.apply(x_BD, W_enc_FD, b_enc_F, pre_BF, act)  # = ReLU(pre) there: all positive
    f_N = variant.values(cc, z_N, act)
    x_hat_BD = Decode.apply(f_N, W_dec_FD, act)
    # Σ_i norm_i · (Σ of latent i's codes): index_add_ sums in a fixed order, where the backward of
    # norms_F[act.cols] would scatter-add in a thread-dependent one
    l1_sum = f_N.new_zeros(F).index_add_(0, act.cols, f_N) @ norms_F
    # an entry may be held for its gradient alone (JumpReLU's band below θ, f = 0 there)
    cols_on = act.cols if f_N is z_N else act.cols[f_N.detach() > 0]
    fired_F = torch.zeros(F, dtype=torch.bool, device=x_BD.device).index_fill_(0, cols_on, True)

    def decode_cols(lo, hi):
        keep = (act.cols >= lo) & (act.cols < hi)
        sub = ActiveSet(act.flat[keep], act.B, act.F, f_N.dtype)
        return Decode.apply(f_N[keep], W_dec_FD, sub)

    return cc.Terms(x_hat_BD=x_hat_BD, l1_sum=l1_sum.float() if l1_sum.dtype != torch.float64 else l1_sum,
                    fired_F=fired_F, n_active=len(cols_on), info=info, pre_BF=pre_BF,
                    values_at=lambda a: PreAt.apply(x_BD, W_enc_FD, b_enc_F, pre_BF, a),
                    score_sum=lambda fn: fn(f_N * TakeAt.apply(norms_F, act.cols)).sum(),
                    decode_cols=decode_cols)
