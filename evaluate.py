"""evaluate.py — how good is the crosscoder, per checkpoint and per latent?

    python evaluate.py --run runs/toy-L0-step64_step128_step512-l1

On held-out token blocks, per revision: FVU, L0, dead latents, next-token CE clean / with the layer
output spliced by its reconstruction / with it zeroed, ΔCE and CE recovered. Per latent: activation
frequency, decoder norm per revision, RelDec and its class, decoder cosines between revisions, and
latent scaling (Minder et al. 2025): the least-squares β with which f_i·d_i explains each revision's
activation (ν_act) and its reconstruction error with the latent's own part added back (ν_err), as a
ratio to the revision the latent's decoder favours. A latent RelDec calls specific to one revision
whose ν_err on another revision exceeds 0.5 is flagged as a likely L1 artifact: that revision does
carry the direction where the latent fires, its decoder norm just shrank there.

Writes runs/<name>/eval.json and runs/<name>/latents.csv, and prints a table.
"""

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from crosscoding import analysis, cli, defaults, lm, measures
from crosscoding.common import atomic_path, positive, run_main, write_json

ARTIFACT_NU = 0.5    # ν above this on a revision the decoder says the latent is absent from
CE_KINDS = ("clean", "spliced", "zero")


@torch.no_grad()
def evaluate(run, n_blocks, batch_blocks=8, dtype=None):
    cc, revs, M = run.cc, run.revisions, len(run.revisions)
    models = run.load_models(dtype)
    ids = run.heldout_blocks(n_blocks, models[-1][2])
    Fdim, d = cc.cfg.dict_size, cc.cfg.d_model
    s_M = cc.scales_M.float()                         # normalised space: s_m · x_m
    dec_FMd = cc.decoder()                            # decoder in the normalised space
    n, zeros = 0, lambda *shape: torch.zeros(*shape, device=run.device)   # sums stay on the device
    sum_x, sum_x2, sum_err = zeros(M, d), zeros(M), zeros(M)
    l0_sum, freq_F, sq_F = torch.zeros((), dtype=torch.long, device=run.device), zeros(Fdim), zeros(Fdim)
    G_MFd, E_MFd = zeros(M, Fdim, d), zeros(M, Fdim, d)   # Σ_t f_i x_m, Σ_t f_i ε_m
    ce = {k: zeros(M) for k in CE_KINDS}
    n_pred = 0
    for b0 in tqdm(range(0, len(ids), batch_blocks), desc="evaluate", unit="batch"):
        ids_BT = ids[b0:b0 + batch_blocks].to(run.device)
        B, T = ids_BT.shape
        targets_BT = ids_BT[:, 2:]   # next-token predictions from positions 1 … T−2 (position 0 is BOS)
        own = [lm.run_to_layer(model, run.layer, ids_BT) for _, model, _ in models]   # blocks 0..L only
        x_BTMd = torch.stack([x.float() for x in own], 2)
        x_RMd = x_BTMd[:, 1:].reshape(-1, M, d)      # R = B·(T−1) token rows: position 0 excluded
        x_hat_RMd, f_RF = cc(x_RMd)
        err_RMd = x_RMd - x_hat_RMd
        n += len(x_RMd)
        sum_x += x_RMd.sum(0)
        sum_x2 += x_RMd.pow(2).sum((0, 2))
        sum_err += err_RMd.pow(2).sum((0, 2))
        l0_sum += (f_RF > 0).sum()
        freq_F += (f_RF > 0).sum(0)
        sq_F += f_RF.pow(2).sum(0)
        G_MFd += torch.einsum("rf,rmd->mfd", f_RF, x_RMd * s_M[:, None])
        E_MFd += torch.einsum("rf,rmd->mfd", f_RF, err_RMd * s_M[:, None])
        # CE with block L's output as it is, spliced by its reconstruction, and zero-ablated (position 0 kept):
        # the three stacked along the batch through the blocks above L, one forward per revision
        for m, (_, model, _) in enumerate(models):
            recon_BTd = torch.cat([x_BTMd[:, :1, m], x_hat_RMd[:, m].view(B, T - 1, d)], 1)
            new_BTd = torch.cat([x_BTMd[:, :, m], recon_BTd, torch.zeros_like(recon_BTd)])
            out = analysis.spliced_forward(model.base_model, run.layer, ids_BT.repeat(3, 1), None,
                                           own[m].repeat(3, 1, 1), new_BTd)
            for k, h_BTd in zip(CE_KINDS, out.last_hidden_state.chunk(3)):
                ce[k][m] += lm.next_token_ce(model, h_BTd[:, 1:-1], targets_BT)
        n_pred += targets_BT.numel()
    ce = {k: v.tolist() for k, v in ce.items()}
    mean_x = sum_x / n
    var_M = sum_x2 - n * mean_x.pow(2).sum(-1)
    fvu = (sum_err / var_M).tolist()
    per_rev = {}
    for m, r in enumerate(revs):
        c, s, z = (ce[k][m] / n_pred for k in CE_KINDS)
        per_rev[r] = dict(fvu=fvu[m], ce_clean=c, ce_spliced=s, ce_zero=z, delta_ce=s - c,
                          ce_recovered=1 - (s - c) / (z - c) if z != c else float("nan"))
    summary = dict(revisions=per_rev, l0=l0_sum.item() / n, dead_frac=(freq_F == 0).float().mean().item(),
                   n_tokens=n, n_blocks=len(ids), dict_size=Fdim)
    latents = latent_table(cc, revs, *(t.cpu() for t in (freq_F / n, dec_FMd, G_MFd, E_MFd, sq_F)),
                           tokens=run.revision_tokens)
    return summary, latents


