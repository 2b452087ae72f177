"""tune.py — the toy's defaults (F, λ, how latents are ranked, the attribution method) chosen again on the
selection half of the pairs only, so that no default is tuned on the pairs its findings are reported on.

    python tune.py --results                 # the toy's default run's data, both stages (FINDINGS.md `tuning`)
    python tune.py --dict-sizes 64 --l1-coeffs 2 --seeds 1 --max-pairs 20   # a tiny grid

The pairs. relie.py splits the task into a selection and a test half (tasks.split_pairs, defaults.TEST_FRAC,
split seed 0: its defaults) and every finding is reported on the test half. Here only the selection half is
used: it is written to OUT/selection.jsonl (the pairs as relie.py tokenizes them, in its order) and every
candidate runs relie.py and ablate.py with `--task` that file, so relie.py splits it again into an inner
selection and an inner test half and ablate.py scores on the inner test half. The outer test half is never read.

The search (coordinate-wise, to fit 2 CPU cores), every candidate over --seeds crosscoder seeds:
  stage 1: F in --dict-sizes × λ in --l1-coeffs (128, 256, 512 × 1, 2, 4): the L1 crosscoder on the run's own
           data and tokens, attributed by AtP, latents ranked by positive IE;
  stage 2: at stage 1's choice, ranking in --selects (positive, abs) × method in --methods (atp, ig).
The criterion, fixed before any candidate was measured: the mean over seeds of the last revision's top-k minus
random-k accuracy drop on the inner test half (ablate.py's verdicts.csv, excess_points), among the candidates
whose every seed keeps the toy's quality bars on train.py's last validation line (log.jsonl): FVU ≤ 0.05 at
every revision, L0 ≤ 64, dead ≤ 25% (tests/test_toy_findings.py). Ties (means within 1e-9 points) go to the
higher minimum over seeds, then to the current default, then to the first candidate in the grid's order.

Each candidate's crosscoder is OUT/F<F>-lambda<λ>-seed<s>/, made by the stages as subprocesses
(crosscoding/stages.py); a finished stage is kept, so a killed command resumes. Writes OUT/tune.json (every
candidate's numbers per seed, each stage's choice, the final choice and whether it equals the current
defaults); --results writes FINDINGS.md `tuning`. defaults.py is never changed here: the choice is reported.
"""
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd

from crosscoding import cli, common, defaults, lm, tasks
from crosscoding.analysis import METHODS
from crosscoding.common import UsageError, read_json, require_done, write_json
from crosscoding.findings import fmt, num, summarise
from crosscoding.stages import ROOT, seed_run, took
from crosscoding.training import last_log

ARCH = "l1"                  # λ is the L1 penalty's coefficient: the search is over the L1 crosscoder
SPLIT_SEED = 0               # relie.py's default --split-seed
GRID = dict(dict_sizes=(128, 256, 512), l1_coeffs=(1.0, 2.0, 4.0), selects=("positive", "abs"),
            methods=("atp", "ig"))
BARS = dict(fvu=0.05, l0=64, dead=0.25)     # the toy preset's quality bars (tests/test_toy_findings.py)
TIE = 1e-9
CRITERION = ("the mean over crosscoder seeds of the last revision's top-k minus random-k accuracy drop (points) on "
             "the inner test half of the selection pairs (ablate.py's verdicts.csv, excess_points)")
BARS_RULE = (f"every seed keeps the toy's quality bars on train.py's last validation line: FVU ≤ {BARS['fvu']:g} at "
             f"every revision, L0 ≤ {BARS['l0']:g}, dead ≤ {100 * BARS['dead']:g}%")
TIE_RULE = ("a tie (means within 1e-9 points) goes to the higher minimum over seeds, then to the current default, then "
            "to the first candidate in the grid's order")


# ---------------------------------------------------------------------------------------------
# The selection half: the only pairs the search reads

def split_halves(pairs, tok, task, max_pairs):
    """relie.py's default split of a task: (selection pairs, test pairs), each in relie's row order — the pairs
    that survive its tokenisation, at most max_pairs per sub-task, split with defaults.TEST_FRAC and seed 0."""
    batch = tasks.tokenize_pairs(tasks.limit_pairs(pairs, max_pairs), tok, task)
    sel, test, _ = tasks.split_pairs(batch.pairs, defaults.TEST_FRAC, SPLIT_SEED)
    return [batch.pairs[i] for i in sel], [batch.pairs[i] for i in test]


