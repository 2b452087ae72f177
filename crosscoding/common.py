"""common.py — the plumbing every script shares: one-line errors with exit codes, atomic writes, the
completion marker, and the lock that keeps two processes out of one output folder.

Exit codes: 2 for bad input (a flag, a file, a name the user can fix), 1 for the environment
(no network, a full disk), 0 for success. A script's `main` is wrapped by `run_main`, which turns
these exceptions into one line on stderr and no traceback.
"""
import argparse
import errno
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


class UsageError(Exception):
    """Bad input: names the bad value and what would be valid. Exit code 2."""


class EnvError(Exception):
    """The environment failed (network, disk). Exit code 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's convention: a bad flag is one line on stderr and exit code 2."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def run_main(main):
    """Run a script's main(); turn our errors (and a full disk) into one line and an exit code."""
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except EnvError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: disk full while writing ({e.strerror}); earlier outputs are intact", file=sys.stderr)
            sys.exit(1)
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path, suffix=""):
    """Yield a temporary path beside `path`; on success fsync it and rename it into place.

    A killed process leaves the old file (or none), never half of a new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside `path`; on success fsync its files and swap it into place (the old
    folder, if any, is removed after the swap). A killed process leaves the old folder or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path, what="file"):
    """Read a JSON file; a missing or corrupt one is a UsageError naming the file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {path} is not valid JSON ({e})") from None


def keep_freed_memory():
    """Keep large freed blocks in the process (glibc's mmap and trim thresholds raised to 1.5 GiB) instead
    of unmapping them: a training step frees and reallocates its ~50 MB gradients and temporaries, and
    mapping them anew costs page faults on every first touch — a quarter of the step at d=512 on a CPU.
    A no-op where the C library is not glibc."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 3 << 29)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 3 << 29)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def update_results(section: str, markdown: str, path="RESULTS.md"):
    """Replace the section `section` of RESULTS.md (what the tool costs) or FINDINGS.md (what it shows) — between
    its <!-- section:start/end --> markers — with `markdown`, adding the section at the end if it is new: the
    commands that measure a result write it."""
    path = Path(path)
    text = path.read_text() if path.exists() else f"# {path.stem.title()}\n"
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text(path, text)


# ---------------------------------------------------------------------------------------------
# The completion marker: a folder is finished when it holds DONE (JSON), written last. Every output
# folder that a kill can leave half-made (the toy model, a cache, a checkpoint, a run, an attribution,
# an ablation) uses it; readers call require_done and never read a folder without it.

DONE = "DONE"


def mark_done(folder, **info):
    write_json(Path(folder) / DONE, info)


def is_done(folder) -> bool:
    return (Path(folder) / DONE).is_file()


def unmark_done(folder):
    (Path(folder) / DONE).unlink(missing_ok=True)


def require_done(folder, what: str, how: str):
    """A UsageError naming the folder, what it should be and how to finish it, unless it is DONE."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{what} {folder} does not exist; {how}")
    if not is_done(folder):
        raise UsageError(f"{what} {folder} is unfinished (no {DONE} marker: a killed run?); {how}")
    return read_json(folder / DONE, f"{what} completion marker")


@contextmanager
def folder_lock(folder, wait=False):
    """Hold `folder/.lock` (our pid) for the duration; refuse if a live process holds it (wait: wait for
    it to let go instead).

    A lock left by a dead pid (a killed run) is taken over."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    # the lock appears with our pid already in it (written beside it, then hard-linked into place): a
    # second process must never read an empty lock and take it for a dead one's
    mine = folder / f".lock.{os.getpid()}"
    mine.write_text(str(os.getpid()))
    try:
        while True:
            try:
                os.link(mine, lock)
                break
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid) and wait:
                    time.sleep(0.5)
                    continue
                if pid and _alive(pid):
                    raise UsageError(f"{folder} is in use by process {pid}; wait for it or use another --out") from None
                lock.unlink(missing_ok=True)  # stale: its owner is gone
    finally:
        mine.unlink(missing_ok=True)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def positive(name):
    """argparse type for a strictly positive int, with a one-line error naming the flag."""
    def parse(s):
        try:
            v = int(float(s)) if ("e" in s.lower() and "." not in s) else int(s)
        except ValueError:
            raise UsageError(f"{name} must be a positive integer, got {s!r}") from None
        if v <= 0:
            raise UsageError(f"{name} must be a positive integer, got {s}")
        return v
    return parse


_FAULT_HITS: dict = {}


def fault_point(name: str):
    """A failpoint for the fault tests: with CCT_FAULT="name:n" the process SIGKILLs itself the
    n-th time it passes `name`; with CCT_FAULT="name:n:enospc" it raises a disk-full OSError there.
    Unset (always, outside tests) it does nothing."""
    spec = os.environ.get("CCT_FAULT")
    if not spec:
        return
    want, n, *kind = spec.split(":")
    if want != name:
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] == int(n):
        if kind == ["enospc"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.kill(os.getpid(), signal.SIGKILL)
