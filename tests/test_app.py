"""app.py over small toy runs of 3 and 10 revisions: every page renders, the emergence map holds every latent,
the Timeline draws every latent grouped by formed_at, revisions keep their training order everywhere,
annotations are saved and survive a reload, hostile names and strings are refused or escaped, the viewer loads
no torch; every verdict the stages wrote is shown (the Ablation page's per-revision top-k verdicts, joint,
class, leave-one-out, overlap and consistency tables; the Checks page's controls, checkpoint sets and seeds;
each Timeline latent's); and real-browser tests (headless Chromium) of every page at M = 3 and M = 10, measured
on the rendered SVG, with a screenshot of each page kept. The 10-revision run's stages also show the command line
at M = 10: relie.py without Python warnings, train.py and evaluate.py warning on the FVU bar. Stages run in this
process (conftest.run_stage); the stability files, which take a controls or seeds run to make, are written here
in the shapes controls.py, checkpoint_sets.py and seeds.py write."""
import contextlib
import html
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow   # whole stages and a real app server: `-m 'not slow'` skips them

PAGES = ["Checkpoints", "Training", "Latents", "Timeline", "Ablation", "Checks"]
M10 = ["step0", "step16", "step32", "step64", "step96", "step128", "step160", "step192", "step256", "step512"]
MARK = {"holds": "✔", "fails": "✘", "uninformative": "?"}
NOT_HOLD = "the latent-level finding does not hold at this revision"


def open_app(page, run=None):
    """An AppTest of app.py opened on a page (and a run), over the folders CCT_RUNS and CCT_SCANS name."""
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.session_state["page"] = page
    if run:
        at.session_state["run"] = run
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.fixture
def app(m10, monkeypatch):
    """The 3-revision run (a copy of toy_run's, in the app's runs folder) opened on a page."""
    monkeypatch.setenv("CCT_RUNS", str(m10["runs"]))
    monkeypatch.setenv("CCT_SCANS", str(m10["scans"]))
    (m10["runs"] / "toy-small" / "annotations.csv").unlink(missing_ok=True)
    return lambda page: open_app(page, "toy-small")


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders(app, page):
    at = app(page)
    if page == "Checks":    # tables and verdicts only
        assert any("cct-verdict" in m.value for m in at.markdown)
    else:
        assert len(at.get("vega_lite_chart")) >= 1, f"{page} shows no chart"
    assert not at.error


def test_emergence_map_holds_every_latent(app, m10):
    run = m10["runs"] / "toy-small"
    at = app("Latents")
    n = json.loads((run / "config.json").read_text())["dict_size"]
    import pyarrow as pa
    chart = at.get("vega_lite_chart")[0].proto
    assert "emergence map" in chart.spec
    latents = set()
    for ds in chart.datasets:   # the chart's data travels as Arrow tables beside the spec
        table = pa.ipc.open_stream(ds.data.data).read_all()
        if "latent" in table.column_names:
            latents |= set(table.column("latent").to_pylist())
    assert latents == set(range(n))


def test_annotation_saved_and_survives_reload(app, m10):
    run = m10["runs"] / "toy-small"
    at = app("Latents")
    latent = at.selectbox(key="latent").value
    text = "promotes plural verbs <script>alert(1)</script>"
    at.text_area(key=f"desc-{run.name}-{latent}").input(text)
    at.text_input(key=f"tags-{run.name}-{latent}").input("number, verb")
    at.button[0].click().run()
    assert not at.exception
    ann = pd.read_csv(run / "annotations.csv")
    assert ann.loc[ann.latent == latent, "description"].item() == text
    again = app("Latents")
    assert again.text_area(key=f"desc-{run.name}-{latent}").value == text
    # the script tag is never rendered as HTML anywhere on the page
    assert all("<script>" not in m.value for m in again.markdown)


def test_relie_export_picks_up_annotations(tmp_path):
    import numpy as np
    import torch

    import relie
    from crosscoding.crosscoder import CrossCoder, CrossCoderConfig
    from crosscoding.measures import save_annotation
    save_annotation(tmp_path, 3, "plural <b>verbs</b>", "number")
    save_annotation(tmp_path, 5, "other", "")
    save_annotation(tmp_path, 3, "plural verbs", "number")        # a later save replaces the earlier one
    ann = relie.read_annotations(tmp_path)
    assert ann == {3: dict(description="plural verbs", tags="number"), 5: dict(description="other", tags="")}

    class FakeRun:
        revisions, revision_tokens = ["a", "b"], [10, 100]
        cc = CrossCoder(CrossCoderConfig(n_models=2, d_model=4, dict_size=6))
    att = dict(ie=torch.tensor([[[0.0, 0, 0, 1.0, 0, 2.0], [0, 0, 0, 0.5, 0, 0]]]), err=torch.zeros(1, 2),
               n=torch.ones(1), subtasks=["s"])
    sheet = relie.latent_sheet(FakeRun(), att, [3, 5], np.full((6, 2), 0.5), ann, {5: True})
    assert sheet.description.tolist() == ["plural verbs", "other"] and sheet.artifact.tolist() == [False, True]
    html = relie.render_html("t", sheet, {}, {}, ["a", "b"])
    assert "plural verbs" in html


CONCURRENT = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from crosscoding import measures
for i in range(int(sys.argv[3]), int(sys.argv[3]) + 20):
    measures.save_annotation(Path(sys.argv[2]), i, f"d{i}", "")
