"""Bad input, every script: exit code 2 (1 for the environment), one line on stderr naming the bad
value and what would be valid, no traceback, and nothing written that looks complete; and a newcomer's
frictions: revision lists typed with spaces, nearest revisions, failed runs, help footers, the README's
commands, the scan's table, a pickle that is not a state dict."""
import json
import re
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, tiny_model, word_tokenizer

pytestmark = pytest.mark.slow   # real subprocesses of whole stages: `-m 'not slow'` skips them


@pytest.fixture(scope="module")
def world(toy_run, tmp_path_factory):
    """Inputs, good and broken, made from a small toy run's outputs (copies: nothing shared is harmed)."""
    cwd, pipeline_run = toy_run
    t = tmp_path_factory.mktemp("bad")
    run = t / "run"
    shutil.copytree(pipeline_run, run)
    cache = next((cwd / "cache").iterdir())
    w = dict(run=run, cache=cache, missing=t / "nope", out=t / "out", text=t / "text.txt")

    def run_copy(name, edit):
        d = t / name
        shutil.copytree(run, d)
        edit(d)
        w[name] = d

    run_copy("truncated", lambda d: (d / "crosscoder.safetensors").write_bytes(
        (d / "crosscoder.safetensors").read_bytes()[:1000]))

    def lie(d):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(dict(cfg, dict_size=cfg["dict_size"] * 2)))
    run_copy("lying", lie)
    run_copy("unfinished", lambda d: (d / "DONE").unlink())

    def gone(d):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(dict(cfg, revisions=cfg["revisions"][:2] + ["step9999"])))
    run_copy("gone_rev", gone)

    def cache_copy(name, edit):
        d = t / name
        shutil.copytree(cache, d)
        edit(d)
        w[name] = d

    cache_copy("incomplete", lambda d: (d / "DONE").unlink())   # as a killed cache_acts.py leaves it

    def nan(d):
        mm = np.memmap(d / "step512.bin", dtype=np.uint16, mode="r+")
        mm[: 64 * 100] = 0x7FC0   # bf16 NaN in the first rows
        mm.flush()
    cache_copy("nan_cache", nan)
    cache_copy("other_cache", lambda d: None)

    (t / "empty.jsonl").write_text("")
    (t / "malformed.jsonl").write_text('{"prefix": "the dog", "good": " is", "bad": " are"}\n{oops\n')
    (t / "dropall.jsonl").write_text('{"prefix": "the dog", "good": " is very old", "bad": " are very old"}\n')
    w.update(empty=t / "empty.jsonl", malformed=t / "malformed.jsonl", dropall=t / "dropall.jsonl")
    # a local "model" whose revisions disagree on the hidden size
    mixed = t / "mixed"
    tok = word_tokenizer([f"w{i}" for i in range(50)])
    for name, d in (("a", 32), ("b", 64)):
        tiny_model("gpt_neox", d=d).save_pretrained(mixed / name)
        tok.save_pretrained(mixed / name)
    w["text"].write_text("\n".join(" ".join(f"w{i % 50}" for i in range(j, j + 12)) for j in range(300)))
    w["mixed"] = mixed
    w["file"] = t / "a_file"
    w["file"].write_text("x")
    return w


