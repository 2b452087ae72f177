"""cli.py — the flags the scripts share, each defined once: one name, one meaning, one help text.

A script builds its parser with `parser(description, preset)` and `add(p, "--model", "--layer", …,
name=default)`. Defaults come from the preset of the model in force (defaults.py), found by a first
look at the command line (`model_in(argv)`, `run_in(argv)`), so `--help` prints the values a run
would use: `python train.py --help` the toy's, `python train.py --model pythia-1b --help` the paper's.
"""
import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from crosscoding import defaults
from crosscoding.common import ArgumentParser, positive
from crosscoding.variants import VARIANTS

DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def _finite(name, low, strict):
    def parse(s):
        import math

        from crosscoding.common import UsageError
        try:
            v = float(s)
        except ValueError:
            raise UsageError(f"{name} must be a number, got {s!r}") from None
        if not math.isfinite(v) or (v <= low if strict else v < low):
            raise UsageError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {s}")
        return v
    return parse


finite_positive = lambda name: _finite(name, 0.0, strict=True)        # noqa: E731
finite_nonnegative = lambda name: _finite(name, 0.0, strict=False)    # noqa: E731


def fraction(name):
    """argparse type for a number in [0, 1), with a one-line error naming the flag."""
    def parse(s):
        from crosscoding.common import UsageError
        v = finite_nonnegative(name)(s)
        if v >= 1:
            raise UsageError(f"{name} must be a number in [0, 1), got {s}")
        return v
    return parse


def revision_list(s) -> list[str]:
    """argparse type of --revisions: comma-separated names, spaces around them and empty entries dropped
    ("step64, step128, step512" is step64,step128,step512)."""
    return [r.strip() for r in s.split(",") if r.strip()]


