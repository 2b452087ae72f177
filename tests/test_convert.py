"""convert.py: crosscoders in and out. Each source is built here from its DOCUMENTED key layout at tiny
shapes (no peer code is imported), converted, and checked against a direct einsum of the source weights
(an independent computation of codes and reconstructions); round trips are bit-for-bit on the weights
no arithmetic touches; bad files exit 2 with one line. The hub: a local fake Hugging Face cache, offline;
--push mocks only huggingface_hub.HfApi's create_repo / upload_folder methods (the HTTP boundary)."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import convert
from conftest import ROOT, run_script
from crosscoding import common
from crosscoding.crosscoder import CrossCoder, CrossCoderConfig

M, d, F = 3, 64, 32           # the toy's M and d (the import checks d against the model), a small F
REVS = ["step64", "step128", "step512"]
TOY = ["--model", "toy", "--layer", "0", "--revisions", ",".join(REVS)]


def cli(*argv, capsys):
    """convert.py's main through the project's run_main, as a shell sees it: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = 0
    try:
        common.run_main(lambda: convert.main([str(a) for a in argv]))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def ok(*argv, capsys):
    code, out, err = cli(*argv, capsys=capsys)
    assert code == 0, err
    return out


def one_line_error(code, err, want, exit_code=2):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == exit_code and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert want in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# Sources from their documented layouts, and their documented forward passes (the references)

def dl_state(seed=0, batchtopk=False, normaliser=False):
    """dictionary_learning's CrossCoder / BatchTopKCrossCoder state dict (dictionary.py): NormalizableMixin's
    buffers, encoder.weight [M, d, F], encoder.bias [F], decoder.weight [M, F, d], decoder.bias [M, d],
    code_normalization_id (1 = CROSSCODER), and for BatchTopK k (int32) and threshold (float32)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"target_rms": torch.tensor(1.0),
          "activation_mean": torch.full((M, d), float("nan")), "activation_std": torch.full((M, d), float("nan")),
          "activation_global_scale": torch.ones(M),
          "encoder.weight": torch.randn(M, d, F, generator=g) * 0.1, "encoder.bias": torch.randn(F, generator=g) * 0.1,
          "decoder.weight": torch.randn(M, F, d, generator=g) * 0.1, "decoder.bias": torch.randn(M, d, generator=g),
          "code_normalization_id": torch.tensor(1)}
    if normaliser:
        sd["activation_mean"] = torch.randn(M, d, generator=g) * 0.3
        sd["activation_std"] = torch.rand(M, d, generator=g) + 0.5
        sd["activation_global_scale"] = torch.tensor([0.5, 2.0, 3.0])
    if batchtopk:
        sd["k"] = torch.tensor(4, dtype=torch.int32)
        sd["threshold"] = torch.tensor(0.0, dtype=torch.float32)
        sd["threshold"] = torch.quantile(dl_scores(sd, torch.randn(256, M, d, generator=g)), 0.8).float()
    return sd


def dl_scores(sd, x_BMd):
    _, pre_BF = dl_pre(sd, x_BMd)
    return (torch.relu(pre_BF) * sd["decoder.weight"].norm(dim=2).sum(0)).flatten()


def dl_pre(sd, x_BMd):
    x_BMd = x_BMd.double()
    if not torch.isnan(sd["activation_mean"]).all():     # x' = (x − mean)·global_scale
        x_BMd = (x_BMd - sd["activation_mean"].double()) * sd["activation_global_scale"].double()[:, None]
    return x_BMd, torch.einsum("bmd,mdf->bf", x_BMd, sd["encoder.weight"].double()) + sd["encoder.bias"].double()


def dl_forward(sd, x_BMd):
    """Codes and reconstruction of the peer's documented forward, in float64."""
    _, pre_BF = dl_pre(sd, x_BMd)
    f_BF = torch.relu(pre_BF)
    if "threshold" in sd:
        f_BF = f_BF * (f_BF * sd["decoder.weight"].double().norm(dim=2).sum(0) > sd["threshold"].double())
    x_hat_BMd = torch.einsum("bf,mfd->bmd", f_BF, sd["decoder.weight"].double()) + sd["decoder.bias"].double()
    if not torch.isnan(sd["activation_mean"]).all():
        x_hat_BMd = x_hat_BMd / (sd["activation_global_scale"].double()[:, None] + 1e-8) + sd["activation_mean"]
    return f_BF, x_hat_BMd