def pairs_jsonl(pairs) -> str:
    """The pairs as jsonl lines that tasks.load_pairs_jsonl reads back into the same Pair objects."""
    lines = []
    for p in pairs:
        rec = dict(prefix=p.prefix, good=p.good, bad=p.bad, subtask=p.subtask)
        if p.good_sentence and p.bad_sentence:
            rec |= dict(sentence_good=p.good_sentence, sentence_bad=p.bad_sentence)
        lines.append(json.dumps(rec) + "\n")
    return "".join(lines)


def check_against_relie(run, task, max_pairs, selection):
    """Where the run holds relie.py's default attribution of this task (same task, split and --max-pairs), its
    split.csv must give these selection pairs: tune.py reads what relie.py would select on, nothing else."""
    folder = Path(run) / "relie" / Path(task).stem
    if not (folder / "split.csv").exists() or not (folder / "summary.json").exists():
        return False
    s = read_json(folder / "summary.json", "attribution summary")
    sp = s.get("split", {})
    if (s.get("task") != task or sp.get("test_frac") != defaults.TEST_FRAC or sp.get("seed") != SPLIT_SEED
            or sp.get("max_pairs") != max_pairs):
        return False
    split = pd.read_csv(folder / "split.csv")
    theirs = split[split.side == "selection"].prefix.fillna("").tolist()
    if theirs != [p.prefix for p in selection]:
        raise UsageError(f"{folder}/split.csv splits {task} otherwise than relie.py does now; run relie.py again")
    return True


def selection_task(run_args, task, max_pairs, out, run) -> dict:
    """Write OUT/selection.jsonl (the selection half of relie.py's default split of task); what it holds."""
    tok = lm.load(lm.resolve(run_args["model"]), run_args["revisions"][0], weights=run_args.get("weights", "hub"))[1]
    sel, test = split_halves(tasks.load_task(task), tok, task, max_pairs)
    checked = check_against_relie(run, task, max_pairs, sel)
    path = Path(out) / "selection.jsonl"
    text = pairs_jsonl(sel)
    if path.exists() and path.read_text() != text:
        raise UsageError(f"{path} holds other pairs than the selection half of {task} with --max-pairs {max_pairs} "
                         f"(made with another task or --max-pairs); delete {out} or give another --out")
    common.write_text(path, text)
    return dict(file=str(path), task=task, max_pairs=max_pairs, test_frac=defaults.TEST_FRAC, split_seed=SPLIT_SEED,
                n_selection=len(sel), n_test_never_read=len(test), checked_against_relie_split=checked)


# ---------------------------------------------------------------------------------------------
# One candidate on one seed, and the choice among candidates

def keeps_bars(val_fvu, val_l0, val_dead) -> bool:
    return max(val_fvu) <= BARS["fvu"] and val_l0 <= BARS["l0"] and val_dead <= BARS["dead"]


def measured(folder, name, revisions) -> dict:
    """A finished candidate's numbers: the criterion (the last revision's verdict row, with its 95% interval over
    the inner test pairs' groups), the bars (train.py's last validation line), evaluate.py's FVU, L0 and dead
    beside them, and the sizes of relie.py's inner split."""
    v = pd.read_csv(folder / "ablation" / name / "verdicts.csv").set_index("revision").loc[revisions[-1]]
    val = last_log(folder)
    ev = read_json(folder / "eval.json", "evaluation")
    inner = read_json(folder / "relie" / name / "summary.json", "attribution summary")["split"]
    return dict(folder=str(folder), inner_selection_pairs=inner["n_selection"], inner_test_pairs=inner["n_test"],
                excess_points=float(v.excess_points), excess_points_lo=float(v.excess_points_lo),
                excess_points_hi=float(v.excess_points_hi), verdict=v.verdict, val_fvu=val["val_fvu"],
                val_l0=val["val_l0"], val_dead_frac=val["val_dead_frac"],
                keeps_bars=keeps_bars(val["val_fvu"], val["val_l0"], val["val_dead_frac"]),
                eval_fvu=[ev["revisions"][r]["fvu"] for r in revisions], eval_l0=ev["l0"],
                eval_dead_frac=ev["dead_frac"])