CASES = [
    # (script and args, what stderr must name, exit code)
    ("-m crosscoding.lm nope", "unknown model 'nope'; valid keys: pythia-70m", 2),
    ("-m crosscoding.tasks subjverb", "unknown task 'subjverb'; valid: subjectverb", 2),
    ("toy.py --steps 0", "--steps", 2),
    ("toy.py --out {file}", "a_file", 2),
    ("cache_acts.py --model nope", "unknown model 'nope'", 2),
    ("cache_acts.py --model toy --revisions step64,step999 --out {out}", "unknown revision 'step999' of toy", 2),
    ("cache_acts.py --model toy --layer 5 --out {out}", "layer 5 is out of range for toy: valid layers are 0..1", 2),
    ("cache_acts.py --model toy --layer -1 --out {out}", "layer -1 is out of range", 2),
    ("cache_acts.py --model toy --tokens 0 --out {out}", "--tokens must be a positive integer, got 0", 2),
    ("cache_acts.py --model toy --cache-dtype fp8 --out {out}", "invalid choice: 'fp8'", 2),
    ("cache_acts.py --scan --model toy --suggest 0 --out {out}", "--suggest must be a positive integer, got 0", 2),
    ("cache_acts.py --model org/unknown --layer 1 --revisions a,b --weights random --out {out}",
     "--weights random needs a model whose architecture is known", 2),
    ("cache_acts.py --suggest", "--suggest needs --scan", 2),
    ("cache_acts.py --scan --model toy --task {empty} --out {out}", "holds no minimal pairs", 2),
    ("cache_acts.py --scan --model toy --task {malformed} --out {out}", "malformed.jsonl:2: malformed", 2),
    ("cache_acts.py --model {mixed} --layer 0 --revisions a,b --text {text} --tokens 100 --out {out}",
     "different hidden sizes: a d=32, b d=64", 2),
    ("cache_acts.py --model toy --tokens 1000 --out {other_cache}", "was made with n_blocks=", 2),
    ("train.py --model nope --out {out}", "unknown model 'nope'", 2),
    ("train.py --dict-size 0 --out {out}", "--dict-size must be a positive integer, got 0", 2),
    ("train.py --batch-size -3 --out {out}", "--batch-size must be a positive integer, got -3", 2),
    ("train.py --resume --overwrite --out {out}", "contradict", 2),
    ("train.py --cache {missing} --out {out}", "nope does not exist", 2),
    ("train.py --cache {incomplete} --out {out}", "is unfinished", 2),
    ("train.py --cache {cache} --revisions step0,step512 --out {out}", "revisions step64,step128,step512, not toy", 2),
    ("train.py --revisions step64 --out {out}", "needs at least 2 revisions", 2),
    ("train.py --revisions step64,step64 --out {out}", "lists a revision twice", 2),
    ("train.py --out {run}", "already holds a run", 2),
    ("train.py --tokens 10 --out {out}", "--tokens 10 is less than one batch of 1024", 2),
    ("train.py --lr nan --out {out}", "--lr must be a finite number > 0, got nan", 2),
    ("train.py --arch batchtopk --k 1000 --out {out}",
     "--arch batchtopk: --k 1000 is invalid: must be at most dict_size=256", 2),
    ("train.py --arch matryoshka --k 1000 --out {out}", "--arch matryoshka: --k 1000 is invalid", 2),
    ("train.py --l1-coeff inf --out {out}", "--arch l1: --l1-coeff inf is invalid: must be a finite number >= 0", 2),
    ("train.py --arch batchtopk --auxk-alpha inf --out {out}", "--auxk-alpha inf is invalid: must be a finite number",
     2),
    ("train.py --dict-size 4000000000 --out {out}", "GiB", 2),
    ("train.py --cache {nan_cache} --out {out}", "NaN/Inf in the activations of revision step512", 2),
    ("evaluate.py --run {missing}", "holds no trained crosscoder", 2),
    ("evaluate.py --run {truncated}", "cannot be read", 2),
    ("evaluate.py --run {lying}", "has shape", 2),
    ("evaluate.py --run {unfinished}", "is unfinished (no DONE marker", 2),
    ("evaluate.py --run {run} --blocks 0", "--blocks must be a positive integer", 2),
    ("relie.py --run {run} --task nope", "unknown task 'nope'", 2),
    ("relie.py --run {run} --task {dropall}", "drops every one of its 1 pairs", 2),
    ("relie.py --run {run} --threshold -1", "--threshold must be a finite number >= 0, got -1", 2),
    ("relie.py --run {run} --method exact --latents 9999", "--latents must lie in 0..127", 2),
    ("relie.py --run {run} --latents 3", "--latents only applies to --method exact", 2),
    ("relie.py --run {run} --method magic", "invalid choice: 'magic'", 2),
    ("relie.py --run {gone_rev}", "revision step9999 of run", 2),
    ("ablate.py --run {run} --task clams_en", "run `python relie.py", 2),
    ("ablate.py --run {run} --subtasks nope", "--subtasks ['nope'] not in this task; valid:", 2),
    ("ablate.py --run {run} --top-k 0", "--top-k must be a positive integer", 2),
]


def _looks_complete(folder):
    """Anything a later stage would read as a finished output."""
    return [p for name in ("DONE", "summary.json", "eval.json") for p in folder.rglob(name)]


def visible_lines(text):
    """What a terminal shows: a carriage return overwrites its line (progress bars), blank lines vanish."""
    return [seen for line in text.split("\n") if (seen := line.split("\r")[-1].strip())]


def run_cli(args, cwd, monkeypatch, capsys):
    """Run a script's __main__ in this process (imports stay warm: ~50 cases in seconds, not minutes);
    the exit code and stderr are what a shell would see. test_train/test_lm run real subprocesses."""
    monkeypatch.chdir(cwd)
    module = args[1] if args[0] == "-m" else None      # python -m crosscoding.lm …: a library module's CLI
    args = args[2:] if module else args
    monkeypatch.setattr(sys, "argv", [module or str(ROOT / args[0]), *args[1 - bool(module):]])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(ROOT / args[0]), run_name="__main__")
    return e.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("cmd,msg,code", CASES, ids=[c[0][:60] for c in CASES])