"""


def test_concurrent_annotations_lose_nothing(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(ROOT), str(tmp_path), str(lo)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for lo in (1000, 2000)]
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read()
    ann = pd.read_csv(tmp_path / "annotations.csv")
    assert set(ann.latent) == set(range(1000, 1020)) | set(range(2000, 2020))


def test_run_names_outside_roots_refused(tmp_path):
    import app
    for bad in ["..", "../etc", "/etc", "a/b", "", "."]:
        with pytest.raises(ValueError, match="refused"):
            app.inside(tmp_path, bad)
    assert app.inside(tmp_path, "ok") == tmp_path.resolve() / "ok"


def test_viewer_imports_no_torch():
    """The app only reads files: importing it (and the table helpers it uses) never loads torch."""
    r = subprocess.run([sys.executable, "-c", "import sys, app; sys.exit('torch' in sys.modules)"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_streamlit_binds_localhost():
    cfg = (ROOT / ".streamlit" / "config.toml").read_text()
    assert 'address = "127.0.0.1"' in cfg


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextlib.contextmanager
def served_app(runs, scans):
    """`streamlit run app.py` on a free localhost port over these folders; yields its URL once it listens."""
    port = _free_port()
    env = dict(os.environ, CCT_RUNS=str(runs), CCT_SCANS=str(scans))
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
                               "--server.port", str(port), "--server.headless", "true",
                               "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(10)


def _chromium(p):
    return p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])


def _timeline_runs(root):
    """Run folders over M = 2, 3 and 8 toy revisions whose latents have hand-set decoder-norm curves (the
    crosscoder alone: the app reads its safetensors when evaluate.py has not run)."""
    import numpy as np
    import torch

    from crosscoding.crosscoder import CrossCoder, CrossCoderConfig
    revs = ["step0", "step16", "step32", "step64", "step96", "step128", "step192", "step512"]
    made = {}
    for M in (2, 3, 8):
        r = revs[:: max(1, len(revs) // M)][:M] if M < 8 else revs
        cc = CrossCoder(CrossCoderConfig(n_models=M, d_model=8, dict_size=40, seed=M))
        g = np.random.default_rng(M)
        curves = g.random((40, M)) ** 3
        curves[np.arange(40), g.integers(0, M, 40)] = 1.0
        with torch.no_grad():
            cc.W_dec_FMd.copy_(torch.nn.functional.normalize(cc.W_dec_FMd, dim=-1) * torch.tensor(curves)[..., None])
        folder = root / f"timeline-M{M}"
        cc.save(folder, extra=dict(model="toy", revisions=r, layer=0,
                                   revision_tokens=[int(x[4:]) * 2048 for x in r]))
        (folder / "DONE").write_text("{}")
        made[M] = (folder, r)
    return made


def _frames(chart):
    """The data tables of a rendered chart (Arrow, beside its spec)."""
    import pyarrow as pa
    return [pa.ipc.open_stream(ds.data.data).read_all().to_pandas() for ds in chart.proto.datasets]


@pytest.mark.parametrize("M", [2, 3, 8])
def test_timeline_page_renders_in_formed_at_order(M, tmp_path, monkeypatch, toy_run):
    import numpy as np

    import app
    cwd, _ = toy_run
    runs = tmp_path / "runs"
    made = _timeline_runs(runs)
    monkeypatch.setenv("CCT_RUNS", str(runs))
    monkeypatch.setenv("CCT_SCANS", str(cwd / "scans"))
    folder, revs = made[M]
    at = open_app("Timeline", folder.name)
    heat = [c for c in at.get("vega_lite_chart") if "grouped by formed_at" in c.proto.spec][0]
    cells = [c for c in _frames(heat) if "row" in c.columns][0]
    formed = app.decoder_table(str(folder), 0.0).set_index("latent").formed_at.map({r: i for i, r in enumerate(revs)})
    rows = cells.drop_duplicates("latent").sort_values("row")
    assert len(rows) == 40 and (np.diff(formed[rows.latent].to_numpy()) >= 0).all()   # every latent, by formed_at
    assert set(cells.revision) == set(revs)
    # the groups' rows follow one another without overlap
    assert (rows.row.to_numpy()[1:] >= rows.row_end.to_numpy()[:-1] - 1e-9).all()


def test_decoder_cosines_match_evaluate(toy_run):
    """The app's cosines read from the crosscoder (no latents.csv) are evaluate.py's (torch, normalised space)."""
    import numpy as np

    import app
    _, run = toy_run
    mine = app.decoder_table(str(run), 0.0)
    theirs = pd.read_csv(run / "latents.csv")
    cos = [c for c in theirs.columns if c.startswith("cos_")]
    assert len(cos) == 3 and np.allclose(mine[cos].to_numpy(), theirs[cos].to_numpy(), atol=1e-5)
    assert (mine.formed_at == theirs.formed_at).all()


def test_row_layout_and_group_caps():
    import numpy as np

    import app
    groups = np.array(["a"] * 300 + ["b"] + ["c"] * 3)
    y0, y1, total, px = app.row_layout(groups)
    assert (np.diff(y0) > 0).all() and np.allclose(y1[:-1], y0[1:])
    assert (y1[-1] - y0[-4]) * px >= 16 - 1e-9 and (y1[300] - y0[300]) * px >= 16 - 1e-9   # small groups: a label
    caps = app.group_caps({"a": 5000, "b": 1, "c": 30, "d": 900}, 1000)
    assert caps["b"] == 1 and caps["c"] == 30 and sum(caps.values()) <= 1000 and min(caps.values()) >= 1
    assert caps["a"] + caps["d"] == 1000 - 31 and abs(caps["a"] - caps["d"]) <= 1   # the rest split evenly


# ---------------------------------------------------------------------------------------------
# A run over 10 revisions, its stages as a user runs them; its outputs are what the M = 10 tests read

@pytest.fixture(scope="module")
def m10(tmp_path_factory, toy_run):
    """The toy over 10 revisions, small (a 2k-token cache, 20 steps of a 128-latent crosscoder validated twice, 4
    pairs per sub-task; latents still form at step16, step32 and step64): each stage's output (conftest.run_stage),
    and the folder of runs the app reads: copies of this run and of toy_run's (the 10-revision one newest), each
    with stability files (write_checks)."""
    from conftest import run_stage
    cwd = tmp_path_factory.mktemp("m10")
    out = {}
    run = cwd / "runs" / "toy-m10"
    steps = [("cache", ["cache_acts.py", "--model", "toy", "--revisions", ",".join(M10), "--tokens", "2048",
                        "--out", str(cwd / "cache" / "c10")]),
             ("train", ["train.py", "--revisions", ",".join(M10), "--dict-size", "128", "--tokens", str(1024 * 20),
                        "--log-every", "10", "--cache", str(cwd / "cache" / "c10"), "--out", str(run)]),
             ("evaluate", ["evaluate.py", "--run", str(run), "--blocks", "8"]),
             ("relie", ["relie.py", "--run", str(run), "--max-pairs", "4", "--context-blocks", "2", "--top-k", "3"]),
             ("ablate", ["ablate.py", "--run", str(run), "--max-pairs", "4", "--draws", "1", "--top-k", "3"])]
    for name, args in steps:
        out[name] = run_stage(args, cwd)
    runs = cwd / "app-runs"
    runs.mkdir()
    shutil.copytree(toy_run[1], runs / toy_run[1].name, ignore=shutil.ignore_patterns("stability"))
    write_checks(runs / toy_run[1].name, "graded")
    time.sleep(0.01)
    shutil.copytree(run, runs / run.name)     # copied last: the newest run
    write_checks(runs / run.name, "conjunction")
    (runs / run.name / "config.json").touch()
    return dict(cwd=cwd, run=run, runs=runs, scans=toy_run[0] / "scans", **out)


CONTROLS = {"shuffled-revisions": "revision-specific structure", "untrained-lm": "learned features (the LMs untrained)",
            "fixed-decoder": "learned directions (a fixed random decoder)"}


def write_checks(run, checkpoints="graded"):
    """RUN/stability/ as controls.py, checkpoint_sets.py and seeds.py write it: controls.json (each check × control,
    one check made uninformative by its control); checkpoint_sets.json, graded (checkpoint_sets.py's per-cosine
    survival with its verdict) or, with checkpoints='conjunction', the older one-rate-per-variant shape that has
    none; seeds.json from the run's own findings (crosscoding.findings over its files) as two crosscoder seeds whose
    last revision's verdict differs, two split seeds, and two LM seeds, the second failing."""
    from crosscoding import findings
    cfg = json.loads((run / "config.json").read_text())
    revs = cfg["revisions"]
    stab = run / "stability"
    stab.mkdir(exist_ok=True)
    checks = {"top-k vs random-k": ("untrained-lm", "fixed-decoder"),
              "joint ablation": ("untrained-lm", "fixed-decoder"),
              "consistency ρ beyond membership": ("shuffled-revisions",),
              "seed matching": ("untrained-lm", "fixed-decoder")}
    own = {"top-k vs random-k": "holds", "joint ablation": "fails", "consistency ρ beyond membership": "holds",
           "seed matching": "holds"}
    rows = []
    for k, (check, designated) in enumerate(checks.items()):
        ctl = {c: dict(value=0.1 * k + 0.01 * j, about=f"{check} on {c}", designated=c in designated,
                       verdict="holds" if check == "seed matching" and c == "fixed-decoder" else "fails")
               for j, c in enumerate(CONTROLS)}
        by = [c for c in designated if own[check] == "holds" and ctl[c]["verdict"] == "holds"]
        rows.append(dict(check=check, about=f"what {check} measures", real=1.5 + k, real_verdict=own[check],
                         verdict="uninformative" if by else own[check], uninformative_by=by, controls=ctl))
    rec = {"run": dict(fvu=[0.02 + 0.001 * m for m in range(len(revs))], l0=21.0, dead=0.1)}
    for j, c in enumerate(CONTROLS):
        rec[c] = dict(fvu=[0.03 + 0.01 * j] * len(revs), l0=20.0 + j, dead=0.2, matched=j != 2)
    (stab / "controls.json").write_text(json.dumps(dict(
        attribution="toy_sva-atp-positive", rows=rows, reconstruction=rec, controls=CONTROLS, folders={}, factor=2.0,
        rules=dict(control="a check that holds where a control removed what it credits is uninformative"),
        note="every ablation on the held-out test pairs")))
    (stab / "checkpoint_sets.json").write_text(json.dumps(
        graded_checkpoint_sets(revs) if checkpoints == "graded" else conjunction_checkpoint_sets(revs)))
    f = findings.findings_of(run, "toy_sva", revs)
    last = f"topk_holds_{revs[-1]}"
    per_seed = [f, dict(f, **{last: 1 - f[last], "topk_holds_last": 1 - f[last]})]
    ver = pd.read_csv(run / "ablation" / "toy_sva" / "verdicts.csv").set_index("revision").loc[revs[-1]]
    v0 = dict(revision=revs[-1], acc_clean=float(ver.acc_clean), flag=ver.flag if isinstance(ver.flag, str) else "",
              verdict=ver.verdict, **{k: float(ver[k]) for k in ("excess_points", "excess_points_lo",
                                                                 "excess_points_hi", "excess_delta", "excess_delta_lo",
                                                                 "excess_delta_hi")})
    v1 = dict(v0, excess_points=0.4, excess_points_lo=-1.0, excess_points_hi=1.8, verdict="fails")
    summ = findings.summarise(per_seed)
    few = findings.summarise([{k: g[k] for k in ("ablation_gap_last", "topk_holds_last", "joint_holds_last",
                                                 "consistency_holds", "rho_relie_mean")} for g in per_seed])
    x = findings.summarise([{"x": 0.6}, {"x": 0.7}])["x"]
    (stab / "seeds.json").write_text(json.dumps(dict(
        run=str(run), arch="l1", task="toy_sva", seeds=[0, 1], revisions=revs, method="atp", select="positive",
        runs=[], methods={"atp": dict(findings=summ, matched_top_k_fraction=x, matched_random_fraction=x)},
        pairs="findings from ablations are on the held-out test pairs", findings=summ, matched_top_k_fraction=x,
        matched_random_fraction=x, split_seeds=dict(seeds=[0, 1], findings=few),
        lm_seeds=dict(seeds=[0, 1], revisions=[revs, revs], verdicts=[dict(seed=0, **v0), dict(seed=1, **v1)],
                      findings=few))))


