"""crosscoding/common.py: atomic writes, the DONE marker, locks, the one-line errors, generated sections."""
import json
import os
import subprocess
import sys

import pytest

from crosscoding import common
from crosscoding.common import UsageError


def test_atomic_path_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "a.json"
    common.write_json(path, {"x": 1})
    with pytest.raises(RuntimeError):
        with common.atomic_path(path) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]      # no temporary left behind


def test_atomic_dir_swaps_whole_folders(tmp_path):
    out = tmp_path / "out"
    with common.atomic_dir(out) as tmp:
        (tmp / "f").write_text("new")
    assert (out / "f").read_text() == "new"
    with pytest.raises(ValueError):
        with common.atomic_dir(out) as tmp:
            (tmp / "f").write_text("newer")
            raise ValueError
    assert (out / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_read_json_names_a_missing_or_corrupt_file(tmp_path):
    with pytest.raises(UsageError, match="run config .*does not exist"):
        common.read_json(tmp_path / "nope.json", "run config")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UsageError, match="bad.json is not valid JSON"):
        common.read_json(tmp_path / "bad.json")


def test_done_marker(tmp_path):
    with pytest.raises(UsageError, match="does not exist; train it"):
        common.require_done(tmp_path / "run", "run", "train it")
    (tmp_path / "run").mkdir()
    with pytest.raises(UsageError, match="unfinished .*no DONE"):
        common.require_done(tmp_path / "run", "run", "train it")
    common.mark_done(tmp_path / "run", steps=3)
    assert common.is_done(tmp_path / "run") and common.require_done(tmp_path / "run", "run", "") == {"steps": 3}
    common.unmark_done(tmp_path / "run")
    assert not common.is_done(tmp_path / "run")


def test_folder_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(str(holder.pid))
        with pytest.raises(UsageError, match=f"in use by process {holder.pid}"):
            with common.folder_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with common.folder_lock(tmp_path):            # its owner is gone: taken over
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("text, ok", [("3", 3), ("1e3", 1000), ("0", None), ("-2", None), ("x", None)])
def test_positive(text, ok):
    if ok is None:
        with pytest.raises(UsageError, match=f"--steps must be a positive integer, got '?{text}'?"):
            common.positive("--steps")(text)
    else:
        assert common.positive("--steps")(text) == ok


def test_update_results_replaces_its_section_and_keeps_the_others(tmp_path):
    path = tmp_path / "FINDINGS.md"
    common.update_results("a", "## A\n\none", path)
    common.update_results("b", "## B\n\ntwo", path)
    common.update_results("a", "## A\n\nthree", path)
    text = path.read_text()
    assert text.startswith("# Findings\n") and "one" not in text
    assert text.index("## A\n\nthree") < text.index("## B\n\ntwo")
    assert text.count("<!-- a:start -->") == 1 and text.count("<!-- b:end -->") == 1


def test_run_main_turns_usage_errors_into_one_line_and_exit_2(capsys):
    def main():
        raise UsageError("--top-k must be a positive integer, got 0")
    with pytest.raises(SystemExit) as e:
        common.run_main(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --top-k must be a positive integer, got 0\n"
