"""tune.py: the tuning task file holds relie.py's selection half and nothing of its test half; the choice rule
respects the bars and breaks ties as its docstring says; and the whole command on a tiny grid over a small toy
run, its selection file checked against the split relie.py itself wrote."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import tune
from conftest import ROOT, word_tokenizer
from crosscoding import defaults, tasks
from crosscoding.common import UsageError

WORDS = [f"w{i}" for i in range(40)]


def synthetic_pairs():
    """Two sub-tasks with near-copies (shared prefixes, shared head and last word) and pairs the tokenizer drops
    (both answers out of its vocabulary: one <unk> token each, the same id)."""
    pairs = []
    for i in range(30):
        sub = "a" if i % 3 else "b"
        head, last = f"w{i % 7}", f"w{10 + i % 5}"
        bad = " oov1" if i % 11 == 4 else f" w{21 + i % 3}"
        good = " oov2" if i % 11 == 4 else f" w{30 + i % 4}"
        pairs.append(tasks.Pair(f"{head} w{i % 2} {last}", good, bad, sub,
                                good_sentence=f"{head} {last}{good} ." if i % 2 else None,
                                bad_sentence=f"{head} {last}{bad} ." if i % 2 else None))
    return pairs


def test_the_tuning_file_is_the_selection_half_in_relies_order(tmp_path):
    tok = word_tokenizer(WORDS)
    pairs = synthetic_pairs()
    sel, test = tune.split_halves(pairs, tok, "t", None)
    kept = [p for p in pairs if tasks.encode_pair(p, tok) is not None]
    assert len(kept) < len(pairs)                                     # some pairs are dropped by the tokenizer
    # relie.py's split, done as relie.py does it: the pairs that survive tokenisation, split_pairs with its defaults
    rows, test_rows, _ = tasks.split_pairs(kept, defaults.TEST_FRAC, 0)
    assert sel == [kept[i] for i in rows] and test == [kept[i] for i in test_rows]
    # all of the selection half, none of the test half, in the original order
    assert sorted(map(kept.index, sel + test)) == list(range(len(kept)))
    assert [kept.index(p) for p in sel] == sorted(kept.index(p) for p in sel)
    path = tmp_path / "selection.jsonl"
    path.write_text(tune.pairs_jsonl(sel))
    back = tasks.load_pairs_jsonl(path)
    assert back == sel                                                # sub-tasks and whole sentences kept
    assert not {p.prefix for p in back} & {p.prefix for p in test}    # no test-half prefix in the file
    # --max-pairs limits each sub-task before the split, as relie.py's does
    sel5, test5 = tune.split_halves(pairs, tok, "t", 5)
    assert len(sel5) + len(test5) == len(tasks.tokenize_pairs(tasks.limit_pairs(pairs, 5), tok).pairs) < len(kept)


def test_the_file_refuses_other_pairs_and_the_split_is_checked_against_relies(local_model, tmp_path):
    root, _, pairs = local_model
    run_args = dict(model=str(root), revisions=["step0", "step100"], weights="hub")
    run = tmp_path / "run"
    info = tune.selection_task(run_args, str(pairs), None, tmp_path / "out", run)
    sel = tasks.load_pairs_jsonl(info["file"])
    assert info["n_selection"] == len(sel) and info["n_selection"] + info["n_test_never_read"] == 20
    assert not info["checked_against_relie_split"]                    # the run has no attribution of this task
    tune.selection_task(run_args, str(pairs), None, tmp_path / "out", run)     # the same pairs again: kept
    with pytest.raises(UsageError, match="holds other pairs"):
        tune.selection_task(run_args, str(pairs), 4, tmp_path / "out", run)
    # relie.py's split.csv of the same task and split: agreeing is checked, differing refused
    folder = run / "relie" / pairs.stem
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(dict(task=str(pairs), split=dict(
        test_frac=defaults.TEST_FRAC, seed=0, max_pairs=None))))
    split = pd.DataFrame(dict(prefix=[p.prefix for p in sel], side="selection"))
    split.to_csv(folder / "split.csv", index=False)
    assert tune.selection_task(run_args, str(pairs), None, tmp_path / "out", run)["checked_against_relie_split"]
    split.iloc[::-1].to_csv(folder / "split.csv", index=False)
    with pytest.raises(UsageError, match="splits .* otherwise than relie.py"):
        tune.selection_task(run_args, str(pairs), None, tmp_path / "out", run)


def _cand(setting, values, bars=True):
    per_seed = [dict(excess_points=v, val_fvu=[0.01, 0.02], val_l0=20.0, val_dead_frac=0.1, keeps_bars=bars)
                for v in values]
    return tune.candidate(setting, per_seed)


def test_the_choice_keeps_the_bars_and_breaks_ties_as_stated():
    s = [dict(dict_size=f, l1_coeff=2.0) for f in (64, 128, 256, 512)]
    # the best mean misses the bars: the best of the rest is chosen
    rows = [_cand(s[0], [30, 40], bars=False), _cand(s[1], [10, 12]), _cand(s[2], [20, 22]), _cand(s[3], [5, 6])]
    assert tune.choose(rows, s[3])["setting"] == s[2]
    # a tie in the mean goes to the higher minimum over seeds, whatever the default
    rows = [_cand(s[0], [10, 30]), _cand(s[1], [19, 21]), _cand(s[2], [5, 6])]
    assert tune.choose(rows, s[0])["setting"] == s[1]
    # a tie in mean and minimum: the current default, else the first listed
    rows = [_cand(s[0], [19, 21]), _cand(s[1], [21, 19]), _cand(s[2], [19, 21])]
    assert tune.choose(rows, s[2])["setting"] == s[2]
    assert tune.choose(rows, s[3])["setting"] == s[0]
    # a candidate keeps the bars only if every seed does; none keeps them: no choice
    one_bad = tune.candidate(s[0], [dict(excess_points=50.0, val_fvu=[0.01], val_l0=10, val_dead_frac=0.1,
                                         keeps_bars=True),
                                    dict(excess_points=50.0, val_fvu=[0.06], val_l0=10, val_dead_frac=0.1,
                                         keeps_bars=False)])
    assert not one_bad["keeps_bars"] and tune.choose([one_bad, _cand(s[1], [1, 2])], s[0])["setting"] == s[1]
    assert tune.choose([one_bad], s[0]) is None
    # the bars at their edges (tests/test_toy_findings.py's: FVU ≤ 0.05 at every revision, L0 ≤ 64, dead ≤ 25%)
    assert tune.keeps_bars([0.05, 0.01], 64, 0.25)
    assert not tune.keeps_bars([0.01, 0.0501], 20, 0.1)
    assert not tune.keeps_bars([0.01], 64.1, 0.1) and not tune.keeps_bars([0.01], 20, 0.26)


def test_bad_grids_are_refused_in_one_line():
    for argv, msg in ((["--dict-sizes", "0"], "--dict-sizes must be a positive integer"),
                      (["--l1-coeffs", "2,-1"], "--l1-coeffs must be a finite number > 0"),
                      (["--selects", "top"], "--selects: 'top' is not one of positive, abs"),
                      (["--methods", "atp,magic"], "--methods: 'magic' is not one of"),
                      (["--dict-sizes", "64,64"], "--dict-sizes must list distinct values")):
        with pytest.raises(UsageError, match=msg):
            tune.parse_args(argv)


def test_both_stages_and_the_record(tmp_path, monkeypatch):
    """main() with the stages replaced by a table of numbers: stage 1 runs the whole F × λ grid, stage 2 every
    ranking × method at stage 1's choice (and nowhere else), and tune.json and the RESULTS section say what was
    chosen and that it differs from the defaults."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "DONE").write_text("{}")
    (run / "run_args.json").write_text(json.dumps(dict(model="toy", revisions=["a", "b"], dict_size=256,
                                                       l1_coeff=2.0)))
    gap = {(128, 1.0): 30.0, (128, 2.0): 12.0, (256, 2.0): 20.0, (512, 2.0): 25.0}    # others 10
    calls = []

    def fake_seed_run(folder, run_args, arch, seed, methods, task, select, threshold, cwd):
        calls.append((folder.name, run_args["dict_size"], run_args["l1_coeff"], arch, seed, methods[0], select))
        assert task == "sel.jsonl" and run_args["revisions"] == ["a", "b"]
        return folder

    def fake_measured(folder, name, revisions):
        f, lam = next(c[1:3] for c in calls if c[0] == folder.name)
        method, select = name.split("-")[1:]
        v = gap.get((f, lam), 10.0) + (5.0 if (select, method) == ("abs", "ig") else 0.0)
        v += 0.5 * int(folder.name[-1])     # seed 1 a little higher
        return dict(folder=str(folder), inner_selection_pairs=3, inner_test_pairs=2, excess_points=v,
                    val_fvu=[0.2 if lam == 1.0 else 0.03], val_l0=20.0, val_dead_frac=0.1,
                    keeps_bars=lam != 1.0)     # λ = 1 misses the FVU bar

    written = {}
    monkeypatch.setattr(tune, "seed_run", fake_seed_run)
    monkeypatch.setattr(tune, "measured", fake_measured)
    monkeypatch.setattr(tune, "selection_task", lambda *a: dict(file="sel.jsonl", task="toy_sva", max_pairs=None,
                                                                test_frac=0.5, split_seed=0, n_selection=5,
                                                                n_test_never_read=5))
    monkeypatch.setattr(tune.common, "update_results", lambda name, md, path: written.update({name: md}))
    tune.main(["--run", str(run), "--out", str(tmp_path / "out"), "--l1-coeffs", "1,2", "--results"])
    stage1 = {(c[1], c[2]) for c in calls if (c[5], c[6]) == ("atp", "positive")}
    assert stage1 == {(f, lam) for f in (128, 256, 512) for lam in (1.0, 2.0)}
    assert {c[3] for c in calls} == {"l1"} and {c[4] for c in calls} == {0, 1}
    stage2 = {(c[1], c[2], c[6], c[5]) for c in calls if (c[5], c[6]) != ("atp", "positive")}
    assert stage2 == {(512, 2.0, s, m) for s in ("positive", "abs") for m in ("atp", "ig")} - {(512, 2.0, "positive",
                                                                                             "atp")}
    res = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert res["stage1"]["choice"] == dict(dict_size=512, l1_coeff=2.0, select="positive", method="atp")
    assert res["choice"] == dict(dict_size=512, l1_coeff=2.0, select="abs", method="ig")
    assert not res["equals_defaults"] and res["differs_in"] == ["dict_size", "select", "method"]
    c = next(c for c in res["stage1"]["candidates"] if c["setting"]["dict_size"] == 128 and
             c["setting"]["l1_coeff"] == 1.0)
    assert (c["mean"], c["min"], c["max"], c["keeps_bars"]) == (30.25, 30.0, 30.5, False)
    md = written["tuning"]
    assert "`python tune.py --run" in md and "| 128 | 1 | 30.25 [30.00, 30.50] | 30.0 30.5 |" in md
    assert "**no** |" in md and "| abs | ig | 30.25 [30.00, 30.50] |" in md
    assert "differs from the current defaults" in md and "defaults.py is unchanged" in md
    assert "(3 inner selection and 2 inner test pairs)" in md and "crosscoder seeds 0, 1." in md