def ctt_state(seed=0, batchtopk=False):
    """The paper's CrossCoder: W_enc [M, d, F], W_dec [F, M, d], b_enc [F], b_dec [M, d]; BatchTopK: k, threshold."""
    g = torch.Generator().manual_seed(seed)
    sd = {"W_enc": torch.randn(M, d, F, generator=g) * 0.1, "W_dec": torch.randn(F, M, d, generator=g) * 0.1,
          "b_enc": torch.randn(F, generator=g) * 0.1, "b_dec": torch.randn(M, d, generator=g)}
    if batchtopk:
        sd.update(k=torch.tensor(5, dtype=torch.int32), threshold=torch.tensor(0.02))
    return sd


def ctt_forward(sd, scales, x_BMd):
    """The paper's forward on activations its buffer scaled by estimated_act_norm_list, back in raw units."""
    s_M = torch.tensor(scales, dtype=torch.float64)
    f_BF = torch.relu(torch.einsum("bmd,mdf->bf", x_BMd.double() * s_M[:, None], sd["W_enc"].double())
                      + sd["b_enc"].double())
    if "threshold" in sd:
        f_BF = f_BF * (f_BF * sd["W_dec"].double().norm(dim=2).sum(1) > sd["threshold"].double())
    x_hat = torch.einsum("bf,fmd->bmd", f_BF, sd["W_dec"].double()) + sd["b_dec"].double()
    return f_BF, x_hat / s_M[:, None]


def ctt_cfg(scales, **kw):
    return dict(d_in=d, dict_size=F, n_models=M, enc_dtype="fp32", seed=0, dec_init_norm=0.08, device="cpu",
                estimated_act_norm_list=scales, **kw)


def x_raw(seed=1, B=200):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, M, d, generator=g) * 3 + 1


def ours(run):
    return CrossCoder.load(run).eval().requires_grad_(False)


def check_same(cc, f_ref, x_hat_ref, x_BMd):
    with torch.no_grad():
        x_hat, f = cc(x_BMd)
    torch.testing.assert_close(f.double(), f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat.double(), x_hat_ref, atol=1e-5, rtol=1e-5)
    assert 0 < (f > 0).float().mean() < 1   # the check means something: some latents on, some off


# ---------------------------------------------------------------------------------------------
# Import

@pytest.mark.parametrize("batchtopk", [False, True], ids=["l1", "batchtopk"])
@pytest.mark.parametrize("normaliser", [False, True], ids=["raw", "normaliser"])
def test_dictionary_learning_import_equals_its_forward(tmp_path, capsys, batchtopk, normaliser):
    sd = dl_state(batchtopk=batchtopk, normaliser=normaliser)
    torch.save(sd, tmp_path / "cc.pt")
    run = tmp_path / "runs" / "dl"
    ok("--from", "dictionary_learning", tmp_path / "cc.pt", *TOY, "--out", run, capsys=capsys)
    cc, cfg = ours(run), json.loads((run / "config.json").read_text())
    x = x_raw()
    check_same(cc, *dl_forward(sd, x), x)
    assert cfg["arch"] == ("batchtopk" if batchtopk else "l1")
    assert cfg["model"] == "toy" and cfg["layer"] == 0 and cfg["revisions"] == REVS and common.is_done(run)
    imp = cfg["imported"]
    assert imp["format"] == "dictionary_learning" and imp["source"] == str(tmp_path / "cc.pt")
    assert imp["sha256"] == hashlib.sha256((tmp_path / "cc.pt").read_bytes()).hexdigest()
    if batchtopk:
        assert cfg["k"] == 4 and torch.equal(cc.threshold, sd["threshold"])
    if not normaliser:   # nothing to fold: the weights are the file's, bit for bit
        assert torch.equal(cc.W_enc, sd["encoder.weight"])
        assert torch.equal(cc.W_dec_FMd, sd["decoder.weight"].permute(1, 0, 2))
        assert torch.equal(cc.b_dec_Md, sd["decoder.bias"]) and torch.equal(cc.b_enc_F, sd["encoder.bias"])
    else:
        assert cfg["scales"] == pytest.approx([0.5, 2.0, 3.0])


