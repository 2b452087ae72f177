"""Repository hygiene: CI runs the README's commands; no unsafe loading anywhere."""
import re

from conftest import ROOT

PY_FILES = [p for p in ROOT.glob("*.py")] + [p for p in (ROOT / "tests").glob("*.py")]


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
