"""Tests for variants.py: every registered variant's fast path against the readable dense loss (values and
gradients), JumpReLU's jump and straight-through estimator, the Matryoshka prefix loss, BatchTopK → JumpReLU
codes, the config fields (validation, round trip, old run folders), and a FIFTH variant defined here alone
(registered by monkeypatching the table) trained through train.py's real code path: nothing else edited.
The planted-feature acceptance test of every variant is in test_crosscoder.py."""
import json
import math
from dataclasses import dataclass

import pytest
import torch
from test_crosscoder import naive, rand_x, small_cc, trained_cc

from crosscoding import common, defaults, sparse, variants
from crosscoding.crosscoder import CrossCoder, CrossCoderConfig
from crosscoding.variants import VARIANTS, JumpReLUFn, Variant, batchtopk_to_jumprelu, group_ends


def _jump_thresholds(cc, x):
    """θ_i at the median of latent i's positive pre-activations on x, and ε wide enough that the STE's band
    holds some entries, so the jump and the θ-gradient are both exercised."""
    with torch.no_grad():
        pre = torch.relu(cc.pre_acts(x))
        med = torch.stack([p[p > 0].median() if (p > 0).any() else p.new_tensor(1.0) for p in pre.t()])
        cc.log_threshold_F.copy_(med.log())


def _setup(arch, **kw):
    cc, x = trained_cc(arch, fire=0.06, k=4, k_start=4, aux_k=8, jumprelu_bandwidth=0.05, **kw)
    if arch == "jumprelu":
        _jump_thresholds(cc, x)
    cc.eval()  # a pure function: no buffer updates between the runs compared
    cc.tokens_since_active_F[1::4] = cc.cfg.dead_tokens   # AuxK in the loss of the variants that have it
    return cc, x


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_fast_path_equals_readable_loss(arch, monkeypatch):
    """The active-set path (sparse kernels forced, then its dense kernels) gives the readable dense loss's
    value, L0 and every gradient (x's too), for every variant in the table."""
    results = []
    for density, devices in ((1.0, ("cpu",)), (0.0, ("cpu",)), (0.0, ())):
        monkeypatch.setattr(sparse, "SPARSE_MAX_DENSITY", density)
        monkeypatch.setattr(sparse, "ACTIVE_MAX_DENSITY", 1.0)
        monkeypatch.setattr(sparse, "ACTIVE_SET_DEVICES", devices)
        cc, x = _setup(arch)
        x.requires_grad_()
        out = cc.loss(x, step=7)
        wrt = [x, *cc.parameters()]
        results.append((out, torch.autograd.grad(out["loss"], wrt)))
    (ref, g_ref) = results[-1]     # the readable loss (loss()'s plain dense branch)
    assert 0 < ref["l0"] < cc.cfg.dict_size / 4 and ref["sparsity"] >= 0
    for out, g in results[:-1]:
        assert torch.allclose(out["loss"], ref["loss"], rtol=1e-5, atol=1e-6), arch
        assert out["l0"] == ref["l0"] and torch.allclose(out["sparsity"], ref["sparsity"], rtol=1e-5, atol=1e-7)
        for a, b in zip(g, g_ref):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), arch
    if arch == "jumprelu":    # the STE gives θ a gradient, on both paths
        assert g_ref[-1].abs().sum() > 0


@pytest.mark.parametrize("arch", ["l1", "batchtopk"])
def test_paper_variants_readable_loss_is_the_naive_loop(arch):
    """The readable loss of the paper's two variants is the formulas' naive per-revision loop."""
    cc, x = _setup(arch)
    out = cc.loss(x, step=7)
    assert torch.allclose(out["loss"], naive(cc, x, step=7)[3], rtol=1e-5, atol=1e-6)


