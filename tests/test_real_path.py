"""The path users run, end to end, as subprocesses: a Hugging Face cache of three `pythia-1b` revisions
(tiny GPT-NeoX models under the real repo name, a GPT-NeoX-style tokenizer that adds no BOS),
offline, the live buffer over a local text file, then evaluate → relie → ablate; and the paper's
shapes with random weights (`--weights random`). Slow: whole stages in real processes."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, tiny_model

pytestmark = pytest.mark.slow

REVS = ["step512", "step2000", "step143000"]
WORDS = [f"w{i}" for i in range(100)]


def neox_tokenizer():
    """Word-level, with GPT-NeoX's specials: BOS = EOS = <|endoftext|>, and no BOS added on a plain call."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<|padding|>", "<unk>"] + WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<|padding|>")


def fake_hub(cache, repo, revisions, tok):
    base = cache / f"models--{repo.replace('/', '--')}"
    for i, rev in enumerate(revisions):
        commit = f"{i:040x}"
        tiny_model("gpt_neox", seed=i).save_pretrained(base / "snapshots" / commit)
        tok.save_pretrained(base / "snapshots" / commit)
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / rev).write_text(commit)


def sh(args, cwd, env, timeout=900):
    r = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"{args[0]} failed:\n{r.stderr[-3000:]}"
    return r


def test_hub_path_offline_end_to_end(tmp_path):
    tok = neox_tokenizer()
    assert tok("w5")["input_ids"] == [tok.convert_tokens_to_ids("w5")]          # no BOS from the tokenizer
    fake_hub(tmp_path / "hub", "EleutherAI/pythia-1b", REVS, tok)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"),
               OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    rng = np.random.default_rng(0)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS, rng.integers(5, 30))) for _ in range(3000)))
    pairs = tmp_path / "pairs.jsonl"
    rows = [dict(prefix=f"w{i}", good=" w1", bad=" w2", subtask="one_word") for i in range(10, 30)]
    rows += [dict(prefix=f"w{i} w{i + 1} w{i + 2}", good=" w3", bad=" w4", subtask="three_words")
             for i in range(30, 50)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "runs" / "p1b"
    sh(["train.py", "--model", "pythia-1b", "--layer", "1", "--text", str(text), "--seq-len", "16",
        "--heldout-tokens", "3000", "--dict-size", "64", "--batch-size", "64", "--tokens", str(64 * 80),
        "--buffer-tokens", "1024", "--device", "cpu", "--out", str(run)], tmp_path, env)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["revisions"] == REVS and cfg["data"]["cache"] is None and cfg["data"]["buffer_windows"] == 4
    sh(["evaluate.py", "--run", str(run), "--blocks", "8"], tmp_path, env)
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["revisions"]) == set(REVS)
    sh(["relie.py", "--run", str(run), "--task", str(pairs), "--threshold", "0", "--context-blocks", "2"],
       tmp_path, env)
    err = pd.read_csv(run / "relie" / "pairs" / "error.csv")
    one = err[err.subtask == "one_word"].set_index("revision")
    assert list(one.n_pairs) == [10, 10, 10]          # the selection half of the 20 (each prefix its own group)
    # a one-word prefix is [BOS, word]: the word is spliced, so latents and the error term carry IE everywhere
    assert (one.ie_latents_abs > 0).all() and (one.ie_error.abs() > 0).all(), one
    sh(["ablate.py", "--run", str(run), "--task", str(pairs), "--draws", "2"], tmp_path, env)
    abl = pd.read_csv(run / "ablation" / "pairs" / "ablation.csv")
    top = abl[(abl.kind == "top") & (abl.subtask == "one_word") & (abl.selected_at == abl.revision)]
    assert len(top) == 3 and (top.delta.abs() > 0).all(), top