def candidate(setting, per_seed) -> dict:
    """A setting with its seeds' numbers, the criterion's mean / min / max and whether every seed keeps the bars."""
    s = summarise([dict(excess_points=p["excess_points"], val_fvu_max=max(p["val_fvu"]), val_l0=p["val_l0"],
                        val_dead_frac=p["val_dead_frac"]) for p in per_seed])
    crit = s.pop("excess_points")
    return dict(setting=setting, per_seed=per_seed, mean=crit["mean"], min=crit["min"], max=crit["max"],
                keeps_bars=all(p["keeps_bars"] for p in per_seed), summary=s)


def choose(candidates, current):
    """The candidate the criterion picks (module docstring): the highest mean among those that keep the bars;
    ties to the higher minimum, then to the setting `current`, then to the first listed. None when no candidate
    keeps the bars."""
    ok = [c for c in candidates if c["keeps_bars"] and c["mean"] is not None and math.isfinite(c["mean"])]
    if not ok:
        return None
    best = max(c["mean"] for c in ok)
    tied = [c for c in ok if c["mean"] >= best - TIE]
    low = max(c["min"] for c in tied)
    tied = [c for c in tied if c["min"] >= low - TIE]
    return next((c for c in tied if c["setting"] == current), tied[0])


# ---------------------------------------------------------------------------------------------

def run_stage(settings, seeds, out, run_args, task, threshold, revisions):
    """Every setting (dict_size, l1_coeff, select, method) on every seed through the stages; its candidate row."""
    rows = []
    name_of = lambda s: f"{Path(task).stem}-{s['method']}-{s['select']}"  # noqa: E731 (seed_run's folder name)
    for s in settings:
        per_seed = []
        for seed in seeds:
            folder = out / f"F{s['dict_size']}-lambda{s['l1_coeff']:g}-seed{seed}"
            print(f"   F {s['dict_size']}, λ {s['l1_coeff']:g}, {s['select']}, {s['method']}, seed {seed}",
                  file=sys.stderr, flush=True)
            seed_run(folder, dict(run_args, dict_size=s["dict_size"], l1_coeff=s["l1_coeff"]), ARCH, seed,
                     [s["method"]], task, s["select"], threshold, Path.cwd())
            per_seed.append(dict(seed=seed, **measured(folder, name_of(s), revisions)))
        rows.append(candidate(s, per_seed))
    return rows


def seed_values(c) -> str:
    return " ".join(f"{p['excess_points']:.1f}" for p in c["per_seed"])


def stage_table(rows, keys, last) -> str:
    head = " ".join(f"{k:>10}" for k in keys)
    lines = [f"{head}  {'excess points at ' + last + ', mean [min, max]':>40}  {'per seed':>16}  "
             f"{'val FVU max':>22}  {'L0':>20}  {'dead':>20}  bars"]
    for c in rows:
        s = c["summary"]
        lines.append(" ".join(f"{c['setting'][k]:>10}" for k in keys) + f"  {fmt(c):>40}  "
                     + f"{seed_values(c):>16}  "
                     f"{fmt(s['val_fvu_max']):>22}  {fmt(s['val_l0']):>20}  {fmt(s['val_dead_frac']):>20}  "
                     + ("kept" if c["keeps_bars"] else "MISSED"))
    return "\n".join(lines)


def parse_list(flag, kind, choices=None):
    def parse(s):
        out = []
        for x in s.split(","):
            if choices is not None:
                if x not in choices:
                    raise UsageError(f"{flag}: {x!r} is not one of {', '.join(choices)}")
                out.append(x)
            else:
                out.append(kind(x))
        if not out or len(set(out)) != len(out):
            raise UsageError(f"{flag} must list distinct values, got {s!r}")
        return out
    return parse


def parse_args(argv=None):
    run_dir, spec = cli.run_in(argv)
    p = cli.parser(__doc__.split("\n\n")[0], spec.preset)
    cli.add(p, "--run", "--task", "--threshold", "--max-pairs", run=str(run_dir), task=spec.task,
            threshold=spec.preset.ie_threshold)
    g = GRID
    p.add_argument("--dict-sizes", type=parse_list("--dict-sizes", common.positive("--dict-sizes")),
                   default=list(g["dict_sizes"]), help="stage 1's F (default: %(default)s)")
    p.add_argument("--l1-coeffs", type=parse_list("--l1-coeffs", cli.finite_positive("--l1-coeffs")),
                   default=list(g["l1_coeffs"]), help="stage 1's λ (default: %(default)s)")
    p.add_argument("--selects", type=parse_list("--selects", str, ("positive", "abs")), default=list(g["selects"]),
                   help="stage 2's rankings (default: %(default)s)")
    p.add_argument("--methods", type=parse_list("--methods", str, tuple(METHODS)), default=list(g["methods"]),
                   help="stage 2's attribution methods (default: %(default)s)")
    p.add_argument("--seeds", type=common.positive("--seeds"), default=2, help="crosscoder seeds 0 … N−1 per candidate "
                   "(default: %(default)s)")
    cli.add(p, "--out", "--results", out=str(Path(run_dir) / "tune"))
    args = p.parse_args(argv)
    args.out = Path(args.out)
    return args, spec


