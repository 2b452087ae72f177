"""app.py over a small toy run's outputs: every page renders, the emergence map holds every latent,
annotations are saved and survive a reload, hostile names and strings are refused or escaped, the
viewer loads no torch; and one real-browser test (headless Chromium) of the Latents page."""
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

PAGES = ["Checkpoints", "Training", "Latents", "Ablation"]


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
        at.sidebar.radio[0].set_value(page).run()
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


@pytest.mark.skipif(not shutil.which("chromium") and not os.path.exists("/usr/bin/chromium"),
                    reason="no Chromium on this machine (apt-get install -y chromium)")
def test_browser_latents_page(toy_run, tmp_path):
    from playwright.sync_api import sync_playwright
    cwd, run = toy_run
    with served_app(cwd / "runs", cwd / "scans") as url, sync_playwright() as p:
        browser = _chromium(p)
        page = browser.new_page()
        page.goto(url, timeout=60_000)
        page.get_by_text("Latents", exact=True).first.click()
        page.wait_for_selector('[data-testid="stVegaLiteChart"]', timeout=60_000)
        page.wait_for_selector(".cct-context", timeout=60_000)
        assert page.locator(".cct-context").count() >= 1
        page.screenshot(path=str(tmp_path / "latents.png"), full_page=True)
        browser.close()


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


@pytest.mark.parametrize("M", [2, 3, 8])
def test_timeline_page_renders_in_formed_at_order(M, tmp_path, monkeypatch, toy_run):
    import pyarrow as pa
    from streamlit.testing.v1 import AppTest
    cwd, _ = toy_run
    runs = tmp_path / "runs"
    made = _timeline_runs(runs)
    monkeypatch.setenv("CCT_RUNS", str(runs))
    monkeypatch.setenv("CCT_SCANS", str(cwd / "scans"))
    folder, revs = made[M]
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.sidebar.radio[0].set_value("Timeline").run()
    at.sidebar.selectbox[0].set_value(folder.name).run()
    assert not at.exception, [e.value for e in at.exception]
    heat = [c for c in at.get("vega_lite_chart") if "sorted by formed_at" in c.proto.spec][0].proto
    cells = [pa.ipc.open_stream(ds.data.data).read_all().to_pandas() for ds in heat.datasets]
    cells = [c for c in cells if "rank" in c.columns][0]
    import numpy as np

    from crosscoding import measures
    table = measures.timeline(np.ones((1, M)), revs)   # the column names only
    assert set(table.columns) >= {"formed_at", "peak_at", "faded_at", "timeline_class"}
    import app
    lat = app.decoder_table(str(folder), 0.0)
    formed = lat.set_index("latent").formed_at.map({r: i for i, r in enumerate(revs)})
    ranks = cells.drop_duplicates("rank").sort_values("rank")
    assert len(ranks) == 40 and (np.diff(formed[ranks.latent].to_numpy()) >= 0).all()
    assert set(cells.revision) == set(revs)


@pytest.mark.skipif(not shutil.which("chromium") and not os.path.exists("/usr/bin/chromium"),
                    reason="no Chromium on this machine (apt-get install -y chromium)")
def test_browser_timeline_page(tmp_path, toy_run):
    """The Timeline page of an 8-revision run in a real browser; its screenshot is saved (timeline.png)."""
    from playwright.sync_api import sync_playwright
    cwd, _ = toy_run
    runs = tmp_path / "runs"
    _timeline_runs(runs)
    for other in ("timeline-M2", "timeline-M3"):
        shutil.rmtree(runs / other)
    with served_app(runs, cwd / "scans") as url, sync_playwright() as p:
        browser = _chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, timeout=60_000)
        page.get_by_text("Timeline", exact=True).first.click()
        page.wait_for_selector("text=sorted by formed_at", timeout=60_000)
        page.wait_for_selector('[data-testid="stVegaLiteChart"]', timeout=60_000)
        shot = tmp_path / "timeline.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
