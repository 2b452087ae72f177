"""seeds.py: latents matched across seeds (one-to-one, decoder cosine ≥ 0.9), and the whole command on a
tiny run (two seeds, every stage as a subprocess) writing the JSON the findings are read from."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import seeds
from conftest import ROOT
from crosscoding import activations, matching, stages
from crosscoding.crosscoder import CrossCoder, CrossCoderConfig


def test_partners_maximise_the_total_cosine_one_to_one():
    """Hungarian, not greedy: greedy takes 0.97 first (row 1 → col 0) and leaves row 0 with 0.2 (total 1.17);
    the one-to-one optimum pairs row 0 → col 0 and row 1 → col 1 (total 1.91)."""
    dec_a = torch.eye(3)
    dec_b = torch.tensor([[0.95, 0.2, 0.0], [0.97, 0.96, 0.0], [0.1, 0.3, 1.0]]).T   # cos[i, j] = row i, column j
    p = matching.partners(dec_a, np.array([0, 1]), dec_b, np.array([0, 1, 2]))
    assert p == pytest.approx({0: 0.95, 1: 0.96})
    # more active latents in a than in b: the one left over gets −1
    assert sorted(matching.partners(dec_a, np.array([0, 1, 2]), dec_b, np.array([2])).values()) == [-1, -1, 1.0]


def test_a_seed_trained_for_other_arguments_is_stale():
    """When the run is trained again with another dictionary size, its old seed runs must not be reused."""
    run = dict(revisions=["a", "b"], dict_size=256, lr=2e-3, seed=0, out="runs/x")
    assert not stages.stale(dict(run, seed=3, out="runs/x/stability/l1-seed3"), run)
    assert stages.stale(dict(run, dict_size=512), run)
    assert stages.stale(dict(run, revisions=["a", "c"]), run)


def test_matched_fractions_and_their_null(tmp_path):
    """A crosscoder against a permuted copy of itself: every latent matched, its chosen ones and random ones alike
    (the null is then as high as the finding: the number says the dictionary is stable, not the latents); against
    a fresh random one: none, for both."""
    import pandas as pd
    cfg = CrossCoderConfig(n_models=2, d_model=16, dict_size=64)
    a = CrossCoder(cfg)
    b = CrossCoder(cfg)
    with torch.no_grad():
        b.W_dec_FMd.copy_(a.W_dec_FMd[torch.randperm(64, generator=torch.Generator().manual_seed(0))])
    c = CrossCoder(CrossCoderConfig(n_models=2, d_model=16, dict_size=64, seed=7))
    freq = np.linspace(0.01, 0.5, 64)
    for name, cc in (("a", a), ("b", b), ("c", c)):
        cc.save(tmp_path / name)
        pd.DataFrame(dict(latent=np.arange(64), freq=freq)).to_csv(tmp_path / name / "latents.csv", index=False)
    top, null = matching.matched_fractions([tmp_path / "a", tmp_path / "b"], [[0, 5, 9], [1, 2, 3]])
    assert top == [1.0, 1.0] and null == [1.0, 1.0]
    top, null = matching.matched_fractions([tmp_path / "a", tmp_path / "c"], [[0, 5, 9], [1, 2, 3]])
    assert top == [0.0, 0.0] and null == [0.0, 0.0]


@pytest.mark.slow
def test_seeds_on_a_tiny_run(local_model, tmp_path):
    root, text, pairs = local_model
    cache = activations.make_cache(str(root), 1, ["step0", "step100"], tmp_path / "cache", n_tokens=6000, seq_len=16,
                                   heldout_tokens=2000, text=str(text), val_rows=1000)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(root), "--layer", "1", "--revisions",
                        "step0,step100", "--cache", str(cache), "--dict-size", "64", "--batch-size", "64", "--tokens",
                        str(64 * 40), "--lr", "3e-3", "--out", str(run)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, str(ROOT / "seeds.py"), "--run", str(run), "--seeds", "2", "--task",
                        str(pairs), "--threshold", "0", "--split-seeds", "2"], env=env, capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((run / "stability" / "seeds.json").read_text())
    assert out["seeds"] == [0, 1] and set(out["methods"]) == {"atp", "ig"}   # the paper's IG always beside
    f = out["findings"]
    for name in ("fvu_step0", "fvu_step100", "l0", "dead_frac", "ablation_gap_last", "faithfulness_rho",
                 "rho_relie_step0_step100", "rho_reldec_step0_step100"):
        assert set(f[name]) == {"per_seed", "mean", "min", "max"} and len(f[name]["per_seed"]) == 2, name
    fvu = f["fvu_step0"]
    assert fvu["min"] <= fvu["mean"] <= fvu["max"] and fvu["per_seed"][0] != fvu["per_seed"][1]   # two crosscoders
    # seed 0 is the run itself; seed 1 was trained beside it with the same arguments but its seed
    assert out["runs"][0] == str(run) and json.loads((tmp_path / out["runs"][1] / "run_args.json").read_text()
                                                     )["seed"] == 1
    assert 0 <= out["matched_top_k_fraction"]["mean"] <= 1 and 0 <= out["matched_random_fraction"]["mean"] <= 1
    assert set(f["joint_measured_last"]) == {"per_seed", "mean", "min", "max"}
    assert "finding" in r.stdout and "ablation_gap_last" in r.stdout
    # the run's own crosscoder on a second split of the pairs: another held-out half, the same kind of findings
    split = out["split_seeds"]
    assert split["seeds"] == [0, 1] and len(split["findings"]["topk_holds_last"]["per_seed"]) == 2
    assert (run / "relie" / f"{pairs.stem}-atp-positive-split1" / "DONE").exists()
    s0 = json.loads((run / "relie" / f"{pairs.stem}-atp-positive" / "summary.json").read_text())["split"]
    s1 = json.loads((run / "relie" / f"{pairs.stem}-atp-positive-split1" / "summary.json").read_text())["split"]
    assert (s0["seed"], s1["seed"]) == (0, 1)
    assert set(f["topk_holds_last"]["per_seed"]) <= {0.0, 1.0}


def test_methods_side_by_side_in_the_tables():
    """--compare's table (stdout) and RESULTS.md section: one row per method with mean [min, max]; small
    values (FVUs) keep three decimals."""
    def finding(values):
        return dict(per_seed=values, mean=float(np.mean(values)), min=min(values), max=max(values))
    per_method = {m: dict(findings=dict(faithfulness_rho=finding([rho, rho + 0.1]),
                                        faithfulness_flagged_frac=finding([0.1, 0.2]),
                                        ablation_gap_last=finding([gap, gap + 2]),
                                        rho_relie_mean=finding([0.9, 0.95]), rho_reldec_mean=finding([0.7, 0.8])),
                          matched_top_k_fraction=finding([0.5, 1.0]), matched_random_fraction=finding([0.25, 0.5]))
                  for m, rho, gap in (("atp", 0.8, 20.0), ("ig", 0.3, 10.0))}
    result = dict(run="runs/x", arch="l1", seeds=[0, 1], revisions=["a", "b"], method="atp", select="positive",
                  findings=dict(per_method["atp"]["findings"], fvu_a=finding([0.021, 0.025])),
                  matched_top_k_fraction=per_method["atp"]["matched_top_k_fraction"],
                  matched_random_fraction=per_method["atp"]["matched_random_fraction"], methods=per_method)
    table = seeds.methods_table(result).splitlines()
    assert table[1].split() == ["atp", "0.85", "[0.80,", "0.90]", "0.15", "[0.10,", "0.20]", "21.00", "[20.00,",
                                "22.00]", "0.75", "[0.50,", "1.00]"]
    assert table[2].split()[:4] == ["ig", "0.35", "[0.30,", "0.40]"]
    md = seeds.results_markdown(result, "python seeds.py --compare ig")
    assert "(`python seeds.py --compare ig`)" in md
    assert "| fvu_a | 0.023 [0.021, 0.025] | 0.021 0.025 |" in md
    assert ("| ig | 0.35 [0.30, 0.40] | 0.15 [0.10, 0.20] | 11.00 [10.00, 12.00] | 0.93 [0.90, 0.95] | "
            "0.75 [0.70, 0.80] | 0.75 [0.50, 1.00] | 0.38 [0.25, 0.50] |") in md
    assert "| the same for random active latents of matched frequency (null) | 0.38 [0.25, 0.50] | |" in md