def test_jumprelu_applies_theta_once_and_its_ste():
    """f = z·H(z − θ): kept codes are z itself, not z − θ (dictionary_learning issue #55 is applying θ twice);
    inference is the training code's forward; θ's gradient is −(θ/ε)·K((z − θ)/ε) per entry, summed."""
    cc, x = _setup("jumprelu")
    z = torch.relu(cc.pre_acts(x)).detach()
    theta = cc.log_threshold_F.exp().detach()
    f = cc.encode(x)
    assert torch.equal(f, z * (z > theta)) and (f > 0).any()
    assert torch.equal(f[f > 0], z[f > 0])
    f_train, _ = cc.variant.code(cc, cc.pre_acts(x), cc.decoder_norms().sum(1), None)
    assert torch.equal(f_train.detach(), f)
    th = theta.clone().requires_grad_()
    eps = 0.05
    g = torch.randn_like(z)
    (JumpReLUFn.apply(z, th, eps) * g).sum().backward()
    band = ((z - theta).abs() < eps / 2) & (z > 0)
    assert band.any()
    assert torch.allclose(th.grad, (-(theta / eps) * band * g).sum(0))


def test_matryoshka_loss_averages_its_prefixes():
    cc, x = _setup("matryoshka", F=64, matryoshka_groups=[0.25, 0.25, 0.5])
    assert group_ends(cc.cfg) == [16, 32, 64] and cc.cfg.matryoshka_groups == (0.25, 0.25, 0.5)
    out = cc.loss(x, step=7)
    _, f, _, _ = naive(cc, x, step=7)        # BatchTopK's code (AuxK excluded below)
    aux = out["sparsity"]
    want = 0
    for end in (16, 32, 64):
        x_hat = torch.einsum("bf,fmd->bmd", f[:, :end], cc.W_dec_FMd[:end]) + cc.b_dec_Md
        want = want + (x - x_hat).pow(2).sum() / len(x) / 3
    assert torch.allclose(out["loss"] - aux, want, rtol=1e-5)
    assert torch.allclose(out["mse"], (x - x_hat).pow(2).sum() / len(x), rtol=1e-5)   # the whole dictionary's


@torch.no_grad()
def _midway_threshold(cc, x):
    """θ midway between the two middle positive scores on x, as an EMA lands: not ON a token's score, where
    f·n > θ and f > θ/n may round apart (they agree everywhere else: a band of one float rounding about θ)."""
    score = (torch.relu(cc.pre_acts(x)) * cc.decoder_norms().sum(1)).flatten()
    s = score[score > 0].sort().values
    j = len(s) // 2
    return float((s[j - 1] + s[j]) / 2)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_to_jumprelu_same_codes(arch, tmp_path):
    """θ_i = θ / Σ_m ‖W_dec[i,m]‖ in the normalised space: the converted crosscoder's codes are BatchTopK's θ
    rule's, exactly, with scales folded in; saved and loaded as a JumpReLU run."""
    cc, _ = trained_cc(arch, F=256, fire=0.1, k=8, k_start=8)
    x = rand_x(B=2048, M=3, d=16, seed=9)
    with torch.no_grad():
        cc.threshold.fill_(_midway_threshold(cc, x))
        cc.W_dec_FMd[3] = 0       # a latent with no decoder: never kept, by either rule
    s_M = torch.tensor([0.5, 2.0, 3.0])
    folded = cc.fold_scales(s_M)
    x_raw = x / s_M[:, None]
    jr = batchtopk_to_jumprelu(folded)
    assert jr.cfg.arch == "jumprelu" and "threshold" not in dict(jr.named_buffers())
    f_btk, f_jr = folded.encode(x_raw), jr.encode(x_raw)
    assert (f_btk > 0).any() and torch.equal(f_btk, f_jr)
    assert torch.allclose(folded(x_raw)[0], jr(x_raw)[0])
    jr.save(tmp_path, extra={"converted": {"from_arch": arch}})
    back = CrossCoder.load(tmp_path)
    assert torch.equal(back.encode(x_raw), f_btk) and back.extra["converted"]["from_arch"] == arch
    cc.threshold.fill_(-1.0)
    with pytest.raises(ValueError, match="no threshold"):
        batchtopk_to_jumprelu(cc)
    with pytest.raises(ValueError, match="only a BatchTopK"):
        batchtopk_to_jumprelu(small_cc("l1"))


@pytest.mark.parametrize("field,value", [("jumprelu_bandwidth", 0.0), ("jumprelu_coeff", -1.0),
                                         ("jumprelu_threshold_init", float("nan")), ("jumprelu_tanh_c", -2.0),
                                         ("matryoshka_groups", (0.5, 0.6)), ("matryoshka_groups", ())])
