"""lm.py — language models by revision, and raw forward hooks on one layer's residual stream.

- MODELS: keys (pythia-70m … pythia-12b, olmo-1b, bloom-1b1, toy) with their Hugging Face repo,
  default revision triplet, layer, LM-text source, task and run preset (defaults.py). Any other repo
  id or local folder works too (with the paper's preset).
- revisions(model): available revisions sorted by training step, with step and tokens seen.
- load(model, revision, device, dtype): the model (eval mode, no grad) and its tokenizer.
- Hooks on block L's output (== hidden_states[L+1]): read it, replace it by a function of itself,
  or stop the forward right after it, so caching never pays for the layers above; or start the
  forward from a given block-L output, so IG steps and ablations never pay for the layers below.

    python -m crosscoding.lm pythia-1b          # list the revisions of a model
"""
import contextlib
import dataclasses
import difflib
import inspect
import os
import re
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from crosscoding import defaults
from crosscoding.common import ArgumentParser, EnvError, UsageError, is_done, run_main

HERE = Path(__file__).resolve().parent.parent   # the repository root
TOY_DIR = HERE / "models" / "toy"


@dataclass(frozen=True)
class ModelSpec:
    key: str
    repo: str                      # Hugging Face repo id, or a local folder whose sub-folders are revisions
    revisions: tuple = ()          # default revisions (the paper's triplet)
    layer: int | None = None       # default layer; None = the user must say
    tokenizer_repo: str | None = None
    tokens_per_step: int | None = None
    text: str = "monology/pile-uncopyrighted"   # LM text for caching / evaluation
    task: str = "subjectverb"      # the model's own task
    preset: defaults.Preset = defaults.PAPER
    build: str | None = None       # for a local model made by this toolkit: the command that makes it
    arch: tuple = ()               # (config class, its keywords) for --weights random: the real shapes
    tokenizer_size: int | None = None   # the real tokenizer's vocabulary, for --weights random's stand-in

    @property
    def local(self) -> bool:
        return self.build is not None or os.path.isdir(self.repo)


def _pythia(size, layer, n_layers, d, heads, vocab=50304):
    # Pythia: 1024 sequences × 2048 tokens per step; GPT-NeoX blocks with parallel attention and MLP.
    arch = ("GPTNeoXConfig", dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layers,
                                  num_attention_heads=heads, intermediate_size=4 * d, rotary_pct=0.25,
                                  max_position_embeddings=2048, use_parallel_residual=True,
                                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0))
    return ModelSpec(f"pythia-{size}", f"EleutherAI/pythia-{size}", ("step512", "step2000", "step143000"), layer,
                     tokens_per_step=2_097_152, arch=arch, tokenizer_size=50277)


MODELS = {
    m.key: m for m in [
        _pythia("70m", 3, 6, 512, 8), _pythia("160m", 6, 12, 768, 12), _pythia("410m", 12, 24, 1024, 16),
        _pythia("1b", 8, 16, 2048, 8), _pythia("1.4b", 12, 24, 2048, 16), _pythia("2.8b", 16, 32, 2560, 32),
        _pythia("6.9b", 16, 32, 4096, 32), _pythia("12b", 18, 36, 5120, 40, vocab=50688),
        ModelSpec("olmo-1b", "allenai/OLMo-1B-0724-hf",
                  ("step2000-tokens4B", "step16000-tokens33B", "step1454000-tokens3048B"), 8,
                  tokens_per_step=4_194_304, text="devingulliver/dolma-v1_6-sample",   # a Dolma sample (parquet)
                  arch=("OlmoConfig", dict(vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                                           num_hidden_layers=16, num_attention_heads=16, max_position_embeddings=4096,
                                           clip_qkv=8.0, tie_word_embeddings=True, pad_token_id=1,
                                           bos_token_id=None, eos_token_id=50279)),
                  tokenizer_size=50280),
        ModelSpec("bloom-1b1", "bigscience/bloom-1b1-intermediate",
                  ("global_step10000", "global_step100000", "main"), 12,
                  tokenizer_repo="bigscience/bloom-1b1", tokens_per_step=1_048_576, text="allenai/c4:en",
                  arch=("BloomConfig", dict(vocab_size=250880, hidden_size=1536, n_layer=24, n_head=16,
                                            bos_token_id=1, eos_token_id=2, pad_token_id=3)),
                  tokenizer_size=250680),
        # The embedded default, trained locally by toy.py (no network). Triplet: before agreement,
        # the nearest-noun phase (simple agreement right, attractors fool it), the last.
        ModelSpec("toy", str(TOY_DIR), ("step64", "step128", "step512"), 0, tokens_per_step=64 * 32,
                  text="toy", task="toy_sva", preset=defaults.TOY, build="python toy.py"),
    ]
}


