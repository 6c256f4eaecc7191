"""Loading: files in, a `Llama` and a `Tokenizer` out (`llama.py` stays the forward pass only).

    config.py     HF config.json <-> LlamaConfig (both RoPE spellings), CheckpointError
    weights.py    HF directories (safetensors, single or sharded): the name map and the one model builder
    llama2c.py    llama2.c legacy .bin files (q/k permuted from Meta's interleaved RoPE layout)
    gguf.py       GGUF files (llama.cpp): metadata -> config, dequantized tensors, the vocabulary's tokenizer
    tokenizer.py  the Tokenizer interface: sentencepiece .model, HF tokenizer.json, chat templates

`load_model(path)` picks the format from the path: a directory, `config.json` or a `.safetensors` file (an HF
directory; a folder without config.json holding one `.gguf` or `.bin` file means that file), a `.gguf` file,
else a llama2.c `.bin`. `load_config(path)` reads only the config (no weights), so that a command checks its
arguments and the tokenizer against the model before loading the weights.
"""

import os
from pathlib import Path

import torch

from homer_ref.llama import Llama, LlamaConfig
from homer_ref.loading.config import CheckpointError, hf_config_dict, parse_config
from homer_ref.loading.llama2c import llama2c_config, load_llama2c
from homer_ref.loading.tokenizer import Tokenizer, check_tokenizer, load_tokenizer
from homer_ref.loading.weights import checkpoint_names, hf_dir_config, load_hf_dir, num_parameters, save_hf

__all__ = [
    "CheckpointError",
    "Tokenizer",
    "check_tokenizer",
    "checkpoint_names",
    "hf_config_dict",
    "load_config",
    "load_model",
    "load_tokenizer",
    "num_parameters",
    "parse_config",
    "save_hf",
]


def _model_format(path, caller: str) -> tuple[str, Path]:
    """("hf" | "gguf" | "llama2c", the path to read) for a model path, or a CheckpointError."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{caller} needs a path (str or Path), got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        single = sorted(path.glob("*.gguf")) + sorted(path.glob("*.bin"))
        if not (path / "config.json").is_file() and len(single) == 1:  # a folder holding one GGUF or llama2.c file
            return _model_format(single[0], caller)
        return "hf", path
    if path.is_file():
        if path.name == "config.json" or path.suffix == ".safetensors":
            return "hf", path.parent
        return ("gguf" if path.suffix == ".gguf" else "llama2c"), path
    raise CheckpointError(
        f"{path}: no such file or directory; pass an HF model directory, a .gguf file or a llama2.c .bin file"
    )


def load_config(path) -> LlamaConfig:
    """The `LlamaConfig` of a model path (any format `load_model` reads), without reading the weights."""
    kind, path = _model_format(path, "load_config")
    if kind == "gguf":
        from homer_ref.loading.gguf import gguf_config

        return gguf_config(path)
    return hf_dir_config(path) if kind == "hf" else llama2c_config(path)


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu") -> Llama:
    """A `Llama` from an HF model directory, a GGUF file or a llama2.c legacy `.bin` file, in `dtype` on `device`."""
    _model_format(path, "load_model")  # the path is checked first
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ('cpu', 'cuda', 'cuda:1', ...)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available here; use device='cpu'")
    kind, path = _model_format(path, "load_model")
    if kind == "gguf":
        from homer_ref.loading.gguf import load_gguf

        return load_gguf(path, dtype, device)
    return load_hf_dir(path, dtype, device) if kind == "hf" else load_llama2c(path, dtype, device)
