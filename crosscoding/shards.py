"""shards.py — revision-parallel training: the crosscoder split along its revision axis over ranks.

The crosscoder splits naturally along the checkpoint axis: its encoder is a sum over revisions of
per-revision encoders, and each revision's decoder reconstructs only that revision. So shard r of R holds
revisions [r·M/R, (r+1)·M/R): their LMs (a live buffer) or cache columns, their slices W_enc[m],
W_dec[:, m], b_dec[m], and those slices' Adam moments. One step, on the same global batch on every shard:

    p_r   = Σ_{m∈r} x_m W_enc[m]                 this shard's partial pre-activations [B, F]
    pre   = Σ_r p_r + b_enc                      one all-reduce (SumOverShards)
    n_i   = Σ_r Σ_{m∈r} ‖W_dec[i, m]‖            one all-reduce of [F]
    f     = the variant's code of (pre, n)       the same numbers on every shard
    x̂_m  = f W_dec[:, m] + b_dec[m],  m ∈ r     each shard decodes its own revisions
    L_r   = Σ_{m∈r} ‖x̂_m − x_m‖² / B + S(f, n) / R
    L     = Σ_r L_r                              the one-process loss (S: the variant's sparsity term)

Backward through an all-reduce is an all-reduce of the gradients (SumOverShards.backward): every slice
gets ∂L/∂slice. A parameter every shard holds whole (b_enc, JumpReLU's thresholds) gets ∂L_r/∂θ on shard
r; one more all-reduce sums them (sum_whole_grads). Adam is elementwise, so each shard stepping its own
slices takes the one-process step; the grad-norm clip sums squared norms over the shards (grad_norm).
ShardedCrossCoder is that crosscoder: CrossCoder with the sums above (pre-activations, norms, AuxK's sums
over revisions), the sparsity term's share and the gradients' completion overridden; train.py builds it for
--revision-shards R > 1. It takes the dense terms (crosscoder.CrossCoder.terms), never sparse.py's fast path.

With D data replicas (the 2-D grid R × D, world rank = replica·R + shard), each replica reads its share
of the batch; gradients are then averaged over the replicas of a shard (as DDP would), BatchTopK selects
over the replicas' global batch, and the dead-latent counters and θ are synced over them.

A tensor's revision axis is the position of M in its shape suffix (W_enc_FMd: 1, b_dec_Md: 0,
scales_M: 0); a tensor without one is whole on every shard.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from crosscoding.common import UsageError
from crosscoding.crosscoder import CrossCoder, clip_grad_norm


@dataclass
class Grid:
    """R revision shards × D data replicas; world rank = replica · R + shard."""
    shards: int = 1
    replicas: int = 1
    rank: int = 0
    shard_group: object = None    # the R ranks of this replica (all-reduces over revisions)
    data_group: object = None     # the D ranks of this shard (gradient averaging, BatchTopK's global batch)

    @property
    def shard(self) -> int:
        return self.rank % self.shards

    @property
    def replica(self) -> int:
        return self.rank // self.shards

    def revisions(self, M) -> range:
        """This shard's revisions: a contiguous slice of M / R."""
        per = M // self.shards
        return range(self.shard * per, (self.shard + 1) * per)