def test_bad_input(world, toy_run, cmd, msg, code, monkeypatch, capsys):
    cwd, _ = toy_run
    shutil.rmtree(world["out"], ignore_errors=True)
    before = {p: p.stat().st_mtime for p in world["run"].rglob("*") if p.is_file()}
    args = [a.format(**world) for a in cmd.split()]
    rc, err = run_cli(args, cwd, monkeypatch, capsys)
    assert rc == code, (rc, err[-2000:])
    shown = visible_lines(err)
    assert "Traceback" not in err and len(shown) == 1, err[-2000:]
    assert shown[0].startswith("error: ") and msg in shown[0], err
    if world["out"].exists():
        assert not _looks_complete(world["out"]), _looks_complete(world["out"])
    after = {p: p.stat().st_mtime for p in world["run"].rglob("*") if p.is_file()}
    assert after == before, "a failed command changed the run folder"


def test_a_real_subprocess_too(toy_run):
    cwd, _ = toy_run
    r = subprocess.run([sys.executable, str(ROOT / "cache_acts.py"), "--model", "toy", "--layer", "7"], cwd=cwd,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "error: layer 7 is out of range for toy: valid layers are 0..1"


def test_enough_cases():
    assert len(CASES) >= 30 and {c[0].split()[0] for c in CASES} >= {
        "-m", "toy.py", "cache_acts.py", "train.py", "evaluate.py", "relie.py", "ablate.py"}


def test_top_k_larger_than_nonzero_is_capped(world, toy_run):
    cwd, _ = toy_run
    r = subprocess.run([sys.executable, str(ROOT / "relie.py"), "--run", str(world["run"]), "--top-k", "100000",
                        "--max-pairs", "20", "--context-blocks", "2"], cwd=cwd, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--top-k 100000 capped at" in r.stdout


# ---------------------------------------------------------------------------------------------
# A newcomer's frictions on the command line

def test_nearest_revisions_by_step(world, toy_run, monkeypatch, capsys):
    cwd, _ = toy_run
    rc, err = run_cli(["cache_acts.py", "--model", "toy", "--revisions", "step64,step182", "--out", str(world["out"])],
                      cwd, monkeypatch, capsys)
    assert rc == 2 and err == ("error: unknown revision 'step182' of toy; nearest available: step192, step160, "
                               "step128, step256, step96")


def test_failed_train_leaves_no_folder(world, toy_run, monkeypatch, capsys):
    """A train.py that fails before its first checkpoint leaves no folder behind (one that looks like a run to
    the app and to the next train.py); the revisions are named without the spaces they were typed with."""
    cwd, _ = toy_run
    out = world["out"].parent / "failed run"
    rc, err = run_cli(["train.py", "--revisions", "step64, step999", "--out", str(out)], cwd, monkeypatch, capsys)
    assert rc == 2 and visible_lines(err)[-1].startswith("error: unknown revision 'step999' of toy"), err
    assert not out.exists()
    assert not (cwd / "cache" / "toy-L0-step64_step999").exists()


def test_revision_lists_tolerate_spaces(world, toy_run, monkeypatch):
    import cache_acts
    import train
    cwd, _ = toy_run
    monkeypatch.chdir(cwd)
    args, _ = train.parse_args(["--revisions", " step64, step128 ,step512,", "--arch", "batchtopk"])
    assert args.revisions == ["step64", "step128", "step512"]
    assert str(args.out) == "runs/toy-L0-step64_step128_step512-batchtopk"
    assert cache_acts.parse_args(["--revisions", "step64, step128"])[0].revisions == ["step64", "step128"]
    out = world["out"].parent / "spaced"
    train.main(["--cache", str(world["cache"]), "--revisions", "step64, step128, step512", "--tokens", "2048",
                "--dict-size", "16", "--out", str(out)])
    assert json.loads((out / "config.json").read_text())["revisions"] == ["step64", "step128", "step512"]
    assert (out / "DONE").exists()


FAKE_PAPER_RUN = {"model": "pythia-70m", "layer": 3, "revisions": ["step512", "step143000"]}


@pytest.mark.parametrize("script", ["train.py", "cache_acts.py", "evaluate.py", "relie.py", "ablate.py", "seeds.py",
                                    "controls.py", "checkpoint_sets.py", "convert.py"])
def test_help_footer_is_true(script, tmp_path, monkeypatch, capsys):
    """Each script's --help says whose defaults it shows and names a command that shows the paper's; that command
    works and shows them. convert.py has no default that depends on the model, and says nothing of presets."""
    def help_of(*args):
        monkeypatch.setattr(sys, "argv", [str(ROOT / script), *args, "--help"])
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        out = capsys.readouterr().out
        assert e.value.code == 0, out
        return " ".join(out.split())
    run = tmp_path / "paper-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(FAKE_PAPER_RUN))
    monkeypatch.chdir(tmp_path)
    toy = help_of()
    if script == "convert.py":
        assert "preset" not in toy and "--help` shows" not in toy
        return
    assert "Defaults are the 'toy' preset's" in toy
    if script in ("train.py", "cache_acts.py"):
        assert "`--model pythia-1b --help` shows them" in toy
        paper = help_of("--model", "pythia-1b")
    else:
        assert "`--run RUN --help`, RUN a run of a Hugging Face model, shows them" in toy
        assert not re.search(r"--model\b(?!-)", toy)      # --model-dtype is not --model
        paper = help_of("--run", str(run))
    assert "Defaults are the 'paper' preset's" in paper
    if script in ("relie.py", "seeds.py", "controls.py"):
        assert "(default: 0.1" in paper and "(default: 0.0" in toy    # the IE threshold: the paper's, the toy's


def test_interop_doc_trains_the_run_it_converts():
    """docs/interop.md's `convert.py --to jumprelu --run R` follows, in the same block, the command that trains R."""
    import re
    import shlex

    from crosscoding import defaults, lm
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / "interop.md").read_text(), re.S)
    block = [b for b in blocks if "--to jumprelu" in b]
    assert len(block) == 1
    lines = [shlex.split(line.split("#")[0]) for line in block[0].splitlines() if line.strip().startswith("python")]
    at = [i for i, a in enumerate(lines) if "--to" in a and a[a.index("--to") + 1] == "jumprelu"][0]
    want = lines[at][lines[at].index("--run") + 1]
    toy = lm.resolve("toy")
    made = []
    for a in lines[:at]:
        if a[1] == "train.py" and "--out" not in a and "--revisions" not in a and "--model" not in a:
            made.append(str(defaults.run_dir("toy", toy.layer, toy.revisions, a[a.index("--arch") + 1]
                                             if "--arch" in a else defaults.ARCH)))
    assert want in made, (want, made)