def _compared(top, null_mean, **kw):
    return dict(top=top, lo=top - 0.1, hi=top + 0.1, n=8, null_mean=null_mean, null_lo=null_mean - 0.05,
                null_hi=null_mean + 0.05, null=[null_mean] * 3, **kw)


def graded_checkpoint_sets(revs) -> dict:
    """checkpoint_sets.json as its graded-survival version writes it: per variant and cosine the top latents kept
    beside the null, graded over the drop/add variants and over the shifts, a verdict; one latent cannot be told."""
    grid = ["0.8", "0.85", "0.9"]
    names = [f"drop-{revs[1]}", f"add-{revs[0]}x", "shift-later"]
    variants = [dict(name=n, revisions=revs[:1] + revs[2:] if i == 0 else revs, shared=revs, folder="", shift=i == 2,
                     n=8 - i, class_kept=0.7, formed_agrees=0.8,
                     by_cos={c: _compared(0.5 + 0.1 * i, 0.3, matched=0.9) for c in grid})
                for i, n in enumerate(names)]
    latents = [dict(latent=7 + i, timeline_class="emerging", formed_at=revs[1], formed=[0.0, 1.0], variants={
        n: dict(partner=3, cos=0.95, class_shared="emerging", class_variant="kept" if i == 1 else "emerging",
                formed_variant=revs[1], formed_variant_interval=[0.0, 1.0], formed_agrees=True,
                cannot_tell=n == names[0] and i == 0,
                kept={c: None if (n == names[0] and i == 0) else i == 0 for c in grid}) for n in names})
        for i in range(2)]
    graded = dict(variants=names[:2], by_cos={c: dict(_compared(0.6, 0.3), verdict="holds", why="top above the null",
                                                      matched=_compared(0.9, 0.8)) for c in grid})
    shifts = dict(variants=names[2:], by_cos={c: dict(_compared(0.2, 0.3), verdict="fails", why="inside the null",
                                                      matched=_compared(0.5, 0.5)) for c in grid})
    return dict(variants=variants, latents=latents, graded=graded, shifts=shifts, every=_compared(0.25, 0.1),
                verdict=dict(finding="the top latents' timelines are robust to the checkpoints chosen",
                             verdict="holds", why="top [0.50, 0.70] above the null's [0.25, 0.35]",
                             rule="holds when the top latents' graded survival's interval lies above the null's",
                             cos=0.9), times={}, match_cos=0.9, grid=[0.8, 0.85, 0.9], draws=3, null_pooled=[])


