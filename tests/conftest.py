"""Shared test fixtures: tiny random models of every supported architecture, built from configs."""
import os
import sys
from pathlib import Path

# Two xdist workers on 2 cores, each starting stage scripts as subprocesses with 2 torch threads: OpenMP threads
# that spin while they wait take the cores from each other (toy.py, 128 steps on a loaded 2-core box: 150 s
# spinning, 20 s passive, the same weights). Set before torch loads; the subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "seed-data"

torch.set_num_threads(2)

VOCAB = 128

# The longest test files first (minutes each: whole stages run as subprocesses), the rest in their own order:
# with `-n 2 --dist loadfile` the two workers then end together, instead of one running the last long file
# alone while the other idles.
LONGEST_FIRST = ("test_faults.py", "test_train.py", "test_controls.py", "test_seeds.py", "test_bench.py",
                 "test_planted.py", "test_real_path.py", "test_toy_findings.py", "test_app.py", "test_convert.py",
                 "test_shards.py", "test_tune.py", "test_bad_input.py", "test_ablate.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))    # stable: a file's tests keep their order


def tiny_config(arch: str, n_layers=3, d=32):
    import transformers as tf
    common = dict(vocab_size=VOCAB, num_hidden_layers=n_layers, num_attention_heads=4, hidden_size=d,
                  intermediate_size=4 * d, max_position_embeddings=64)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**common, rotary_pct=0.25, tie_word_embeddings=False)
    if arch == "olmo":
        return tf.OlmoConfig(**common)
    if arch == "olmo2":
        return tf.Olmo2Config(**common)
    if arch == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=2)
    if arch == "bloom":
        return tf.BloomConfig(vocab_size=VOCAB, n_layer=n_layers, n_head=4, hidden_size=d)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_layer=n_layers, n_head=4, n_embd=d, n_positions=64)
    raise ValueError(arch)


ARCHS = ["gpt_neox", "olmo", "olmo2", "llama", "bloom", "gpt2"]


def tiny_model(arch: str, seed=0, **kw):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(arch, **kw))
    return m.eval().requires_grad_(False)


def word_tokenizer(words):
    """A word-level HF tokenizer over `words` (+ specials), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


WORDS = [f"w{i}" for i in range(100)]


@pytest.fixture(scope="session")
def local_model(tmp_path_factory):
    """A local 'model folder' of three tiny GPT-NeoX revisions with a word tokenizer, a text file
    of random words, and a small pairs file: the hub's layout, offline."""
    import json

    import numpy as np
    root = tmp_path_factory.mktemp("lm")
    tok = word_tokenizer(WORDS)
    for s, name in enumerate(["step0", "step10", "step100"]):
        m = tiny_model("gpt_neox", seed=s)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    text = root / "text.txt"
    rng = np.random.default_rng(0)
    text.write_text("\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(4000)))
    pairs = root / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prefix": f"w{i} w{i+1}", "good": " w1", "bad": " w2",
                                           "subtask": ["a", "b"][i % 2]}) for i in range(20)))
    return root, text, pairs


@pytest.fixture(scope="session")
def small_cache(local_model, tmp_path_factory):
    """Layer 1 of local_model's step0 and step100 cached on a few thousand tokens: what the training tests
    train on."""
    from crosscoding import activations
    root, text, _ = local_model
    return activations.make_cache(str(root), 1, ["step0", "step100"], tmp_path_factory.mktemp("cache") / "c",
                                  n_tokens=6000, seq_len=16, heldout_tokens=2000, text=str(text), val_rows=1000)


def run_script(args, cwd, timeout=600, check=True):
    """Run one of the project's scripts as a user would, in `cwd`; return the CompletedProcess."""
    import os
    import subprocess
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{args} failed:\n{r.stderr[-3000:]}"
    return r


def run_stage(args, cwd):
    """Run one of the project's stage scripts in this process, as `python <script> <args>` would in `cwd`, with
    imports kept warm (no interpreter start-up, and torch and transformers imported once a worker). Returns its
    stdout, its stderr and the Python warnings it raised, filtered as a fresh interpreter filters them."""
    import contextlib
    import importlib
    import io
    import os
    import types
    import warnings
    main = importlib.import_module(Path(args[0]).stem).main
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", quiet)
            main([str(a) for a in args[1:]])
    finally:
        os.chdir(here)
    return types.SimpleNamespace(stdout=out.getvalue(), stderr=err.getvalue(),
                                 warnings=[f"{w.category.__name__}: {w.message}" for w in caught])


@pytest.fixture(scope="session", autouse=True)
def toy_model():
    """The toy model (models/toy), built once if missing: every `--model toy` command reads it."""
    import toy
    return toy.ensure_toy()


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """A small, fast toy run through every stage (a 20k-token cache, 60 steps of a 128-latent
    crosscoder validated 3 times, 10 pairs per sub-task), each stage in this process: what the app and the bad-input
    tests read. The findings of the default run are conftest.toy_pipeline's (slow)."""
    cwd = tmp_path_factory.mktemp("toyrun")
    run_stage(["cache_acts.py", "--scan", "--model", "toy", "--scan-tokens", "512"], cwd)
    run_stage(["cache_acts.py", "--model", "toy", "--tokens", "20000"], cwd)
    run = cwd / "runs" / "toy-small"
    run_stage(["train.py", "--dict-size", "128", "--tokens", str(1024 * 60), "--log-every", "20", "--out", str(run),
               "--cache", str(next((cwd / "cache").iterdir()))], cwd)
    run_stage(["evaluate.py", "--run", str(run), "--blocks", "32"], cwd)
    run_stage(["relie.py", "--run", str(run), "--max-pairs", "10", "--context-blocks", "4"], cwd)
    run_stage(["ablate.py", "--run", str(run), "--max-pairs", "10", "--draws", "2"], cwd)
    return cwd, run


@pytest.fixture(scope="session")
def toy_pipeline(tmp_path_factory):
    """The toy pipeline with each stage's defaults, as pipeline.sh runs it but for the scan (no test reads
    it; toy_run has one), in a fresh folder (the toy LM itself is models/toy, built on first use):
    cache/, runs/<name>/ with eval.json, latents.csv, relie/toy_sva/ and ablation/toy_sva/."""
    cwd = tmp_path_factory.mktemp("pipeline")
    run_script(["train.py"], cwd)
    run = next((cwd / "runs").iterdir())
    run_script(["evaluate.py", "--run", str(run)], cwd)
    run_script(["relie.py", "--run", str(run)], cwd)
    run_script(["ablate.py", "--run", str(run)], cwd)
    return cwd, run