@pytest.mark.parametrize("batchtopk", [False, True], ids=["l1", "batchtopk"])
def test_ctt_paper_import_both_layouts(tmp_path, capsys, batchtopk):
    """N.pt + N_cfg.json (its save()) and cfg.json + cc_weights.pt (its load_from_hf); model, layer and
    revisions come from the cfg when it has them (blocks.1.hook_resid_pre is the output of block 0)."""
    sd, scales = ctt_state(batchtopk=batchtopk), [0.7, 1.5, 2.5]
    (tmp_path / "version_0").mkdir()
    torch.save(sd, tmp_path / "version_0" / "3.pt")
    cfg = ctt_cfg(scales, hook_point="blocks.1.hook_resid_pre", revision_list="step64-step128-step512")
    (tmp_path / "version_0" / "3_cfg.json").write_text(json.dumps(cfg))
    hub = tmp_path / "hub_layout"
    hub.mkdir()
    torch.save(sd, hub / "cc_weights.pt")
    (hub / "cfg.json").write_text(json.dumps(cfg))
    x = x_raw()
    for i, src in enumerate([tmp_path / "version_0" / "3.pt", hub]):
        run = tmp_path / "runs" / f"ctt{i}"
        ok("--from", "ctt-paper", src, "--model", "toy", "--out", run, capsys=capsys)
        check_same(ours(run), *ctt_forward(sd, scales, x), x)
        c = json.loads((run / "config.json").read_text())
        assert c["layer"] == 0 and c["revisions"] == REVS and c["imported"]["format"] == "ctt-paper"
        if batchtopk:
            assert c["k"] == 5 and ours(run).threshold.item() == sd["threshold"].item()
    # the format is read from the files when not named
    ok("--from", hub, "--model", "toy", "--out", tmp_path / "runs" / "guessed", capsys=capsys)
    assert json.loads((tmp_path / "runs" / "guessed" / "config.json").read_text())["imported"]["format"] == "ctt-paper"


# ---------------------------------------------------------------------------------------------
# Export and round trips

