"""defaults.py — every default of the toolkit in one place: run presets per model family, the method's
constants, and where outputs go.

A preset is the size of a run: how much text, how large a dictionary, how many tokens, which IE
threshold. Every Hugging Face model uses PAPER, the paper's settings (Bayazit, Mueller, Bosselut,
"Crosscoding Through Time", arXiv 2509.05291: §3 and App. B — F = 16384, 4096-token batches, 400M
tokens, Adam lr 5e-5, λ = 2, BatchTopK k = 200, per-token |IE| threshold 0.1, 1024-token sequences).
The embedded toy model uses TOY, tuned here for 2 CPU cores (it meets validation FVU ≤ 0.05,
L0 ≤ 64, dead ≤ 25%: tests/test_toy_findings.py). Each script's --help prints the values in force
for the model it is given (`python train.py --model pythia-1b --help`).

The crosscoder's own schedules (λ warm-up, lr decay, k anneal, θ's EMA, AuxK) are the fields of
crosscoder.CrossCoderConfig, whose defaults are the paper's.
"""
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Preset:
    name: str
    # LM text (tasks.iter_blocks)
    seq_len: int            # tokens per text block; position 0 is BOS (or EOS) and never used
    heldout_tokens: int     # the text's first documents, up to this many tokens, are held out from training
    # cache_acts.py
    cache_tokens: int       # token positions cached per revision
    scan_tokens: int        # token positions whose layer-L similarity the scan compares
    scan_seq_len: int
    # train.py
    data: str               # "cache": train from cache_acts.py's cache (made first, saying so); "live": run the LMs
    dict_size: int          # F
    batch_size: int         # token positions per step (global, over all ranks)
    tokens: int             # training token positions in all (each seen by every revision)
    lr: float
    l1_coeff: float         # λ
    k: int                  # BatchTopK: latents per token at the end of the anneal
    buffer_tokens: int      # live buffer: token positions held on the device
    # evaluate.py, relie.py, ablate.py
    eval_blocks: int        # held-out text blocks for FVU, CE, latent statistics
    ie_threshold: float     # per-token |IE| at or below this is zeroed
    context_blocks: int     # held-out text blocks searched for top-activating contexts


PAPER = Preset(
    name="paper", seq_len=1024, heldout_tokens=1 << 20, cache_tokens=10_000_000, scan_tokens=2048,
    scan_seq_len=128, data="live", dict_size=16384, batch_size=4096, tokens=400_000_000, lr=5e-5,
    l1_coeff=2.0, k=200, buffer_tokens=524_288, eval_blocks=64, ie_threshold=0.1, context_blocks=64)

# The toy: 32-token blocks; a 256K-token cache trained on for 8 epochs; a high lr (the dictionary is
# small); no IE threshold (the toy's logits are small, so 0.1 would zero most of its effects).
# F = 256 (4 × d): on 2M tokens it reaches the FVU of F = 512 with L0 22 instead of 36, and the task
# concentrates in fewer latents (top-10 vs random-10 ablation gap 27 points over 5 seeds instead of 16).
TOY = Preset(
    name="toy", seq_len=32, heldout_tokens=1 << 15, cache_tokens=262_144, scan_tokens=2048, scan_seq_len=32,
    data="cache", dict_size=256, batch_size=1024, tokens=2_048_000, lr=2e-3, l1_coeff=2.0, k=32,
    buffer_tokens=131_072, eval_blocks=512, ie_threshold=0.0, context_blocks=64)

PRESETS = {p.name: p for p in (PAPER, TOY)}
PRESET_FIELDS = [f.name for f in fields(Preset) if f.name != "name"]

# The method's constants (the paper's)
VAL_ROWS = 8192         # held-out token positions for validation during training
IG_STEPS = 10           # integrated-gradient steps (α = 0, 0.1, …, 0.9)
METHOD = "atp"          # relie.py's attribution (analysis.METHODS): the one agreeing best with exact ablation
TOP_K = 10              # latents per revision studied (by IE)
SELECT = "positive"     # ... ranked by positive IE (supporting the right answer); "abs" is the paper's |IE|,
#                         which mixes in latents that push the wrong way, so ablating its top-k cancels out
TEST_FRAC = 0.5         # share of the minimal pairs held out from selection for every ablation (relie.py)
DRAWS = 5               # random-k sets per ablation
ARCH = "l1"             # the paper's crosscoder (train.py --arch)

# Where outputs go (relative to the working directory)
RUNS, CACHE, SCANS = Path("runs"), Path("cache"), Path("scans")


def _short(model_key: str) -> str:
    return Path(model_key).name if Path(model_key).is_dir() else model_key.replace("/", "_")


def run_dir(model_key: str, layer: int, revisions, arch: str) -> Path:
    """runs/<model>-L<layer>-<rev>_<rev>…-<arch>: the folder train.py writes by default."""
    return RUNS / f"{_short(model_key)}-L{layer}-{'_'.join(revisions)}-{arch}"


def cache_dir(model_key: str, layer: int, revisions) -> Path:
    return CACHE / f"{_short(model_key)}-L{layer}-{'_'.join(revisions)}"


def scan_path(model_key: str, layer: int, task: str) -> Path:
    return SCANS / f"{_short(model_key)}-L{layer}-{Path(task).stem}.csv"


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"
