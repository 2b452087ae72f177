"""ablate.py: it measures on the pairs relie.py held out only; its verdict, leave-one-out, class and
consistency tables agree with its own ablations; the consistency check with exact ablation on the same pairs is
1 by construction (what that table can and cannot say)."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import run_script
from crosscoding import measures


@pytest.mark.slow
def test_ablation_never_sees_a_selection_pair(toy_run):
    """relie.py attributes and selects on the selection half only; ablate.py measures on the test half only."""
    _, run = toy_run
    split = pd.read_csv(run / "relie" / "toy_sva" / "split.csv")
    summary = json.loads((run / "relie" / "toy_sva" / "summary.json").read_text())
    used = json.loads((run / "ablation" / "toy_sva" / "DONE").read_text())["test_rows"]
    selection = set(split.row[split.side == "selection"])
    assert summary["n_pairs"] == len(selection) == summary["split"]["n_selection"] > 0
    assert used and not selection & set(used)
    assert set(used) == set(split.row[split.side == "test"])
    groups = split.groupby("group").side.nunique()
    assert (groups == 1).all()


@pytest.mark.slow
def test_consistency_with_exact_ablation_is_one_by_construction(toy_run, tmp_path):
    """With --method exact and no split, RelIE is computed from the very single-latent ablations it is then
    correlated with: ρ = 1 on every pair of revisions, so that table checks the attribution, not the model."""
    cwd, run = toy_run
    run_script(["relie.py", "--run", str(run), "--method", "exact", "--test-frac", "0", "--max-pairs", "6",
                "--context-blocks", "2", "--name", "exact"], cwd)
    run_script(["ablate.py", "--run", str(run), "--name", "exact", "--draws", "1"], cwd)
    sp = pd.read_csv(run / "ablation" / "exact" / "consistency.csv")
    assert len(sp) == 3
    np.testing.assert_allclose(sp.rho_relie, 1.0, atol=1e-9)


@pytest.mark.slow
def test_ablation_tables_agree_with_their_own_ablations(toy_run):
    """ablate.py's verdicts, leave-one-out, class and consistency tables recomputed from its own ablation.csv and
    ratios.csv: the excess is top minus the mean of the random draws; a latent's carried Δ is the set's minus the
    set-without-it's; the membership ρ is the rank correlation with where each latent was chosen."""
    _, run = toy_run
    out = run / "ablation" / "toy_sva"
    abl = pd.read_csv(out / "ablation.csv")
    abl = abl[abl.subtask == "all"]
    ver = pd.read_csv(out / "verdicts.csv")
    summary = json.loads((out / "summary.json").read_text())
    for v in ver.itertuples():
        mine = abl[(abl.selected_at == v.revision) & (abl.revision == v.revision)]
        top, rnd = mine[mine.kind == "top"], mine[mine.kind == "random"]
        assert v.excess_points == pytest.approx(100 * (top.acc_drop.item() - rnd.acc_drop.mean()), abs=1e-6)
        assert v.excess_delta == pytest.approx(top.delta.item() - rnd.delta.mean(), abs=1e-6)
        assert v.excess_points_lo <= v.excess_points <= v.excess_points_hi
        assert v.verdict in ("holds", "fails") and v.flag == ("ceiling" if v.acc_clean >= 0.95 else "chance"
                                                              if v.acc_clean <= 0.65 else "")
    loo = pd.read_csv(out / "loo.csv")
    for r in loo.itertuples():
        without = abl[(abl.kind == "without") & (abl.selected_at == r.selected_at) & (abl.draw == r.latent)
                      & (abl.revision == r.revision)]
        top = abl[(abl.kind == "top") & (abl.selected_at == r.selected_at) & (abl.revision == r.revision)]
        assert r.carried_delta == pytest.approx(top.delta.item() - without.delta.item(), abs=1e-6)
        assert str(r.latent) not in without.latents.item().split()
    union = {i for s in summary["sets"].values() for i in s}
    assert {i for c in summary["classes"].values() for i in c} == union
    ratios = pd.read_csv(out / "ratios.csv")
    sp = pd.read_csv(out / "consistency.csv")
    for row in sp.itertuples():
        g = ratios[(ratios.A == row.A) & (ratios.B == row.B)]
        sets = summary["sets"]
        want = [1.0 if i not in sets[row.A] else 0.0 if i not in sets[row.B] else 0.5 for i in g.latent]
        assert g.membership.tolist() == want
        assert row.rho_membership == pytest.approx(measures.spearman(g.ratio, g.membership), abs=1e-6) or (
            np.isnan(row.rho_membership))
    assert summary["ie_threshold"] == json.loads((run / "relie" / "toy_sva" / "summary.json").read_text())["threshold"]