def our_run(folder, arch="l1", scales=None, seed=0):
    """A run folder of our own (random weights, optionally folded scales), as train.py leaves one."""
    cfg = CrossCoderConfig(n_models=M, d_model=d, dict_size=F, arch=arch, k=4, seed=seed)
    cc = CrossCoder(cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        cc.W_enc_FMd.normal_(0, 0.1, generator=g)
        cc.b_enc_F.normal_(0, 0.1, generator=g)
        cc.b_dec_Md.normal_(0, 1, generator=g)
        if arch == "batchtopk":      # θ is BatchTopK's state (variants.BatchTopK); L1 has none
            cc.threshold.fill_(0.05)
    if scales is not None:
        cc = cc.fold_scales(scales)
    cc.save(folder, extra=dict(model="toy", repo="models/toy", revisions=REVS, layer=0,
                               scales=cc.scales_M.tolist(), data=dict(cache=None, weights="hub")))
    common.mark_done(folder)
    return cc.eval().requires_grad_(False)


@pytest.mark.parametrize("arch", ["l1", "batchtopk"])
@pytest.mark.parametrize("scales", [None, [0.5, 2.0, 3.0]], ids=["unit", "scaled"])
def test_round_trips_through_each_peer(tmp_path, capsys, arch, scales):
    src = our_run(tmp_path / "runs" / "ours", arch, scales)
    x = x_raw()
    with torch.no_grad():
        x_hat0, f0 = src(x)
    # the exported .pt is the peer's documented state dict and its documented forward gives our codes
    ok("--to", "dictionary_learning", "--run", tmp_path / "runs" / "ours", "--out", tmp_path / "cc.pt", capsys=capsys)
    sd = torch.load(tmp_path / "cc.pt", weights_only=True)
    want = {"target_rms", "activation_mean", "activation_std", "activation_global_scale", "encoder.weight",
            "encoder.bias", "decoder.weight", "decoder.bias", "code_normalization_id"}
    assert set(sd) == want | ({"k", "threshold"} if arch == "batchtopk" else set())
    assert sd["encoder.weight"].shape == (M, d, F) and sd["decoder.weight"].shape == (M, F, d)
    assert sd["code_normalization_id"].item() == 1
    if arch == "batchtopk":
        assert sd["k"].dtype == torch.int32 and sd["k"].item() == 4 and sd["threshold"].item() == src.threshold.item()
    f_ref, x_hat_ref = dl_forward(sd, x)
    torch.testing.assert_close(f0.double(), f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat0.double(), x_hat_ref, atol=1e-5, rtol=1e-5)
    ok("--to", "ctt-paper", "--run", tmp_path / "runs" / "ours", "--out", tmp_path / "ctt" / "0.pt", capsys=capsys)
    ctt_sd = torch.load(tmp_path / "ctt" / "0.pt", weights_only=True)
    ctt_c = json.loads((tmp_path / "ctt" / "0_cfg.json").read_text())
    assert ctt_c["hook_point"] == "blocks.1.hook_resid_pre" and ctt_c["revision_list"] == "step64-step128-step512"
    f_ref, x_hat_ref = ctt_forward(ctt_sd, ctt_c["estimated_act_norm_list"], x)
    torch.testing.assert_close(f0.double(), f_ref, atol=1e-5, rtol=1e-5)
    # ... and back: ours → theirs → ours
    for fmt, path in (("dictionary_learning", tmp_path / "cc.pt"), ("ctt-paper", tmp_path / "ctt" / "0.pt")):
        back_dir = tmp_path / "runs" / f"back-{fmt}"
        ok("--from", fmt, path, *TOY, "--out", back_dir, capsys=capsys)
        back = ours(back_dir)
        with torch.no_grad():
            x_hat1, f1 = back(x)
        torch.testing.assert_close(f1, f0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x_hat1, x_hat0, atol=1e-5, rtol=1e-5)
        assert torch.equal(back.b_enc_F, src.b_enc_F)
        assert arch == "l1" or torch.equal(back.threshold, src.threshold)     # θ: BatchTopK's state
        assert back.cfg.arch == arch and (arch == "l1" or back.cfg.k == src.cfg.k)
        same = [torch.equal(getattr(back, n), getattr(src, n)) for n in ("W_enc_FMd", "W_dec_FMd", "b_dec_Md")]
        if scales is None:    # no scale to unfold and fold again: bit for bit
            assert all(same)
        else:                 # ×(1/s) then ×s: float tolerance
            for n in ("W_enc_FMd", "W_dec_FMd", "b_dec_Md", "scales_M"):
                torch.testing.assert_close(getattr(back, n), getattr(src, n), rtol=1e-6, atol=1e-7)


def test_theirs_ours_theirs_is_bit_for_bit(tmp_path, capsys):
    for batchtopk in (False, True):
        sd = dl_state(seed=3, batchtopk=batchtopk)
        torch.save(sd, tmp_path / "in.pt")
        ok("--from", "dictionary_learning", tmp_path / "in.pt", *TOY, "--out", tmp_path / "run", "--overwrite",
           capsys=capsys)
        ok("--to", "dictionary_learning", "--run", tmp_path / "run", "--out", tmp_path / "out.pt", "--overwrite",
           capsys=capsys)
        back = torch.load(tmp_path / "out.pt", weights_only=True)
        assert set(back) == set(sd)
        for k, v in sd.items():
            assert torch.equal(back[k], v) or (v.isnan().all() and back[k].isnan().all()), k
            assert back[k].dtype == v.dtype, k


def test_dictionary_learning_hub_mixin_folder(tmp_path, capsys):
    """--out FOLDER: PyTorchModelHubMixin's config.json (the constructor's arguments) + model.safetensors."""
    our_run(tmp_path / "run", "batchtopk", [0.5, 2.0, 3.0])
    ok("--to", "dictionary_learning", "--run", tmp_path / "run", "--out", tmp_path / "hub", capsys=capsys)
    cfg = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert cfg == dict(activation_dim=d, dict_size=F, num_layers=M, code_normalization="CROSSCODER", k=4)
    sd = load_file(tmp_path / "hub" / "model.safetensors")
    exported = _export_pt(tmp_path, capsys)
    pt = torch.load(exported, weights_only=True)
    assert set(sd) == set(pt) and all(torch.equal(sd[k], pt[k]) for k in sd)
    ok("--from", tmp_path / "hub", *TOY, "--out", tmp_path / "again", capsys=capsys)   # read back, format guessed
    x = x_raw()
    check_same(ours(tmp_path / "again"), *dl_forward(sd, x), x)


def _export_pt(tmp_path, capsys):
    ok("--to", "dictionary_learning", "--run", tmp_path / "run", "--out", tmp_path / "x.pt", capsys=capsys)
    return tmp_path / "x.pt"


# ---------------------------------------------------------------------------------------------
# SAELens: a slice per revision, and how far it is from the crosscoder

@pytest.mark.parametrize("arch", ["l1", "batchtopk"])
def test_saelens_slices(tmp_path, capsys, arch):
    cc = our_run(tmp_path / "run", arch, [0.5, 2.0, 3.0])
    ok("--to", "saelens", "--run", tmp_path / "run", "--out", tmp_path / "sae", capsys=capsys)
    x = x_raw()
    with torch.no_grad():
        _, f_cc = cc(x)
    for m, r in enumerate(REVS):
        cfg = json.loads((tmp_path / "sae" / r / "cfg.json").read_text())
        t = load_file(tmp_path / "sae" / r / "sae_weights.safetensors")
        assert cfg["architecture"] == ("jumprelu" if arch == "batchtopk" else "standard")
        assert (cfg["d_in"], cfg["d_sae"], cfg["apply_b_dec_to_input"], cfg["normalize_activations"]) == \
            (d, F, False, "none")
        assert "NOT the crosscoder" in cfg["metadata"]["not_the_crosscoder"]
        assert cfg["metadata"]["model_from_pretrained_kwargs"] == {"revision": r}
        shapes = {"W_enc": (d, F), "b_enc": (F,), "W_dec": (F, d), "b_dec": (d,)}
        if arch == "batchtopk":
            shapes["threshold"] = (F,)
        assert {k: tuple(v.shape) for k, v in t.items()} == shapes
        # SAELens' StandardSAE / JumpReLUSAE forward (saes/standard_sae.py, jumprelu_sae.py), written out here
        pre = (x[:, m] - t["b_dec"] * cfg["apply_b_dec_to_input"]) @ t["W_enc"] + t["b_enc"]
        f_sae = torch.relu(pre) * ((pre > t["threshold"]) if "threshold" in t else 1)
        ref_pre = torch.einsum("bd,df->bf", x[:, m].double(), cc.W_enc[m].double()) + cc.b_enc_F.double()
        torch.testing.assert_close(pre.double(), ref_pre, atol=1e-5, rtol=1e-5)
        # with only this revision's input, the crosscoder's code IS the slice's (θ/n_i is its selection)
        x_only = torch.zeros_like(x)
        x_only[:, m] = x[:, m]
        with torch.no_grad():
            _, f_only = cc(x_only)
        torch.testing.assert_close(f_sae, f_only, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(f_sae, f_cc, atol=1e-3)   # ... but on real input it is not the crosscoder


def test_sae_slice_measures(tmp_path):
    """slice_vs_crosscoder's FVU and L0 against a direct computation (on a trained crosscoder and the toy's
    activations, test_imported_run_through_every_stage shows how far apart they are)."""
    cc = our_run(tmp_path / "run", "l1", [0.5, 2.0, 3.0])
    x = x_raw(B=500)
    rows = convert.slice_vs_crosscoder(cc, x)
    W_enc, W_dec = cc.W_enc.double(), cc.W_dec_FMd.double()
    f_cc = torch.relu(torch.einsum("bmd,mdf->bf", x.double(), W_enc) + cc.b_enc_F.double())
    for m, row in enumerate(rows):
        xm = x[:, m].double()
        var = ((xm - xm.mean(0)) ** 2).sum()
        x_hat = f_cc @ W_dec[:, m] + cc.b_dec_Md[m].double()
        f_sae = torch.relu(xm @ W_enc[m] + cc.b_enc_F.double())
        sae_hat = f_sae @ W_dec[:, m] + cc.b_dec_Md[m].double()
        assert row["fvu_crosscoder"] == pytest.approx((((x_hat - xm) ** 2).sum() / var).item(), rel=1e-4)
        assert row["fvu_sae"] == pytest.approx((((sae_hat - xm) ** 2).sum() / var).item(), rel=1e-4)
        assert row["l0_crosscoder"] == pytest.approx((f_cc > 0).sum(1).double().mean().item(), abs=0.02)
        assert row["l0_sae"] == pytest.approx((f_sae > 0).sum(1).double().mean().item(), abs=0.02)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written

def _bad_files(t):
    good = dl_state()
    torch.save(good, t / "good.pt")
    raw = (t / "good.pt").read_bytes()
    (t / "corrupt.pt").write_bytes(raw[: len(raw) // 2])
    (t / "noise.pt").write_bytes(os.urandom(4000))
    torch.save([good["encoder.weight"]], t / "list.pt")
    torch.save(torch.nn.Linear(2, 2), t / "module.pt")
    torch.save(dict(good, **{"decoder.weight": good["decoder.weight"].transpose(1, 2)}), t / "shape.pt")
    torch.save({k: v for k, v in good.items() if k != "encoder.bias"}, t / "missing.pt")
    torch.save(dict(good, extra=torch.zeros(1)), t / "extra.pt")
    torch.save(dict(good, **{"encoder.bias": good["encoder.bias"].long()}), t / "dtype.pt")
    torch.save(dict(good, **{"encoder.bias": {"nested": 1}}), t / "nested.pt")
    bad_k = dict(dl_state(batchtopk=True), code_normalization_id=torch.tensor(2))
    torch.save(bad_k, t / "sae_norm.pt")
    torch.save({k: v.expand(2, *v.shape) if k == "threshold" else v for k, v in dl_state(batchtopk=True).items()},
               t / "decoupled.pt")
    narrow = dict(good)   # d = 16: a crosscoder of another model than the toy (d = 64)
    narrow.update({"activation_mean": good["activation_mean"][:, :16], "activation_std": good["activation_std"][:, :16],
                   "encoder.weight": good["encoder.weight"][:, :16], "decoder.weight": good["decoder.weight"][..., :16],
                   "decoder.bias": good["decoder.bias"][:, :16]})
    torch.save({k: v.contiguous() for k, v in narrow.items()}, t / "wrong_d.pt")


BAD = [
    ("corrupt.pt", "cannot be read as a state dict of tensors"),
    ("noise.pt", "cannot be read as a state dict of tensors"),
    ("list.pt", "holds a list, not a state dict"),
    ("module.pt", "Unsupported global"),
    ("shape.pt", "decoder.weight has shape (3, 64, 32), expected (3, 32, 64)"),
    ("missing.pt", "key 'encoder.bias' is missing"),
    ("extra.pt", "unexpected keys ['extra']"),
    ("dtype.pt", "encoder.bias has dtype torch.int64"),
    ("nested.pt", "key 'encoder.bias' holds a dict, not a tensor"),
    ("sae_norm.pt", "code_normalization SAE"),
    ("decoupled.pt", "DECOUPLED"),
    ("wrong_d.pt", "is not toy's hidden size 64"),
]


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    t = tmp_path_factory.mktemp("bad")
    _bad_files(t)
    return t


@pytest.mark.parametrize("name,want", BAD, ids=[b[0] for b in BAD])
def test_bad_file_is_one_line_exit_2(bad_dir, tmp_path, capsys, name, want):
    code, _, err = cli("--from", "dictionary_learning", bad_dir / name, *TOY, "--out", tmp_path / "out", capsys=capsys)
    one_line_error(code, err, want)
    assert not (tmp_path / "out").exists()


BAD_ARGS = [
    (["--from", "dictionary_learning", "{good}", "--model", "toy", "--layer", "0", "--revisions", "step64,step128",
      "--out", "{out}"], "holds M=3 revisions but --revisions lists 2"),
    (["--from", "dictionary_learning", "{good}", "--model", "toy", "--layer", "0", "--revisions",
      "step64,step128,step9", "--out", "{out}"], "unknown revision 'step9' of toy"),
    (["--from", "dictionary_learning", "{good}", "--model", "toy", "--layer", "5", "--revisions",
      "step64,step128,step512", "--out", "{out}"], "layer 5 is out of range for toy"),
    (["--from", "dictionary_learning", "{good}", "--model", "toy", "--out", "{out}"], "give --layer"),
    (["--from", "nope", "{good}", "--out", "{out}"], "unknown format 'nope'"),
    (["--from", "{missing}", "--out", "{out}"], "does not exist"),
    (["--to", "dictionary_learning", "--run", "{missing}", "--out", "{out}"], "holds no trained crosscoder"),
    (["--to", "saelens", "--run", "{run}", "--out", "{out}.pt"], "must be a folder"),
    (["--from", "saelens", "{good}", "--out", "{out}"], "can only be written"),
    (["--to", "dictionary_learning"], "give exactly one of|needs --out"),
    (["--push", "not a repo", "--run", "{run}"], "expected ORG/REPO"),
    (["--push", "org/repo", "--run", "{unfinished}"], "is unfinished"),
    (["--from", "hf:bad", "--out", "{out}"], "expected hf:ORG/REPO"),
]


@pytest.mark.parametrize("argv,want", BAD_ARGS, ids=[" ".join(a[0][:2]) + f" {i}" for i, a in enumerate(BAD_ARGS)])
def test_bad_arguments(bad_dir, tmp_path, capsys, argv, want):
    run = tmp_path / "run"
    our_run(run)
    unfinished = tmp_path / "unfinished"
    our_run(unfinished)
    common.unmark_done(unfinished)
    fill = dict(good=bad_dir / "good.pt", out=tmp_path / "out", missing=tmp_path / "nope", run=run,
                unfinished=unfinished)
    code, _, err = cli(*[a.format(**fill) for a in argv], capsys=capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and any(w in lines[0] for w in want.split("|")), err
    assert not (tmp_path / "out").exists() or not common.is_done(tmp_path / "out")


def test_refuses_to_overwrite_a_run(tmp_path, bad_dir, capsys):
    our_run(tmp_path / "run")
    before = (tmp_path / "run" / "crosscoder.safetensors").read_bytes()
    code, _, err = cli("--from", bad_dir / "good.pt", *TOY, "--out", tmp_path / "run", capsys=capsys)
    one_line_error(code, err, "already holds files")
    assert (tmp_path / "run" / "crosscoder.safetensors").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# The hub: download from a fake local cache (offline), push with HfApi's methods mocked

def fake_hub(cache, repo, files):
    """The Hugging Face cache layout: models--ORG--NAME/snapshots/<commit>/<files>, refs/main → commit."""
    base = cache / f"models--{repo.replace('/', '--')}"
    commit = "1" * 40
    for name, write in files.items():
        path = base / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)


def test_from_hub_offline_cache(tmp_path):
    sd, scales = ctt_state(batchtopk=True), [0.7, 1.5, 2.5]
    cfg = ctt_cfg(scales, hook_point="blocks.1.hook_resid_pre", revision_list="step64-step128-step512")
    fake_hub(tmp_path / "hub", "org/crosscoders", {
        "L0/cc_weights.pt": lambda p: torch.save(sd, p), "L0/cfg.json": lambda p: p.write_text(json.dumps(cfg)),
        "README.md": lambda p: p.write_text("a crosscoder")})
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"))
    run = tmp_path / "runs" / "hub"
    r = subprocess.run([sys.executable, str(ROOT / "convert.py"), "--from", "hf:org/crosscoders:L0", "--model", "toy",
                        "--out", str(run)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    c = json.loads((run / "config.json").read_text())
    assert c["imported"]["source"] == "hf:org/crosscoders:L0" and c["imported"]["format"] == "ctt-paper"
    x = x_raw()
    check_same(ours(run), *ctt_forward(sd, scales, x), x)
    r = subprocess.run([sys.executable, str(ROOT / "convert.py"), "--from", "hf:org/absent", "--model", "toy",
                        "--out", str(tmp_path / "runs" / "absent")], env=env, capture_output=True, text=True,
                       timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "not in the local Hugging Face cache" in lines[0], r.stderr


def test_push_uploads_the_run_folder(tmp_path, capsys, monkeypatch):
    """Mocked at huggingface_hub.HfApi.create_repo / upload_folder: the calls that make the HTTP requests."""
    from huggingface_hub import HfApi
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
                        or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw)))
    run = tmp_path / "runs" / "ours"
    our_run(run)
    (run / ".lock.123").write_text("stale")
    out = ok("--push", "org/my-crosscoder", "--run", run, capsys=capsys)
    assert "pushed" in out
    assert [c[:2] for c in calls] == [("create", "org/my-crosscoder"), ("upload", "org/my-crosscoder")]
    up = calls[1][2]
    assert up["folder_path"] == str(run) and up["repo_type"] == "model" and ".lock*" in up["ignore_patterns"]

    def offline(self, **kw):
        raise ConnectionError("no route to host")
    monkeypatch.setattr(HfApi, "upload_folder", offline)
    code, _, err = cli("--push", "org/my-crosscoder", "--run", run, capsys=capsys)
    one_line_error(code, err, "cannot push", exit_code=1)


# ---------------------------------------------------------------------------------------------
# End to end on the toy: a dictionary_learning crosscoder at the toy's shape is a run every stage takes

@pytest.mark.slow
def test_imported_run_through_every_stage(tmp_path, monkeypatch):
    """A quickly trained toy run (d=64, step64/step128/step512, layer 0, F=256) saved in dictionary_learning's
    layout, imported, then evaluate.py, relie.py and ablate.py on it; FVU in eval.json against the source
    file's documented forward on the same activations; the per-revision SAEs measured beside it; the app."""
    from crosscoding import analysis
    from crosscoding.activations import open_cache
    cache, trained, run = tmp_path / "cache", tmp_path / "runs" / "trained", tmp_path / "runs" / "imported"
    run_script(["cache_acts.py", "--model", "toy", "--tokens", "16384", "--out", str(cache)], tmp_path)
    run_script(["train.py", "--cache", str(cache), "--dict-size", "256", "--tokens", str(1024 * 40), "--out",
                str(trained)], tmp_path)
    run_script(["convert.py", "--to", "dictionary_learning", "--run", str(trained), "--out", str(tmp_path / "dl.pt")],
               tmp_path)
    sd = torch.load(tmp_path / "dl.pt", weights_only=True)
    assert sd["encoder.weight"].shape == (M, d, 256) and not torch.isnan(sd["activation_mean"]).any()
    run_script(["convert.py", "--from", "dictionary_learning", str(tmp_path / "dl.pt"), *TOY, "--out", str(run)],
               tmp_path)
    run_script(["evaluate.py", "--run", str(run), "--blocks", "8"], tmp_path)
    run_script(["relie.py", "--run", str(run), "--max-pairs", "10", "--context-blocks", "2"], tmp_path)
    run_script(["ablate.py", "--run", str(run), "--max-pairs", "10", "--draws", "2"], tmp_path)
    assert common.is_done(run / "relie" / "toy_sva") and common.is_done(run / "ablation" / "toy_sva")
    # FVU by hand from the source file on evaluate.py's activations (its held-out blocks, position 0 left out):
    # Σ‖x − x̂‖² / Σ‖x − mean(x)‖² per revision over all rows and dims, as evaluate.py defines it
    ev = json.loads((run / "eval.json").read_text())
    r = analysis.open_run(run)
    models = r.load_models()
    with torch.no_grad():
        x_BTMd = analysis.run_acts(models, r.layer, r.heldout_blocks(8, models[-1][2]))
    del models
    x_RMd = x_BTMd[:, 1:].reshape(-1, M, d)
    _, x_hat = dl_forward(sd, x_RMd)
    x_RMd = x_RMd.double()
    for m, rev in enumerate(REVS):
        var = ((x_RMd[:, m] - x_RMd[:, m].mean(0)) ** 2).sum()
        fvu = (((x_RMd[:, m] - x_hat[:, m]) ** 2).sum() / var).item()
        assert ev["revisions"][rev]["fvu"] == pytest.approx(fvu, rel=1e-4), rev
    assert all(v["fvu"] < 0.5 for v in ev["revisions"].values()), ev   # trained: it reconstructs
    # the per-revision SAEs beside the crosscoder on the cache's held-out rows: FVU and L0 of each
    res = run_script(["convert.py", "--to", "saelens", "--run", str(run), "--out", str(tmp_path / "sae"),
                      "--acts", str(cache)], tmp_path)
    assert "the per-revision SAE is not the crosscoder" in res.stdout
    x_val = open_cache(cache).val(8192)
    f_val, x_hat = dl_forward(sd, x_val)
    for m, rev in enumerate(REVS):
        row = json.loads((tmp_path / "sae" / rev / "cfg.json").read_text())["metadata"]["measured"]
        xm = x_val[:, m].double()
        var = ((xm - xm.mean(0)) ** 2).sum()
        assert row["fvu_crosscoder"] == pytest.approx((((xm - x_hat[:, m]) ** 2).sum() / var).item(), rel=1e-4)
        assert row["l0_crosscoder"] == pytest.approx((f_val > 0).sum(1).double().mean().item(), abs=0.05)
        # on its own revision's input alone the slice reconstructs worse than the crosscoder
        assert row["fvu_sae"] > row["fvu_crosscoder"] + 0.01, row
    # the app's Training page shows the mark
    from streamlit.testing.v1 import AppTest
    (tmp_path / "runs" / "trained").rename(tmp_path / "trained")    # only the imported run left to pick
    monkeypatch.setenv("CCT_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("CCT_SCANS", str(tmp_path / "scans"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.sidebar.radio[0].set_value("Training").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Imported, not trained here: dictionary_learning" in i.value for i in at.info)
    assert any(str(tmp_path / "dl.pt") in i.value for i in at.info)