def conjunction_checkpoint_sets(revs) -> dict:
    """checkpoint_sets.json as the version before graded survival writes it: no verdict."""
    names = [f"drop-{revs[1]}", "shift-later"]
    return dict(variants=[dict(name=n, revisions=revs, shared=revs, folder="", matched=0.5, survives=0.25,
                               matched_null=[0.3, 0.4], survives_null=[0.1, 0.2]) for n in names],
                latents=[dict(latent=5, timeline_class="kept", formed_at=revs[0], variants={
                    n: dict(partner=2, cos=0.7, class_shared="kept", class_variant="kept", formed_shared=revs[0],
                            formed_variant=revs[0], survives=False) for n in names})],
                survive_all=0.25, survive_all_null=dict(mean=0.2, lo=0.1, hi=0.3), match_cos=0.9)


def test_relie_at_m10_prints_no_python_warning(m10):
    """relie.py over 10 revisions: its table is not buried under pandas' warnings (nor any other's), and beside
    the one-vs-all classes (mostly ±others at 10 revisions) it prints each latent's timeline class and where to read
    more."""
    both = m10["relie"].stdout + m10["relie"].stderr
    assert "Warning" not in both, [line for line in both.splitlines() if "Warning" in line][:3]
    out = m10["relie"].stdout
    assert "wrote" in out and "ie_timeline_class" in out.splitlines()[1] and "the app's Timeline page" in out


def test_fvu_bar_warning_names_the_revisions_that_miss_it(m10):
    from crosscoding import measures
    last = json.loads((m10["run"] / "log.jsonl").read_text().splitlines()[-1])
    miss = [r for r, v in zip(M10, last["val_fvu"]) if v > measures.FVU_BAR]
    line = [l for l in m10["train"].stdout.splitlines() if l.startswith("warning: val FVU")]
    assert miss, "20 steps should leave some revision over the bar"
    assert len(line) == 1 and all(f"{r} (" in line[0] for r in miss)
    assert not any(f"{r} (" in line[0] for r in M10 if r not in miss)
    ev = json.loads((m10["run"] / "eval.json").read_text())["revisions"]
    held = [l for l in m10["evaluate"].stdout.splitlines() if l.startswith("warning: held-out FVU")]
    assert len(held) == 1 and all((f"{r} (" in held[0]) == (ev[r]["fvu"] > measures.FVU_BAR) for r in M10)
    assert measures.fvu_warning({"a": 0.04, "b": 0.05}, "FVU") is None


@pytest.fixture
def at10(m10, monkeypatch):
    """An AppTest over the app's runs (the 10-revision run newest, opened by default) on a page."""
    monkeypatch.setenv("CCT_RUNS", str(m10["runs"]))
    monkeypatch.setenv("CCT_SCANS", str(m10["scans"]))
    return open_app


def test_run_picker_newest_first_with_config(at10, m10):
    at = at10("Training")
    picker = at.sidebar.radio(key="run")
    assert picker.options == ["toy-m10", "toy-small"] and picker.value == "toy-m10"   # newest first, opened on it
    table = at.table[0].value
    cfg = json.loads((m10["run"] / "config.json").read_text())
    shown = dict(zip(table.index, table.iloc[:, 0]))
    assert shown["architecture (--arch)"] == "l1" and shown["F, latents (--dict-size)"] == "128"
    assert shown["revisions"] == f"10: {', '.join(M10)}" and shown["training tokens (--tokens)"] == str(cfg["tokens"])
    assert shown["seed"] == "0"
    assert shown["λ, the L1 penalty's weight after its warm-up (--l1-coeff)"] == str(cfg["l1_coeff"])
    assert not [row for row in shown if row.endswith("(--k)")]      # BatchTopK's, not L1's


def _rank_ok(values, revs):
    rank = {r: i for i, r in enumerate(revs)}
    known = [rank[v] for v in values if v in rank]
    return known == sorted(known)


def _encodings(spec):
    """Every (channel, encoding) of a Vega-Lite spec, through layers and concatenations."""
    if isinstance(spec, dict):
        for k, v in spec.items():
            if k == "encoding" and isinstance(v, dict):
                yield from v.items()
            else:
                yield from _encodings(v)
    elif isinstance(spec, list):
        for v in spec:
            yield from _encodings(v)


@pytest.mark.parametrize("page", PAGES)
def test_revisions_in_training_order_everywhere(at10, page):
    """Every chart that puts revisions on an axis, a legend or a facet sorts them in training order, and every
    table lists them so (columns, rows and index): never alphabetically (step128 before step16)."""
    at = at10(page)
    for chart in at.get("vega_lite_chart"):
        for channel, enc in _encodings(json.loads(chart.proto.spec)):
            if channel in ("x", "y", "color", "column", "row", "facet", "xOffset") and isinstance(enc, dict) \
                    and enc.get("field") in ("revision", "selected_at", "a", "b") \
                    and enc.get("type") in ("nominal", "ordinal"):
                assert enc.get("sort") == M10 or (enc.get("scale") or {}).get("domain") == M10, enc
    for frame in [d.value for d in at.dataframe] + [t.value for t in at.table]:
        assert _rank_ok(list(frame.columns), M10) and _rank_ok(list(frame.index), M10)
        for key in ("selected_at", "A", "revision"):
            if key in frame.columns:
                assert _rank_ok(list(dict.fromkeys(frame[key])), M10), (key, frame[key].tolist())
                break


def test_latents_page_one_coverage_figure_and_faithful_first(at10, m10):
    at = at10("Latents")
    cover = [c for c in at.get("vega_lite_chart") if '"share of the task"' in c.proto.spec]
    assert len(cover) == 1
    frame = [f for f in _frames(cover[0]) if "share" in f.columns][0]
    summary = json.loads((m10["run"] / "relie" / "toy_sva" / "summary.json").read_text())
    lat = frame[frame.part.str.startswith("latents")].set_index("revision").share
    assert all(abs(lat[r] - summary["coverage"][r]["latents_share"]) < 1e-9 for r in M10)   # measured: bars
    by_ie = frame.drop_duplicates("revision").set_index("revision").error_by_ie               # by IE: diamonds
    assert all(abs(by_ie[r] - (1 - summary["coverage"][r]["latents_share_ie"])) < 1e-9 for r in M10)
    assert not [c for c in at.get("vega_lite_chart") if "error share" in c.proto.spec]   # no second figure
    sheet = pd.read_csv(m10["run"] / "relie" / "toy_sva" / "latents.csv")
    flags = sheet[[f"unfaithful_{r}" for r in M10]].sum(axis=1)
    first = at.selectbox(key="latent").value
    if (flags == 0).any():    # a faithful latent exists: the page opens on one
        assert flags[sheet.latent == first].item() == 0
    bad = sheet.latent[flags > 0]
    options = at.selectbox(key="latent").options
    assert all("⚠" in o for o in options if int(o.split()[0]) in set(bad))


