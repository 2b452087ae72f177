"""convert.py — crosscoders in and out: another tool's crosscoder imported as a run folder that every stage
takes, or a run exported to another tool's format.

    python convert.py --from dictionary_learning cc.pt --model toy --layer 0 --revisions step64,step128,step512 \
        --out runs/imported
    python convert.py --to dictionary_learning --run runs/toy-L0-step64_step128_step512-l1 --out cc.pt

More: `--from ctt-paper N.pt` (the paper's repository: N.pt beside N_cfg.json, or a folder of cfg.json +
cc_weights.pt); `--to ctt-paper`; `--to saelens` (one SAE per revision, which is NOT the crosscoder: its
encoder sees one revision where the crosscoder's code sums all of them; `--acts CACHE` measures both);
`--to jumprelu --run RUN --out runs/NEW` (a BatchTopK run as a JumpReLU run folder with the same codes,
θ_i = θ / Σ_m ‖W_dec[i,m]‖; every stage takes it);
`--from hf:ORG/REPO[:PATH]` (downloaded with huggingface_hub, cached, works offline from the cache; the format
is then read from the files, or named: `--from ctt-paper hf:ORG/REPO:PATH`); `--push ORG/REPO --run runs/NAME`.

Units. This toolkit trains on s_m·x_m and saves the crosscoder with the scales folded in (it acts on raw
activations; crosscoder.py). The peers keep the weights in the normalised space and the scale beside them:
dictionary_learning in its activation normaliser (x' = (x − mean_m)·activation_global_scale_m), the paper's
repository in its cfg's estimated_act_norm_list. Export writes the unfolded weights and the scales there,
import folds the source's scales (and mean) in: codes, BatchTopK's selection and θ stay the same numbers.
"""
import hashlib
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from crosscoding import analysis, cli, common, defaults, lm
from crosscoding.activations import open_cache
from crosscoding.common import EnvError, UsageError, atomic_path, write_json
from crosscoding.crosscoder import CONFIG_FILE, WEIGHTS_FILE, CrossCoder, CrossCoderConfig
from crosscoding.variants import VARIANTS, batchtopk_to_jumprelu

# dictionary_learning's CodeNormalization enum (dictionary.py, values from enum.auto()): how a latent's
# decoder weights scale its activation in the sparsity penalty and, for BatchTopK, in the selection.
CODE_NORMS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}
CROSSCODER_NORM = 1   # Σ_m ‖W_dec[i, m]‖: the paper's, and the one our L1 penalty and BatchTopK score use
FLOATS = (torch.float32, torch.float16, torch.bfloat16)   # widened to float32 exactly
SAE_NOTE = ("This SAE is ONE REVISION'S SLICE of a crosscoder and is NOT the crosscoder: its encoder sees only this "
            "revision's activation, while the crosscoder's code is ReLU(sum over all M revisions of x_m W_enc[m] "
            "+ b_enc). Its codes, L0 and FVU differ from the crosscoder's (convert.py --to saelens --acts CACHE "
            "prints both).")


# ---------------------------------------------------------------------------------------------
# What a reader returns and a writer takes

@dataclass
class Imported:
    """A source read into our terms: the crosscoder on raw activations, what the source says of the
    model (model, layer, revisions: None where it does not hold them), the file hashed as its identity."""
    cc: CrossCoder
    weights_file: Path
    model: str | None = None
    layer: int | None = None
    revisions: list | None = None
    data: dict | None = None                     # our own run's data description (its held-out text)
    notes: dict = field(default_factory=dict)


@dataclass
class Format:
    read: Callable[[Path], Imported] | None          # local path → Imported
    write: Callable[[CrossCoder, dict, Path], list] | None   # (crosscoder, run config, out) → files written
    looks_like: Callable[[Path], bool]               # does this local path hold this format?


# ---------------------------------------------------------------------------------------------
# Reading files: plain dicts of tensors only, every key and shape checked before anything is built

def _first_line(e: Exception) -> str:
    """What was wrong, in one line; torch's advice that comes with a refusal (load with weights_only=False,
    allowlist the class) is never passed on: it would run the file's code."""
    text = str(e).strip()
    m = re.search(r"Unsupported global: GLOBAL \S+", text)   # torch's weights_only refusal names the class
    if m:
        return f"{m.group(0)}, an object and not a tensor"
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    line = m.group(1) if m else (text.splitlines() or [""])[0]
    return type(e).__name__ if not line or "weights_only" in line else line[:200]


def load_pt(path: Path) -> dict:
    """A .pt file as a plain dict; torch.load(weights_only=True) only: a pickled module or any other
    object is refused by torch itself, a list or a nested dict by us."""
    try:
        with warnings.catch_warnings():   # a plain pickle's protocol note: the refusal below says all there is
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # corrupt zip, truncated pickle, a pickled class weights_only refuses
        raise UsageError(f"{path} cannot be read as a state dict of tensors ({type(e).__name__}: "
                         f"{_first_line(e)}); save model.state_dict() with torch.save") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    return obj


def load_safetensors(path: Path) -> dict:
    try:
        return load_file(path)
    except Exception as e:
        raise UsageError(f"{path} cannot be read as safetensors ({type(e).__name__}: {_first_line(e)})") from None


