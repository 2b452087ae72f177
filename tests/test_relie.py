"""relie.py: latent selection, classes that carry the sign of the IE, its HTML export escaped."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

import relie
from crosscoding import measures
from crosscoding.crosscoder import CrossCoder, CrossCoderConfig


def test_classes_carry_the_sign_of_the_ie():
    """Through relie's own latent sheet: a latent whose IE is negative where it matters most gets a − class,
    in the one-vs-all, 2-way and timeline classes; RelDec's classes stay unsigned (decoder norms have no sign)."""
    revs = ["a", "b", "c"]
    cc = CrossCoder(CrossCoderConfig(n_models=3, d_model=4, dict_size=3))
    run = SimpleNamespace(revisions=revs, revision_tokens=[None] * 3, cc=cc)
    ie_MF = torch.tensor([[0.01, 0.0, 0.2], [0.02, 0.01, 0.2], [0.9, -0.8, 0.21]])   # latent 1 hurts at c
    att = dict(ie=ie_MF[None], err=torch.zeros(1, 3), n=torch.ones(1), subtasks=["s"])
    sheet = relie.latent_sheet(run, att, [0, 1, 2], np.full((3, 3), 1 / 3), {}, {})
    assert sheet.relie_class.tolist() == ["+specific:c", "−specific:c", "+shared"]
    assert sheet["relie2_class_a_c"].tolist()[:2] == ["+emerging", "−emerging"]
    assert sheet.ie_timeline_class.tolist()[:2] == ["+emerging", "−emerging"]
    assert not any(c[0] in "+−" for c in sheet.reldec_class)
    assert measures.unsigned("−specific:c") == "specific:c"


def test_select_union_and_normalise():
    ie = np.array([[0.5, -0.9, 0.1, 0.0], [0.0, 0.2, 0.0, 0.3]])
    assert relie.select(ie, 1, "abs") == [1, 3]
    assert relie.select(ie, 2, "positive") == [0, 2, 3, 1]
    np.testing.assert_allclose(np.abs(measures.normalise(ie)).sum(1), [1, 1])


def test_html_escapes_everything():
    sheet = pd.DataFrame([dict(latent=3, ie_a=0.1, relie_a=1.0, reldec_a=1.0, relie_class="<b>x</b>",
                               relie_norm_class="shared", reldec_class="shared", artifact=False,
                               description="<script>alert(1)</script>")])
    ctx = {"3": [dict(tokens=["<script>", "ok"], acts=[1.0, 0.0], max_at=0, max=1.0)]}
    eff = {"3": {"a": dict(promoted=[["<img src=x>", 1.0]], suppressed=[])}}
    page = relie.render_html("t<i>", sheet, ctx, eff, ["a"])
    assert "<script>" not in page and "&lt;script&gt;" in page and "<img" not in page and "<b>x" not in page
