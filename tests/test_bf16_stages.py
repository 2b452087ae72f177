"""The analysis stages with their language models in bf16, as they load them on a GPU (Run.load_models: bf16 on
a GPU, fp32 on a CPU), run here on the CPU so a dtype mismatch shows before the GPU box: evaluate, relie and
ablate go through, and evaluate's numbers stay within bf16's reach of the fp32 ones."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


@pytest.mark.slow
def test_analysis_stages_with_bf16_language_models(local_model, small_cache, tmp_path, monkeypatch):
    import ablate
    import evaluate
    import relie
    from crosscoding import analysis, cli
    root, _, pairs = local_model
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(root), "--layer", "1", "--revisions",
                        "step0,step100", "--cache", str(small_cache), "--dict-size", "64", "--batch-size", "64",
                        "--tokens", str(64 * 30), "--lr", "3e-3", "--out", str(run)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    fp32, _ = evaluate.evaluate(analysis.open_run(run), n_blocks=8, batch_blocks=4)
    monkeypatch.setattr(cli, "dtype", lambda name, device: torch.bfloat16)      # what a GPU gets by default
    assert {m.dtype for _, m, _ in analysis.open_run(run).load_models()} == {torch.bfloat16}
    evaluate.main(["--run", str(run), "--blocks", "8", "--device", "cpu"])
    relie.main(["--run", str(run), "--task", str(pairs), "--threshold", "0", "--context-blocks", "2",
                "--device", "cpu"])
    ablate.main(["--run", str(run), "--task", str(pairs), "--draws", "1", "--device", "cpu"])
    bf16 = json.loads((run / "eval.json").read_text())
    assert (run / "relie" / "pairs" / "DONE").exists() and (run / "ablation" / "pairs" / "DONE").exists()
    for rev, s in bf16["revisions"].items():
        for k in ("ce_clean", "ce_spliced", "ce_zero", "fvu"):
            assert s[k] == pytest.approx(fp32["revisions"][rev][k], rel=0.05), (rev, k)