def latent_table(cc, revs, freq_F, dec_FMd, G_MFd, E_MFd, sq_F, tokens=None) -> pd.DataFrame:
    M = len(revs)
    norms_FM = dec_FMd.norm(dim=-1)
    rd = analysis.reldec(cc)
    df = pd.DataFrame({"latent": np.arange(cc.cfg.dict_size), "freq": freq_F.numpy()})
    for m, r in enumerate(revs):
        df[f"dec_norm_{r}"] = norms_FM[:, m].numpy()
    measures.add_shares(df, "reldec", rd, revs)
    df = pd.concat([df, measures.timeline(norms_FM.numpy(), revs, tokens)], axis=1)   # over decoder norms
    unit = F.normalize(dec_FMd, dim=-1)
    for a, b in measures.pairs_of(revs):
        df[f"cos_{revs[a]}_{revs[b]}"] = (unit[:, a] * unit[:, b]).sum(-1).numpy()
    # latent scaling with the favoured revision's decoder direction u = d_{i,m*}
    top_F = torch.from_numpy(rd.argmax(1))
    u_Fd = dec_FMd[torch.arange(len(top_F)), top_F]
    uu_F = u_Fd.pow(2).sum(-1)
    safe = torch.where(sq_F > 0, sq_F, torch.ones_like(sq_F))
    beta_act = torch.stack([(G_MFd[m] * u_Fd).sum(-1) for m in range(M)], 1) / (uu_F * safe)[:, None]
    own_MF = torch.stack([(dec_FMd[:, m] * u_Fd).sum(-1) for m in range(M)])
    beta_err = torch.stack([(E_MFd[m] * u_Fd).sum(-1) + sq_F * own_MF[m] for m in range(M)], 1) / (uu_F * safe)[:, None]
    for name, beta in (("nu_act", beta_act), ("nu_err", beta_err)):
        ref = beta[torch.arange(len(top_F)), top_F][:, None]
        nu = torch.where(ref.abs() > 0, beta / torch.where(ref.abs() > 0, ref, torch.ones_like(ref)),
                         torch.zeros_like(beta))
        nu[sq_F == 0] = float("nan")
        for m, r in enumerate(revs):
            df[f"{name}_{r}"] = nu[:, m].numpy()
    # The flag reads ν_err (Minder et al.'s "complete shrinkage"): the other revision's activation,
    # less everything the rest of the dictionary explains, still holds the direction. ν_act is kept
    # as context only: it is inflated by every feature correlated with the direction.
    others = nu.clone()
    others[torch.arange(len(top_F)), top_F] = -np.inf
    flag = (others.nan_to_num(-np.inf).max(1).values > ARTIFACT_NU).numpy()
    df["artifact"] = flag & df["reldec_class"].str.startswith("specific").to_numpy()
    return df


def print_table(summary):
    rows = [dict(revision=r, **{k: round(v, 4) for k, v in s.items()}) for r, s in summary["revisions"].items()]
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"L0 {summary['l0']:.1f}   dead {100 * summary['dead_frac']:.1f}%   "
          f"({summary['n_tokens']} held-out tokens)")


def main(argv=None):
    run_dir, spec = cli.run_in(argv)
    p = cli.parser(__doc__.split("\n\n")[0], spec.preset)
    cli.add(p, "--run", "--device", "--model-dtype", run=str(run_dir), device=defaults.default_device())
    p.add_argument("--blocks", type=positive("--blocks"), default=spec.preset.eval_blocks,
                   help="held-out text blocks to evaluate on (default: %(default)s)")
    args = p.parse_args(argv)
    run = analysis.open_run(args.run, args.device)
    summary, latents = evaluate(run, args.blocks, dtype=cli.dtype(args.model_dtype, args.device))
    n_art = int(latents["artifact"].sum())
    summary["artifacts"] = n_art
    write_json(run.folder / "eval.json", summary)
    with atomic_path(run.folder / "latents.csv") as tmp:
        latents.to_csv(tmp, index=False)
    print_table(summary)
    warning = measures.fvu_warning({r: s["fvu"] for r, s in summary["revisions"].items()}, "held-out FVU")
    if warning:
        print(warning)
    print(f"classes by RelDec: {latents['reldec_class'].value_counts().to_dict()}; "
          f"{n_art} flagged as likely L1 artifacts (latent scaling)")
    print(f"wrote {run.folder / 'eval.json'} and {run.folder / 'latents.csv'}")


if __name__ == "__main__":
    run_main(main)