@pytest.mark.slow
def test_tune_on_a_tiny_grid(toy_run, tmp_path):
    """The whole command: stage 1 one (F, λ), stage 2 two rankings (one reused from stage 1), one seed, on the
    small toy run's data and 10 pairs per sub-task; then again, resuming with nothing left to do. λ = 0.5: the
    small run's 60 steps reach the FVU bar with it (val FVU ≤ 0.035), not with λ = 2 (0.063–0.075)."""
    cwd, run = toy_run
    out = tmp_path / "tune"
    cmd = [sys.executable, str(ROOT / "tune.py"), "--run", str(run), "--dict-sizes", "64", "--l1-coeffs", "0.5",
           "--selects", "positive,abs", "--methods", "atp", "--seeds", "1", "--max-pairs", "10", "--out", str(out)]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "tune.json").read_text())
    # the file is relie.py's own selection half of this run (its split.csv, written by the toy_run fixture's
    # `relie.py --max-pairs 10`), all of it, in order; nothing of its test half
    split = pd.read_csv(run / "relie" / "toy_sva" / "split.csv")
    sel = tasks.load_pairs_jsonl(out / "selection.jsonl")
    assert [p.prefix for p in sel] == split[split.side == "selection"].prefix.tolist()
    assert not {p.prefix for p in sel} & set(split[split.side == "test"].prefix)
    assert res["pairs"]["checked_against_relie_split"]
    assert res["pairs"]["n_test_never_read"] == (split.side == "test").sum()
    # every candidate attributed and ablated on that file, split again inside it
    (c1,) = res["stage1"]["candidates"]
    assert c1["setting"] == dict(dict_size=64, l1_coeff=0.5, select="positive", method="atp")
    assert c1["keeps_bars"], c1["per_seed"]
    folder = Path(c1["per_seed"][0]["folder"])
    summary = json.loads((folder / "relie" / "selection-atp-positive" / "summary.json").read_text())
    assert summary["task"].endswith("selection.jsonl") and summary["split"]["n_selection"] + summary["split"][
        "n_test"] == len(sel)
    assert (c1["per_seed"][0]["inner_selection_pairs"], c1["per_seed"][0]["inner_test_pairs"]) == (
        summary["split"]["n_selection"], summary["split"]["n_test"])
    inner = pd.read_csv(folder / "relie" / "selection-atp-positive" / "split.csv")
    assert set(inner.prefix) <= {p.prefix for p in sel}
    assert json.loads((folder / "config.json").read_text())["dict_size"] == 64
    # the criterion against ablation.csv (the top set's and the random sets' accuracy drops, averaged apart)
    last = res["revisions"][-1]
    a = pd.read_csv(folder / "ablation" / "selection-atp-positive" / "ablation.csv")
    a = a[(a.subtask == "all") & (a.selected_at == last) & (a.revision == last)]
    gap = 100 * (a[a.kind == "top"].acc_drop.mean() - a[a.kind == "random"].acc_drop.mean())
    assert c1["per_seed"][0]["excess_points"] == pytest.approx(gap, abs=1e-9) and c1["mean"] == pytest.approx(gap)
    # stage 2 at stage 1's choice; its positive / atp row is stage 1's, not measured again
    rows2 = {(c["setting"]["select"], c["setting"]["method"]): c for c in res["stage2"]["candidates"]}
    assert set(rows2) == {("positive", "atp"), ("abs", "atp")}
    assert rows2[("positive", "atp")]["per_seed"] == c1["per_seed"]
    assert (folder / "ablation" / "selection-atp-abs" / "DONE").is_file()
    assert res["choice"] in [c["setting"] for c in res["stage2"]["candidates"]]
    assert res["equals_defaults"] is False and "dict_size" in res["differs_in"]   # F = 64 is not the default
    assert "stage 1" in r.stdout and "The choice is" in r.stdout
    md = tune.results_markdown(res, "python tune.py --seeds 1")
    assert "(`python tune.py --seeds 1`)" in md and "| 64 | 0.5 |" in md and "| abs | atp |" in md
    # a second run resumes: every stage finished, nothing trained or measured again
    done = {p: p.stat().st_mtime for p in out.rglob("DONE")}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in out.rglob("DONE")} == done
    assert json.loads((out / "tune.json").read_text())["stage2"]["candidates"] == res["stage2"]["candidates"]