def test_scan_prints_its_table(toy_run, monkeypatch, capsys):
    """`cache_acts.py --scan --suggest 5` prints the accuracy per revision, the suggested ones marked, not a path
    alone (the scan itself is toy_run's: its table is what is printed)."""
    import cache_acts
    cwd, _ = toy_run
    csv = next(p for p in (cwd / "scans").glob("*.csv") if not p.name.endswith("-cos.csv"))
    monkeypatch.setattr(cache_acts, "scan", lambda *a, **k: csv)
    cache_acts.main(["--scan", "--model", "toy", "--suggest", "5"])
    out = capsys.readouterr().out.splitlines()
    table = pd.read_csv(csv)
    chosen = cache_acts.suggest(csv, 5)
    assert out[-1] == "suggested revisions (5, marked *): " + ",".join(chosen)
    for r, acc in zip(table.revision, table.acc_mean):
        row = [l.split() for l in out if r in l.split()]
        assert len(row) == 1 and f"{acc:.4f}" in row[0] and (row[0][0] == "*") == (r in chosen), (r, row)


def test_pickle_import_quiet_and_never_advises_unsafe_load(tmp_path):
    """A pickle that is not a state dict: one line, exit 2, no protocol warning, and never torch's advice to load
    with weights_only=False (or to allowlist the pickled class)."""
    import pickle

    import torch
    pickle.dump({"W": [1.0, 2.0]}, (tmp_path / "plain.pkl").open("wb"))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    for name, says in (("plain.pkl", "Unsupported operand"), ("module.pt", "Unsupported global: GLOBAL torch.nn")):
        r = subprocess.run([sys.executable, str(ROOT / "convert.py"), "--from", "dictionary_learning", name,
                            "--model", "toy", "--layer", "0", "--revisions", "step64,step128,step512", "--out", "imp"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
        lines = visible_lines(r.stderr)
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr
        assert "weights_only" not in r.stderr and "safe_globals" not in r.stderr and "trust" not in r.stderr
        assert not (tmp_path / "imp").exists()
