"""app.py over small toy runs of 3 and 10 revisions: every page renders, the emergence map holds every latent,
the Timeline draws every latent grouped by formed_at, revisions keep their training order everywhere,
annotations are saved and survive a reload, hostile names and strings are refused or escaped, the viewer loads
no torch; and real-browser tests (headless Chromium) of every page at M = 3 and M = 10, measured on the
rendered SVG, with a screenshot of each page kept. The 10-revision run's stages also show the command line
at M = 10: relie.py without Python warnings, train.py and evaluate.py warning on the FVU bar."""
import contextlib
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

pytestmark = pytest.mark.slow   # real subprocesses of whole stages: `-m 'not slow'` skips them

PAGES = ["Checkpoints", "Training", "Latents", "Timeline", "Ablation"]
M10 = ["step0", "step16", "step32", "step64", "step96", "step128", "step160", "step192", "step256", "step512"]


@pytest.fixture
def app(toy_run, monkeypatch):
    from streamlit.testing.v1 import AppTest
    cwd, run = toy_run
    monkeypatch.setenv("CCT_RUNS", str(cwd / "runs"))
    monkeypatch.setenv("CCT_SCANS", str(cwd / "scans"))
    (run / "annotations.csv").unlink(missing_ok=True)

    def make(page):
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.run()
        at.sidebar.radio(key="page").set_value(page).run()
        assert not at.exception, [e.value for e in at.exception]
        return at
    return make


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders(app, page):
    at = app(page)
    assert len(at.get("vega_lite_chart")) >= 1, f"{page} shows no chart"
    assert not at.error


def test_emergence_map_holds_every_latent(app, toy_run):
    _, run = toy_run
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


def test_annotation_saved_and_survives_reload(app, toy_run):
    _, run = toy_run
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
    from streamlit.testing.v1 import AppTest

    import app
    cwd, _ = toy_run
    runs = tmp_path / "runs"
    made = _timeline_runs(runs)
    monkeypatch.setenv("CCT_RUNS", str(runs))
    monkeypatch.setenv("CCT_SCANS", str(cwd / "scans"))
    folder, revs = made[M]
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.sidebar.radio(key="page").set_value("Timeline").run()
    at.sidebar.radio(key="run").set_value(folder.name).run()
    assert not at.exception, [e.value for e in at.exception]
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
    """The toy over 10 revisions, small (a 10k-token cache, 20 steps of a 128-latent crosscoder, 4 pairs per
    sub-task): each stage's run and its output, and the folder of runs the app reads (this run and toy_run's, the
    10-revision one newest)."""
    from conftest import run_script
    cwd = tmp_path_factory.mktemp("m10")
    out = {}
    run = cwd / "runs" / "toy-m10"
    steps = [("cache", ["cache_acts.py", "--model", "toy", "--revisions", ",".join(M10), "--tokens", "10000",
                        "--out", str(cwd / "cache" / "c10")]),
             ("train", ["train.py", "--revisions", ",".join(M10), "--dict-size", "128", "--tokens", str(1024 * 20),
                        "--cache", str(cwd / "cache" / "c10"), "--out", str(run)]),
             ("evaluate", ["evaluate.py", "--run", str(run), "--blocks", "8"]),
             ("relie", ["relie.py", "--run", str(run), "--max-pairs", "4", "--context-blocks", "2", "--top-k", "3"]),
             ("ablate", ["ablate.py", "--run", str(run), "--max-pairs", "4", "--draws", "1", "--top-k", "3"])]
    for name, args in steps:
        out[name] = run_script(args, cwd)
    runs = cwd / "app-runs"
    runs.mkdir()
    shutil.copytree(toy_run[1], runs / toy_run[1].name)
    time.sleep(0.01)
    shutil.copytree(run, runs / run.name)     # copied last: the newest run
    (runs / run.name / "config.json").touch()
    return dict(cwd=cwd, run=run, runs=runs, scans=toy_run[0] / "scans", **out)


def test_relie_at_m10_prints_no_python_warning(m10):
    """relie.py over 10 revisions: its table is not buried under pandas' warnings (nor any other's)."""
    both = m10["relie"].stdout + m10["relie"].stderr
    assert "Warning" not in both, [line for line in both.splitlines() if "Warning" in line][:3]
    assert "wrote" in m10["relie"].stdout


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
    """An AppTest over the app's runs (the 10-revision run newest) opened on a page."""
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("CCT_RUNS", str(m10["runs"]))
    monkeypatch.setenv("CCT_SCANS", str(m10["scans"]))

    def make(page, run=None):
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.run()
        if run:
            at.sidebar.radio(key="run").set_value(run).run()
        at.sidebar.radio(key="page").set_value(page).run()
        assert not at.exception, [e.value for e in at.exception]
        return at
    return make


def test_run_picker_newest_first_with_config(at10, m10):
    at = at10("Training")
    picker = at.sidebar.radio(key="run")
    assert picker.options == ["toy-m10", "toy-small"] and picker.value == "toy-m10"   # newest first, opened on it
    table = at.table[0].value
    cfg = json.loads((m10["run"] / "config.json").read_text())
    shown = dict(zip(table.index, table.iloc[:, 0]))
    assert shown["architecture (--arch)"] == "l1" and shown["F, latents (--dict-size)"] == "128"
    assert shown["revisions"] == f"10: {', '.join(M10)}" and shown["training tokens (--tokens)"] == str(cfg["tokens"])
    assert shown["seed"] == "0" and shown["λ, L1 penalty (--l1-coeff)"].startswith(str(cfg["l1_coeff"]))


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


def test_ablation_page_has_intervals_and_joint_table(at10, m10):
    at = at10("Ablation")
    specs = [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]
    bars = [s for s in specs if "against random-k" in json.dumps(s)][0]
    fields = {e.get("field") for _, e in _encodings(bars) if isinstance(e, dict)}
    assert {"acc_drop", "acc_drop_lo", "acc_drop_hi"} <= fields
    joint = pd.read_csv(m10["run"] / "ablation" / "toy_sva" / "joint.csv")
    shown = [d.value for d in at.dataframe if "predicted" in d.value.columns]
    assert len(shown) == 1 and len(shown[0]) == len(joint) and set(shown[0].columns) == set(joint.columns)


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


# ---------------------------------------------------------------------------------------------
# A real browser: every page at M = 3 and M = 10, the Timeline measured on the rendered SVG

HAS_CHROMIUM = bool(shutil.which("chromium") or os.path.exists("/usr/bin/chromium"))
READY = {"Checkpoints": "Checkpoints: when", "Training": "Evaluation (held-out tokens)", "Latents": "Coverage",
         "Timeline": "grouped by formed_at", "Ablation": "Joint ablation"}


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
    """Every page of the M-revision run in Chromium: no exception; on the Timeline the columns carry the run's
    revisions, every latent that forms at a middle revision is drawn, and the accuracy curve and the heatmap
    share their x-range (each revision's column centred under its accuracy point)."""
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
        height = page.evaluate("document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
        page.set_viewport_size({"width": 1400, "height": min(int(height) + 40, 12000)})   # the whole page
        page.wait_for_timeout(300)
        page.screenshot(path=str(shots / f"M{M}-{name}.png"), full_page=True)
        if name == "Timeline":
            facts = page.evaluate(SVG_FACTS)
        page.set_viewport_size({"width": 1400, "height": 1000})
    assert not errors, errors
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