def test_variant_field_validation(field, value):
    with pytest.raises(ValueError, match=rf"CrossCoderConfig\.{field}=.* is invalid"):
        CrossCoderConfig(n_models=2, d_model=4, **{field: value})


def test_matryoshka_groups_need_a_latent_each():
    with pytest.raises(ValueError, match="matryoshka_groups.*at least one latent"):
        CrossCoderConfig(n_models=2, d_model=4, dict_size=8, arch="matryoshka", k=2,
                         matryoshka_groups=(0.01, 0.99))


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_config_roundtrip_and_old_runs_load(arch, tmp_path):
    """config.json round-trips every variant's fields; a run folder written before the variants (no new
    fields, and an L1 run's unused θ buffer) still loads to the same model."""
    cc = small_cc(arch, k=3)
    cc.save(tmp_path / "new", extra={"layer": 0})
    back = CrossCoder.load(tmp_path / "new")
    assert back.cfg == cc.cfg and type(back.variant) is VARIANTS[arch]
    x = rand_x()
    assert torch.equal(back(x)[0], cc(x)[0])
    if arch not in ("l1", "batchtopk"):
        return
    from safetensors.torch import load_file, save_file
    old = tmp_path / "old"
    cc.save(old, extra={"layer": 0})
    meta = json.loads((old / "config.json").read_text())
    for name in [k for k in meta if k.startswith(("jumprelu_", "matryoshka_"))]:
        del meta[name]
    (old / "config.json").write_text(json.dumps(meta))
    t = load_file(old / "crosscoder.safetensors")
    t.setdefault("threshold", torch.tensor(-1.0))    # every crosscoder carried θ then
    save_file(t, old / "crosscoder.safetensors")
    again = CrossCoder.load(old)
    assert again.cfg == cc.cfg and torch.equal(again(x)[0], cc(x)[0])


# -----------------------------------------------------------------------------
# a fifth variant, defined here alone


class StraightThroughGate(torch.autograd.Function):
    """f = z·1{z > g}, g's gradient straight through as if f = z − g where kept (a crude STE: enough to learn)."""

    @staticmethod
    def forward(ctx, z, g_F):
        keep = z > g_F
        ctx.save_for_backward(keep)
        return z * keep

    @staticmethod
    def backward(ctx, grad):
        keep, = ctx.saved_tensors
        return grad * keep, -(grad * keep).sum(0)


class Gated(Variant):
    """A learned per-latent gate (a parameter, straight-through backward), a buffer counting the steps seen and
    one marking the latents that ever fired (DDP: fired on any rank, the maximum), an L1 penalty; no fast
    path (it opts out: the dense branch always)."""
    name = "gated"
    fast_path = False
    state_names = ("gate_F", "steps_seen", "ever_fired_F")

    def add_state(self, cc):
        cc.gate_F = torch.nn.Parameter(torch.full((self.cfg.dict_size,), 0.01))
        cc.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        cc.register_buffer("ever_fired_F", torch.zeros(self.cfg.dict_size, dtype=torch.long))

    def sync(self, cc, group):
        torch.distributed.all_reduce(cc.ever_fired_F, op=torch.distributed.ReduceOp.MAX, group=group)

    def code(self, cc, pre_BF, norms_F, step):
        return StraightThroughGate.apply(torch.relu(pre_BF), cc.gate_F), {}

    def sparsity(self, cc, x_BMd, x_hat_BMd, t, step, out):
        return 0.01 * t.l1_sum / x_BMd.shape[0]

    def update(self, cc, t, step):
        cc.steps_seen += 1
        cc.ever_fired_F.masked_fill_(t.fired_F, 1)

    def infer(self, cc, f_BF):
        return f_BF * (f_BF > cc.gate_F)


def _gated_argv(local_model, cache, out):
    return ["--model", str(local_model[0]), "--layer", "1", "--revisions", "step0,step100", "--cache", str(cache),
            "--arch", "gated", "--dict-size", "32", "--batch-size", "64", "--tokens", str(64 * 3), "--lr", "3e-3",
            "--out", str(out), "--log-every", "1", "--ckpt-every", "2"]