def test_timeline_ie_view_shows_cosines(at10, m10):
    at = at10("Timeline")
    at.radio(key="tl-source").set_value("|IE|").run()
    assert not at.exception, [e.value for e in at.exception]
    cos = [c for c in at.get("vega_lite_chart") if "decoder cosine" in c.proto.spec]
    assert len(cos) == 1
    frame = [f for f in _frames(cos[0]) if "cos" in f.columns][0]
    off = frame[frame.a != frame.b]
    assert len(off) == 90 and off.cos.notna().all() and (off.cos < 1 - 1e-6).any()   # not just the diagonal


def verdict_rows(at) -> list:
    """The HTML of every verdict line the page shows (a badge and its text), expanders included."""
    return [r for m in at.markdown for r in m.value.split("<div class='cct-verdict-row'")[1:]]


def badge(verdict) -> str:
    return f">{MARK[verdict]} {verdict}</span>"


@pytest.mark.parametrize("name", ["toy-small", "toy-m10"])
def test_ablation_page_shows_each_revisions_verdict(at10, m10, name):
    """verdicts.csv, every revision: its badge, clean accuracy and flag, excess points and Δ with intervals, and
    where it does not hold, the sentence that says so."""
    at = at10("Ablation", name)
    ver = pd.read_csv(m10["runs"] / name / "ablation" / "toy_sva" / "verdicts.csv")
    rows = verdict_rows(at)
    for v in ver.itertuples():
        mine = [r for r in rows if f"<b>{v.revision}</b> — clean accuracy {v.acc_clean:.2f}" in r]
        assert len(mine) == 1, (v.revision, rows)
        assert badge(v.verdict) in mine[0] and (NOT_HOLD in mine[0]) == (v.verdict != "holds")
        assert f"{v.excess_points:+.1f} [{v.excess_points_lo:+.1f}, {v.excess_points_hi:+.1f}] points" in mine[0]
        assert f"{v.excess_delta:+.3f} [{v.excess_delta_lo:+.3f}, {v.excess_delta_hi:+.3f}]" in mine[0]
        flag = v.flag if isinstance(v.flag, str) else ""
        assert (f"(at {flag}:" in mine[0]) == bool(flag)


def test_a_failing_revision_says_the_finding_does_not_hold(m10, tmp_path, monkeypatch):
    """The same run with its first revision's verdict turned: the sentence follows the verdict."""
    runs = tmp_path / "runs"
    shutil.copytree(m10["runs"] / "toy-small", runs / "toy-small")
    path = runs / "toy-small" / "ablation" / "toy_sva" / "verdicts.csv"
    ver = pd.read_csv(path)
    ver.loc[0, "verdict"] = "fails" if ver.verdict[0] == "holds" else "holds"
    ver.to_csv(path, index=False)
    monkeypatch.setenv("CCT_RUNS", str(runs))
    monkeypatch.setenv("CCT_SCANS", str(m10["scans"]))
    rows = verdict_rows(open_app("Ablation"))
    for v in ver.itertuples():
        mine = [r for r in rows if f"<b>{v.revision}</b> — clean accuracy" in r]
        assert len(mine) == 1 and badge(v.verdict) in mine[0] and (NOT_HOLD in mine[0]) == (v.verdict != "holds")


@pytest.mark.parametrize("name", ["toy-small", "toy-m10"])
def test_accuracy_drops_shown_beside_delta_with_flags(at10, m10, name):
    """Every chart of accuracy drops has its Δ beside it, and every revision at ceiling or chance is named so on
    their axes; the Δ bars are ablation.csv's, with their intervals."""
    at = at10("Ablation", name)
    abl = pd.read_csv(m10["runs"] / name / "ablation" / "toy_sva" / "ablation.csv")
    d = abl[abl.subtask == "all"]
    flags = {r: f for r, f in d.groupby("revision").flag.first().items() if isinstance(f, str) and f}
    revs = json.loads((m10["runs"] / name / "config.json").read_text())["revisions"]
    charts = {json.loads(c.proto.spec).get("title"): c for c in at.get("vega_lite_chart")}
    top = f"top-k of {revs[-1]} vs random-k: "
    for title, value in (("top-k minus random-k: accuracy drop (points)", "points"),
                         ("top-k minus random-k: Δ logit difference", "delta"),
                         (top + "accuracy drop (points)", "acc_drop"), (top + "Δ logit difference", "delta")):
        spec = json.loads(charts[title].proto.spec)
        assert value in {e.get("field") for _, e in _encodings(spec) if isinstance(e, dict)}, title
        assert all(f"{r} ({f})" in json.dumps(spec, ensure_ascii=False) for r, f in flags.items()), title
        if title.startswith(top):   # the bars, each with its interval: ablation.csv's, top-k's in points or Δ
            fields = {e.get("field") for _, e in _encodings(spec) if isinstance(e, dict)}
            assert {value, f"{value}_lo", f"{value}_hi"} <= fields
            bars = [f for f in _frames(charts[title]) if "kind" in f.columns][0]
            bars = bars[bars.kind == "top-k"].set_index("revision")
            want = d[(d.kind == "top") & (d.selected_at == revs[-1])].set_index("revision")
            scale = 100 if value == "acc_drop" else 1
            for col in (value, f"{value}_lo", f"{value}_hi"):
                assert all(abs(bars[col][r] - scale * want[col][r]) < 1e-9 for r in revs), col


