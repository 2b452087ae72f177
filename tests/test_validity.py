"""Checks that can fail: the selection / test split of the minimal pairs keeps near-copies on one side, and a
crosscoder whose decoder carries nothing of the task gets a low latent coverage share."""

import pytest
import torch

import relie
from crosscoding import tasks
from crosscoding.crosscoder import CrossCoder


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
