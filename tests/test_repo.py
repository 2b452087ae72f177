"""Repository hygiene: CI runs the README's commands; no unsafe loading anywhere."""
import re

from conftest import ROOT

PY_FILES = [*ROOT.glob("*.py"), *(ROOT / "crosscoding").glob("*.py"), *(ROOT / "tests").glob("*.py")]


def _readme_block(section):
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"## {section}\n.*?```bash\n(.*?)```", text, re.S)
    assert m, f"README has no bash block under '## {section}'"
    return [l.split("#")[0].strip() for l in m.group(1).splitlines() if l.split("#")[0].strip()]


def test_ci_runs_the_readme_commands():
    ci = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()
          if l.strip() and not l.strip().startswith("#")]
    for cmd in _readme_block("Setup") + _readme_block("Tests"):
        assert cmd in ci, f"README command {cmd!r} is not run by .ci/run"


def test_torch_load_always_weights_only_and_no_remote_code():
    for p in PY_FILES:
        if p.name == "test_repo.py":
            continue
        src = p.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", src):
            assert "weights_only=True" in call, f"{p.name}: {call}"
        assert not re.search(r"trust_remote_code\s*=\s*True", src), f"{p.name} sets trust_remote_code=True"


LIBRARY = {p.stem for p in (ROOT / "crosscoding").glob("*.py")} - {"__init__"}   # the package
STAGES = {"cache_acts", "train", "evaluate", "relie", "ablate", "bench", "app", "seeds", "controls", "checkpoint_sets",
          "convert", "toy", "tune"}


def _imports(path):
    """Every project module a file imports, at any depth (function-level imports too)."""
    import ast
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.removeprefix("crosscoding.").split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "crosscoding":     # from crosscoding import lm
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:  # from crosscoding.lm import x
            names.add(node.module.removeprefix("crosscoding.").split(".")[0])
    return names & (LIBRARY | STAGES)


def test_imports_run_one_way():
    """The top level holds the stage scripts, the package the library: library modules import no stage
    script, and project modules import each other in no circle."""
    stages = {p.stem: p for p in ROOT.glob("*.py")}
    assert set(stages) == STAGES, set(stages) ^ STAGES      # a new top-level module is a stage, or it moves in
    assert not LIBRARY & STAGES
    files = {**stages, **{p.stem: p for p in (ROOT / "crosscoding").glob("*.py") if p.stem != "__init__"}}
    import ast
    init = ast.parse((ROOT / "crosscoding" / "__init__.py").read_text())
    assert not [n for n in ast.walk(init) if isinstance(n, ast.Import | ast.ImportFrom)]   # the package loads nothing
    graph = {name: _imports(path) - {name} for name, path in files.items()}
    for name in LIBRARY & set(files):
        assert not graph[name] & STAGES, f"library module {name} imports stage(s) {graph[name] & STAGES}"
    for name in STAGES & set(files):
        assert not graph[name] & STAGES, f"stage {name} imports another stage: {graph[name] & STAGES}"

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen
    cycles = [name for name in graph if name in reach(name)]
    assert not cycles, f"import circle through {cycles}"


class _Parsed(Exception):
    pass


def _parser_of(module, argv, monkeypatch):
    """The argparse parser a script builds, caught at its parse_args call."""
    import importlib

    from crosscoding import common
    box = {}

    def catch(self, args=None, namespace=None):
        box["p"] = self
        raise _Parsed
    monkeypatch.setattr(common.ArgumentParser, "parse_args", catch)
    mod = importlib.import_module(f"crosscoding.{module}" if module in LIBRARY else module)
    entry = getattr(mod, "parse_args", None) or mod.main
    monkeypatch.setattr("sys.argv", [module + ".py", *argv])
    try:
        entry(argv) if entry is not mod.main or module not in ("toy", "lm", "tasks", "bench") else entry()
    except _Parsed:
        return box["p"]
    raise AssertionError(f"{module} parsed no arguments")


def test_every_shared_flag_has_one_meaning(monkeypatch):
    """A flag used by two scripts has one help text (its meaning), whatever its default there; and
    --help prints the defaults in force (no bare None for a value the run will use)."""
    helps = {}
    for module in ("cache_acts", "train", "evaluate", "relie", "ablate", "bench", "toy", "tasks", "lm"):
        p = _parser_of(module, [], monkeypatch)
        for action in p._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help":
                    helps.setdefault(opt, {})[module] = action.help
    shared = {opt: h for opt, h in helps.items() if len(h) > 1}
    assert {"--model", "--device", "--tokens", "--out", "--seed", "--run", "--top-k"} <= set(shared)
    for opt, by_module in shared.items():
        assert len(set(by_module.values())) == 1, (opt, by_module)
    assert "--dtype" not in helps       # two meanings once: now --cache-dtype (on disk) and --precision (matmuls)


def test_train_help_shows_the_defaults_in_force():
    import subprocess
    import sys
    toy = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True)
    assert toy.returncode == 0
    flat = " ".join(toy.stdout.split())
    from crosscoding.defaults import TOY
    for want in (f"(default: {TOY.dict_size})", "(default: 1024)", "(default: 2048000)", "(default: 0.002)",
                 "(default: toy)",
                 "(default: the model's, step64,step128,step512)", "arXiv 2509.05291"):
        assert want in flat, want
    paper = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "pythia-1b", "--help"],
                           capture_output=True, text=True)
    flat = " ".join(paper.stdout.split())
    for want in ("(default: 16384)", "(default: 4096)", "(default: 400000000)", "(default: 5e-05)",
                 "(default: the model's, step512,step2000,step143000)", "(default: the model's, 8)"):
        assert want in flat, want


def test_every_generated_section_names_the_command_that_writes_it():
    """FINDINGS.md and RESULTS.md hold only sections a command writes (common.update_results): each heading
    names `python <script> …` (or `python -m crosscoding.<module> …`), and that script writes into that file."""
    for doc in ("FINDINGS.md", "RESULTS.md"):
        text = (ROOT / doc).read_text()
        names = re.findall(r"<!-- ([\w-]+):start -->", text)
        assert names and names == re.findall(r"<!-- ([\w-]+):end -->", text), doc
        for name in names:
            body = text[text.index(f"<!-- {name}:start -->"):text.index(f"<!-- {name}:end -->")]
            head = body.splitlines()[1]
            m = re.search(r"`(?:HF_HUB_OFFLINE=1 )?python3? (-m crosscoding\.)?([\w.]+)", head)
            assert head.startswith("## ") and m, f"{doc} section {name}: its heading names no command: {head!r}"
            path = ROOT / "crosscoding" / f"{m.group(2)}.py" if m.group(1) else ROOT / m.group(2)
            assert path.is_file(), f"{doc} section {name}: {path.name} does not exist"
            src = path.read_text()
            assert "update_results" in src and doc in src, f"{doc} section {name}: {path.name} does not write {doc}"
