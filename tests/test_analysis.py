"""Attribution and ablation against independent computations on a tiny model: IG completeness,
AtP = the first IG step, exact ablation = a hand-made splice, no-ablation = clean, all-ablated =
error + biases; RelIE / RelDec classes on hand-made tables; evaluate's CE and latent scaling."""
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import evaluate
from crosscoding import activations, analysis, lm, measures, tasks
from crosscoding.crosscoder import CrossCoder, CrossCoderConfig


@pytest.fixture(scope="module")
def run(local_model, tmp_path_factory):
    """A run folder with a random (untrained) crosscoder over two tiny revisions: the identities
    tested here hold for any weights."""
    root, text, _ = local_model
    folder = tmp_path_factory.mktemp("run")
    cache = activations.make_cache(str(root), 1, ["step0", "step100"], folder / "cache", n_tokens=600, seq_len=16,
                                   heldout_tokens=400, text=str(text), val_rows=150)
    cfg = CrossCoderConfig(n_models=2, d_model=32, dict_size=48, seed=3)
    cc = CrossCoder(cfg)
    with torch.no_grad():
        cc.b_enc_F.fill_(0.05)
        cc.b_dec_Md.normal_(0, 0.1)
    cc.fold_scales([0.5, 2.0]).save(folder, extra=dict(model=str(root), revisions=["step0", "step100"], layer=1,
                                                      data=dict(cache=str(cache), text=str(text), seq_len=16,
                                                                heldout_tokens=400)))
    (folder / "DONE").write_text("{}")
    return analysis.open_run(folder)


@pytest.fixture(scope="module")
def models(run):
    return run.load_models()


@pytest.fixture(scope="module")
def batch(local_model, models):
    pairs = tasks.load_task(str(local_model[2]))
    return tasks.tokenize_pairs(pairs, models[0][2])


def _hook_splice(model, layer, new_BTd, mask_BT):
    """The reference splice: a full forward whose block-L output is patched by a hook (production code
    runs only the blocks above L)."""
    w = analysis.splice_mask(mask_BT)[..., None]
    return lm.patch_layer(model, layer, lambda x: torch.where(w, new_BTd.to(x.dtype), x))


def _metric_with(run, model, batch, new_BTd):
    with torch.no_grad(), _hook_splice(model, run.layer, new_BTd, batch.mask_BT):
        return -tasks.logit_diff(lm.forward(model, batch.ids_BT, batch.mask_BT).logits, batch)


def test_splice_of_reconstruction_plus_error_is_clean(run, models, batch):
    x, f, r = analysis.pair_codes(run, models, batch)
    for m, (_, model, _) in enumerate(models):
        ld = analysis.ablated_logit_diffs(run, model, m, batch, x[:, :, m], f, r[:, :, m], [[]])[:, 0]
        clean = tasks.logit_diff(lm.forward(model, batch.ids_BT, batch.mask_BT).logits, batch)
        torch.testing.assert_close(ld, clean, rtol=1e-4, atol=1e-4)


def test_ablating_all_latents_leaves_error_plus_bias(run, models, batch):
    x, f, r = analysis.pair_codes(run, models, batch)
    m, model = 1, models[1][1]
    ld = analysis.ablated_logit_diffs(run, model, m, batch, x[:, :, m], f, r[:, :, m], [list(range(48))])[:, 0]
    want = -_metric_with(run, model, batch, r[:, :, m] + run.cc.b_dec_Md[m])
    torch.testing.assert_close(ld, want, rtol=1e-5, atol=1e-5)


def test_ig_completeness(run, models, batch):
    """Σ_i IE_i + IE_error → m(zero baseline) − m(clean) as the steps grow (a left Riemann sum:
    the gap shrinks like 1/steps)."""
    x, f, r = analysis.pair_codes(run, models, batch)
    gaps = {}
    for steps in (100, 400):
        att = analysis.attribute(run, models, batch, "ig", threshold=0.0, batch_size=32, steps=steps)
        for m, (_, model, _) in enumerate(models):
            base = _metric_with(run, model, batch, run.cc.b_dec_Md[m].expand_as(r[:, :, m]).clone())
            clean = -tasks.logit_diff(lm.forward(model, batch.ids_BT, batch.mask_BT).logits, batch)
            want = (base - clean).sum().item()
            gaps[steps, m] = abs((att["ie"][:, m].sum() + att["err"][:, m].sum()).item() - want) / abs(want)
    for m in range(len(models)):
        assert gaps[400, m] < 0.015, gaps
        assert gaps[400, m] < gaps[100, m] / 2.5 or gaps[400, m] < 1e-4, gaps