def resolve(model: str) -> ModelSpec:
    """A model key, a local folder, or a Hugging Face repo id → its spec."""
    if model in MODELS:
        return MODELS[model]
    if m := re.fullmatch(r"toy-seed(\d+)", model):
        return toy_with_seed(int(m.group(1)))
    if os.path.isdir(model):
        return ModelSpec(model, str(Path(model).resolve()), task="subjectverb")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not os.path.exists(model):
        return ModelSpec(model, model)
    raise UsageError(f"unknown model {model!r}; valid keys: {', '.join(MODELS)}, "
                     "or a Hugging Face repo id (org/name), or a local folder")


def toy_with_seed(seed: int) -> ModelSpec:
    """`--model toy-seedN`: the toy LM pretrained with seed N (models/toy-seedN, built by toy.py), with the
    toy's preset, text and task — the same world, another LM, for findings over LM seeds."""
    toy = MODELS["toy"]
    folder = TOY_DIR.parent / f"toy-seed{seed}"
    return dataclasses.replace(toy, key=f"toy-seed{seed}", repo=str(folder),
                               build=f"python toy.py --out {folder.relative_to(HERE)} --seed {seed}")


def check_built(spec: ModelSpec):
    """A model this toolkit builds locally (the toy) must have been built: say how, do not build it here."""
    if spec.build and not is_done(spec.repo):
        raise UsageError(f"model {spec.key} is not built yet ({spec.repo}): run `{spec.build}` first "
                         "(about 20 s on 2 CPU cores, offline)")


# ---------------------------------------------------------------------------------------------
# Revisions

@dataclass(frozen=True)
class Revision:
    name: str
    step: int | None
    tokens: int | None


def parse_revision(name: str, tokens_per_step: int | None = None) -> Revision:
    """'step2000-tokens4B' → step 2000, 4e9 tokens; 'global_step10000'; 'step512'; 'main' → no step."""
    m = re.search(r"step(\d+)", name)
    step = int(m.group(1)) if m else None
    t = re.search(r"tokens(\d+(?:\.\d+)?)([KMBT]?)", name)
    if t:
        tokens = int(float(t.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[t.group(2)])
    else:
        tokens = step * tokens_per_step if (step is not None and tokens_per_step) else None
    return Revision(name, step, tokens)


def _sort_key(r: Revision):
    # Revisions without a step ('main') are the final model: they sort last.
    return (r.step is None, r.step or 0, r.name)


def revisions(model: str | ModelSpec, quiet=False) -> list[Revision]:
    """The model's available revisions, sorted by training step."""
    spec = resolve(model) if isinstance(model, str) else model
    check_built(spec)
    if spec.local:
        root = Path(spec.repo)
        names = [p.name for p in root.iterdir() if (p / "config.json").exists()]
        if not names and (root / "config.json").exists():
            names = ["."]  # a plain model folder: one revision, itself
    else:
        names = _hub_revisions(spec.repo, quiet)
    return sorted((parse_revision(n, spec.tokens_per_step) for n in names), key=_sort_key)


def _hub_revisions(repo: str, quiet: bool) -> list[str]:
    from huggingface_hub import list_repo_refs
    try:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise ConnectionError("HF_HUB_OFFLINE is set")
        return [b.name for b in list_repo_refs(repo).branches]
    except Exception as e:  # no network, offline mode, or a hub error: fall back to the local cache
        names = _cached_revisions(repo)
        if not names:
            raise EnvError(f"cannot list the revisions of {repo}: the hub is unreachable ({type(e).__name__}) "
                           "and nothing of it is in the local Hugging Face cache; local folders work offline") from None
        if not quiet:
            print(f"note: hub unreachable for {repo}; using the {len(names)} revisions in the local cache",
                  file=sys.stderr)
        return names


def _cached_revisions(repo: str) -> list[str]:
    """Revision names present in the local HF cache (refs/<name> files hold their commit hashes)."""
    from huggingface_hub.constants import HF_HUB_CACHE
    refs = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs"
    if not refs.is_dir():
        return []
    return sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file())


