"""Loading: files in, a `Llama` and a `Tokenizer` out (`llama.py` stays the forward pass only).

    config.py     HF config.json <-> LlamaConfig (both RoPE spellings), CheckpointError
    weights.py    HF directories (safetensors, single or sharded): the name map and the one model builder
    llama2c.py    llama2.c legacy .bin files (q/k permuted from Meta's interleaved RoPE layout)
    tokenizer.py  sentencepiece tokenizers

`load_model(path)` picks the format from the path.
"""

import os
from pathlib import Path

import torch

from homer_ref.llama import Llama
from homer_ref.loading.config import CheckpointError, hf_config_dict, parse_config
from homer_ref.loading.llama2c import load_llama2c
from homer_ref.loading.tokenizer import Tokenizer, check_tokenizer, load_tokenizer
from homer_ref.loading.weights import checkpoint_names, load_hf_dir, num_parameters, save_hf

__all__ = [
    "CheckpointError",
    "Tokenizer",
    "check_tokenizer",
    "checkpoint_names",
    "hf_config_dict",
    "load_model",
    "load_tokenizer",
    "num_parameters",
    "parse_config",
    "save_hf",
]


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu") -> Llama:
    """A `Llama` from an HF model directory or a llama2.c legacy `.bin` file, in `dtype` on `device`."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"load_model needs a path (str or Path), got {type(path).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ('cpu', 'cuda', 'cuda:1', ...)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available here; use device='cpu'")
    path = Path(path)
    if path.is_dir():
        return load_hf_dir(path, dtype, device)
    if path.is_file():
        if path.name == "config.json":
            return load_hf_dir(path.parent, dtype, device)
        if path.suffix == ".safetensors":
            return load_hf_dir(path.parent, dtype, device)
        return load_llama2c(path, dtype, device)
    raise CheckpointError(f"{path}: no such file or directory; pass an HF model directory or a llama2.c .bin file")
