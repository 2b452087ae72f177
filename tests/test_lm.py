"""lm.py: block discovery, reading, patching and stop-at-layer on tiny models of every architecture,
checked against output_hidden_states; revisions; the hub path offline through a fake HF cache."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, VOCAB, tiny_model
from crosscoding import lm
from crosscoding.common import UsageError


def _ids(B=3, T=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0  # one left-padded row
    return ids, mask


@pytest.mark.parametrize("layer", [0, 1])
def test_read_matches_hidden_states(arch, layer):
    m = tiny_model(arch)
    ids, mask = _ids()
    ref = lm.forward(m, ids, mask, output_hidden_states=True)
    out, x = lm.read_layer(m, layer, ids, mask)
    torch.testing.assert_close(x, ref.hidden_states[layer + 1], rtol=0, atol=0)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    # the base model's last hidden state (final norm applied) gives the same logits through the unembedding
    base, x_base = lm.read_layer(m.base_model, layer, ids, mask)
    torch.testing.assert_close(x_base, x, rtol=0, atol=0)
    torch.testing.assert_close(m.get_output_embeddings()(base.last_hidden_state), ref.logits, rtol=1e-5, atol=1e-5)


def test_stop_at_layer_equals_full_forward(arch):
    m = tiny_model(arch)
    ids, mask = _ids()
    _, full = lm.read_layer(m, 1, ids, mask)
    calls = []
    h = lm.blocks(m)[2].register_forward_hook(lambda *a: calls.append(1))
    stopped = lm.run_to_layer(m, 1, ids, mask)
    h.remove()
    torch.testing.assert_close(stopped, full, rtol=0, atol=0)
    assert calls == [], "the block above the stop layer ran"


@pytest.mark.parametrize("layer", [0, 1])
def test_start_at_layer_equals_full_forward(arch, layer):
    """Handing block L's own output to start_at_layer gives the full forward's logits, and the blocks
    up to L never run; a different block-L output changes the logits the way patching it would."""
    m = tiny_model(arch)
    ids, mask = _ids()
    out, x = lm.read_layer(m, layer, ids, mask)
    logits = out.logits
    with lm.start_at_layer(m, layer, x):
        started = lm.forward(m, ids, mask).logits
    torch.testing.assert_close(started, logits, rtol=1e-5, atol=1e-5)
    calls = []
    inner = [mod for b in lm.blocks(m)[: layer + 1] for mod in b.modules() if mod is not b]
    hooks = [mod.register_forward_hook(lambda *a: calls.append(1)) for mod in inner]
    x2 = x + torch.randn_like(x)
    with lm.start_at_layer(m, layer, x2):
        started2 = lm.forward(m, ids, mask).logits
    for h in hooks:
        h.remove()
    assert inner and calls == [], "a block at or below the start layer computed something"
    with lm.patch_layer(m, layer, lambda _: x2):
        patched2 = lm.forward(m, ids, mask).logits
    torch.testing.assert_close(started2, patched2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(started2, logits)
    # the model is itself again afterwards
    torch.testing.assert_close(lm.forward(m, ids, mask).logits, logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="block 1's output given as"):
        with lm.start_at_layer(m, 1, x[:1]):
            lm.forward(m, ids, mask)


def test_identity_patch_is_bit_identical(arch):
    m = tiny_model(arch)
    ids, mask = _ids()
    clean = lm.forward(m, ids, mask).logits
    with lm.patch_layer(m, 1, lambda x: x.clone()):
        patched = lm.forward(m, ids, mask).logits
    assert torch.equal(clean, patched)


def test_patch_adds_exactly_a_vector(arch):
    m = tiny_model(arch)
    ids, mask = _ids()
    v = torch.randn(m.config.hidden_size)
    _, clean = lm.read_layer(m, 0, ids, mask)
    with lm.patch_layer(m, 0, lambda x: x + v):
        # block 1's input is what block 0 handed on
        seen = {}

        def grab(mod, args, kwargs):
            seen["x"] = args[0] if args else kwargs["hidden_states"]

        h = lm.blocks(m)[1].register_forward_pre_hook(grab, with_kwargs=True)
        patched_logits = lm.forward(m, ids, mask).logits
        h.remove()
    torch.testing.assert_close(seen["x"] - clean, v.expand_as(clean), rtol=0, atol=1e-6)
    assert not torch.allclose(patched_logits, lm.forward(m, ids, mask).logits)


def test_left_padding_keeps_positions(arch):
    """A left-padded row gives the same last-position logits as the unpadded sequence."""
    m = tiny_model(arch)
    ids = torch.randint(4, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    a = lm.forward(m, ids, torch.ones_like(ids)).logits[0, -1]
    b = lm.forward(m, padded, mask).logits[0, -1]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_final_norm_and_blocks_found(arch):
    m = tiny_model(arch)
    assert len(lm.blocks(m)) == 3
    norm = lm.final_norm(m)
    assert "norm" in type(norm).__name__.lower() or "ln" in type(norm).__name__.lower()
    # the last hidden state is the final norm applied to the last block's output
    ids, mask = _ids()
    ref = lm.forward(m, ids, mask, output_hidden_states=True)
    _, last = lm.read_layer(m, 2, ids, mask)
    torch.testing.assert_close(norm(last), ref.hidden_states[-1], rtol=1e-5, atol=1e-5)


def test_layer_out_of_range():
    m = tiny_model("gpt_neox")
    with pytest.raises(UsageError, match=r"valid layers are 0\.\.2"):
        lm.check_layer(m, 5)


def test_unsupported_architecture():
    class NoBlocks(torch.nn.Module):
        config = type("C", (), {"num_hidden_layers": 2})()
    with pytest.raises(UsageError, match="unsupported architecture NoBlocks"):
        lm.blocks(NoBlocks())


def test_parse_revision():
    assert lm.parse_revision("step2000-tokens4B") == lm.Revision("step2000-tokens4B", 2000, 4_000_000_000)
    assert lm.parse_revision("global_step10000", 1000).tokens == 10_000_000
    assert lm.parse_revision("step512", 2_097_152).tokens == 512 * 2_097_152
    assert lm.parse_revision("main").step is None


def test_resolve():
    assert lm.resolve("pythia-1b").repo == "EleutherAI/pythia-1b"
    assert lm.resolve("bloom-1b1").tokenizer_repo == "bigscience/bloom-1b1"
    assert lm.resolve("org/some-model").repo == "org/some-model"
    with pytest.raises(UsageError, match="valid keys: pythia-70m"):
        lm.resolve("pythia-7")


def test_local_revisions_sorted(tmp_path):
    m = tiny_model("gpt_neox")
    for name in ["step10", "step2", "main", "step100"]:
        m.save_pretrained(tmp_path / name)
    spec = lm.resolve(str(tmp_path))
    assert [r.name for r in lm.revisions(spec)] == ["step2", "step10", "step100", "main"]
    with pytest.raises(UsageError, match="nearest available: step10"):
        lm.check_revision(spec, "step11")


HUB_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from crosscoding import lm, tasks
out = {}
for key, rev in [("pythia-1b", "step512"), ("pythia-1b", "step143000"), ("bloom-1b1", "global_step10000")]:
    m, tok = lm.load(key, rev)
    out[f"{key}@{rev}"] = [type(m).__name__, float(m.get_output_embeddings().weight.sum()), tok("the cat")["input_ids"]]
out["revs"] = [r.name for r in lm.revisions("pythia-1b")]
try:
    lm.load("pythia-1b", "step9999")
except Exception as e:
    out["bad"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def _fake_hub_cache(cache, repo, revisions, make_model, tok):
    """Lay out a Hugging Face cache as a real download would: snapshots/<commit>/ and refs/<revision>."""
    base = cache / f"models--{repo.replace('/', '--')}"
    for i, (rev, model) in enumerate(zip(revisions, make_model)):
        commit = f"{i:040x}"
        snap = base / "snapshots" / commit
        model.save_pretrained(snap)
        tok.save_pretrained(snap)
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / rev).write_text(commit)


def test_hub_path_offline(tmp_path):
    from conftest import word_tokenizer
    tok = word_tokenizer(["the", "cat"] + [f"w{i}" for i in range(100)])
    cache = tmp_path / "hub"
    revs = ["step512", "step2000", "step143000"]
    _fake_hub_cache(cache, "EleutherAI/pythia-1b", revs, [tiny_model("gpt_neox", seed=s) for s in range(3)], tok)
    _fake_hub_cache(cache, "bigscience/bloom-1b1-intermediate", ["global_step10000"], [tiny_model("bloom")], tok)
    _fake_hub_cache(cache, "bigscience/bloom-1b1", ["main"], [tiny_model("bloom")], tok)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(ROOT)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["pythia-1b@step512"][0] == "GPTNeoXForCausalLM"
    assert out["pythia-1b@step512"][1] != out["pythia-1b@step143000"][1]  # different weights per revision
    assert out["bloom-1b1@global_step10000"][0] == "BloomForCausalLM"
    assert out["pythia-1b@step512"][2] == [tok.convert_tokens_to_ids("the"), tok.convert_tokens_to_ids("cat")]
    assert out["revs"] == revs
    assert "local cache" in r.stderr
    assert "step9999" in out["bad"] and "step512" in out["bad"]


def test_next_token_ce_in_chunks_equals_direct():
    m = tiny_model("gpt_neox")
    ids, _ = _ids(B=3, T=12)
    out = m.base_model(input_ids=ids)
    targets = ids[:, 2:]
    want = torch.nn.functional.cross_entropy(m(input_ids=ids).logits[:, 1:-1].flatten(0, 1), targets.flatten(),
                                             reduction="sum")
    for rows in (1, 7, 10_000):
        got = lm.next_token_ce(m, out.last_hidden_state[:, 1:-1], targets, rows=rows)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("key,layers,d,vocab,tok_size", [
    ("pythia-70m", 6, 512, 50304, 50277), ("olmo-1b", 16, 2048, 50304, 50280), ("bloom-1b1", 24, 1536, 250880, 250680)])
def test_random_weights_have_the_real_shapes(key, layers, d, vocab, tok_size):
    """--weights random: the registry's architecture numbers (meta tensors: no memory), a seeded init per
    revision, and a stand-in tokenizer of the real vocabulary size and special ids that adds no BOS."""
    import transformers
    spec = lm.resolve(key)
    cls, kw = spec.arch
    cfg = getattr(transformers, cls)(**kw)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (layers, d, vocab)
    with torch.device("meta"):
        m = transformers.AutoModelForCausalLM.from_config(cfg)
    assert len(lm.blocks(m)) == layers and spec.layer < layers
    tok = lm.standin_tokenizer(spec)
    assert len(tok) == tok_size and max(tok.get_vocab().values()) < vocab
    ids = tok("the key to the cabinets is")["input_ids"]
    assert len(ids) == 6 and tok.unk_token_id not in ids and lm.bos_id(tok) not in ids
    assert lm.bos_id(tok) == (kw["bos_token_id"] if kw.get("bos_token_id") is not None else kw["eos_token_id"])


def test_random_weights_seeded_by_revision():
    a1, tok = lm.load("pythia-70m", "step512", weights="random")
    a2, _ = lm.load("pythia-70m", "step512", weights="random")
    b, _ = lm.load("pythia-70m", "step2000", weights="random")
    w = lambda m: m.gpt_neox.layers[0].attention.query_key_value.weight  # noqa: E731
    assert torch.equal(w(a1), w(a2)) and not torch.equal(w(a1), w(b))
    assert a1.config.hidden_size == 512 and not a1.training and not w(a1).requires_grad
    with pytest.raises(UsageError, match="--weights random needs a model whose architecture is known"):
        lm.load("org/unknown", "main", weights="random")


def test_random_weights_built_on_the_device_a_function_of_the_revision():
    """--weights random builds and initialises a revision on the device asked for: on the meta device (the GPU's
    stand-in) every parameter and buffer is there, none made on the CPU first. On the CPU the same revision
    draws the same weights whatever the global RNG's state (which it leaves as it was), another revision other
    ones, initialised as Hugging Face does (std 0.02, norms at 1); drawn_on names where, which a run records."""
    import dataclasses
    spec = lm.MODELS["pythia-70m"]
    spec = dataclasses.replace(spec, arch=(spec.arch[0], dict(spec.arch[1], num_hidden_layers=2)))
    with torch.random.fork_rng():    # the test's own draws leave the other tests' global RNG as it was
        meta = lm.random_model(spec, "step512", device="meta")
        assert {t.device.type for t in [*meta.parameters(), *meta.buffers()]} == {"meta"}
        torch.manual_seed(123)
        state = torch.get_rng_state()
        a = lm.random_model(spec, "step512")
        assert torch.equal(torch.get_rng_state(), state)
        torch.rand(1000)                                  # another global RNG state: the same weights
        a2 = lm.random_model(spec, "step512", device="cpu")
        b = lm.random_model(spec, "step2000")
        sa, sa2, sb = a.state_dict(), a2.state_dict(), b.state_dict()
        assert sa.keys() == sa2.keys() and all(torch.equal(sa[k], sa2[k]) for k in sa)
        w = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
        assert not torch.equal(sa[w], sb[w]) and abs(sa[w].std().item() - 0.02) < 0.001
        assert torch.equal(sa["gpt_neox.layers.0.input_layernorm.weight"], torch.ones(512))
    assert lm.drawn_on("random", "cpu") == "cpu" and lm.drawn_on("hub", "cpu") is None


def test_analysis_refuses_random_weights_drawn_elsewhere(tmp_path):
    """A run trained on random weights drawn on a GPU, analysed on the CPU, would meet other weights under the same
    revision names: one line, exit 2, naming where they were drawn."""
    from crosscoding import analysis
    run = analysis.Run(tmp_path, {"data": {"weights": "random", "random_on": "NVIDIA H200"}}, None,
                       ["step512", "step2000"], 3, lm.MODELS["pythia-70m"], "cpu")
    with pytest.raises(UsageError, match="drawn on NVIDIA H200; on cpu the same revision names draw other weights"):
        run.load_models()


def test_cli_unknown_model():
    r = subprocess.run([sys.executable, "-m", "crosscoding.lm", "pythia-7"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "valid keys" in r.stderr and "Traceback" not in r.stderr


def test_keep_through_drops_later_blocks_and_reads_the_same(arch):
    """A training run's LMs keep blocks 0..L only: block L's output is the full model's hidden_states[L+1]
    (the output of a non-last block), and the parameters counted are those left."""
    full, L = tiny_model(arch, n_layers=4), 1
    ids = torch.randint(4, VOCAB, (2, 9))
    want = full(ids, output_hidden_states=True).hidden_states[L + 1]
    short = lm.keep_through(tiny_model(arch, n_layers=4), L)
    assert lm.n_layers(short) == L + 1
    assert lm.params_through(full, L) == sum(p.numel() for p in short.parameters())
    torch.testing.assert_close(lm.run_to_layer(short, L, ids), want)
