"""controls.py: matched negative controls — the training changes they make (revisions shuffled per token, a
decoder that never trains, untrained LMs) and every headline check run on each, on a small toy run."""
import json

import pytest
import torch

import controls
from crosscoding import training, verdicts
from crosscoding.crosscoder import CrossCoder


def test_shuffled_revisions_permute_each_row_and_repeat_on_resume():
    """Each token's M activations come back in some order of its own (a permutation, not a mix), the orders differ
    between rows, and the same (seed, step) gives the same orders (a resumed run sees the same batches)."""
    x = torch.arange(64 * 3 * 4, dtype=torch.float32).view(64, 3, 4)
    y = training.shuffle_revisions(x, seed=0, step=5)
    assert torch.equal(y.sort(1).values, x.sort(1).values)
    orders = {tuple(int(v) for v in y[b, :, 0] // 4 % 3) for b in range(64)}
    assert len(orders) == 6                                             # all 3! orders occur over 64 rows
    assert torch.equal(training.shuffle_revisions(x, seed=0, step=5), y)
    assert not torch.equal(training.shuffle_revisions(x, seed=0, step=6), y)


@pytest.mark.slow
def test_every_check_runs_on_every_control(toy_run):
    """On the small toy run: each control is trained with its one change (the decoder of fixed-decoder is its
    random initialisation, bit for bit; untrained-lm trains on random-weight LMs; shuffled-revisions on shuffled
    rows), every check has a value and a verdict on the run and on each control, and a check's verdict is its own
    unless a control that removes what it credits holds too."""
    cwd, run = toy_run
    run_args = json.loads((run / "run_args.json").read_text())
    ctl = controls.controls(run, "toy_sva", run_args, cwd, other_seed=1)
    folders = {k: [cwd / f for f in v] for k, v in ctl["folders"].items()}   # relative to the cwd, or absolute
    fixed = CrossCoder.load(folders["fixed-decoder"][0])
    fresh = CrossCoder(fixed.cfg)        # the same config and seed: the initialisation the run started from
    torch.testing.assert_close(fixed.decoder(), fresh.W_dec_FMd, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fixed.unfold_scales().W_enc_FMd, fresh.W_enc_FMd, atol=1e-3)   # the encoder trained
    args = {k: json.loads((v[0] / "run_args.json").read_text()) for k, v in folders.items()}
    assert args["untrained-lm"]["weights"] == "random" and args["run"]["weights"] == "hub"
    assert args["shuffled-revisions"]["control"] == "shuffled-revisions"
    assert json.loads((folders["run"][1] / "run_args.json").read_text())["seed"] == 1
    assert set(ctl["reconstruction"]) == {"run", *controls.CONTROLS}
    for r in ctl["rows"]:
        assert r["real_verdict"] in (verdicts.HOLDS, verdicts.FAILS)
        assert set(r["controls"]) == set(controls.CONTROLS)
        final = r["real_verdict"]
        for c in controls.CHECKS[r["check"]]:
            final = verdicts.with_control(final, r["controls"][c]["verdict"])
        assert r["verdict"] == final
    table = controls.controls_table(ctl)
    assert all(r["check"] in table for r in ctl["rows"]) and "within 2× of the run's" in table
    md = controls.controls_markdown(ctl, "python controls.py")
    assert md.count("\n| ") == (2 + len(controls.CONTROLS)) + (1 + len(ctl["rows"]))   # two tables, headers too
