"""stages.py — the stage scripts run as subprocesses on a derived run (another crosscoder seed, another LM
seed, a control, another set of checkpoints), each with the run's own arguments and each skipped when it has
finished, so a killed command resumes where it stopped. seeds.py, controls.py and checkpoint_sets.py share them.
"""
import os
import subprocess
import sys
from pathlib import Path

from crosscoding import lm
from crosscoding.activations import make_cache, open_cache
from crosscoding.cli import flag
from crosscoding.common import UsageError, is_done, mark_done, read_json, require_done, write_json
from crosscoding.training import RunConfig

ROOT = Path(__file__).resolve().parent.parent     # where the stage scripts are
VARIED = ("arch", "seed")     # what a seed run changes of the run's RunConfig


def stage(args, cwd):
    """Run one stage script as a subprocess; a failure ends this command with its last line."""
    r = subprocess.run([sys.executable, str(ROOT / args[0]), *map(str, args[1:])], cwd=cwd, capture_output=True,
                       text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UsageError(f"{' '.join(map(str, args))} failed: {last}")
    return r


def train_args(run_args, arch, seed, out):
    """train.py with the run's RunConfig, another arch and seed, on the run's device."""
    cmd = ["train.py", "--arch", arch, "--seed", seed, "--out", out, "--device", run_args["device"]]
    for k, v in RunConfig.known(run_args).items():
        if k not in VARIED and v is not None:        # None: left to train.py (an LM seed's own cache)
            cmd += [flag(k), ",".join(map(str, v)) if isinstance(v, list) else v]
    return cmd


def stale(seed_args, run_args) -> bool:
    """A seed's run no longer matches the run it varies (the run was trained again with other arguments)."""
    return any(str(seed_args.get(k)) != str(v) for k, v in RunConfig.known(run_args).items()
               if k not in VARIED and v is not None)


def seed_run(folder, run_args, arch, seed, methods, task, select, threshold, cwd, own=False):
    """One seed through every stage (each skipped when already finished) into folder (the run itself
    when own); returns folder."""
    again = (not own and (folder / "run_args.json").exists()
             and stale(read_json(folder / "run_args.json", "run arguments"), run_args))
    if again:
        print(f"   {folder} was trained with other arguments; training it again", file=sys.stderr)
    if again or not is_done(folder):
        resume = (folder / "ckpt").is_dir() and not again
        stage(train_args(run_args, arch, seed, folder) + (["--resume"] if resume else ["--overwrite"]), cwd)
    ev = folder / "eval.json"
    if not ev.exists() or ev.stat().st_mtime < (folder / "DONE").stat().st_mtime:
        stage(["evaluate.py", "--run", folder], cwd)
    for m in methods:
        name = f"{Path(task).stem}-{m}-{select}"
        if not is_done(folder / "relie" / name):
            stage(["relie.py", "--run", folder, "--task", task, "--method", m, "--name", name, "--select", select,
                   "--threshold", str(threshold)], cwd)
        if not is_done(folder / "ablation" / name):
            stage(["ablate.py", "--run", folder, "--task", task, "--name", name], cwd)
    return folder


def lm_seed_args(run_args, seed, cwd) -> dict:
    """The run's arguments for the toy LM pretrained with another seed: that LM (built first), the
    revisions its own scan suggests (as the paper picks them, by accuracy shifts), its own cache."""
    model = f"toy-seed{seed}"
    spec = lm.resolve(model)
    if not is_done(spec.repo):
        stage(["toy.py", "--out", spec.repo, "--seed", seed], cwd)
    out = stage(["cache_acts.py", "--scan", "--model", model, "--layer", run_args["layer"], "--suggest",
                 len(run_args["revisions"])], cwd).stdout
    line = [x for x in out.splitlines() if x.startswith("suggested revisions")]
    if not line:
        raise UsageError(f"cache_acts.py --scan --model {model} suggested no revisions")
    revisions = line[-1].split(":", 1)[1].strip().split(",")
    return dict(run_args, model=model, revisions=revisions, cache=None)


def relie_settings(folder, name) -> dict:
    """How relie.py and ablate.py ran on folder/relie/<name> and folder/ablation/<name>, to run them again,
    unchanged, on a control."""
    s = read_json(folder / "relie" / name / "summary.json", "attribution summary")
    a = read_json(folder / "ablation" / name / "DONE", "ablation")
    return dict(task=s["task"], method=s["method"], select=s["select"], threshold=s["threshold"], top_k=a["top_k"],
                draws=a["draws"], test_frac=s["split"]["test_frac"], split_seed=s["split"]["seed"],
                max_pairs=s["split"]["max_pairs"])


def attribution_stages(folder, name, st, device, cwd, relie=True):
    """relie.py (unless relie=False: the attribution is the control's own) and ablate.py on a control with the
    run's settings; finished stages are kept. Contexts are for reading only: one block."""
    if relie and not is_done(folder / "relie" / name):
        stage(["relie.py", "--run", folder, "--task", st["task"], "--method", st["method"], "--name", name,
               "--select", st["select"], "--threshold", st["threshold"], "--top-k", st["top_k"], "--test-frac",
               st["test_frac"], "--split-seed", st["split_seed"], "--context-blocks", 1, "--device", device]
              + (["--max-pairs", st["max_pairs"]] if st["max_pairs"] else []), cwd)
    if not is_done(folder / "ablation" / name):
        stage(["ablate.py", "--run", folder, "--task", st["task"], "--name", name, "--top-k", st["top_k"], "--draws",
               st["draws"], "--device", device], cwd)


def extra_cache(run_args, revisions, folder) -> Path | None:
    """The variants' revisions the run's cache lacks, cached once into folder/extra on the run's own tokens
    (the same text, blocks and split: their fingerprints must agree). None when there are none, or for a run
    trained from a live buffer (its variants then stream as it did)."""
    if not run_args.get("cache") or not revisions:
        return None
    base = open_cache(run_args["cache"]).meta
    extra = Path(make_cache(run_args["model"], run_args["layer"], list(revisions), folder / "extra", base["tokens"],
                            base["seq_len"], base["split"]["heldout_tokens"], base["text"],
                            run_args.get("device", "cpu"), base["dtype"], weights=base.get("weights", "hub")))
    meta = read_json(extra / "meta.json")
    if meta["fingerprint"] != base["fingerprint"] or meta["n_blocks"] != base["n_blocks"]:
        raise UsageError(f"{extra} was cached on other tokens than {run_args['cache']}; delete it")
    return extra


def cache_view(run_args, revisions, extra, folder) -> str | None:
    """A cache folder of `revisions` whose arrays are links into the run's cache and the extra one: what
    cache_acts.py would write for them (same tokens, per-revision scales), without caching any revision twice."""
    if not run_args.get("cache"):
        return None
    base = open_cache(run_args["cache"]).meta
    view = folder / f"cache-{'_'.join(revisions)}"
    if is_done(view):
        return str(view)
    view.mkdir(parents=True, exist_ok=True)
    src = {r: Path(run_args["cache"]) for r in base["revisions"]}
    scales = dict(base["scales"])
    if extra is not None:
        meta = read_json(extra / "meta.json")
        src |= {r: extra for r in meta["revisions"] if r not in src}
        scales |= {r: v for r, v in meta["scales"].items() if r not in base["scales"]}
    for name, target in [(f"{r}.bin", src[r] / f"{r}.bin") for r in revisions] + [
            ("tokens.npy", Path(run_args["cache"]) / "tokens.npy")]:
        (view / name).unlink(missing_ok=True)
        (view / name).symlink_to(target.resolve())
    write_json(view / "meta.json", dict(base, revisions=list(revisions), scales={r: scales[r] for r in revisions}))
    mark_done(view, revisions=list(revisions), linked_from=sorted({str(src[r]) for r in revisions}))
    return str(view)


def run_args_of(folder) -> tuple[Path, dict]:
    """A finished run's folder and arguments (run_args.json), which its derived runs start from."""
    base = Path(folder)
    require_done(base, "training run", "train it with train.py first")
    return base, read_json(base / "run_args.json", "run arguments")


def took(seconds) -> str:
    """The sentence a RESULTS section gives its command's wall time in."""
    return "" if seconds is None else (f" The command took {seconds:.0f} s on {os.cpu_count()} CPU cores (wall; "
                                       "stages an earlier run finished are reused, not timed).")