def test_atp_equals_first_ig_step(run, models, batch):
    """AtP = −f · ∂m/∂f at the clean point, computed here by plain autograd on one forward."""
    att = analysis.attribute(run, models, batch, "atp", threshold=0.0, batch_size=32)
    x, f, r = analysis.pair_codes(run, models, batch)
    m, model = 0, models[0][1]
    fl = f.clone().requires_grad_(True)
    new = fl @ run.cc.W_dec_FMd[:, m] + run.cc.b_dec_Md[m] + r[:, :, m]
    with _hook_splice(model, run.layer, new, batch.mask_BT):
        metric = -tasks.logit_diff(lm.forward(model, batch.ids_BT, batch.mask_BT).logits, batch)
    (g,) = torch.autograd.grad(metric.sum(), fl)
    want = (-(f * g)).sum((0, 1))
    torch.testing.assert_close(att["ie"][:, m].sum(0), want, rtol=1e-4, atol=1e-5)


def test_ig_equals_naive_loop_over_steps(run, models, batch):
    """IG (all α batched, blocks above L only, mean gradient before the decoder matmul) equals a plain
    loop: one full hooked forward/backward per α with f and r scaled, gradients averaged."""
    x, f, r = analysis.pair_codes(run, models, batch)
    m, model, alphas = 1, models[1][1], [0.0, 0.3, 0.7]
    ie, ie_err, _ = analysis.ie_gradient(run, model, m, batch, x[:, :, m], f, r[:, :, m], alphas)
    gf_sum, gr_sum = torch.zeros_like(f), torch.zeros_like(r[:, :, m])
    for a in alphas:
        fa, ra = ((1 - a) * f).requires_grad_(True), ((1 - a) * r[:, :, m]).requires_grad_(True)
        new = fa @ run.cc.W_dec_FMd[:, m] + run.cc.b_dec_Md[m] + ra
        with _hook_splice(model, run.layer, new, batch.mask_BT):
            metric = -tasks.logit_diff(lm.forward(model, batch.ids_BT, batch.mask_BT).logits, batch)
        gf, gr = torch.autograd.grad(metric.sum(), [fa, ra])
        gf_sum, gr_sum = gf_sum + gf, gr_sum + gr
    want, want_err = -f * gf_sum / len(alphas), -(r[:, :, m] * gr_sum / len(alphas)).sum(-1)
    assert want.abs().max() > 0 and want_err.abs().max() > 0
    torch.testing.assert_close(ie, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ie_err, want_err, rtol=1e-4, atol=1e-6)


def test_exact_ablation_matches_hand_made_splice(run, models, batch):
    x, f, r = analysis.pair_codes(run, models, batch)
    m, model = 1, models[1][1]
    i = int((f > 0).sum((0, 1)).argmax())       # a latent that fires
    ie, clean = analysis.ie_exact(run, model, m, batch, x[:, :, m], f, r[:, :, m], [i])
    ie = ie[:, 0]
    # by hand: the model's own activation minus this latent's decoder contribution
    x_m = x[:, :, m]
    no_i = x_m - f[..., i:i + 1] * run.cc.W_dec_FMd[i, m]
    want = _metric_with(run, model, batch, no_i) - _metric_with(run, model, batch, x_m)
    torch.testing.assert_close(ie, want, rtol=1e-4, atol=1e-5)
    assert want.abs().sum() > 0
    with torch.no_grad():   # the clean metric it returns is the model's own
        own = -tasks.logit_diff(lm.forward(model, batch.ids_BT, batch.mask_BT).logits, batch)
    torch.testing.assert_close(clean, own, rtol=1e-4, atol=1e-4)


def test_threshold_zeroes_small_token_effects(run, models, batch):
    a = analysis.attribute(run, models, batch, "ig", threshold=0.0, batch_size=32)
    b = analysis.attribute(run, models, batch, "ig", threshold=1e9, batch_size=32)
    assert a["ie"].abs().sum() > 0 and b["ie"].abs().sum() == 0
    torch.testing.assert_close(a["err"], b["err"])   # the error term is reported in full