@pytest.mark.parametrize("name", ["toy-small", "toy-m10"])
def test_ablation_tables_with_their_verdicts(at10, m10, name):
    """joint.csv with its verdict columns first and a line per set at its own revision; consistency.csv with its
    membership baseline and a line per pair; the overlap of the top-k sets; classes.csv per class and revision with
    its mark by the top-k rule; loo.csv for the chosen set."""
    from crosscoding import verdicts
    at = at10("Ablation", name)
    folder = m10["runs"] / name / "ablation" / "toy_sva"
    revs = json.loads((m10["runs"] / name / "config.json").read_text())["revisions"]
    frames = [d.value for d in at.dataframe]
    rows = verdict_rows(at)
    joint = pd.read_csv(folder / "joint.csv")
    shown = [f for f in frames if "predicted" in f.columns]
    assert len(shown) == 1 and len(shown[0]) == len(joint) and set(shown[0].columns) == set(joint.columns)
    assert list(shown[0].columns[:7]) == ["selected_at", "revision", "k", "verdict", "verdict_exact", "predicted",
                                          "predicted_exact"]
    both = shown[0].merge(joint, on=["selected_at", "revision"], suffixes=("", "_file"))
    assert (both.verdict == both.verdict_file).all() and len(both) == len(joint)
    for j in joint[joint.selected_at == joint.revision].itertuples():
        line = [r for r in rows if f"<b>top-k of {j.revision}</b>" in r]
        assert len(line) == 1 and line[0].split("<b>")[0].count(badge(j.verdict)) == 1
    sp = pd.read_csv(folder / "consistency.csv")
    shown = [f for f in frames if "rho_membership" in f.columns][0]
    assert list(shown.columns[:4]) == ["A", "B", "n", "verdict"] and len(shown) == len(sp)
    assert {"rho_diff_membership", "rho_diff_membership_lo", "rho_diff_membership_hi"} <= set(shown.columns)
    for c in sp.itertuples():
        line = [r for r in rows if f"<b>{c.A} → {c.B}</b>" in r]
        assert len(line) == 1 and badge(c.verdict) in line[0]
        assert f"{c.rho_membership:.2f} [{c.rho_membership_lo:.2f}, {c.rho_membership_hi:.2f}]" in line[0]
    summary = json.loads((folder / "summary.json").read_text())
    overlap = [f for f in frames if f.index.name == "top-k of"][0]
    assert all(overlap.loc[a, b] == summary["overlap"][a][b] for a in revs for b in revs)
    cls = pd.read_csv(folder / "classes.csv")
    ver = pd.read_csv(folder / "verdicts.csv").set_index("revision")
    table = [f for f in frames if "latents" in f.columns and f.index.isin(cls.relie_class).all()][0]
    assert set(table.index) == set(cls.relie_class)
    for c in cls.itertuples():
        cell = table.loc[c.relie_class, c.revision]
        assert cell.startswith(f"{c.excess_points:+.1f} [{c.excess_points_lo:+.1f}, {c.excess_points_hi:+.1f}] pts · "
                               f"Δ {c.excess_delta:+.3f} [")
        flag = ver.flag[c.revision] if isinstance(ver.flag[c.revision], str) else ""
        margin = verdicts.MIN_MARGIN_SHARE * ver.margin[c.revision]
        carries = (c.excess_points >= verdicts.MIN_GAP and c.excess_points_lo > 0 and c.excess_delta_lo > 0) or (
            bool(flag) and c.excess_delta_lo > 0 and c.excess_delta >= margin)
        assert cell.endswith("✔" if carries else "✘")
    loo = pd.read_csv(folder / "loo.csv")
    loo = loo[loo.selected_at == revs[-1]]
    carried = [f for f in frames if "whole set" in f.index]
    assert len(carried) == 2
    for frame, value, total in zip(carried, ("carried_delta", "carried_points"), ("set_delta", "set_points")):
        assert list(frame.columns) == revs
        for x in loo.itertuples():
            assert abs(frame.loc[f"latent {x.latent}", x.revision] - round(getattr(x, value), 3)) < 1e-9
            assert abs(frame.loc["whole set", x.revision] - round(getattr(x, total), 3)) < 1e-9


@pytest.mark.parametrize("name", ["toy-small", "toy-m10"])
def test_checks_page_shows_every_check_with_its_verdict(at10, m10, name):
    """The Checks page: each control row with its verdict, values and uninformative_by, the controls'
    reconstruction; the checkpoint-set verdict (graded) or the note that there is none (the older file); seeds' verdicts
    over seeds, split seeds and LM seeds; and each ablated revision's top-k verdict."""
    from crosscoding.findings import num
    at = at10("Checks", name)
    stab = m10["runs"] / name / "stability"
    revs = json.loads((m10["runs"] / name / "config.json").read_text())["revisions"]
    rows, frames = verdict_rows(at), [d.value for d in at.dataframe]
    ctl = json.loads((stab / "controls.json").read_text())
    table = [f for f in frames if "uninformative_by" in f.columns][0].set_index("check")
    assert set(table.index) == {r["check"] for r in ctl["rows"]}
    for r in ctl["rows"]:
        line = [x for x in rows if f"<b>{r['check']}</b> — run" in x]
        assert len(line) == 1 and line[0].split("<b>")[0].count(badge(r["verdict"])) == 1
        assert ("<b>uninformative</b>: its control" in line[0]) == bool(r["uninformative_by"])
        shown = table.loc[r["check"]]
        assert shown.verdict == r["verdict"] and shown.run == f"{num(r['real'])} {r['real_verdict']}"
        assert shown.uninformative_by == ", ".join(r["uninformative_by"])
        for c, v in r["controls"].items():
            assert shown[c] == f"{num(v['value'])} {v['verdict']}" + ("*" if v["designated"] else "")
    assert any(r["verdict"] == "uninformative" for r in ctl["rows"])
    rec = [f for f in frames if "reconstruction kept" in f.columns][0]
    assert list(rec.index) == ["run", *CONTROLS] and all(c in rec.columns for c in revs)
    for k, v in ctl["reconstruction"].items():
        assert [rec.loc[k, r] for r in revs] == v["fvu"] and rec.loc[k, "L0"] == v["l0"]
        assert rec.loc[k, "reconstruction kept"] == ("—" if k == "run" else "yes" if v["matched"] else "NO")
    ver = pd.read_csv(m10["runs"] / name / "ablation" / "toy_sva" / "verdicts.csv")
    summary = " ".join(r for r in rows if "<b>toy_sva</b>" in r)
    assert all(f">{MARK[v]} {r}: {v}</span>" in summary for r, v in zip(ver.revision, ver.verdict))
    cs = json.loads((stab / "checkpoint_sets.json").read_text())
    if "verdict" in cs:
        line = [x for x in rows if html.escape(cs["verdict"]["finding"]) in x]
        assert len(line) == 1 and badge(cs["verdict"]["verdict"]) in line[0]
        graded = [f for f in frames if "top latents kept [95%]" in f.columns]
        assert len(graded) == 2 and [list(g.verdict) for g in graded] == [
            [x["verdict"] for x in cs[k]["by_cos"].values()] for k in ("graded", "shifts")]
        fates = [f for f in frames if "formed_at" in f.columns][0].set_index("latent")
        assert fates.loc[7, f"drop-{revs[1]}"] == "cannot tell" and fates.loc[7, "shift-later"] == "kept"
        assert fates.loc[8, "shift-later"] == "→ kept"
    else:
        assert any("carries no verdict" in i.value for i in at.info)
        per = [f for f in frames if "survives" in f.columns][0]
        assert list(per.survives) == [v["survives"] for v in cs["variants"]]
    seeds = json.loads((stab / "seeds.json").read_text())
    for key in (f"topk_holds_{r}" for r in revs):
        per = seeds["findings"][key]["per_seed"]
        label = f"holds in {int(sum(per))} of {len(per)}"
        line = [x for x in rows if f"the top-k set of {key[11:]} against random-k there (seeds" in x]
        assert len(line) == 1 and label in line[0]
    assert any("holds in 1 of 2" in x for x in rows)        # the two seeds disagree at the last revision: mixed
    for v in seeds["lm_seeds"]["verdicts"]:
        line = [x for x in rows if f"<b>LM seed {v['seed']}</b>" in x]
        assert len(line) == 1 and badge(v["verdict"]) in line[0] and (NOT_HOLD in line[0]) == (v["verdict"] != "holds")