# name → argparse keywords (without the default, which each script sets from its preset)
FLAGS = {
    "--model": dict(help="a model key (toy, pythia-70m … pythia-12b, olmo-1b, bloom-1b1), a Hugging Face "
                         "repo id, or a local folder of revisions (default: %(default)s)"),
    "--layer": dict(type=int, help="decoder block L whose output is crosscoded, 0-indexed; the output of "
                                   "block L is hidden_states[L+1] (default: the model's, %(default)s)"),
    "--revisions": dict(type=revision_list, help="comma-separated revisions in training order (default: the "
                                                 "model's, %(default)s)"),
    "--weights": dict(choices=("hub", "random"), help="hub: the revisions' trained weights; random: the "
                      "model's architecture with random weights seeded by the revision name, a stand-in "
                      "tokenizer of its vocabulary size and the toy grammar's text, offline (to check memory "
                      "and speed at the paper's shapes) (default: %(default)s)"),
    "--device": dict(help="torch device: cpu, cuda, cuda:N; under torchrun each rank takes cuda:LOCAL_RANK "
                          "(default: %(default)s)"),
    "--model-dtype": dict(choices=DTYPE_CHOICES, help="dtype the language models run in (default: bf16 on a "
                                                      "GPU, fp32 on a CPU)"),
    "--text": dict(help="LM text: 'toy' (the toy grammar), a local text file (one document per line), or a "
                        "Hugging Face dataset id[:config] (default: the model's, %(default)s; 'toy' with "
                        "--weights random)"),
    "--seq-len": dict(type=positive("--seq-len"), help="tokens per LM text block, BOS first (default: %(default)s)"),
    "--heldout-tokens": dict(type=positive("--heldout-tokens"), help="the text's first documents holding this "
                             "many tokens are held out: validation, scales, evaluation and contexts come from "
                             "them, training never sees them (default: %(default)s)"),
    "--tokens": dict(type=positive("--tokens"), help="token positions of LM text, each run through every "
                     "revision: train.py trains on them, cache_acts.py caches them, --scan compares layer L "
                     "on them (default: %(default)s)"),
    "--run": dict(help="a run folder made by train.py (default: the toy's default run, %(default)s)"),
    "--task": dict(help="task: subjectverb (BLiMP), clams_en, clams_fr, multiblimp_<lang>, toy_sva, or a "
                        "jsonl file of minimal pairs (default: the model's, %(default)s)"),
    "--top-k": dict(type=positive("--top-k"), help="latents studied per revision, by IE (default: %(default)s)"),
    "--select": dict(choices=("abs", "positive"), help="rank latents by positive IE, the latents that support the "
                     "right answer, or by |IE| (the paper's) (default: %(default)s; ablate.py: what relie.py used)"),
    "--threshold": dict(type=finite_nonnegative("--threshold"), help="per-token |IE| at or below this is zeroed "
                        "(default: %(default)s, the preset's)"),
    "--test-frac": dict(type=fraction("--test-frac"), help="share of the minimal pairs held out from attribution "
                        "and selection for ablate.py to test on, whole groups of near-copies at a time (0: no "
                        "split, every finding in-sample; default: %(default)s)"),
    "--results": dict(action="store_true", help="write what this command measured into its section of FINDINGS.md "
                      "(what the toy shows) or RESULTS.md (speed and memory), named by the command"),
    "--split-seed": dict(type=int, help="seed of the selection / test split of the pairs (default: %(default)s)"),
    "--max-pairs": dict(type=positive("--max-pairs"), help="at most this many pairs per sub-task (default: all)"),
    "--pair-batch": dict(type=positive("--pair-batch"), help="minimal pairs per forward pass (default: %(default)s)"),
    "--batch-size": dict(type=positive("--batch-size"), help="token positions per training step, over all "
                                                             "ranks (default: %(default)s)"),
    "--seed": dict(type=int, help="random seed of what this command trains (train.py: the crosscoder's init and "
                                  "batch order; toy.py: the toy LM's init and data) (default: %(default)s)"),
    # choices: the variants' table itself (a dict: argparse tests membership, and --help lists its keys when it
    # prints), so a variant registered there, even after import, is a valid --arch everywhere
    "--arch": dict(choices=VARIANTS, help="crosscoder sparsity variant, one of crosscoding/variants.py's table: "
                                          "%(choices)s; l1 is the paper's (default: %(default)s)"),
    "--out": dict(help="output folder (default: %(default)s)"),
    "--name": dict(help="the attribution's folder in the run: relie/<name>/ (relie.py writes it, ablate.py reads it "
                        "and writes ablation/<name>/) (default: the task's name)"),
    "--overwrite": dict(action="store_true", help="replace what the output folder holds"),
}


def add_settings(p: argparse.ArgumentParser, preset: defaults.Preset):
    """Every registered variant's settings (variants.settings_fields) as flags, --k for k, one group per variant
    in --help. A default is the preset's where it has that field (k, l1_coeff), else the setting's."""
    from crosscoding.variants import settings_fields
    users = {}     # setting -> the variants that read it
    for name, cls in VARIANTS.items():
        for f in fields(cls.Settings):
            users.setdefault(f.name, []).append(name)
    groups = {}
    for name, f in settings_fields().items():
        owner, *others = users[name]
        if owner not in groups:
            groups[owner] = p.add_argument_group(f"--arch {owner}" + (f" (and {', '.join(others)})" if others else ""))
        default = getattr(preset, name) if name in defaults.PRESET_FIELDS else f.default
        text = ",".join(map(str, default)) if isinstance(default, tuple) else default
        shown = "" if default is None else f" (default: {text})"
        groups[owner].add_argument(flag(name), type=_setting_type(flag(name), f), default=default,
                                   help=(f.metadata["help"] + shown).replace("%", "%%"))


def flag(name: str) -> str:
    """A field's flag: --jumprelu-coeff for jumprelu_coeff."""
    return "--" + name.replace("_", "-")


_WHAT = {int: "an integer", float: "a number"}     # what a setting's flag must be, by its type