def _shape_text(shape, dims):
    return "(" + ", ".join(str(dims.get(s, s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_state(sd: dict, required: dict, optional: dict, where, integer=()) -> dict:
    """Check a state dict against {key: shape in letters or numbers}; returns the letters' sizes (M, d, F),
    taken from the first required key. Raises a one-line UsageError naming the key: missing, unexpected,
    not a tensor, a wrong dtype, a wrong shape (expected vs got), NaN/Inf. `integer` keys hold integers
    and may be plain ints in the file; the rest are floating tensors (plain floats allowed for scalars)."""
    for key in required:
        if key not in sd:
            raise UsageError(f"{where}: key {key!r} is missing (expected keys: {', '.join(required)})")
    unexpected = sorted(set(sd) - set(required) - set(optional), key=str)
    if unexpected:
        raise UsageError(f"{where}: unexpected keys {unexpected} (expected: {', '.join([*required, *optional])})")
    dims = {}
    first = next(iter(required))
    for key, shape in {**required, **optional}.items():
        if key not in sd:
            continue
        t = sd[key]
        if not shape and isinstance(t, (int, float)) and not isinstance(t, bool):
            t = sd[key] = torch.tensor(t)
        if not torch.is_tensor(t):
            raise UsageError(f"{where}: key {key!r} holds a {type(t).__name__}, not a tensor")
        if key in integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise UsageError(f"{where}: {key} has dtype {t.dtype}, expected an integer dtype")
        if key not in integer and t.dtype not in FLOATS:
            raise UsageError(f"{where}: {key} has dtype {t.dtype}, expected one of "
                             f"{', '.join(str(f) for f in FLOATS)}")
        got = tuple(t.shape)
        ok = len(got) == len(shape)
        for s, n in zip(shape, got):
            if isinstance(s, int):
                ok &= s == n
            elif ok:
                ok &= dims.setdefault(s, n) == n
        if not ok:
            base = f" (M={dims.get('M')}, d={dims.get('d')}, F={dims.get('F')} from {first})" if key != first else ""
            raise UsageError(f"{where}: {key} has shape {got}, expected {_shape_text(shape, dims)}{base}")
    for key in sd:
        if key not in integer and not key.startswith("activation_") and not torch.isfinite(sd[key]).all():
            raise UsageError(f"{where}: {key} holds NaN or Inf")
    return dims


def peer_variant(fmt: str, top_k: bool) -> str:
    """The registered variant a peer's crosscoder in format `fmt` is, as it is: the one that format holds (its
    `formats`) with BatchTopK's k and θ when the file has them (top_k), without when not (variants.py)."""
    return next(name for name, cls in VARIANTS.items() if fmt in cls.formats and cls.keeps_top_k == top_k)


def build(fmt, W_enc_MdF, b_enc_F, W_dec_FMd, b_dec_Md, k=None, threshold=None, scales_M=None, mean_Md=None):
    """Our crosscoder on RAW activations from weights that act on normalised ones, x' = s_m·(x_m − mean_m)
    (scales_M, mean_Md None: x' = x), of the variant the format `fmt` holds (peer_variant). k given: BatchTopK's
    selection with θ = threshold. With y = s·x the normalised input
    is y − s·mean, so the mean moves into the biases (b_enc − Σ_m s_m mean_m W_enc[m], b_dec + s·mean) and then
    fold_scales bakes s in, as it does for a run of our own. No arithmetic touches what needs none."""
    M, d, F = W_enc_MdF.shape
    arch = peer_variant(fmt, k is not None)
    try:
        cfg = CrossCoderConfig(n_models=M, d_model=d, dict_size=F, arch=arch, **({} if k is None else {"k": int(k)}))
    except ValueError as e:
        raise UsageError(str(e)) from None
    cc = CrossCoder(cfg, init=False)
    with torch.no_grad():
        cc.W_enc_FMd.copy_(W_enc_MdF.permute(2, 0, 1))
        cc.b_enc_F.copy_(b_enc_F)
        cc.W_dec_FMd.copy_(W_dec_FMd)
        cc.b_dec_Md.copy_(b_dec_Md)
        if k is not None:       # θ is the state of BatchTopK's selection (variants.BatchTopK)
            cc.threshold.fill_(-1.0 if threshold is None else float(threshold))
        if mean_Md is not None and bool((mean_Md != 0).any()):
            sm_Md = mean_Md.float() * (torch.ones(M) if scales_M is None else scales_M.float())[:, None]
            cc.b_enc_F.sub_(torch.einsum("md,mdf->f", sm_Md, W_enc_MdF.float()))
            cc.b_dec_Md.add_(sm_Md)
    cc.tokens_since_active_F.zero_()
    cc.scales_M.fill_(1.0)
    if scales_M is not None and not bool((scales_M == 1).all()):
        if not bool((scales_M > 0).all()) or not bool(torch.isfinite(scales_M).all()):
            raise UsageError(f"the source's activation scales must be positive and finite, got {scales_M.tolist()}")
        cc = cc.fold_scales(scales_M.double())
    return cc.eval().requires_grad_(False)


def normalised(cc: CrossCoder):
    """(the crosscoder on the normalised space it was trained in, its scales as a list): what the peers store."""
    s_M = cc.scales_M
    return (cc if bool((s_M == 1).all()) else cc.unfold_scales()), s_M.tolist()


def _int(t) -> int:
    return int(t.item()) if torch.is_tensor(t) else int(t)


# ---------------------------------------------------------------------------------------------
# dictionary_learning (science-of-finetuning): CrossCoder / BatchTopKCrossCoder state dicts

DL_REQUIRED = {"encoder.weight": ("M", "d", "F"), "encoder.bias": ("F",), "decoder.weight": ("M", "F", "d"),
               "decoder.bias": ("M", "d")}
DL_OPTIONAL = {"code_normalization_id": (), "target_rms": (), "activation_mean": ("M", "d"),
               "activation_std": ("M", "d"), "activation_global_scale": ("M",), "k": (), "threshold": ()}
DL_HUB_WEIGHTS, DL_HUB_CONFIG = "model.safetensors", "config.json"   # PyTorchModelHubMixin's layout


def _dl_weights_file(path: Path) -> Path:
    return path / DL_HUB_WEIGHTS if path.is_dir() else path


def read_dictionary_learning(path: Path) -> Imported:
    file = _dl_weights_file(path)
    if not file.is_file():
        raise UsageError(f"{path}: no dictionary_learning crosscoder here (a .pt state dict, or a folder with "
                         f"{DL_HUB_CONFIG} + {DL_HUB_WEIGHTS})")
    sd = load_safetensors(file) if file.suffix == ".safetensors" else load_pt(file)
    # a state dict saved under torch.compile has its keys prefixed (the peer strips it too)
    sd = {(k.split("_orig_mod.", 1)[1] if "_orig_mod." in k else k): v for k, v in sd.items()}
    batchtopk = "k" in sd or "threshold" in sd
    required = {**DL_REQUIRED, **({"k": (), "threshold": ()} if batchtopk else {})}
    if batchtopk and "threshold" in sd and torch.is_tensor(sd["threshold"]) and sd["threshold"].dim() == 1:
        raise UsageError(f"{file}: threshold has shape {tuple(sd['threshold'].shape)}, expected (): a "
                         "DECOUPLED BatchTopK crosscoder (one θ per layer) has no equivalent here")
    check_state(sd, required, DL_OPTIONAL, file, integer=("k", "code_normalization_id"))
    norm = _int(sd.get("code_normalization_id", CROSSCODER_NORM))   # absent: the peer assumes CROSSCODER too
    if norm not in CODE_NORMS:
        raise UsageError(f"{file}: code_normalization_id {norm} is none of {CODE_NORMS}")
    if batchtopk and norm != CROSSCODER_NORM:
        raise UsageError(f"{file}: a BatchTopK crosscoder with code_normalization {CODE_NORMS[norm]} selects latents "
                         "by another score than this toolkit's Σ_m ‖W_dec[i,m]‖ (CROSSCODER); its codes would change")
    scales = mean = None
    if "activation_mean" in sd and not torch.isnan(sd["activation_mean"]).all():
        # the peer's normaliser (keep_relative_variance, the CrossCoder's only mode): x' = (x − mean)·global_scale
        if not torch.isfinite(sd["activation_mean"]).all() or "activation_global_scale" not in sd:
            raise UsageError(f"{file}: activation_mean is partly NaN or has no activation_global_scale beside it")
        mean, scales = sd["activation_mean"], sd["activation_global_scale"].double()
    cc = build("dictionary_learning", sd["encoder.weight"], sd["encoder.bias"], sd["decoder.weight"].permute(1, 0, 2),
               sd["decoder.bias"], k=sd.get("k"), threshold=sd.get("threshold"), scales_M=scales, mean_Md=mean)
    notes = {"code_normalization": CODE_NORMS[norm]}
    if norm != CROSSCODER_NORM:
        notes["code_normalization_note"] = ("trained with another sparsity penalty than this toolkit's; encode and "
                                            "decode are unaffected")
    return Imported(cc, file, notes=notes)


def dl_state(cc: CrossCoder) -> dict:
    """The peer's CrossCoder / BatchTopKCrossCoder state dict, weights in the normalised space and the
    scales in its activation normaliser (mean 0, activation_global_scale = s_m); none when s = 1."""
    n, scales = normalised(cc)
    M, d = cc.cfg.n_models, cc.cfg.d_model
    s_M = torch.tensor(scales, dtype=torch.float32)
    unit = bool((s_M == 1).all())
    sd = {
        "target_rms": torch.tensor(1.0),
        # NaN is the peer's "no normaliser"; its std is only read to compute global_scale at construction,
        # so it is written as the one consistent with s_m (Σ_j std_j² = 1/s_m²), not a measured std
        "activation_mean": torch.full((M, d), float("nan")) if unit else torch.zeros(M, d),
        "activation_std": torch.full((M, d), float("nan")) if unit else (1 / (s_M * d ** 0.5))[:, None].expand(M, d),
        "activation_global_scale": torch.ones(M) if unit else s_M,
        "encoder.weight": n.W_enc,                                  # [M, d, F]
        "encoder.bias": n.b_enc_F,
        "decoder.weight": n.W_dec_FMd.permute(1, 0, 2),             # [M, F, d]
        "decoder.bias": n.b_dec_Md,
        "code_normalization_id": torch.tensor(CROSSCODER_NORM),
    }
    if cc.variant.keeps_top_k:
        sd["k"] = torch.tensor(cc.cfg.k, dtype=torch.int32)
        sd["threshold"] = n.threshold.detach().clone().float()
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def write_dictionary_learning(cc: CrossCoder, run_cfg: dict, out: Path) -> list:
    sd = dl_state(cc)
    if out.suffix == ".pt":
        with atomic_path(out) as tmp:
            torch.save(sd, tmp)
        return [out]
    # the hub-mixin layout: from_pretrained(folder, from_hub=True) builds cls(**config.json), loads model.safetensors
    config = dict(activation_dim=cc.cfg.d_model, dict_size=cc.cfg.dict_size, num_layers=cc.cfg.n_models,
                  code_normalization=CODE_NORMS[CROSSCODER_NORM])
    if cc.variant.keeps_top_k:
        config["k"] = cc.cfg.k
    with atomic_path(out / DL_HUB_WEIGHTS) as tmp:
        save_file(sd, str(tmp))
    write_json(out / DL_HUB_CONFIG, config)
    return [out / DL_HUB_WEIGHTS, out / DL_HUB_CONFIG]


def _looks_dl(path: Path) -> bool:
    if path.is_dir():
        return (path / DL_HUB_WEIGHTS).is_file() and (path / DL_HUB_CONFIG).is_file()
    return path.suffix == ".pt" and "encoder.weight" in load_pt(path)


# ---------------------------------------------------------------------------------------------
# ctt-paper (bayazitdeniz/crosscoding-through-time): W_enc [M, d, F], W_dec [F, M, d], b_enc, b_dec (+ k, θ)

CTT_REQUIRED = {"W_enc": ("M", "d", "F"), "W_dec": ("F", "M", "d"), "b_enc": ("F",), "b_dec": ("M", "d")}
CTT_BTK = {"k": (), "threshold": ()}
CTT_HUB_WEIGHTS, CTT_HUB_CONFIG = "cc_weights.pt", "cfg.json"       # its load_from_hf layout


def _ctt_files(path: Path):
    """(weights, cfg) of the paper's two layouts: <dir>/N.pt + N_cfg.json (its save()), cfg.json + cc_weights.pt."""
    if path.is_dir():
        return path / CTT_HUB_WEIGHTS, path / CTT_HUB_CONFIG
    if path.name == CTT_HUB_WEIGHTS:
        return path, path.with_name(CTT_HUB_CONFIG)
    return path, path.with_name(f"{path.stem}_cfg.json")


def _revision_sep(model_name: str) -> str:
    return "_" if "olmo" in model_name.lower() else "-"    # OLMo's revision names hold '-' themselves


def read_ctt(path: Path) -> Imported:
    file, cfg_file = _ctt_files(path)
    if not file.is_file():
        raise UsageError(f"{path}: no ctt-paper crosscoder here (N.pt + N_cfg.json, or a folder with "
                         f"{CTT_HUB_CONFIG} + {CTT_HUB_WEIGHTS})")
    sd = load_pt(file)
    batchtopk = "k" in sd or "threshold" in sd
    check_state(sd, {**CTT_REQUIRED, **(CTT_BTK if batchtopk else {})}, {}, file, integer=("k",))
    # the cfg holds the activation scales; without it the scales are unknown, and guessing 1 would be silent
    cfg = common.read_json(cfg_file, "ctt-paper crosscoder config (it holds the activation scales)")
    M = sd["W_enc"].shape[0]
    scales = cfg.get("estimated_act_norm_list")
    if scales is not None and (not isinstance(scales, list) or len(scales) != M):
        raise UsageError(f"{cfg_file}: estimated_act_norm_list must be a list of {M} numbers, got {scales!r}")
    imp = Imported(build("ctt-paper", sd["W_enc"], sd["b_enc"], sd["W_dec"], sd["b_dec"], k=sd.get("k"),
                         threshold=sd.get("threshold"),
                         scales_M=None if scales is None else torch.tensor(scales, dtype=torch.float64)), file)
    if scales is None:
        imp.notes["scales"] = "the cfg holds no estimated_act_norm_list: weights taken to act on raw activations"
    name = cfg.get("model_name")
    if name:
        imp.model = next((key for key, spec in lm.MODELS.items() if name in (key, spec.repo)), name)
    if cfg.get("revision_list"):
        imp.revisions = str(cfg["revision_list"]).split(_revision_sep(name or ""))
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", str(cfg.get("hook_point", "")))
    if m:   # the paper reads the output of block N−1 for blocks.N.hook_resid_pre (its buffer.py): our --layer N−1
        imp.layer = int(m.group(1)) - 1
    return imp


def write_ctt(cc: CrossCoder, run_cfg: dict, out: Path) -> list:
    n, scales = normalised(cc)
    sd = {"W_enc": n.W_enc, "W_dec": n.W_dec_FMd, "b_enc": n.b_enc_F, "b_dec": n.b_dec_Md}
    btk = cc.variant.keeps_top_k
    if btk:
        sd.update(k=torch.tensor(cc.cfg.k, dtype=torch.int32), threshold=n.threshold.float())
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    model = _model_name(run_cfg)
    revs = run_cfg.get("revisions", [])
    # what the paper's CrossCoder(cfg) reads to build itself, plus what its analysis reads of the run
    cfg = dict(d_in=cc.cfg.d_model, dict_size=cc.cfg.dict_size, n_models=cc.cfg.n_models, enc_dtype="fp32",
               seed=cc.cfg.seed, dec_init_norm=cc.cfg.dec_init_norm, device="cpu", l1_coeff=cc.cfg.l1_coeff,
               l1_warmup_pct=cc.cfg.l1_warmup_frac, lr=cc.cfg.lr, batch_size=cc.cfg.batch_size,
               model_name=model, revision_list=_revision_sep(model).join(revs),
               hook_point=f"blocks.{run_cfg.get('layer', 0) + 1}.hook_resid_pre", estimated_act_norm_list=scales,
               batch_topk_init=cc.cfg.k if btk else None, batch_topk_final=cc.cfg.k if btk else None,
               threshold_beta=cc.cfg.threshold_beta, auxk_alpha=cc.cfg.auxk_alpha)
    file, cfg_file = _ctt_files(out) if out.suffix == ".pt" else (out / CTT_HUB_WEIGHTS, out / CTT_HUB_CONFIG)
    with atomic_path(file) as tmp:
        torch.save(sd, tmp)
    write_json(cfg_file, cfg)
    return [file, cfg_file]


def _model_name(run_cfg: dict) -> str:
    """The name a peer's config gets: the Hugging Face repo, or our key for a model built here (the toy),
    whose folder path means nothing on another machine; convert.py --from maps either back to the key."""
    key = run_cfg.get("model", "")
    return key if key in lm.MODELS and lm.MODELS[key].local else run_cfg.get("repo") or key


def _looks_ctt(path: Path) -> bool:
    file, cfg = _ctt_files(path)
    return file.is_file() and cfg.is_file() and "W_enc" in load_pt(file)


# ---------------------------------------------------------------------------------------------
# SAELens: one SAE per revision (export only), cfg.json + sae_weights.safetensors in a folder each

SAELENS_WEIGHTS, SAELENS_CONFIG = "sae_weights.safetensors", "cfg.json"


def sae_slices(cc: CrossCoder) -> list:
    """Per revision m, SAELens' tensors: W_enc [d, F] = W_enc[m], b_enc [F] (shared), W_dec [F, d] = W_dec[:, m],
    b_dec [d] = b_dec[m], on raw activations. BatchTopK becomes JumpReLU: the crosscoder keeps latent i when
    f_i·n_i > θ (n_i = Σ_m ‖W_dec[i,m]‖, normalised space), i.e. when its pre-activation exceeds θ/n_i."""
    out = []
    for m in range(cc.cfg.n_models):
        t = dict(W_enc=cc.W_enc_FMd[:, m].T, b_enc=cc.b_enc_F, W_dec=cc.W_dec_FMd[:, m], b_dec=cc.b_dec_Md[m])
        try:
            theta_F = cc.variant.pre_threshold(cc)     # BatchTopK: θ / n_i; JumpReLU: θ_i; L1: None
        except ValueError as e:
            raise UsageError(f"{e}, which no per-token SAE can express") from None
        if theta_F is not None:
            t["threshold"] = theta_F
        out.append({k: v.detach().float().contiguous().clone() for k, v in t.items()})
    return out


def sae_encode(t: dict, x_Bd):
    pre_BF = x_Bd @ t["W_enc"] + t["b_enc"]
    f_BF = torch.relu(pre_BF)
    return f_BF * (pre_BF > t["threshold"]) if "threshold" in t else f_BF


def slice_vs_crosscoder(cc: CrossCoder, x_BMd) -> list:
    """Per revision: FVU and L0 of the crosscoder, and of that revision's SAE slice used on its own input.
    FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the rows, as evaluate.py computes it."""
    with torch.no_grad():
        x_hat_BMd, f_BF = cc(x_BMd)
        rows = []
        for m, t in enumerate(sae_slices(cc)):
            x_Bd = x_BMd[:, m]
            g_BF = sae_encode(t, x_Bd)
            var = (x_Bd - x_Bd.mean(0)).pow(2).sum()
            rows.append(dict(fvu_crosscoder=((x_hat_BMd[:, m] - x_Bd).pow(2).sum() / var).item(),
                             fvu_sae=((g_BF @ t["W_dec"] + t["b_dec"] - x_Bd).pow(2).sum() / var).item(),
                             l0_crosscoder=(f_BF > 0).sum(1).float().mean().item(),
                             l0_sae=(g_BF > 0).sum(1).float().mean().item()))
    return rows


def write_saelens(cc: CrossCoder, run_cfg: dict, out: Path, measured=None) -> list:
    revs, layer = run_cfg["revisions"], run_cfg.get("layer", 0)
    files = []
    for m, (rev, t) in enumerate(zip(revs, sae_slices(cc))):
        meta = dict(sae_lens_version="6.0.0",   # the cfg layout of SAELens 6 (no pre-6.0 key renaming on load)
                    model_name=_model_name(run_cfg), hook_name=f"blocks.{layer}.hook_resid_post",
                    hook_head_index=None, prepend_bos=True, context_size=run_cfg.get("data", {}).get("seq_len"),
                    model_from_pretrained_kwargs={"revision": rev},
                    not_the_crosscoder=SAE_NOTE,
                    crosscoder=dict(revision=rev, index=m, revisions=revs, layer=layer, arch=cc.cfg.arch,
                                    scales_folded=cc.scales_M.tolist()))
        if measured:
            meta["measured"] = measured[m]
        cfg = dict(architecture="jumprelu" if "threshold" in t else "standard", d_in=cc.cfg.d_model,
                   d_sae=cc.cfg.dict_size, dtype="float32", device="cpu",
                   apply_b_dec_to_input=False,       # the crosscoder never subtracts b_dec from its input
                   normalize_activations="none",     # the scales are folded in: raw activations
                   reshape_activations="none", metadata=meta)
        folder = out / rev
        with atomic_path(folder / SAELENS_WEIGHTS) as tmp:
            save_file(t, str(tmp))
        write_json(folder / SAELENS_CONFIG, cfg)
        files += [folder / SAELENS_WEIGHTS, folder / SAELENS_CONFIG]
    return files


# ---------------------------------------------------------------------------------------------
# our own run folder (read only: `--from hf:ORG/REPO` of a run another `--push` uploaded)

def write_jumprelu(cc: CrossCoder, run_cfg: dict, out: Path) -> list:
    """--to jumprelu: a BatchTopK (or Matryoshka) run as a JumpReLU run folder with the same codes
    (variants.batchtopk_to_jumprelu: θ_i = θ / Σ_m ‖W_dec[i,m]‖, normalised space). Every stage takes it;
    config.json keeps the run's entries and says, under "converted", what it was made from."""
    try:
        new = batchtopk_to_jumprelu(cc)
    except ValueError as e:
        raise UsageError(str(e)) from None
    names = set(CrossCoderConfig.names())
    extra = {k: v for k, v in run_cfg.items() if k not in names and k != "converted"}
    extra["converted"] = dict(to="jumprelu", from_arch=cc.cfg.arch, threshold=float(cc.threshold),
                              rule="theta_i = theta / sum_m ||W_dec[i,m]|| (normalised space)")
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)      # export_run refused it unless --overwrite
    with common.folder_lock(out):
        new.save(out, extra=extra)
        common.mark_done(out, converted="jumprelu")     # last: a killed conversion is no run
    return [out / CONFIG_FILE, out / WEIGHTS_FILE]


def read_run(path: Path) -> Imported:
    try:
        cc = CrossCoder.load(path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except Exception as e:
        raise UsageError(f"{path}/{WEIGHTS_FILE} cannot be read ({type(e).__name__}: {_first_line(e)})") from None
    x = cc.extra
    return Imported(cc, path / WEIGHTS_FILE, x.get("model"), x.get("layer"), x.get("revisions"), x.get("data"))


def _looks_run(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS_FILE).is_file() and (path / "config.json").is_file()


FORMATS = {
    "dictionary_learning": Format(read_dictionary_learning, write_dictionary_learning, _looks_dl),
    "ctt-paper": Format(read_ctt, write_ctt, _looks_ctt),
    "saelens": Format(None, write_saelens, lambda path: False),
    "jumprelu": Format(None, write_jumprelu, lambda path: False),     # a run folder: BatchTopK -> JumpReLU
    "run": Format(read_run, None, _looks_run),
}


def detect(path: Path) -> str:
    for name, fmt in FORMATS.items():
        if fmt.read and fmt.looks_like(path):
            return name
    readable = [n for n, f in FORMATS.items() if f.read]
    raise UsageError(f"cannot tell the format of {path}; name it: --from FORMAT PATH with FORMAT one of "
                     f"{', '.join(readable)}")


# ---------------------------------------------------------------------------------------------
# The hub

HF_REPO = re.compile(r"[\w.-]+/[\w.-]+")


def fetch_hf(source: str) -> Path:
    """hf:ORG/REPO[:PATH] → a local path in the Hugging Face cache (downloaded once; offline from the cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    repo, _, sub = source[len("hf:"):].partition(":")
    if not HF_REPO.fullmatch(repo):
        raise UsageError(f"{source!r}: expected hf:ORG/REPO or hf:ORG/REPO:PATH")
    sub = sub.strip("/")
    # PATH and what sits beside it: a file's config (N_cfg.json, cfg.json, config.json) or a folder's files
    parent = str(Path(sub).parent) if sub else ""
    near = [f"{parent}/{n}" if parent not in ("", ".") else n for n in ("cfg.json", "config.json", "*_cfg.json")]
    patterns = [sub, f"{sub}/*", *near] if sub else None
    offline = (f"cannot download {source}: no network and it is not in the local Hugging Face cache "
               "(HF_HUB_CACHE); a local path works offline")
    try:
        root = Path(snapshot_download(repo, allow_patterns=patterns))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:   # before EntryNotFoundError: its subclass
        raise EnvError(f"{offline} ({type(e).__name__})") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise UsageError(f"{source}: no such model repo on the Hugging Face hub, or it is private/gated "
                         f"({type(e).__name__})") from None
    except (RevisionNotFoundError, EntryNotFoundError, HFValidationError) as e:
        raise UsageError(f"{source}: {type(e).__name__}: {_first_line(e)}") from None
    except OSError as e:   # connection errors, HTTP errors of the hub
        raise EnvError(f"{offline} ({type(e).__name__})") from None
    local = root / sub if sub else root
    if not local.exists():
        raise UsageError(f"{source}: {repo} holds no {sub!r}")
    return local


def push(run: Path, repo: str):
    """Upload a finished run folder (not its lock, temporaries or checkpoints) to a model repo."""
    from huggingface_hub import HfApi
    if not HF_REPO.fullmatch(repo):
        raise UsageError(f"--push {repo!r}: expected ORG/REPO")
    common.require_done(run, "run", "finish it first (train.py --resume, or convert.py --from)")
    if not (run / WEIGHTS_FILE).is_file():
        raise UsageError(f"{run} holds no {WEIGHTS_FILE}: not a run folder")
    api = HfApi()
    try:
        url = api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(run), repo_type="model",
                          commit_message=f"crosscoder run {run.name} (convert.py --push)",
                          ignore_patterns=[".lock*", ".*.tmp", "*.tmp", "ckpt/*", ".*.old*"])
    except Exception as e:   # HTTP errors, no network, not logged in: the environment, not the input
        raise EnvError(f"cannot push {run} to {repo} ({type(e).__name__}: {_first_line(e)}); "
                       "log in with `hf auth login` and check the network") from None
    print(f"pushed {run} to {url}")


# ---------------------------------------------------------------------------------------------
# Import: a run folder every stage takes

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_shape(spec, revision):
    """(layers, d) of a model without loading its weights, where that is possible offline (local folders
    and the toy, models whose architecture lm.MODELS knows); None otherwise (stages check on loading)."""
    import transformers
    try:
        if spec.local:
            c = transformers.AutoConfig.from_pretrained(str(Path(spec.repo) / revision))
        elif spec.arch:
            c = getattr(transformers, spec.arch[0])(**spec.arch[1])
        else:
            return None
    except (OSError, ValueError):
        return None
    return c.num_hidden_layers, c.hidden_size


def check_target(cc: CrossCoder, spec, layer: int, revisions: list):
    M, d = cc.cfg.n_models, cc.cfg.d_model
    if len(revisions) != M:
        raise UsageError(f"the crosscoder holds M={M} revisions but --revisions lists {len(revisions)}: "
                         f"{','.join(revisions)}")
    if len(set(revisions)) != M:
        raise UsageError(f"--revisions lists a revision twice: {revisions}")
    if spec.local:
        avail = lm.revisions(spec, quiet=True)
        for r in revisions:
            lm.check_revision(spec, r, avail)
    shape = _model_shape(spec, revisions[0])
    if shape:
        n_layers, hidden = shape
        if not 0 <= layer < n_layers:
            raise UsageError(f"layer {layer} is out of range for {spec.key}: valid layers are 0..{n_layers - 1}")
        if hidden != d:
            raise UsageError(f"the crosscoder's d={d} is not {spec.key}'s hidden size {hidden}")


def import_run(fmt: str, source: str, args):
    local = fetch_hf(source) if source.startswith("hf:") else Path(source)
    if not local.exists():
        raise UsageError(f"{source} does not exist")
    fmt = fmt or detect(local)
    reader = FORMATS[fmt].read
    if reader is None:
        raise UsageError(f"--from {fmt}: this format can only be written (--to {fmt})")
    imp = reader(local)
    model = args.model or imp.model
    layer = args.layer if args.layer is not None else imp.layer
    revisions = args.revisions or imp.revisions
    for flag, value in (("--model", model), ("--layer", layer), ("--revisions", revisions)):
        if value is None:
            raise UsageError(f"{source} ({fmt}) does not say which {flag[2:]} it was trained on: give {flag}")
    for flag, mine, theirs in (("--model", model, imp.model), ("--layer", layer, imp.layer),
                               ("--revisions", revisions, imp.revisions)):
        if theirs is not None and mine != theirs:
            print(f"note: {flag} {mine} overrides the source's {theirs}", file=sys.stderr)
    spec = lm.resolve(model)
    check_target(imp.cc, spec, layer, revisions)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise UsageError(f"{out} already holds files; pass --overwrite to replace them, or another --out")
        shutil.rmtree(out)
    imported = dict(format=fmt, source=source, sha256=_sha256(imp.weights_file), file=imp.weights_file.name,
                    **imp.notes)
    extra = dict(model=spec.key, repo=spec.repo, revisions=revisions, layer=layer, scales=imp.cc.scales_M.tolist(),
                 revision_tokens=[lm.parse_revision(r, spec.tokens_per_step).tokens for r in revisions],
                 data=imp.data or dict(cache=None, weights="hub"), imported=imported,
                 activations="raw (scales folded in)")
    with common.folder_lock(out):
        imp.cc.save(out, extra=extra)
        common.mark_done(out, imported=fmt)     # last: a killed import is no run
    cfg = imp.cc.cfg
    print(f"imported {source} ({fmt}: M={cfg.n_models}, d={cfg.d_model}, F={cfg.dict_size}, {cfg.arch}) as run {out}")
    return out


# ---------------------------------------------------------------------------------------------
# Export

def export_run(fmt: str, args):
    writer = FORMATS[fmt].write
    if writer is None:
        raise UsageError(f"--to {fmt}: this format can only be read (--from {fmt})")
    if args.out is None:
        raise UsageError(f"--to {fmt} needs --out ({'a folder' if fmt == 'saelens' else 'a .pt file or a folder'})")
    run = analysis.open_run(args.run)
    peers = [name for name, cls in VARIANTS.items() if fmt in cls.formats]
    if peers and fmt not in run.cc.variant.formats:
        raise UsageError(f"--to {fmt} holds {' and '.join(peers)} crosscoders; {args.run} is {run.cc.cfg.arch} "
                         "(--to saelens writes any variant's per-revision slices)")
    out = Path(args.out)
    if fmt == "saelens" and out.suffix:
        raise UsageError(f"--to saelens writes a folder per revision: --out must be a folder, got {out}")
    if fmt != "saelens" and out.suffix not in ("", ".pt"):
        raise UsageError(f"--out {out}: a .pt file, or a folder for the hub layout")
    if out.exists() and (out.is_file() or any(out.iterdir())) and not args.overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it, or another --out")
    if fmt == "saelens":
        measured = None
        if args.acts:
            measured = measure(run, args.acts)
        files = write_saelens(run.cc, run.config, out, measured)
    else:
        if args.acts:
            raise UsageError("--acts only applies to --to saelens")
        if fmt in run.cc.variant.formats and run.cc.variant.keeps_top_k and run.cc.threshold < 0:
            print(f"note: θ is unset (−1): this crosscoder keeps the top k·B of each batch, {fmt}'s eval mode "
                  "would keep every positive latent", file=sys.stderr)
        files = writer(run.cc, run.config, out)
    print(f"wrote {', '.join(str(f) for f in files)}")


def measure(run, cache_dir) -> list:
    """FVU and L0 of the crosscoder and of each revision's SAE slice on the cache's held-out rows; printed."""
    cache = open_cache(cache_dir)
    if cache.revisions != run.revisions or cache.meta["layer"] != run.layer:
        raise UsageError(f"cache {cache_dir} holds layer {cache.meta['layer']} of {','.join(cache.revisions)}, "
                         f"not layer {run.layer} of {','.join(run.revisions)}")
    x_BMd = cache.val(defaults.VAL_ROWS)
    rows = slice_vs_crosscoder(run.cc, x_BMd)
    print(f"on {len(x_BMd)} held-out rows of {cache_dir}: the per-revision SAE is not the crosscoder")
    print(f"{'revision':>16} {'FVU cc':>8} {'FVU sae':>8} {'L0 cc':>7} {'L0 sae':>7}")
    for r, row in zip(run.revisions, rows):
        print(f"{r:>16} {row['fvu_crosscoder']:8.4f} {row['fvu_sae']:8.4f} {row['l0_crosscoder']:7.1f} "
              f"{row['l0_sae']:7.1f}")
    return [dict(row, rows=len(x_BMd), cache=str(cache_dir)) for row in rows]


def parse_args(argv=None):
    readable = [n for n, f in FORMATS.items() if f.read]
    writable = [n for n, f in FORMATS.items() if f.write]
    p = cli.parser(__doc__.split("\n\n")[0], None)   # no default here depends on the model
    p.add_argument("--from", dest="src", metavar="FORMAT|SOURCE",
                   help=f"import: a format ({', '.join(readable)}) followed by SOURCE, or a SOURCE alone whose "
                        "format is read from its files; SOURCE is a local path or hf:ORG/REPO[:PATH]")
    p.add_argument("source", nargs="?", help="with --from FORMAT: the file or folder to import")
    p.add_argument("--to", choices=writable, help="export the --run to this format")
    p.add_argument("--push", metavar="ORG/REPO", help="upload the --run folder to this Hugging Face model repo")
    cli.add(p, "--run", "--model", "--layer", "--revisions", "--out", "--overwrite", run=str(cli.default_run()),
            model=None, layer=None, revisions=None, out=None)
    p.add_argument("--acts", metavar="CACHE", help="--to saelens: a cache folder (cache_acts.py) of the run's "
                   "revisions and layer; prints FVU and L0 of the crosscoder and of each SAE on its held-out rows")
    args = p.parse_args(argv)
    modes = [m for m in ("src", "to", "push") if getattr(args, m)]
    if len(modes) != 1:
        raise UsageError("give exactly one of --from, --to, --push (see convert.py --help)")
    if args.src:
        if args.src in FORMATS:
            if not args.source:
                raise UsageError(f"--from {args.src} needs the file or folder to import after it")
            args.fmt, args.src = args.src, args.source
        elif args.source:
            raise UsageError(f"unknown format {args.src!r}; valid: {', '.join(readable)}")
        else:
            args.fmt = None
        if args.out is None:
            raise UsageError("--from needs --out, the run folder to write (e.g. runs/NAME)")
    elif args.source:
        raise UsageError(f"unexpected argument {args.source!r} (a source goes with --from)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.src:
        return import_run(args.fmt, args.src, args)
    if args.to:
        return export_run(args.to, args)
    return push(Path(args.run), args.push)


if __name__ == "__main__":
    common.run_main(main)