def check_revision(spec: ModelSpec, revision: str, available: list[Revision] | None = None):
    """Raise a UsageError listing the nearest available names when `revision` does not exist."""
    available = available if available is not None else revisions(spec, quiet=True)
    names = [r.name for r in available]
    if revision not in names:
        raise UsageError(f"unknown revision {revision!r} of {spec.key}; nearest available: "
                         f"{', '.join(nearest(revision, names))}")


def nearest(revision: str, names: list[str], n=5) -> list[str]:
    """The n names nearest to `revision`: by training step when it names one (step182 → step192, step160
    before step512), else by spelling."""
    step = parse_revision(revision).step
    stepped = [(abs(r.step - step), r.step, r.name) for r in map(parse_revision, names)
               if step is not None and r.step is not None]
    if stepped:
        return [name for *_, name in sorted(stepped)[:n]]
    return difflib.get_close_matches(revision, names, n=n, cutoff=0.3) or names[:n]


# ---------------------------------------------------------------------------------------------
# Loading

def load(model: str | ModelSpec, revision: str | None = None, device="cpu", dtype=None, weights="hub"):
    """Load one revision with its tokenizer: (model in eval mode with grads off, tokenizer).
    weights="random": the model's architecture with random weights (see random_model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # our own bars say what is loading; errors stay one line
    spec = resolve(model) if isinstance(model, str) else model
    if weights == "random":
        # a local model (the toy) keeps its own tokenizer; a hub model gets a stand-in of its vocabulary (offline)
        tok = AutoTokenizer.from_pretrained(_local_config_dir(spec)) if spec.local else standin_tokenizer(spec)
        lm = random_model(spec, revision or "main", device)
        return lm.to(dtype=dtype or torch.float32).eval().requires_grad_(False), tok
    check_built(spec)
    if spec.local:
        path = Path(spec.repo) / (revision or ".")
        if not (path / "config.json").exists():
            check_revision(spec, revision or ".")
        kw, tok_src, tok_kw = {}, str(path), {}
        src = str(path)
    else:
        src, kw = spec.repo, {"revision": revision or "main"}
        tok_src = spec.tokenizer_repo or spec.repo
        tok_kw = {} if spec.tokenizer_repo else kw
    try:
        lm = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(tok_src, **tok_kw)
    except Exception as e:
        _explain_load_error(spec, revision, e)
    lm.to(device).eval().requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return lm, tok


# ---------------------------------------------------------------------------------------------
# --weights random: the paper's shapes offline

def default_text(spec: ModelSpec, weights="hub") -> str:
    """The LM text of a model; with random weights the toy grammar's (offline, in the stand-in's vocabulary)."""
    return "toy" if weights == "random" else spec.text


def default_task(spec: ModelSpec, weights="hub") -> str:
    return "toy_sva" if weights == "random" else spec.task


def _local_config_dir(spec: ModelSpec) -> Path:
    """A local model's first revision folder: its architecture and tokenizer, which every revision shares."""
    check_built(spec)
    return Path(spec.repo) / spec.revisions[0]


def _need_arch(spec):
    if not spec.arch and not spec.local:
        with_arch = ", ".join(k for k, m in MODELS.items() if m.arch)
        raise UsageError(f"--weights random needs a model whose architecture is known: {with_arch}; "
                         f"{spec.key!r} is not one of them")


def architecture(spec: ModelSpec):
    """spec's architecture (its real numbers: layers, d, heads, vocabulary) as an untrained model; under
    `with torch.device("meta")` it takes no memory (what --plan counts)."""
    import transformers
    from transformers import AutoModelForCausalLM
    _need_arch(spec)
    if spec.local and not spec.arch:     # a local model's own config (the toy's), read from its folder
        return AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(_local_config_dir(spec)))
    cls, kw = spec.arch
    return AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw))