def test_evaluate_ce_and_scaling(run, models):
    summary, lat = evaluate.evaluate(run, n_blocks=4, batch_blocks=2)
    ids = run.heldout_blocks(4, models[0][2])
    x_all = analysis.run_acts(models, run.layer, ids)
    x_hat_all = run.cc(x_all.flatten(0, 1))[0].view_as(x_all)

    def ce(model, new_BTd=None):
        """By hand: −log softmax at positions 1..T-2 against the next token, through a full forward
        (block L's output hooked to new_BTd from position 1 on)."""
        with _hook_splice(model, run.layer, new_BTd, torch.ones_like(ids)) if new_BTd is not None else nullcontext():
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        return -logp[:, 1:-1].gather(2, ids[:, 2:, None]).mean().item()

    for m, (rev, model, _) in enumerate(models):
        s = summary["revisions"][rev]
        assert s["ce_clean"] == pytest.approx(ce(model), rel=2e-6)
        assert s["ce_spliced"] == pytest.approx(ce(model, x_hat_all[:, :, m]), rel=2e-6)
        assert s["ce_zero"] == pytest.approx(ce(model, torch.zeros_like(x_hat_all[:, :, m])), rel=2e-6)
        assert abs(s["ce_zero"] - s["ce_clean"]) > 5 * 2e-6 * s["ce_clean"]   # the checks above can tell them apart
        assert s["ce_recovered"] == pytest.approx(1 - s["delta_ce"] / (s["ce_zero"] - s["ce_clean"]))
    # latent scaling: β by least squares on the raw tokens for one firing latent
    x = analysis.run_acts(models, run.layer, ids)[:, 1:].reshape(-1, 2, 32)
    _, f = run.cc(x)
    i = int((f > 0).sum(0).argmax())
    s_M = run.cc.scales_M
    dec = run.cc.W_dec_FMd[i] * s_M[:, None]
    top = int(np.argmax(analysis.reldec(run.cc)[i]))
    betas = []
    for m in range(2):
        A = (f[:, i:i + 1, None] * dec[top]).reshape(-1, 1)          # [N*d, 1]
        y = (x[:, m] * s_M[m]).reshape(-1, 1)
        betas.append(torch.linalg.lstsq(A.double(), y.double()).solution.item())
    want_nu = betas[1 - top] / betas[top]
    got = lat.loc[i, f"nu_act_{run.revisions[1 - top]}"]
    assert got == pytest.approx(want_nu, rel=1e-3, abs=1e-5)
    assert set(lat.reldec_class) <= {"shared", "others", "specific:step0", "specific:step100"}


def test_open_run_refusals(tmp_path):
    from crosscoding.common import UsageError
    with pytest.raises(UsageError, match="holds no trained crosscoder"):
        analysis.open_run(tmp_path)
    cc = CrossCoder(CrossCoderConfig(n_models=2, d_model=4, dict_size=8))
    cc.save(tmp_path, extra=dict(model="toy", revisions=["a", "b"], layer=0))
    with pytest.raises(UsageError, match="training run .* is unfinished"):
        analysis.open_run(tmp_path)
    (tmp_path / "DONE").write_text("{}")
    f = tmp_path / "crosscoder.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(UsageError, match="cannot be read"):
        analysis.open_run(tmp_path)


def test_one_word_prefix_is_attributed_on_every_revision(run, models):
    """A one-word prefix ("Paula references") is [BOS, word]: the word sits at position 1, which is spliced,
    so its IE and its ablation Δ are non-zero at every revision (the tokenizer adds no BOS itself; before
    BOS was put first, the word was position 0, never spliced: IE = Δ = 0 while the pair still counted)."""
    pairs = [tasks.Pair("w5", " w1", " w2", "one"), tasks.Pair("w7", " w3", " w4", "one")]
    tok = models[0][2]
    assert tok("w5")["input_ids"] == [tok.convert_tokens_to_ids("w5")]
    batch = tasks.tokenize_pairs(pairs, tok)
    assert batch.ids_BT[:, 0].tolist() == [tok.bos_token_id] * 2 and batch.ids_BT.shape[1] == 2
    att = analysis.attribute(run, models, batch, "ig", threshold=0.0, batch_size=2)
    x, f, r = analysis.pair_codes(run, models, batch)
    for m, (_, model, _) in enumerate(models):
        assert att["ie"][0, m].abs().sum() > 0 and att["err"][0, m].abs() > 0, m
        ld = analysis.ablated_logit_diffs(run, model, m, batch, x[:, :, m], f, r[:, :, m], [[], list(range(48))])
        assert (ld[:, 0] - ld[:, 1]).abs().min() > 0, m


