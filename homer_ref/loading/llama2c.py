"""llama2.c legacy `.bin` checkpoints (Karpathy's llama2.c export, version 0) -> a `Llama`.

Header: 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a positive
vocab_size means the output head is tied), then float32 arrays in a fixed order. llama2.c stores q/k in Meta's
*interleaved* RoPE layout (pairs (2i, 2i+1)); `weights.interleaved_to_half_split` is the one place where they are
permuted to HF's half-split layout (pairs (i, i + Dh/2)) that `llama.py` uses.
"""

import math
import struct
from pathlib import Path

import numpy as np
import torch

from homer_ref.llama import Llama, LlamaConfig
from homer_ref.loading.config import CheckpointError, parse_config
from homer_ref.loading.weights import LazyTensors, build_model, check_file_fits, interleaved_to_half_split, read_array

_LLAMA2C_HEADER = struct.Struct("<7i")  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len


def _header_config(path: Path, data: bytes) -> tuple[LlamaConfig, int]:
    """(config, seq_len) from the 28-byte header at the start of `data`."""
    if len(data) < _LLAMA2C_HEADER.size:
        raise CheckpointError(f"{path}: {len(data)} bytes is too short for a llama2.c header (28 bytes)")
    if data.startswith((b"PK\x03\x04", b"\x80\x02\x8a\x0a")):  # torch.save's zip archive, or its legacy pickle
        raise CheckpointError(
            f"{path}: a pickled PyTorch checkpoint, which homer_ref never loads; convert it to an HF directory "
            "with save_pretrained(..., safe_serialization=True)"
        )
    if data.startswith(b"GGUF"):
        raise CheckpointError(f"{path}: a GGUF file without the .gguf extension; rename it to end in .gguf")
    dim, hidden, L, Hq, Hkv, vocab, seq_len = _LLAMA2C_HEADER.unpack_from(data)
    if dim == 0x616B3432:  # "ak42": llama2.c version-1/2 export
        raise CheckpointError(f"{path}: llama2.c v1/v2 export; only the legacy format is read (export --version 0)")
    cfg_dict = {
        "vocab_size": abs(vocab),
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_hidden_layers": L,
        "num_attention_heads": Hq,
        "num_key_value_heads": Hkv,
        "max_position_embeddings": seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": vocab > 0,  # a positive vocab_size means the output head is tied
    }
    return parse_config(cfg_dict, f"{path} (header)"), seq_len


def llama2c_config(path: Path) -> LlamaConfig:
    """The `LlamaConfig` of a llama2.c `.bin` from its header alone."""
    with open(path, "rb") as f:
        return _header_config(path, f.read(_LLAMA2C_HEADER.size))[0]


def load_llama2c(path: Path, dtype, device) -> Llama:
    check_file_fits([path])
    with open(path, "rb") as f:
        cfg, seq_len = _header_config(path, f.read(_LLAMA2C_HEADER.size))
    size = path.stat().st_size
    L, Hq, Hkv, tied = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings
    V, D, Dh, F = cfg.vocab_size, cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    # The arrays in file order: (checkpoint name, or its per-layer suffix; shape; stored once per layer?).
    layout = [
        ("model.embed_tokens.weight", [V, D], False),
        ("input_layernorm.weight", [D], True),
        ("self_attn.q_proj.weight", [Hq * Dh, D], True),
        ("self_attn.k_proj.weight", [Hkv * Dh, D], True),
        ("self_attn.v_proj.weight", [Hkv * Dh, D], True),
        ("self_attn.o_proj.weight", [D, Hq * Dh], True),
        ("post_attention_layernorm.weight", [D], True),
        ("mlp.gate_proj.weight", [F, D], True),  # llama2.c w1
        ("mlp.down_proj.weight", [D, F], True),  # w2
        ("mlp.up_proj.weight", [F, D], True),  # w3
        ("model.norm.weight", [D], False),
        ("rope_cos", [seq_len, Dh // 2], False),  # precomputed tables: skipped, RoPE is recomputed
        ("rope_sin", [seq_len, Dh // 2], False),
    ]
    if not tied:
        layout.append(("lm_head.weight", [V, D], False))
    offset, where = _LLAMA2C_HEADER.size, {}  # checkpoint name -> (byte offset, shape)
    for name, shape, per_layer in layout:
        count = math.prod(shape) * (L if per_layer else 1)
        if offset + 4 * count > size:
            raise CheckpointError(
                f"{path}: truncated: the file ends inside tensor '{name}' "
                f"(needs {offset + 4 * count} bytes, has {size}); re-download or re-export it"
            )
        if per_layer:
            for i in range(L):
                where[f"model.layers.{i}.{name}"] = (offset + 4 * i * math.prod(shape), shape)
        elif not name.startswith("rope_"):
            where[name] = (offset, shape)
        offset += 4 * count
    if offset != size:
        raise CheckpointError(f"{path}: {size - offset} unexpected bytes after the last tensor")

    def read(name: str) -> torch.Tensor:  # one tensor, read when `build_model` asks for it
        start, shape = where[name]
        w = read_array(path, start, "<f4", math.prod(shape)).reshape(shape)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            w = interleaved_to_half_split(w, Hq if name.endswith("q_proj.weight") else Hkv)
        return torch.from_numpy(np.ascontiguousarray(w))

    shapes = {name: tuple(shape) for name, (_, shape) in where.items()}
    return build_model(cfg, LazyTensors(list(where), read, shapes), str(path), dtype, device)