def random_model(spec: ModelSpec, revision: str, device="cpu"):
    """A model of spec's architecture with random weights, seeded by the revision's name, so each revision
    is another random model and each load the same one. Built and initialised on `device` (a GPU draws
    pythia-1b's weights at once, where the CPU takes 15-20 s), by that device's generator: the weights are
    a function of the revision's name and of where they were drawn (drawn_on: a CPU's differ from a GPU's,
    and one GPU model's may differ from another's)."""
    import zlib
    with torch.random.fork_rng():
        torch.manual_seed(zlib.crc32(f"{spec.key}@{revision}".encode()))
        with torch.device(device):
            return architecture(spec)


def drawn_on(weights: str, device) -> str | None:
    """Where --weights random draws a revision's weights on `device` (random_model): "cpu", or the GPU's name;
    None for trained weights. A run records it, and the analysis stages draw the same weights only there."""
    if weights != "random":
        return None
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def keep_through(lm: nn.Module, layer: int) -> nn.Module:
    """Drop the blocks after `layer`: what reads block `layer`'s output (run_to_layer, a training run's live
    buffer) never runs them, and a 32-revision run holds 32 LMs."""
    check_layer(lm, layer)
    del blocks(lm)[layer + 1:]
    lm.config.num_hidden_layers = layer + 1     # how blocks() finds them, and what the forward iterates
    return lm


def params_through(lm: nn.Module, layer: int) -> int:
    """Parameters of the LM as keep_through(lm, layer) leaves it (shared tensors counted once)."""
    later = {id(p) for b in blocks(lm)[layer + 1:] for p in b.parameters()}
    return sum(p.numel() for p in lm.parameters() if id(p) not in later)


_STANDINS: dict = {}


def standin_tokenizer(spec: ModelSpec):
    """A word-level tokenizer with the real tokenizer's vocabulary size and special-token ids (BOS, EOS,
    pad), whose words are the toy grammar's (so the toy text and pairs encode one token per word), and
    which, like GPT-NeoX's, adds no BOS on a plain call."""
    if spec.key in _STANDINS:
        return _STANDINS[spec.key]
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    from crosscoding import grammar
    _need_arch(spec)
    kw = spec.arch[1]
    V = spec.tokenizer_size or kw["vocab_size"]
    special = {}
    for role, name in (("eos", "<|endoftext|>"), ("bos", "<s>"), ("pad", "<pad>")):
        i = kw.get(f"{role}_token_id")
        if i is not None:
            special.setdefault(i, name)
    special.setdefault(next(i for i in range(V) if i not in special), "<unk>")
    words = iter(w for w in grammar.vocabulary() if not w.startswith("<"))
    vocab = {}
    for i in range(V):
        vocab[special.get(i) or next(words, None) or f"<extra_{i}>"] = i
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = Whitespace()
    ids = {role: kw.get(f"{role}_token_id") for role in ("bos", "eos", "pad")}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", name_or_path=f"standin-{spec.key}",
        **{f"{role}_token": special[i] for role, i in ids.items() if i is not None})
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    _STANDINS[spec.key] = tok
    return tok


def _explain_load_error(spec, revision, e):
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    if isinstance(e, RevisionNotFoundError):
        check_revision(spec, revision)
    if isinstance(e, RepositoryNotFoundError):
        raise UsageError(f"no model repo {spec.repo!r} on the Hugging Face hub") from None
    if isinstance(e, GatedRepoError):
        raise EnvError(f"{spec.repo} is gated: log in with `huggingface-cli login`") from None
    if isinstance(e, (LocalEntryNotFoundError, ConnectionError)) or "offline" in str(e).lower() \
            or "connect" in str(e).lower():
        cached = _cached_revisions(spec.repo)
        near = nearest(revision or "main", cached)
        raise EnvError(f"cannot download {spec.repo}@{revision}: no network and it is not in the local "
                       f"Hugging Face cache (cached: {', '.join(near) or 'none'}); "
                       "local folders work offline (--model path/to/folder)") from None
    if isinstance(e, (ValueError, KeyError)) and "model type" in str(e):
        raise UsageError(f"unsupported architecture in {spec.repo}: {e}") from None
    raise e