def test_checks_page_says_what_is_missing(m10, tmp_path, monkeypatch):
    """A run without stability files: each section says which command makes it, and none pretends to a result."""
    runs = tmp_path / "runs"
    shutil.copytree(m10["runs"] / "toy-small", runs / "toy-small", ignore=shutil.ignore_patterns("stability"))
    monkeypatch.setenv("CCT_RUNS", str(runs))
    monkeypatch.setenv("CCT_SCANS", str(m10["scans"]))
    at = open_app("Checks")
    infos = " ".join(i.value for i in at.info)
    assert all(f"python {s}.py --run" in infos for s in ("controls", "checkpoint_sets", "seeds"))
    assert not [h for h in at.subheader if h.value.startswith(("Negative controls", "Robust", "Over"))]


@pytest.mark.parametrize("name", ["toy-small", "toy-m10"])
def test_timeline_latents_carry_their_verdicts(at10, m10, name):
    """Per formation revision, each latent of a top-k set is listed with the verdict of every set that holds it,
    and its RelIE class's ablation (classes.csv) at the revision the class names, else where its |IE| peaks."""
    from crosscoding import measures
    at = at10("Timeline", name)
    run = m10["runs"] / name
    revs = json.loads((run / "config.json").read_text())["revisions"]
    summary = json.loads((run / "ablation" / "toy_sva" / "summary.json").read_text())
    ver = dict(pd.read_csv(run / "ablation" / "toy_sva" / "verdicts.csv")[["revision", "verdict"]].values)
    cls = pd.read_csv(run / "ablation" / "toy_sva" / "classes.csv")
    peak = pd.read_csv(run / "relie" / "toy_sva" / "latents.csv").set_index("latent").ie_peak_at
    of = {int(i): c for c, lat in zip(cls.relie_class, cls.latents) for i in str(lat).split()}
    union = {int(i) for r in revs for i in summary["sets"][r]}
    formed = pd.read_csv(run / "latents.csv").set_index("latent").formed_at
    seen = set()
    for group in [r for r in revs if r in set(formed[list(union)])]:
        at.radio(key=f"tl-group-{name}-formed_at").set_value(group).run()
        assert not at.exception, [e.value for e in at.exception]
        table = [d.value for d in at.dataframe if "in top-k set of (its verdict)" in d.value.columns][0]
        for row in table.to_dict("records"):
            i = row["latent"]
            want = "; ".join(f"{r} {MARK[ver[r]]} {ver[r]}" for r in revs if i in summary["sets"][r])
            assert row["in top-k set of (its verdict)"] == want, (i, row)
            if i in of:
                named = measures.unsigned(of[i]).partition(":")[2]
                at_rev = named if named in revs else peak[i] if isinstance(peak.get(i), str) else revs[-1]
                c = cls[(cls.relie_class == of[i]) & (cls.revision == at_rev)].iloc[0]
                want_cls = f"{of[i]} ({c.n}) at {at_rev}: {c.excess_points:+.1f} ["
                assert row["its RelIE class ablated"].startswith(want_cls), (i, row)
            seen |= {i} if want else set()
    assert seen == union


