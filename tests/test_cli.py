"""crosscoding/cli.py: the shared flags, their parsers' one-line errors, the help footers' presets."""
import pytest

from crosscoding import cli, defaults
from crosscoding.common import UsageError


def test_shared_flags_take_each_scripts_defaults():
    p = cli.parser("t", defaults.TOY)
    cli.add(p, "--top-k", "--select", "--results", top_k=7, select="positive")
    a = p.parse_args([])
    assert (a.top_k, a.select, a.results) == (7, "positive", False)
    assert p.parse_args(["--top-k", "3", "--results"]).top_k == 3
    with pytest.raises(UsageError, match="--top-k must be a positive integer, got 0"):
        p.parse_args(["--top-k", "0"])
    with pytest.raises(UsageError, match="invalid choice: 'both'.*see .* --help"):
        p.parse_args(["--select", "both"])


def test_number_parsers_name_the_flag():
    assert cli.finite_positive("--lr")("1e-4") == 1e-4
    for bad in ("0", "nan", "inf", "x"):
        with pytest.raises(UsageError, match="--lr must be a"):
            cli.finite_positive("--lr")(bad)
    assert cli.finite_nonnegative("--threshold")("0") == 0.0
    with pytest.raises(UsageError, match=r"--test-frac must be a number in \[0, 1\), got 1"):
        cli.fraction("--test-frac")("1")


def test_revision_lists_tolerate_spaces_and_empty_entries():
    assert cli.revision_list("step64, step128 ,step512,") == ["step64", "step128", "step512"]


def test_command_names_the_flags_but_results():
    assert cli.command("seeds.py", ["--seeds", "3", "--results"]) == "python seeds.py --seeds 3"
    assert cli.given(["--run", "r", "--seeds", "3"], "--seeds") == "3"
    assert cli.given(["--run", "r"], "--seeds") is None


def test_help_footer_names_the_preset_and_how_to_see_the_papers():
    toy = cli.preset_note(defaults.TOY, {"--model": None})
    assert "'toy' preset" in toy and "`--model pythia-1b --help`" in toy
    assert "`--run RUN --help`" in cli.preset_note(defaults.TOY, {"--run": None})
    assert "'paper' preset" in cli.preset_note(defaults.PAPER, {"--run": None})
    assert cli.preset_note(None, {}) is None


def test_model_dtype_default_follows_the_device():
    import torch
    assert cli.dtype(None, "cpu") == torch.float32 and cli.dtype(None, "cuda:1") == torch.bfloat16
    assert cli.dtype("fp16", "cpu") == torch.float16