def test_random_weights_at_a_paper_shape_end_to_end(tmp_path):
    """pythia-70m's real shapes (6 layers, d = 512, vocabulary 50,304) with random weights, offline, through
    every stage at small sizes."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    run = tmp_path / "runs" / "p70m"
    sh(["train.py", "--model", "pythia-70m", "--weights", "random", "--tokens", "4096", "--batch-size", "1024",
        "--dict-size", "1024", "--seq-len", "64", "--heldout-tokens", "4096", "--device", "cpu", "--out", str(run)],
       tmp_path, env)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["d_model"] == 512 and cfg["layer"] == 3 and cfg["data"]["weights"] == "random"
    sh(["evaluate.py", "--run", str(run), "--blocks", "2"], tmp_path, env)
    sh(["relie.py", "--run", str(run), "--max-pairs", "4", "--context-blocks", "2", "--threshold", "0"], tmp_path, env)
    assert (run / "relie" / "toy_sva" / "DONE").exists()
    sh(["ablate.py", "--run", str(run), "--max-pairs", "4", "--draws", "1"], tmp_path, env)
    assert (run / "ablation" / "toy_sva" / "DONE").exists()


def test_normalised_relie_has_one_definition(toy_run):
    """relie.py's normalised RelIE (its latents.csv) and ablate.py's (from ie.csv) are one computation:
    measures.normalise of the mean IE over the same pairs."""
    import ablate
    from crosscoding import measures
    _, run = toy_run
    revs = json.loads((run / "config.json").read_text())["revisions"]
    relie_dir = run / "relie" / "toy_sva"
    sheet = pd.read_csv(relie_dir / "latents.csv")
    _, nie = ablate.selection_ie(relie_dir, revs, None)
    ours = measures.rel(nie.reindex(sheet.latent, fill_value=0.0).to_numpy())
    np.testing.assert_allclose(sheet[[f"relie_norm_{r}" for r in revs]].to_numpy(), ours, rtol=1e-5, atol=1e-6)


def test_relie_reports_its_faithfulness_and_intervals(toy_run):
    """relie.py's summary.json holds `faithfulness` (Spearman ρ of the IE with exact ablation of the chosen
    latents, and the flagged ones); its sheet holds the per-revision checks and the bootstrap intervals."""
    _, run = toy_run
    summary = json.loads((run / "relie" / "toy_sva" / "summary.json").read_text())
    faith = summary["faithfulness"]
    assert -1 <= faith["rho"] <= 1 and set(faith["rho_by_revision"]) == set(summary["revisions"])
    assert faith["n"] == len(summary["chosen"]) * len(summary["revisions"]) and 0 <= faith["n_flagged"] <= faith["n"]
    sheet = pd.read_csv(run / "relie" / "toy_sva" / "latents.csv")
    for r in summary["revisions"]:
        assert {f"exact_{r}", f"atp_{r}", f"unfaithful_{r}", f"ie_{r}_lo", f"ie_{r}_hi"} <= set(sheet.columns)
        assert (sheet[f"ie_{r}_lo"] <= sheet[f"ie_{r}"] + 1e-9).all()
        assert (sheet[f"ie_{r}"] <= sheet[f"ie_{r}_hi"] + 1e-9).all()
    assert sheet.loc[sheet[[f"unfaithful_{r}" for r in summary["revisions"]]].any(axis=1), "latent"].isin(
        [f["latent"] for f in faith["flagged"]]).all()
    sp = pd.read_csv(run / "ablation" / "toy_sva" / "consistency.csv")
    assert {"rho_relie_lo", "rho_relie_hi", "rho_diff_membership", "rho_diff_membership_lo",
            "rho_diff_membership_hi", "verdict"} <= set(sp.columns)
    ab = pd.read_csv(run / "ablation" / "toy_sva" / "ablation.csv")
    assert (ab.acc_drop_lo <= ab.acc_drop + 1e-9).all() and (ab.acc_drop <= ab.acc_drop_hi + 1e-9).all()