# ---------------------------------------------------------------------------------------------
# The residual stream: finding blocks, running, reading and patching block L's output

def blocks(lm: nn.Module) -> nn.ModuleList:
    """The decoder blocks of any HF causal LM: the ModuleList holding num_hidden_layers modules.

    One rule for GPT-NeoX (gpt_neox.layers), Llama/OLMo (model.layers), BLOOM and GPT-2
    (transformer.h): no per-architecture table."""
    n = getattr(lm.config, "num_hidden_layers", None)
    for _, mod in lm.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and len({type(b) for b in mod}) == 1:
            return mod
    raise UsageError(f"unsupported architecture {type(lm).__name__}: no list of {n} decoder blocks found")


def n_layers(lm) -> int:
    return len(blocks(lm))


def check_layer(lm, layer: int, name="model"):
    n = n_layers(lm)
    if not 0 <= layer < n:
        raise UsageError(f"layer {layer} is out of range for {name}: valid layers are 0..{n - 1}")


def final_norm(lm: nn.Module) -> nn.Module:
    """The norm between the last block and the unembedding: the base model's child norm registered
    after the blocks (GPT-NeoX final_layer_norm, Llama/OLMo norm, BLOOM/GPT-2 ln_f)."""
    base, stack = lm.base_model, blocks(lm)
    seen_blocks = False
    found = None
    for _, child in base.named_children():
        if child is stack:
            seen_blocks = True
        elif seen_blocks and "norm" in type(child).__name__.lower():
            found = child
    if found is None:
        raise UsageError(f"unsupported architecture {type(lm).__name__}: no final norm after the blocks")
    return found


def _out(output):
    # transformers ≥ 5 decoder layers return a Tensor; older ones (and some models) a tuple.
    return output[0] if isinstance(output, tuple) else output


def _with(output, new):
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new


class _Stop(Exception):
    pass


def forward(lm, ids_BT, mask_BT=None, last_only=False, **kw):
    """A forward on (possibly left-padded) ids: position ids follow the mask, so padding on the left
    does not shift positions in rotary/learned-position models (ALiBi models take the mask).
    last_only: compute the unembedding at the last position only, where the model supports it."""
    params = inspect.signature(lm.forward).parameters
    if mask_BT is not None and "position_ids" in params:
        kw["position_ids"] = (mask_BT.long().cumsum(-1) - 1).clamp(min=0)
    head = lm.get_output_embeddings() if last_only and "logits_to_keep" in params else None
    if head is None:
        return lm(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False, **kw)
    # logits_to_keep hands the unembedding a strided [B, 1, d] slice, which a CPU matmul runs ~13× slower
    # than a contiguous one (pythia-70m's 50k vocabulary: 1.37 s vs 0.11 s for 256 rows)
    h = head.register_forward_pre_hook(lambda mod, args: (args[0].contiguous(),) + tuple(args[1:]))
    try:
        return lm(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False, logits_to_keep=1, **kw)
    finally:
        h.remove()


def _block_output(lm, layer: int, ids_BT, mask_BT=None):
    """Block `layer`'s raw output (a Tensor, or a tuple for some blocks), stopping the forward there."""
    box = {}

    def hook(mod, inp, output):
        box["out"] = output
        raise _Stop

    h = blocks(lm)[layer].register_forward_hook(hook)
    try:
        forward(lm, ids_BT, mask_BT)
    except _Stop:
        pass
    finally:
        h.remove()
    return box["out"]


def run_to_layer(lm, layer: int, ids_BT, mask_BT=None) -> torch.Tensor:
    """Block `layer`'s output [B, T, d], stopping the forward right after that block."""
    return _out(_block_output(lm, layer, ids_BT, mask_BT))


@contextlib.contextmanager
def patch_layer(lm, layer: int, fn):
    """Inside the block, block `layer`'s output x is replaced by fn(x) in every forward."""
    h = blocks(lm)[layer].register_forward_hook(lambda mod, inp, output: _with(output, fn(_out(output))))
    try:
        yield
    finally:
        h.remove()