def _setting_type(name, f):
    """argparse type of a setting's flag `name`: its declared parse, else its default's type (a tuple:
    comma-separated numbers, as a list); text that does not parse is a one-line error naming the flag."""
    from crosscoding.common import UsageError
    parse = f.metadata.get("parse") or (
        (lambda s: [float(v) for v in s.split(",") if v.strip()]) if isinstance(f.default, tuple) else type(f.default))

    def read(s):
        try:
            return parse(s)
        except ValueError:
            raise UsageError(f"{name} must be {_WHAT.get(parse, 'comma-separated numbers')}, got {s!r}") from None
    return read


class _Parser(ArgumentParser):
    """The scripts' parser: its help ends with which preset the defaults shown are, and how to see the other's."""
    preset: defaults.Preset | None = None
    extra: str | None = None

    def format_help(self):
        self.epilog = " ".join(x for x in (self.extra, preset_note(self.preset, self._option_string_actions)) if x)
        return super().format_help()


def preset_note(preset: defaults.Preset | None, flags) -> str | None:
    """Which preset's values the help shows, and the command that shows the paper's: `--model pythia-1b`
    where the script takes a model, a run of a Hugging Face model where it reads one (--run)."""
    if preset is None:
        return None
    if preset.name != "toy":
        return f"Defaults are the '{preset.name}' preset's (defaults.py): the paper's settings (arXiv 2509.05291, " \
               "§3 and App. B)."
    shows = ("`--model pythia-1b --help`" if "--model" in flags else
             "`--run RUN --help`, RUN a run of a Hugging Face model," if "--run" in flags else None)
    return ("Defaults are the 'toy' preset's (defaults.py): the toy model's, tuned for 2 CPU cores. Every Hugging "
            "Face model uses the 'paper' preset, the paper's settings (arXiv 2509.05291, §3 and App. B)"
            + (f"; {shows} shows them." if shows else "."))


def parser(description: str, preset: defaults.Preset | None, epilog: str | None = None) -> ArgumentParser:
    """The script's parser; its epilog names the preset whose values the defaults show (none: the script's
    defaults do not depend on the model)."""
    p = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.preset, p.extra = preset, epilog
    return p


def add(p: argparse.ArgumentParser, *names, **default_of):
    """Add shared flags; default_of maps a flag's dest (model, top_k, …) to its default."""
    for name in names:
        kw = dict(FLAGS[name])
        dest = name.lstrip("-").replace("-", "_")
        if dest in default_of:
            kw["default"] = default_of[dest]
        p.add_argument(name, **kw)


def command(script, argv) -> str:
    """The command line a --results section names: `python <script> <its flags but --results>`."""
    return " ".join([f"python {script}"] + [a for a in (sys.argv[1:] if argv is None else argv) if a != "--results"])


def given(argv, flag):
    """The value of `flag` on the command line, or None when it is not there."""
    return _peek(argv, flag)


def _peek(argv, flag):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(flag, default=None)
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    return getattr(known, flag.lstrip("-").replace("-", "_"))


def model_in(argv, default="toy"):
    """The model a command line names (--model), before the full parse: its spec sets the defaults."""
    from crosscoding import lm
    return lm.resolve(_peek(argv, "--model") or default)


def default_run() -> Path:
    """The run `python train.py` makes with no arguments (the toy's): the analysis scripts' default --run."""
    from crosscoding import lm
    spec = lm.resolve("toy")
    return defaults.run_dir(spec.key, spec.layer, spec.revisions, defaults.ARCH)


def run_in(argv):
    """The run folder a command line names (--run, else the toy's default run) and its model's spec."""
    from crosscoding import lm
    run = Path(_peek(argv, "--run") or default_run())
    try:
        model = json.loads((run / "config.json").read_text())["model"]
    except (OSError, ValueError, KeyError):
        model = "toy"    # no readable run yet: open_run will say so; the toy's defaults meanwhile
    return run, lm.resolve(model)


def dtype(name, device):
    """--model-dtype (None: bf16 on a GPU, fp32 on a CPU) as a torch dtype."""
    import torch
    name = name or ("bf16" if str(device).startswith("cuda") else "fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