def test_faithfulness_flags_what_ablation_contradicts(run, models, batch, monkeypatch):
    """faithfulness() checks an attribution against exact ablation of the chosen latents: against itself
    (exact) it agrees everywhere; against an 'exact ablation' built to contradict it (sign flipped on two
    latents), those two are flagged in every revision and ρ falls."""
    chosen = [0, 1, 2, 3, 4, 5]
    att = analysis.attribute(run, models, batch, "exact", 0.0, 32, latents=chosen)
    ie_MK = (att["ie"].sum(0) / att["n"].sum()).numpy()[:, chosen]
    faith, exact, _, flags = analysis.faithfulness(run, models, batch, chosen, ie_MK, "exact", 0.0, 32)
    assert faith["n_flagged"] == 0 and np.allclose(exact, ie_MK)
    real = analysis.attribute

    def contradicting(run_, models_, batch_, method, *a, **kw):
        out = real(run_, models_, batch_, method, *a, **kw)
        if method == "exact":
            out["ie"][..., [0, 3]] *= -1
        return out
    monkeypatch.setattr(analysis, "attribute", contradicting)
    faith, exact, atp, flags = analysis.faithfulness(run, models, batch, chosen, ie_MK, "ig", 0.0, 32)
    big = np.abs(ie_MK) > 1e-3 * np.abs(ie_MK).max()
    assert flags[:, [0, 3]][big[:, [0, 3]]].all() and faith["n_flagged"] >= big[:, [0, 3]].sum()
    assert {f["latent"] for f in faith["flagged"]} >= {0, 3} - {c for c in (0, 3) if not big[:, c].any()}


def test_timeline_of_hand_set_decoder_norms(tmp_path):
    """A crosscoder over 5 revisions whose decoder norms are set by hand: formed_at / peak_at / faded_at
    (and their token counts) and the classes, from the crosscoder itself and from its saved file (the app's
    torch-free path)."""
    revs = ["step0", "step16", "step64", "step128", "step512"]
    norms = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0],      # kept
                          [0.0, 0.1, 0.6, 1.0, 0.9],      # emerging at step64 (0.6 ≥ 0.5), peak step128
                          [1.0, 0.8, 0.3, 0.1, 0.0],      # discontinued: fades at step64
                          [0.0, 1.0, 0.2, 0.0, 0.0],      # transient: forms step16, fades step64
                          [0.4, 0.3, 1.0, 0.6, 0.45]])    # emerging at step64, fades step512 → transient
    cc = CrossCoder(CrossCoderConfig(n_models=5, d_model=4, dict_size=5))
    with torch.no_grad():
        unit = torch.nn.functional.normalize(cc.W_dec_FMd, dim=-1)
        cc.W_dec_FMd.copy_(unit * norms[..., None])
    tl = measures.timeline(cc.decoder_norms().detach().numpy(), revs, [0, 16 * 2048, 64 * 2048, 128 * 2048, 512 * 2048])
    assert tl.formed_at.tolist() == ["step0", "step64", "step0", "step16", "step64"]
    assert tl.peak_at.tolist() == ["step0", "step128", "step0", "step16", "step64"]
    assert tl.faded_at.tolist() == ["", "", "step64", "step64", "step512"]
    assert tl.timeline_class.tolist() == ["kept", "emerging", "discontinued", "transient", "transient"]
    assert tl.formed_at_tokens.tolist()[:2] == [0, 64 * 2048] and np.isnan(tl.faded_at_tokens[0])
    cc.save(tmp_path, extra=dict(revisions=revs, revision_tokens=[0, 16 * 2048, 64 * 2048, 128 * 2048, 512 * 2048]))
    import app
    table = app.decoder_table(str(tmp_path), 0.0)
    assert table.formed_at.tolist() == tl.formed_at.tolist()
    assert table.timeline_class.tolist() == tl.timeline_class.tolist()