_TUPLE_BLOCKS = weakref.WeakKeyDictionary()


def _blocks_return_tuple(lm) -> bool:
    """Whether lm's blocks return (hidden, ...) rather than a Tensor (BLOOM does, even in transformers 5):
    probed once per model on a one-token forward stopped after block 0."""
    if lm not in _TUPLE_BLOCKS:
        one_token = torch.zeros(1, 1, dtype=torch.long, device=next(lm.parameters()).device)
        _TUPLE_BLOCKS[lm] = isinstance(_block_output(lm, 0, one_token), tuple)
    return _TUPLE_BLOCKS[lm]


@contextlib.contextmanager
def start_at_layer(lm, layer: int, x_BTd):
    """Inside the block, a forward skips blocks 0..layer: block `layer`'s output is x_BTd, and only the
    blocks above it run (the ids still give the shapes, mask and positions; hooks on block `layer` still
    fire on x_BTd). Many forwards that share the lower blocks (IG steps, ablation sets) pay for them once."""
    wrap = (lambda h: (h,)) if _blocks_return_tuple(lm) else (lambda h: h)

    def hidden_of(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def skip(*args, **kwargs):
        return wrap(hidden_of(args, kwargs))

    def give(*args, **kwargs):
        hidden = hidden_of(args, kwargs)
        if hidden.shape != x_BTd.shape:
            raise ValueError(f"start_at_layer: block {layer}'s output given as {tuple(x_BTd.shape)}, "
                             f"but the forward's ids make {tuple(hidden.shape)}")
        return wrap(x_BTd.to(hidden.dtype))

    below = blocks(lm)[: layer + 1]
    for b in below:              # an instance attribute shadows the class's forward; nn.Module.__call__ uses it
        b.forward = skip
    below[-1].forward = give
    try:
        yield
    finally:
        for b in below:
            del b.forward


def read_layer(module, layer: int, ids_BT, mask_BT=None):
    """(the forward's output, block `layer`'s output [B,T,d]) from one full forward of `module` (the LM,
    or its base_model: then the output's last_hidden_state has the final norm applied)."""
    box = {}

    def keep(x):
        box["x"] = x
        return x

    with patch_layer(module, layer, keep):
        out = forward(module, ids_BT, mask_BT)
    return out, box["x"]


def next_token_ce(lm, h_BTd, targets_BT, rows=2048) -> torch.Tensor:
    """Σ of next-token cross-entropies of the final hidden states h (final norm applied) against targets,
    through the unembedding `rows` positions at a time: full-vocabulary fp32 logits for a whole batch
    (8 GB for BLOOM's 250k vocabulary) never exist at once."""
    head = lm.get_output_embeddings()
    h_Rd, t_R = h_BTd.reshape(-1, h_BTd.shape[-1]), targets_BT.reshape(-1)
    total = torch.zeros((), device=h_BTd.device)
    for i in range(0, len(t_R), rows):
        logits_RV = head(h_Rd[i:i + rows]).float()
        total += torch.nn.functional.cross_entropy(logits_RV, t_R[i:i + rows], reduction="sum")
    return total


def bos_id(tok) -> int:
    """The token every sequence starts with: the tokenizer's BOS, or its EOS where it has none (as
    lm-eval-harness does for Pythia). Never the tokenizer's defaults: GPT-NeoX, OLMo-hf and BLOOM
    tokenizers add no BOS on a plain call, so every encode here passes add_special_tokens=False."""
    for t in (tok.bos_token_id, tok.eos_token_id):
        if t is not None:
            return t
    raise UsageError(f"tokenizer {tok.name_or_path!r} has neither a BOS nor an EOS token to start sequences with")


def d_model(lm) -> int:
    return lm.config.hidden_size


def main():
    p = ArgumentParser(description="List a model's revisions with step and tokens seen.")
    p.add_argument("model")
    args = p.parse_args()
    spec = resolve(args.model)
    for r in revisions(spec):
        print(f"{r.name:32s} step={r.step}  tokens={r.tokens}")


if __name__ == "__main__":
    run_main(main)