def make_grid(shards, world, rank, M) -> Grid:
    """The grid of `world` ranks with `shards` revision shards, and its process groups (every rank creates
    every group, in the same order, as torch.distributed requires)."""
    if shards < 1 or world % shards:
        raise UsageError(f"--revision-shards {shards} does not divide the {world} processes; valid: "
                         f"{', '.join(str(r) for r in range(1, world + 1) if world % r == 0)}")
    if M % shards:
        raise UsageError(f"--revision-shards {shards} does not divide the {M} revisions; valid: "
                         f"{', '.join(str(r) for r in range(1, M + 1) if M % r == 0 and world % r == 0)}")
    grid = Grid(shards, world // shards, rank)
    if world == 1:
        return grid
    for rep in range(grid.replicas):
        g = dist.new_group([rep * shards + s for s in range(shards)])
        if rep == grid.replica:
            grid.shard_group = g
    for s in range(shards):
        g = dist.new_group([rep * shards + s for rep in range(grid.replicas)])
        if s == grid.shard:
            grid.data_group = g
    return grid


class SumOverShards(torch.autograd.Function):
    """y = Σ_shards x (an all-reduce). Each shard's loss uses y; the total loss is the sum of the shards'
    losses, so ∂L/∂x on every shard is Σ_shards ∂L_r/∂y: the backward is the same all-reduce."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class ShardedCrossCoder(CrossCoder):
    """One revision shard's crosscoder: its revisions' slices (grid.revisions), every sum over revisions
    summed over the shards, so its code is the one-process code and Σ_shards of its losses the one-process loss."""

    def __init__(self, cfg, grid: Grid, init: bool = True):
        super().__init__(cfg, init, revisions=grid.revisions(cfg.n_models))
        self.grid = grid
        self.fast = None    # the shards' sums are in the dense terms only

    def over_revisions(self, t):
        return SumOverShards.apply(t, self.grid.shard_group)

    def pre_acts(self, x_BMd):
        W_FD = self.W_enc_FMd.view(self.cfg.dict_size, -1)
        return self.over_revisions(x_BMd.reshape(x_BMd.shape[0], -1) @ W_FD.t()) + self.b_enc_F

    def sparsity(self, x_BMd, x_hat_BMd, t, step, out):
        # every shard computes the sparsity term whole (from the summed code and norms): its share of it
        return super().sparsity(x_BMd, x_hat_BMd, t, step, out) / self.grid.shards

    def clip_grads(self, max_norm):
        """Whole parameters' gradients summed over the shards, every gradient averaged over the replicas, then
        the clip by the norm over the whole crosscoder."""
        sum_whole_grads(self, self.grid)
        average_over_replicas(self, self.grid)
        clip_grad_norm(self.parameters(), max_norm, grad_norm(self, self.grid))

    def fold_scales(self, scales_M):
        """CrossCoder.fold_scales, the copy on the same grid (its process groups cannot be copied)."""
        grid, self.grid = self.grid, None
        try:
            new = super().fold_scales(scales_M)
        finally:
            self.grid = grid
        new.grid = grid
        return new


def revision_axis(name: str) -> int | None:
    """The revision axis of a crosscoder tensor from its shape suffix (W_dec_FMd → 1); None: whole."""
    suffix = name.rsplit("_", 1)[-1] if "_" in name else ""
    return suffix.index("M") if "M" in suffix else None


def take(state: dict, revs: range) -> dict:
    """The slice of a whole crosscoder's state that a shard holding `revs` keeps."""
    return {k: (v if (a := revision_axis(k)) is None else v.narrow(a, revs.start, len(revs)).clone())
            for k, v in state.items()}


def whole_params(cc) -> list:
    """The parameters every shard holds whole (no revision axis)."""
    return [p for n, p in cc.named_parameters() if revision_axis(n) is None]


@torch.no_grad()
def sum_whole_grads(cc, grid):
    """A whole parameter's gradient on shard r is ∂L_r/∂θ: the sum over shards is ∂L/∂θ."""
    if grid.shards > 1:
        _all_reduce_grads([p.grad for p in whole_params(cc) if p.grad is not None], grid.shard_group)


@torch.no_grad()
def average_over_replicas(cc, grid):
    """Data parallelism over the D replicas of a shard: every gradient averaged, as DDP does."""
    if grid.replicas > 1:
        _all_reduce_grads([p.grad for p in cc.parameters() if p.grad is not None], grid.data_group, grid.replicas)


def _all_reduce_grads(grads, group, divisor=1):
    """Sum `grads` over `group` in one all-reduce of their concatenation (then / divisor), in place."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    if divisor != 1:
        flat /= divisor
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


@torch.no_grad()
def grad_norm(cc, grid) -> torch.Tensor:
    """‖∇L‖ over the whole crosscoder: the slices' squared norms summed over shards, the whole parameters'
    counted once."""
    def sq(ps):
        gs = [p.grad for p in ps if p.grad is not None]
        return torch.stack([g.float().pow(2).sum() for g in gs]).sum() if gs else torch.zeros(())
    whole = {id(p) for p in whole_params(cc)}
    sliced = sq([p for p in cc.parameters() if id(p) not in whole])
    if grid.shards > 1:
        dist.all_reduce(sliced, group=grid.shard_group)
    return (sliced + sq([p for p in cc.parameters() if id(p) in whole])).sqrt()


def gather_state(cc, grid) -> dict | None:
    """The whole crosscoder's state, assembled from the shards on rank 0 (of replica 0), on the CPU; None on
    the other ranks. Slices are equal in size (R divides M), so one all_gather per tensor."""
    out = {}
    for k, v in cc.state_dict().items():
        a = revision_axis(k)
        if a is None or grid.shards == 1:
            out[k] = v.detach().cpu()
            continue
        parts = [torch.empty_like(v) for _ in range(grid.shards)]
        dist.all_gather(parts, v.detach().contiguous(), group=grid.shard_group)
        out[k] = torch.cat([p.cpu() for p in parts], a)
    return out if grid.rank == 0 else None


def per_rank_elements(cc, opt) -> tuple:
    """(parameter elements, optimizer-state elements) this rank holds: what the split buys."""
    n_par = sum(p.numel() for p in cc.parameters())
    n_opt = sum(t.numel() for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    return n_par, n_opt