def main(argv=None):
    t0 = time.time()
    args, spec = parse_args(argv)
    base = Path(args.run)
    require_done(base, "training run", "train it with train.py first (bash pipeline.sh)")
    run_args = read_json(base / "run_args.json", "run arguments")
    revisions = run_args["revisions"]
    pre = spec.preset
    current = dict(dict_size=pre.dict_size, l1_coeff=pre.l1_coeff, select=defaults.SELECT, method=defaults.METHOD)
    pairs = selection_task(run_args, args.task, args.max_pairs, args.out, base)
    task = pairs["file"]
    seeds = list(range(args.seeds))
    print(f"the selection half of {args.task}: {pairs['n_selection']} pairs in {task} (the {pairs['n_test_never_read']}"
          " test pairs are never read)", file=sys.stderr, flush=True)

    print("stage 1: F × λ", file=sys.stderr, flush=True)
    first = [dict(dict_size=f, l1_coeff=float(lam), select=defaults.SELECT, method=defaults.METHOD)
             for f in args.dict_sizes for lam in args.l1_coeffs]
    rows1 = run_stage(first, seeds, args.out, run_args, task, args.threshold, revisions)
    pick1 = choose(rows1, current)
    rows2, pick2 = [], None
    if pick1 is not None:
        print("stage 2: ranking × method", file=sys.stderr, flush=True)
        second = [dict(pick1["setting"], select=sel, method=m) for sel in args.selects for m in args.methods]
        rows2 = run_stage(second, seeds, args.out, run_args, task, args.threshold, revisions)
        pick2 = choose(rows2, dict(pick1["setting"], select=current["select"], method=current["method"]))
    choice = pick2["setting"] if pick2 else None
    result = dict(run=str(base), task=args.task, pairs=pairs, arch=ARCH, seeds=seeds, revisions=revisions,
                  threshold=args.threshold, criterion=CRITERION, bars=dict(BARS, rule=BARS_RULE), tie_rule=TIE_RULE,
                  current_defaults=current,
                  stage1=dict(grid=dict(dict_sizes=args.dict_sizes, l1_coeffs=args.l1_coeffs), candidates=rows1,
                              choice=pick1["setting"] if pick1 else None),
                  stage2=dict(grid=dict(selects=args.selects, methods=args.methods), candidates=rows2,
                              choice=choice),
                  choice=choice, equals_defaults=choice == current,
                  differs_in=[k for k in current if choice and choice[k] != current[k]],
                  seconds=time.time() - t0)
    path = args.out / "tune.json"
    write_json(path, result)       # written whole and renamed into place: present means finished
    print(summary_text(result))
    if args.results:
        command = cli.command("tune.py", argv)
        common.update_results("tuning", results_markdown(result, command), ROOT / "FINDINGS.md")
    print(f"wrote {path}")


def _setting(s) -> str:
    return (f"F = {s['dict_size']}, λ = {s['l1_coeff']:g}, latents ranked by {s['select']} IE, attribution "
            f"{s['method']}")


def choice_sentence(result) -> str:
    c, cur = result["choice"], result["current_defaults"]
    if c is None:
        return f"No candidate keeps the bars: nothing is chosen; the current defaults ({_setting(cur)}) stand untested."
    if result["equals_defaults"]:
        return f"The choice is {_setting(c)}: the current defaults."
    return (f"The choice is {_setting(c)}; it differs from the current defaults ({_setting(cur)}) in "
            f"{', '.join(result['differs_in'])}. defaults.py is unchanged: every measured finding depends on the "
            "defaults, so changing them is a decision of its own.")