def test_a_fifth_variant_trains_through_train_py(local_model, small_cache, tmp_path, monkeypatch):
    """A class and a registry line, here alone: train.py's real code path (its parser's --arch, the config
    checks, the loss, checkpoints, save) trains it, and the saved run loads with its state."""
    import train
    monkeypatch.setitem(VARIANTS, "gated", Gated)
    out = tmp_path / "run"
    train.main(_gated_argv(local_model, small_cache, out))
    cc = CrossCoder.load(out)
    assert cc.cfg.arch == "gated" and type(cc.variant) is Gated
    assert int(cc.steps_seen) == 3 and not torch.allclose(cc.gate_F, torch.full((32,), 0.01))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["val_fvu"][0]) for r in log)
    assert "gated" in variants.VARIANTS        # the table itself, no copy of it, is what train.py read


# a sixth, with a hyperparameter of its own: its settings' dataclass and one register() line, nothing else


@dataclass
class TunedGateSettings(variants.Settings):
    gate_init: float = variants.setting(0.01, "the gate's value at init, every latent")


class TunedGated(Gated):
    """Gated, its gate starting at gate_init; the value it read is kept in a buffer, so the saved run shows it."""

    def add_state(self, cc):
        super().add_state(cc)
        cc.gate_F.data.fill_(self.cfg.gate_init)
        cc.register_buffer("gate_init_read", torch.tensor(self.cfg.gate_init))


@pytest.fixture
def tuned_gate():
    variants.register("tuned-gate", TunedGated, TunedGateSettings)
    yield
    del VARIANTS["tuned-gate"]


def test_a_variant_setting_is_one_line_and_a_train_py_flag(tuned_gate, local_model, small_cache, tmp_path, capsys):
    """The setting a variant declares (here, in this file alone) is train.py's flag --gate-init, in its --help under
    the variant's name, reaches the variant that trains, config.json (flat, as every field) and the run's RunConfig;
    the other variants' settings keep their defaults; once unregistered, no config or flag holds it."""
    import train
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    helptext = capsys.readouterr().out
    assert "--arch tuned-gate:" in helptext and "--gate-init GATE_INIT" in helptext and "tuned-gate" in helptext
    assert "the gate's value at init, every latent (default: 0.01)" in " ".join(helptext.split())
    out = tmp_path / "run"
    argv = [a if a != "gated" else "tuned-gate" for a in _gated_argv(local_model, small_cache, out)]
    train.main(argv + ["--gate-init", "0.0625"])
    cc = CrossCoder.load(out)
    assert type(cc.variant) is TunedGated and cc.cfg.gate_init == 0.0625
    assert float(cc.gate_init_read) == 0.0625      # what the variant read when it was built for training
    config = json.loads((out / "config.json").read_text())
    assert config["gate_init"] == 0.0625 and config["run"]["gate_init"] == 0.0625
    assert config["jumprelu_coeff"] == variants.JumpReLUSettings.jumprelu_coeff and config["k"] == defaults.PAPER.k
    with pytest.raises(common.UsageError, match="--gate-init must be a number, got 'wide'"):
        train.parse_args(argv + ["--gate-init", "wide"])
    assert CrossCoderConfig(n_models=2, d_model=4).gate_init == 0.01


def test_unregistered_setting_is_gone():
    """No variant, no setting: the config refuses the field, train.py has no flag for it."""
    import train
    assert "gate_init" not in variants.settings_fields()
    with pytest.raises(TypeError, match="no fields.*gate_init"):
        CrossCoderConfig(n_models=2, d_model=4, gate_init=0.5)
    with pytest.raises(common.UsageError, match="unrecognized arguments: --gate-init"):
        train.parse_args(["--gate-init", "0.5"])


def test_settings_names_clash_is_refused():
    """A setting's name means one thing: a variant declaring another's name is refused when it registers."""
    @dataclass
    class Clash(variants.Settings):
        k: int = variants.setting(3, "another k")

    class ClashGated(Gated):
        pass
    with pytest.raises(ValueError, match="variant 'clash' declares setting 'k', which 'batchtopk' declares too"):
        variants.register("clash", ClashGated, Clash)
    assert "clash" not in VARIANTS and variants.settings_fields()["k"].default == variants.BatchTopKSettings.k


