"""Checks that can fail: the selection / test split of the minimal pairs (near-copies on one side, ablations
on pairs the latents were not selected on), the single-latent consistency check known for what it is (1 by
construction with exact ablation on the same pairs), classes that carry the sign of the IE, and a decoder
that carries nothing of the task read as such."""
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import relie
from conftest import run_script
from crosscoding import measures, tasks
from crosscoding.crosscoder import CrossCoder, CrossCoderConfig


def test_split_keeps_near_copies_on_one_side():
    """Pairs with a repeated prefix, or the same (head noun, attractor) under other words, never straddle."""
    pairs = []
    for i in range(40):
        head, attr = ["key", "boy", "dog", "cat", "girl"][i % 5], ["cabinets", "tables", "men"][i % 3]
        pairs.append(tasks.Pair(f"the {head} near the {attr}", " is", " are", "across_pp"))          # repeats
        pairs.append(tasks.Pair(f"the {head} with the old {attr}", " is", " are", "across_pp"))      # same key
        pairs.append(tasks.Pair(f"the {head}{i}", " runs", " run", "simple"))                        # unique
    sel, test, groups = tasks.split_pairs(pairs, 0.5, seed=3)
    assert set(sel) | set(test) == set(range(len(pairs))) and not set(sel) & set(test)
    assert not {groups[i] for i in sel} & {groups[i] for i in test}
    by_key = {}
    for i, p in enumerate(pairs):
        for key in tasks.pair_keys(p):
            by_key.setdefault(key, set()).add(i in test)
    assert all(len(sides) == 1 for sides in by_key.values())
    # stratified: each sub-task about half held out; the simple pairs are singletons, so exactly half there
    n_simple = sum(p.subtask == "simple" for p in pairs)
    assert sum(pairs[i].subtask == "simple" for i in test) == n_simple // 2
    assert 0.3 < sum(pairs[i].subtask == "across_pp" for i in test) / (2 * 40) < 0.7
    # seeded: the same split again, another seed another split; --test-frac 0: every pair on both sides
    assert tasks.split_pairs(pairs, 0.5, seed=3)[1] == test and tasks.split_pairs(pairs, 0.5, seed=4)[1] != test
    everything = tasks.split_pairs(pairs, 0.0)
    assert everything[0] == everything[1] == list(range(len(pairs)))


def test_classes_carry_the_sign_of_the_ie():
    """Through relie's own latent sheet: a latent whose IE is negative where it matters most gets a − class,
    in the one-vs-all, 2-way and timeline classes; RelDec's classes stay unsigned (decoder norms have no sign)."""
    revs = ["a", "b", "c"]
    cc = CrossCoder(CrossCoderConfig(n_models=3, d_model=4, dict_size=3))
    run = SimpleNamespace(revisions=revs, revision_tokens=[None] * 3, cc=cc)
    ie_MF = torch.tensor([[0.01, 0.0, 0.2], [0.02, 0.01, 0.2], [0.9, -0.8, 0.21]])   # latent 1 hurts at c
    att = dict(ie=ie_MF[None], err=torch.zeros(1, 3), n=torch.ones(1), subtasks=["s"])
    sheet = relie.latent_sheet(run, att, [0, 1, 2], np.full((3, 3), 1 / 3), {}, {})
    assert sheet.relie_class.tolist() == ["+specific:c", "−specific:c", "+shared"]
    assert sheet["relie2_class_a_c"].tolist()[:2] == ["+emerging", "−emerging"]
    assert sheet.ie_timeline_class.tolist()[:2] == ["+emerging", "−emerging"]
    assert not any(c[0] in "+−" for c in sheet.reldec_class)
    assert measures.unsigned("−specific:c") == "specific:c"


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


@pytest.mark.slow
def test_coverage_is_low_for_a_decoder_that_carries_nothing(toy_pipeline, tmp_path):
    """The latents' coverage share on the toy's default run against two copies whose decoder carries nothing of
    the task: every row shrunk to 1% (the error term then holds the whole activation) and random unit directions
    with the rows' norms (control (c)). The exact share (all latents zeroed vs the error term zeroed) is ≤ 0.2 for
    both at the last revision, where the LM does the task, and ≥ 0.8 for the real run; the attribution's Σ|IE|
    share is ≤ 0.2 for the shrunk decoder but cannot tell random directions (their large IEs cancel), which is
    why the exact share is the headline."""
    from crosscoding import analysis
    from crosscoding.common import mark_done
    _, base = toy_pipeline

    def copy(out, decoder):                      # the run with its decoder replaced: a run folder the stages take
        cc = CrossCoder.load(base)
        with torch.no_grad():
            cc.W_dec_FMd.copy_(decoder(cc.W_dec_FMd.clone()))
        cc.save(out, extra=cc.extra)
        mark_done(out)
        return out

    def random_directions(W_FMd):                # random unit directions, each [i, m] row keeping its norm
        R = torch.randn(W_FMd.shape, generator=torch.Generator().manual_seed(0))
        return R / R.norm(dim=-1, keepdim=True) * W_FMd.norm(dim=-1, keepdim=True)
    copies = {"run": base, "tiny": copy(tmp_path / "tiny", lambda W: 0.01 * W),
              "random": copy(tmp_path / "random", random_directions)}
    shares = {}
    for name, folder in copies.items():
        run = analysis.open_run(folder)
        models = run.load_models()
        pairs = tasks.limit_pairs(tasks.load_task("toy_sva"), 40)
        batch = tasks.tokenize_pairs(pairs, models[0][2], "toy_sva")
        att = analysis.attribute(run, models, batch, "atp", 0.0, 32)
        ie_MF, err_M = relie.mean_ie(att)
        lat, err = analysis.exact_parts(run, models, batch, 32)
        shares[name] = relie.coverage(ie_MF, err_M, lat, err, run.revisions)
    last = base.name.split("-")[2].split("_")[-1]
    assert shares["run"][last]["latents_share"] >= 0.8
    assert shares["tiny"][last]["latents_share"] <= 0.2 and shares["random"][last]["latents_share"] <= 0.2
    assert all(c["latents_share_ie"] <= 0.2 for c in shares["tiny"].values())