def summary_text(result) -> str:
    last = result["revisions"][-1]
    p = result["pairs"]
    out = [f"tuning on the selection half of {p['task']} ({p['n_selection']} pairs; relie.py splits them again, "
           f"ablate.py scores on the inner test half; the {p['n_test_never_read']} test pairs were not read)",
           f"criterion: {result['criterion']}", f"bars: {result['bars']['rule']}", result["tie_rule"],
           "\nstage 1 (ranked by positive IE, attribution atp):",
           stage_table(result["stage1"]["candidates"], ("dict_size", "l1_coeff"), last)]
    if result["stage2"]["candidates"]:
        out += ["\nstage 2 (at stage 1's choice):",
                stage_table(result["stage2"]["candidates"], ("select", "method"), last)]
    out.append("\n" + choice_sentence(result))
    return "\n".join(out)


def _md_rows(rows, keys) -> str:
    lines = []
    for c in rows:
        s = c["summary"]
        lines.append("| " + " | ".join(f"{c['setting'][k]:g}" if isinstance(c["setting"][k], float)
                                        else str(c["setting"][k]) for k in keys)
                     + f" | {fmt(c)} | {seed_values(c)} | "
                     f"{fmt(s['val_fvu_max'])} | {fmt(s['val_l0'])} | {fmt(s['val_dead_frac'])} | "
                     + ("yes" if c["keeps_bars"] else "**no**") + " |")
    return "\n".join(lines)


def results_markdown(result, command="python tune.py") -> str:
    p, last = result["pairs"], result["revisions"][-1]
    cols = (f"gap at {last} (points), mean [min, max] | per seed | val FVU (max over revisions) | val L0 | val dead "
            "| keeps the bars |")
    text = (f"## The toy's defaults chosen on the selection half of the pairs only (`{command}`)\n\n"
            f"The pairs: the selection half of relie.py's default split of {p['task']} ({p['n_selection']} pairs, "
            f"test_frac {p['test_frac']:g}, split seed {p['split_seed']}"
            + (f", --max-pairs {p['max_pairs']}" if p["max_pairs"] else "")
            + f"), written to a task file; relie.py splits it again and ablate.py scores each candidate on that inner "
            f"test half ({inner_sizes(result)}). The {p['n_test_never_read']} test pairs every reported finding is "
            f"measured on were not read. Every candidate: an {result['arch']} crosscoder on the run's own data and "
            f"tokens, crosscoder seeds {', '.join(map(str, result['seeds']))}. The criterion, fixed before looking: "
            f"{result['criterion']}, among the candidates where {result['bars']['rule']}; {result['tie_rule']}. "
            "Coordinate-wise: stage 1 "
            "varies F and λ (AtP, latents ranked by positive IE), stage 2 the ranking and the method at stage 1's "
            f"choice.{took(result.get('seconds'))}\n\n"
            f"Stage 1:\n\n| F | λ | {cols}\n|---|---|---|---|---|---|---|---|\n"
            f"{_md_rows(result['stage1']['candidates'], ('dict_size', 'l1_coeff'))}\n")
    if result["stage2"]["candidates"]:
        s1 = result["stage1"]["choice"]
        text += (f"\nStage 2, at F = {s1['dict_size']}, λ = {s1['l1_coeff']:g}:\n\n| ranking | method | {cols}\n"
                 f"|---|---|---|---|---|---|---|---|\n"
                 f"{_md_rows(result['stage2']['candidates'], ('select', 'method'))}\n")
    text += "\n" + choice_sentence(result) + spread_sentence(result)
    return text


def inner_sizes(result) -> str:
    p = result["stage1"]["candidates"][0]["per_seed"][0]
    return f"{p['inner_selection_pairs']} inner selection and {p['inner_test_pairs']} inner test pairs"


def spread_sentence(result) -> str:
    """How far the choice stands from the current defaults, beside the spread over seeds."""
    cur, c = result["current_defaults"], result["choice"]
    if c is None or result["equals_defaults"]:
        return ""
    rows = result["stage1"]["candidates"] + result["stage2"]["candidates"]
    mine = next((r for r in rows if r["setting"] == c), None)
    theirs = next((r for r in rows if r["setting"] == cur), None)
    if theirs is None:
        return " The current defaults were not among the candidates."
    overlap = mine["min"] <= theirs["max"] and theirs["min"] <= mine["max"]
    return (f" The choice's gap {num(mine['mean'])} [{num(mine['min'])}, {num(mine['max'])}] against the current "
            f"defaults' {num(theirs['mean'])} [{num(theirs['min'])}, {num(theirs['max'])}]: the seeds' ranges "
            + ("overlap, so the difference is within the spread over seeds." if overlap else "do not overlap."))


if __name__ == "__main__":
    common.run_main(main)