def test_jumprelu_coeff_is_a_train_py_flag(local_model, small_cache, tmp_path):
    """--jumprelu-coeff (its default fits the toy, not every dataset) reaches the saved crosscoder's config,
    the penalty the training log reports (λ_J = coeff · M·d after the warm-up), and the run's RunConfig."""
    import train
    out = tmp_path / "run"
    argv = [a if a != "gated" else "jumprelu" for a in _gated_argv(local_model, small_cache, out)]
    train.main(argv + ["--jumprelu-coeff", "0.0123"])
    cc = CrossCoder.load(out)
    assert cc.cfg.arch == "jumprelu" and cc.cfg.jumprelu_coeff == 0.0123
    assert cc.variant.coeff_at(None) == pytest.approx(0.0123 * 2 * cc.cfg.d_model)
    assert json.loads((out / "config.json").read_text())["run"]["jumprelu_coeff"] == 0.0123


def test_convert_to_jumprelu_writes_a_run_every_stage_opens(tmp_path):
    """convert.py --to jumprelu: a normal run folder (config.json + crosscoder.safetensors + DONE), marked as
    converted, whose codes are the BatchTopK run's; analysis.open_run (what evaluate/relie/ablate use) takes it."""
    import convert
    from crosscoding import analysis, common
    cc, _ = trained_cc("batchtopk", F=64, fire=0.1, k=4, k_start=4)
    x = rand_x(B=512, M=3, d=16, seed=4)
    cc.threshold.fill_(_midway_threshold(cc, x))
    src, out = tmp_path / "btk", tmp_path / "jr"
    cc.save(src, extra=dict(model="toy", revisions=["a", "b", "c"], layer=0, scales=[1.0, 1.0, 1.0]))
    common.mark_done(src)
    convert.main(["--to", "jumprelu", "--run", str(src), "--out", str(out)])
    run = analysis.open_run(out)
    assert run.cc.cfg.arch == "jumprelu" and run.config["converted"]["from_arch"] == "batchtopk"
    assert set(run.config["arch_settings"]) == {f for f in variants.settings_fields() if f.startswith("jumprelu_")}
    assert run.revisions == ["a", "b", "c"] and common.is_done(out)
    assert torch.equal(run.cc.encode(x), cc.encode(x))
    with pytest.raises(common.UsageError, match="already exists"):
        convert.main(["--to", "jumprelu", "--run", str(src), "--out", str(out)])
    with pytest.raises(common.UsageError, match="--to dictionary_learning holds l1 and batchtopk "
                                                       "crosscoders; .* is jumprelu"):
        convert.main(["--to", "dictionary_learning", "--run", str(out), "--out", str(tmp_path / "x.pt")])


def _gated_rank(rank, argv, port):
    """One DDP rank of train.py (gloo), in a spawned process: the fifth variant is registered here too."""
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    VARIANTS["gated"] = Gated
    import train
    train.main(argv)


@pytest.mark.slow
def test_a_fifth_variant_under_ddp_matches_one_process(local_model, small_cache, tmp_path, monkeypatch):
    """Two gloo ranks train the fifth variant as one process does: its parameter (the gate) by DDP's gradient
    averaging, its buffer by its own sync rule (fired on any rank), the dead counters by sync_buffers."""
    import train
    monkeypatch.setitem(VARIANTS, "gated", Gated)
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(_gated_argv(local_model, small_cache, one))
    torch.multiprocessing.start_processes(_gated_rank, args=(_gated_argv(local_model, small_cache, two), 29531),
                                          nprocs=2, start_method="spawn")
    a, b = CrossCoder.load(one), CrossCoder.load(two)
    assert torch.equal(a.ever_fired_F, b.ever_fired_F) and int(b.steps_seen) == 3
    assert torch.equal(a.tokens_since_active_F, b.tokens_since_active_F)
    for name in ("gate_F", "W_enc_FMd", "W_dec_FMd", "b_enc_F"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-5)