def test_relie_sheet_at_m32_builds_without_warnings():
    """relie.py's sheet at 32 revisions gains ~230 interval and faithfulness columns: built at once, pandas warns
    nothing; each column holds what a column-by-column construction gives (which, built so, does warn)."""
    import warnings

    import numpy as np
    import torch

    import relie
    from crosscoding import measures
    from crosscoding.crosscoder import CrossCoder, CrossCoderConfig
    revs = [f"step{2 ** i}" for i in range(32)]

    class FakeRun:
        revisions, revision_tokens = revs, [2 ** i * 2048 for i in range(32)]
        cc = CrossCoder(CrossCoderConfig(n_models=32, d_model=4, dict_size=6))
    g = np.random.default_rng(0)
    chosen, P = [1, 3, 4], 20
    att = dict(ie=torch.tensor(g.normal(size=(2, 32, 6))), err=torch.zeros(2, 32), n=torch.tensor([10.0, 10.0]),
               subtasks=["a", "b"])
    pv_PMK, groups = g.normal(size=(P, 32, 3)), np.arange(P) // 2
    exact, atp = g.normal(size=(32, 3)), g.normal(size=(32, 3))
    flags = measures.disagree(atp, exact)

    def sheet():
        return relie.latent_sheet(FakeRun(), att, chosen, np.full((6, 32), 1 / 32), {}, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        built = relie.with_faithfulness(relie.add_intervals(sheet(), pv_PMK, revs, groups), revs, exact, atp, flags)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        naive = sheet()
        lo, hi = measures.interval(measures.bootstrap_means(pv_PMK, groups=groups))
        for m, r in enumerate(revs):
            naive[f"ie_{r}_lo"], naive[f"ie_{r}_hi"] = lo[m], hi[m]
            naive[f"exact_{r}"], naive[f"atp_{r}"], naive[f"unfaithful_{r}"] = exact[m], atp[m], flags[m]
    assert any(issubclass(w.category, pd.errors.PerformanceWarning) for w in caught)   # the test can fail
    same = [c for c in naive.columns if c.endswith(("_lo", "_hi")) or c.startswith(("exact_", "atp_", "unfaithful_"))]
    assert len(same) == 5 * 32 and all(c in built.columns for c in same)
    pd.testing.assert_frame_equal(built[same], naive[same])
    assert {f"relie_{r}_lo" for r in revs} <= set(built.columns) and "relie_class_agree" in built


# ---------------------------------------------------------------------------------------------
# A real browser: every page at M = 3 and M = 10, the Timeline measured on the rendered SVG

HAS_CHROMIUM = bool(shutil.which("chromium") or os.path.exists("/usr/bin/chromium"))
READY = {"Checkpoints": "Checkpoints: when", "Training": "Evaluation (held-out tokens)", "Latents": "Coverage",
         "Timeline": "grouped by formed_at", "Ablation": "Single-latent ablations", "Checks": "Over LM seeds"}


@pytest.fixture(scope="module")
def browser(m10, tmp_path_factory):
    """One app server over both runs and one headless Chromium; the screenshots' folder."""
    from playwright.sync_api import sync_playwright
    shots = tmp_path_factory.getbasetemp() / "screenshots"
    shots.mkdir(exist_ok=True)
    with served_app(m10["runs"], m10["scans"]) as url, sync_playwright() as p:
        chromium = _chromium(p)
        yield url, chromium, shots
        chromium.close()
    print(f"\nscreenshots of every page: {shots}")


def _settle(page, text):
    """Wait for a page's own text, Streamlit's run to end and every chart to be drawn."""
    page.wait_for_selector(f"text={text}", timeout=90_000)
    page.wait_for_function("""() => !document.querySelector('[data-testid="stStatusWidget"]')
        && [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')]
           .every(c => c.querySelector('svg.marks'))""", timeout=90_000)
    page.wait_for_timeout(500)


SVG_FACTS = """() => {
  const svg = [...document.querySelectorAll('[data-testid="stVegaLiteChart"] svg.marks')]
      .find(s => s.textContent.includes('grouped by formed_at'));
  const box = e => { const b = e.getBoundingClientRect(); return [b.left, b.right]; };
  const aria = a => a.getAttribute('aria-label') || '';
  const axes = [...svg.querySelectorAll('g.role-axis')].filter(a => aria(a).startsWith('X-axis'));
  const ylab = [...svg.querySelectorAll('g.role-axis')].filter(a => aria(a).includes('grouped by formed_at'));
  return {
    x_labels: axes.map(a => [...a.querySelectorAll('g.role-axis-label text')].map(t => t.textContent)),
    x_domains: axes.map(a => box(a.querySelector('g.role-axis-domain path, g.role-axis-domain line'))),
    group_labels: ylab.length ? [...ylab[0].querySelectorAll('g.role-axis-label text')].map(t => t.textContent) : [],
    cells: [...svg.querySelectorAll('g.mark-rect path')].map(r => [r.getAttribute('aria-label') || '', ...box(r)]),
    points: [...svg.querySelectorAll('g.mark-symbol path')].map(r => [r.getAttribute('aria-label') || '', ...box(r)]),
  };
}"""


def _field(aria, name):
    import re
    m = re.search(rf"(?:^|; ){re.escape(name)}: ([^;]*)", aria)
    return m.group(1) if m else None


@pytest.mark.skipif(not HAS_CHROMIUM, reason="no Chromium on this machine (apt-get install -y chromium)")
@pytest.mark.parametrize("M", [3, 10])
def test_browser_every_page(browser, m10, toy_run, M):
    """Every page of the M-revision run in Chromium: no exception; the Ablation page's verdict badge for every
    revision; on the Timeline the columns carry the run's revisions, every latent that forms at a middle revision
    is drawn, and the accuracy curve and the heatmap share their x-range (each revision's column centred under its
    accuracy point)."""
    import numpy as np
    url, chromium, shots = browser
    run = m10["run"] if M == 10 else toy_run[1]
    revs = json.loads((run / "config.json").read_text())["revisions"]
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url, timeout=60_000)
    page.wait_for_selector('[data-testid="stSidebar"]', timeout=60_000)
    page.get_by_text(run.name, exact=True).first.click()
    for name in PAGES:
        page.get_by_text(name, exact=True).first.click()
        _settle(page, READY[name])
        assert page.locator('[data-testid="stException"]').count() == 0, name
        height = 0
        for _ in range(4):   # the whole page: tables drawn late make it taller
            now = page.evaluate("document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
            if now == height:
                break
            height = now
            page.set_viewport_size({"width": 1400, "height": min(int(height) + 40, 12000)})
            page.wait_for_timeout(500)
        page.screenshot(path=str(shots / f"M{M}-{name}.png"), full_page=True)
        if name == "Timeline":
            facts = page.evaluate(SVG_FACTS)
        if name == "Ablation":
            shown = page.evaluate("[...document.querySelectorAll('.cct-verdict-row')].map(e => e.textContent)")
        page.set_viewport_size({"width": 1400, "height": 1000})
    assert not errors, errors
    # a verdict badge for every revision of verdicts.csv, and the sentence where its finding does not hold
    for v in pd.read_csv(run / "ablation" / "toy_sva" / "verdicts.csv").itertuples():
        line = [t for t in shown if t.startswith(f"{MARK[v.verdict]} {v.verdict} {v.revision} — clean accuracy")]
        assert len(line) == 1 and (NOT_HOLD in line[0]) == (v.verdict != "holds"), (v.revision, shown)
    # the columns are the run's revisions, on every chart sharing the axis (accuracy, group means, heatmap)
    assert len(facts["x_labels"]) == 3 and all(labels == revs for labels in facts["x_labels"])
    left, right = np.array(facts["x_domains"]).T
    assert np.ptp(left) < 0.5 and np.ptp(right) < 0.5, facts["x_domains"]
    # each revision's heatmap column is centred under its accuracy points
    cells = pd.DataFrame(facts["cells"], columns=["aria", "l", "r"])
    cells["latent"] = cells.aria.map(lambda a: _field(a, "latent"))
    cells["revision"] = cells.aria.map(lambda a: _field(a, "revision"))
    heat = cells.dropna(subset=["latent"])
    points = pd.DataFrame(facts["points"], columns=["aria", "l", "r"])
    points["revision"] = points.aria.map(lambda a: _field(a, "revision"))
    col = ((heat.l + heat.r) / 2).groupby(heat.revision).agg(["min", "max"])
    dot = ((points.l + points.r) / 2).groupby(points.revision).agg(["min", "max"])
    assert set(dot.index) == set(revs) and set(col.index) == set(revs)
    assert (col["max"] - col["min"]).max() < 0.5 and (dot["max"] - dot["min"]).max() < 0.5
    assert np.abs(col["min"] - dot["min"]).max() < 0.5, pd.concat([col, dot], axis=1)
    # every latent forming at a middle revision is drawn by default, under its group's label and count
    lat = pd.read_csv(run / "latents.csv")
    middle = lat[lat.formed_at.isin(revs[1:-1])]
    assert len(middle), "the run should have latents forming between its first and last revisions"
    assert set(middle.latent) <= set(heat.latent.astype(int)), set(middle.latent) - set(heat.latent.astype(int))
    counts = lat.formed_at.value_counts()
    assert facts["group_labels"] == [f"{r} · {counts[r]}" for r in revs if r in counts]
