"""GGUF files (llama.cpp's format) -> a `Llama` and a `Tokenizer`, read with the `gguf` package (ggml's own reader).

A GGUF file holds metadata (key -> value) and tensors in llama.cpp's names and, for quantized types, in blocks.
Reading one:
- the config comes from the metadata (`gguf_config_dict`: llama.* keys -> HF config.json fields, then the one
  `parse_config`), the output head is tied when the file has no `output.weight`, and Llama 3.1+'s "llama3" RoPE
  scaling is recovered from the per-frequency divisors llama.cpp stores in `rope_freqs.weight`;
- every tensor is dequantized by `gguf.quants.dequantize` (every type it implements: F32, F16, BF16, Q8_0,
  Q4_0, Q4_1, Q4_K, Q6_K, ...), renamed to HF's name, and q/k rows are permuted back: llama.cpp's converter
  stores them in Meta's interleaved RoPE layout (the same permutation as llama2.c, `interleaved_to_half_split`);
- the tensors then go through the one `build_model`, which checks names, shapes and values;
- the tokenizer is built from the vocabulary (`tokenizer.ggml.*`) as a `tokenizers.Tokenizer`: the "gpt2" type
  (byte-level BPE with the file's merges and the pre-tokenizer named by `tokenizer.ggml.pre`) or the "llama"
  type (sentencepiece BPE: merges ranked by the merged piece's score, byte fallback, "▁" for spaces).

Only Llama-architecture files are read (`general.architecture` = "llama"); anything else, a file that is not
GGUF, truncated, or lacks a key, is refused with one line naming what is wrong. A damaged header is refused before
the reader sees it (`check_gguf_header`): the reader trusts the file's counts. The file is parsed once per
process (`open_gguf` keeps the reader), so checking the tokenizer and config before the weights costs nothing.
"""

import functools
import math
import mmap
import struct
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from homer_ref.llama import Llama, LlamaConfig
from homer_ref.loading.config import CheckpointError, parse_config
from homer_ref.loading.tokenizer import HFTokenizer, optional_import
from homer_ref.loading.weights import (
    LazyTensors,
    build_model,
    check_file_fits,
    interleaved_to_half_split,
    read_array,
)

GGUF_MAGIC = b"GGUF"
ARCHITECTURE = "llama"

# llama.cpp tensor name -> HF checkpoint name ("blk.{i}." -> "model.layers.{i}.").
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# Pre-tokenizer regexes of llama.cpp's byte-level BPE types (`tokenizer.ggml.pre`), applied in order.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "default": [GPT2_SPLIT],
    "gpt2": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],  # digits one by one, then GPT-2's split (starcoder's family)
    "starcoder": [r"\p{N}", GPT2_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT],  # Llama 3.x
    "llama3": [LLAMA3_SPLIT],
}
IGNORE_MERGES = {"llama-bpe", "llama3"}  # a word that is itself in the vocabulary is one token (Llama 3's rule)
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (1 normal, 2 unknown, 5 unused, 6 byte)


# ----------------------------------------------------------------------------------------------- reading


# GGUF value types (gguf.GGUFValueType): the bytes of each fixed-size one; 8 is a string, 9 an array.
VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY, UINT32 = 8, 9, 4
MAX_DIMS, MAX_NAME, MAX_KEY = 4, 64, 65535  # llama.cpp's GGML_MAX_DIMS, GGML_MAX_NAME; the spec's longest key
MAX_ARRAY_ITEMS = 1 << 21  # in all arrays of a file: real vocabularies hold < 10^6 (Gemma 3: 3 arrays of 262k)


class _Cursor:
    """Little-endian fields read from a buffer (the file, memory-mapped), never past its end."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def skip(self, n: int, what: str) -> int:
        """Step over `n` bytes; where they start."""
        if n > len(self.buf) - self.pos:
            raise ValueError(f"{what} at byte {self.pos} needs {n} bytes; the file has {len(self.buf) - self.pos} left")
        self.pos += n
        return self.pos - n

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.skip(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.skip(8, what))[0]

    def string(self, what: str) -> int:
        """Step over a string (u64 length, bytes); where its bytes start."""
        return self.skip(self.u64(what), what)

    def name(self, what: str, max_len: int) -> str:
        """A key or tensor name: 1 to `max_len` bytes of printable ASCII (names appear in error messages)."""
        n = self.u64(what)
        if not 0 < n <= max_len:
            raise ValueError(f"{what} at byte {self.pos} is {n} bytes long (1 to {max_len})")
        raw = self.buf[self.skip(n, what) : self.pos]
        if not (raw.isascii() and raw.decode().isprintable()):
            raise ValueError(f"{what} {raw[:40]!r} at byte {self.pos - n} is not printable ASCII")
        return raw.decode()


def check_gguf_header(buf, quant_sizes: dict) -> None:
    """Walk a GGUF header (metadata and tensor infos) without building anything; a ValueError where it is damaged.

    `gguf.GGUFReader` trusts every count in the file, and slicing its memory map past the end gives an empty
    array, not an error: a corrupted count (e.g. a key's type byte turned into 9, "array", so that the next bytes
    are read as an element type and a count of ~10^18) makes it read billions of empty items, each kept as a numpy
    view, until the OOM killer stops the process. So every length and count is checked here, against the bytes
    left, before it is used, and each loop steps over at least one byte of the file (the file's size bounds it):
    - header: magic and version (checked by `open_gguf`), tensor and metadata counts that fit the file;
    - each metadata key: a printable name, a known type; a string's length, an array's element type (arrays of
      arrays are refused, as llama.cpp does) and count times element size, within the file; all arrays together
      at most MAX_ARRAY_ITEMS items (the reader keeps ~1 KB of Python objects per item); a power-of-two
      `general.alignment`;
    - each tensor info: a printable name shorter than 64 bytes, 1 to 4 dimensions, a known ggml type whose
      block divides the first dimension, an aligned offset, and its data (dimensions' product in that type's
      bytes) inside the file.
    quant_sizes: ggml type -> (block size, bytes per block), `gguf.GGML_QUANT_SIZES`."""
    c = _Cursor(buf)
    c.skip(8, "magic and version")
    n_tensors, n_kv = c.u64("tensor count"), c.u64("metadata count")
    left = len(buf) - c.pos
    if 14 * n_kv + 33 * n_tensors > left:  # the smallest key-value (a 1-byte key, a uint8) and tensor info (1-D)
        raise ValueError(f"{n_tensors} tensors and {n_kv} metadata keys cannot fit in the {left} bytes left")
    alignment, items = 32, 0
    for _ in range(n_kv):
        key = c.name("metadata key", MAX_KEY)
        kind, count = c.u32(f"type of '{key}'"), 1
        if kind == ARRAY:
            kind, count = c.u32(f"element type of '{key}'"), c.u64(f"length of '{key}'")
            items += count
            if items > MAX_ARRAY_ITEMS:
                raise ValueError(f"array '{key}' of {count} items: more than {MAX_ARRAY_ITEMS} array items in all")
        if kind in VALUE_SIZES:
            start = c.skip(count * VALUE_SIZES[kind], f"value of '{key}'")
        elif kind == STRING:
            for _ in range(count):
                c.string(f"string of '{key}'")
        else:
            raise ValueError(f"'{key}' has value type {kind} (0-12; arrays of arrays are not read)")
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", buf, start)[0] if (kind, count) == (UINT32, 1) else 0
            if alignment == 0 or alignment & (alignment - 1):
                raise ValueError("general.alignment is not a uint32 power of two")
    tensors = []  # (name, offset from the data's start, bytes)
    for _ in range(n_tensors):
        name = c.name("tensor name", MAX_NAME - 1)
        n_dims = c.u32(f"dimension count of '{name}'")
        if not 0 < n_dims <= MAX_DIMS:
            raise ValueError(f"tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = [c.u64(f"dimensions of '{name}'") for _ in range(n_dims)]
        qtype = c.u32(f"type of '{name}'")
        if qtype not in quant_sizes:
            raise ValueError(f"tensor '{name}' has unknown ggml type {qtype}")
        block, block_bytes = quant_sizes[qtype]
        if dims[0] % block:
            raise ValueError(f"tensor '{name}' has rows of {dims[0]} values, not a multiple of its block ({block})")
        tensors.append((name, c.u64(f"offset of '{name}'"), math.prod(dims) // block * block_bytes))
    data_start = c.pos + -c.pos % alignment
    for name, offset, nbytes in tensors:
        if offset % alignment or data_start + offset + nbytes > len(buf):
            raise ValueError(
                f"tensor '{name}': {nbytes} bytes at byte {data_start + offset} (aligned to {alignment}) do not fit "
                f"in the file's {len(buf)}"
            )


@functools.lru_cache(maxsize=2)
def _reader(path: str, mtime_ns: int, size: int):
    gguf = optional_import("gguf", f"{path} (a GGUF file)")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            check_gguf_header(buf, gguf.GGML_QUANT_SIZES)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({e})") from e
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e


def open_gguf(path: Path):
    """A `gguf.GGUFReader` of `path` (memory-mapped: tensors are read when used), parsed once per process."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {head[:4]!r}, a GGUF file with {GGUF_MAGIC!r})")
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else None
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    stat = path.stat()
    return _reader(str(path), stat.st_mtime_ns, stat.st_size)


class Metadata:
    """The metadata of a GGUF file: `meta.get(key)` (None when absent) and `meta.require(key)` (an error when)."""

    def __init__(self, reader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return value.tolist() if isinstance(value, np.ndarray) else value

    def require(self, key: str):
        if key not in self.fields:
            raise CheckpointError(f"{self.path}: missing GGUF metadata key '{key}'; is this a complete Llama GGUF?")
        return self.get(key)


def gguf_config_dict(meta: Metadata, tensor_names: set[str]) -> dict:
    """HF config.json fields from llama.cpp's metadata keys (refusing what a Llama cannot be)."""
    arch = meta.require("general.architecture")
    if arch != ARCHITECTURE:
        raise CheckpointError(
            f"{meta.path}: architecture {arch!r} is not supported; homer_ref reads Llama models "
            f"(general.architecture '{ARCHITECTURE}')"
        )
    head_count, head_count_kv = meta.require("llama.attention.head_count"), meta.get("llama.attention.head_count_kv")
    for key, value in (("head_count", head_count), ("head_count_kv", head_count_kv)):
        if isinstance(value, list):
            raise CheckpointError(f"{meta.path}: per-layer llama.attention.{key} is not a Llama setting")
    blocks, layers = meta.require("llama.block_count"), {n.split(".")[1] for n in tensor_names if n.startswith("blk.")}
    if isinstance(blocks, int) and blocks > len(layers):  # refused before anything loops over the layers
        raise CheckpointError(
            f"{meta.path}: llama.block_count is {blocks} but the file holds tensors (blk.N.*) of {len(layers)} "
            "layers; the file is damaged or incomplete"
        )
    hidden = meta.require("llama.embedding_length")
    head_dim = meta.get("llama.attention.key_length", hidden // head_count if head_count else None)
    rotated = meta.get("llama.rope.dimension_count", head_dim)
    if rotated != head_dim:
        raise CheckpointError(
            f"{meta.path}: llama.rope.dimension_count {rotated} != head dimension {head_dim}; partial RoPE is not Llama"
        )
    d = {
        "vocab_size": meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or None,
        "hidden_size": hidden,
        "intermediate_size": meta.require("llama.feed_forward_length"),
        "num_hidden_layers": blocks,
        "num_attention_heads": head_count,
        "num_key_value_heads": head_count_kv,
        "head_dim": head_dim,
        "rms_norm_eps": meta.require("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": meta.require("llama.context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    scaling = meta.get("llama.rope.scaling.type", "none")
    factor = meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear"))
    if scaling == "none" and meta.get("llama.rope.scale_linear") is not None:
        scaling = "linear"
    if scaling in ("linear", "yarn"):
        d["rope_scaling"] = {"rope_type": scaling, "factor": factor}
        if scaling == "yarn":
            d["rope_scaling"]["original_max_position_embeddings"] = meta.get(
                "llama.rope.scaling.original_context_length"
            )
    elif scaling != "none":
        raise CheckpointError(f"{meta.path}: llama.rope.scaling.type {scaling!r} is not supported (linear, yarn)")
    return d


def gguf_config(path: Path) -> LlamaConfig:
    """The `LlamaConfig` of a GGUF file, from its metadata (and the small `rope_freqs.weight`, if any)."""
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    d = gguf_config_dict(Metadata(reader, path), set(tensors))
    if "rope_freqs.weight" in tensors:
        cfg = parse_config(d, str(path))
        freqs = dequantized(stored_tensor(tensors["rope_freqs.weight"]), path).reshape(-1)
        d["rope_scaling"] = llama3_scaling(freqs, cfg, path)
    return parse_config(d, str(path))


def llama3_scaling(factors: np.ndarray, cfg: LlamaConfig, path: Path) -> dict:
    """HF's "llama3" `rope_scaling` from the per-frequency divisors llama.cpp stores instead (`rope_freqs.weight`,
    Llama 3.1+): inv_freq / factors is the scaled frequency.

    llama3 divides long wavelengths by `factor`, keeps short ones, and between the two thresholds blends with
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor), i.e. 1 / divisor =
    (1 - smooth) / factor + smooth. So factor is the largest divisor, and smooth is linear in 1 / wavelen: a line
    fitted through the blended frequencies gives original / (high - low) and -low / (high - low). Only those two
    ratios matter, so low_freq_factor = 1 is chosen (Llama 3.x's own value, which then gives back its
    high_freq_factor 4 and original context 8192). The result is checked by recomputing every divisor."""
    from homer_ref.llama import RopeScaling, rope_frequencies

    inv_freq, _ = rope_frequencies(cfg, 0)  # [Dh/2] float64, unscaled
    factors = factors.astype(np.float64)
    if factors.shape != (len(inv_freq),) or not np.isfinite(factors).all() or (factors < 1 - 1e-6).any():
        raise CheckpointError(f"{path}: rope_freqs.weight must hold {len(inv_freq)} divisors >= 1 (llama3 RoPE)")
    factor = float(factors.max())
    band = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    if factor <= 1 or band.sum() < 2:
        raise CheckpointError(f"{path}: rope_freqs.weight is not a llama3 RoPE scaling this reader can recover")
    x = inv_freq.numpy()[band] / (2 * np.pi)  # 1 / wavelen
    smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(x, smooth, 1)
    high = 1 - 1 / intercept  # with low = 1: intercept = -1 / (high - 1)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": float(high),
               "original_max_position_embeddings": round(slope * (high - 1))}  # fmt: skip
    rs = RopeScaling(**scaling)
    recomputed = inv_freq.numpy() / rope_frequencies(replace(cfg, rope_scaling=rs), 0)[0].numpy()
    if not np.allclose(recomputed, factors, rtol=1e-4):
        raise CheckpointError(f"{path}: rope_freqs.weight does not follow llama3 RoPE scaling (the only kind read)")
    return scaling


def hf_name(name: str) -> str | None:
    """llama.cpp's tensor name -> HF's, or None for a name a Llama does not have."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".", 2)  # blk, i, rest
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    return None


DEQUANTIZE_ROWS_BYTES = 1 << 22  # stored bytes dequantized at a time: bounds the transient float32 arrays


class StoredTensor(NamedTuple):
    """Where a GGUF tensor lies in its file and how it is stored: enough to read it without the reader."""

    name: str
    offset: int  # byte offset of its data in the file
    dtype: np.dtype  # numpy dtype of the stored items (uint8 blocks for quantized types)
    stored_shape: tuple[int, ...]  # shape of the stored items ([rows, bytes per row] for quantized types)
    qtype: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # HF's layout: GGUF lists dimensions innermost first


def stored_tensor(tensor) -> StoredTensor:
    """The `StoredTensor` of one of a `gguf.GGUFReader`'s tensors."""
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return StoredTensor(tensor.name, int(tensor.data_offset), tensor.data.dtype, tensor.data.shape,
                        tensor.tensor_type, shape)  # fmt: skip


def dequantized(tensor: StoredTensor, path: Path) -> np.ndarray:
    """One GGUF tensor as float32 in HF's layout.

    The stored bytes are read from the file (`read_array`: the reader's memory map would keep them resident) and
    dequantized a few rows at a time into the output, so that a large tensor's intermediates stay small."""
    from gguf.quants import dequantize

    stored = read_array(path, tensor.offset, tensor.dtype, math.prod(tensor.stored_shape))
    rows = stored.reshape(-1, tensor.stored_shape[-1]) if len(tensor.stored_shape) > 1 else stored.reshape(1, -1)
    if rows.shape[0] == 0 or math.prod(tensor.shape) % rows.shape[0]:
        raise CheckpointError(
            f"{path}: tensor '{tensor.name}' stores {rows.shape[0]} rows for shape {list(tensor.shape)}: the file is "
            "damaged (re-download or re-convert it)"
        )
    out = np.empty((rows.shape[0], math.prod(tensor.shape) // rows.shape[0]), dtype=np.float32)
    step = max(1, DEQUANTIZE_ROWS_BYTES // max(1, rows[0].nbytes))
    try:
        for start in range(0, rows.shape[0], step):
            out[start : start + step] = dequantize(rows[start : start + step], tensor.qtype)
    except NotImplementedError as e:
        raise CheckpointError(
            f"{path}: tensor '{tensor.name}' has quantization type {tensor.qtype.name}, which the installed "
            "gguf package cannot dequantize; upgrade gguf or re-quantize the file (e.g. Q8_0, Q4_K)"
        ) from e
    return out.reshape(tensor.shape)


def load_gguf(path: Path, dtype, device) -> Llama:
    """A `Llama` from a Llama-architecture GGUF file, dequantized to `dtype` on `device` one tensor at a time.

    The reader is let go before the weights are read: its parsed metadata (a large vocabulary is ~10^5 small
    arrays, ~160 MB for SmolLM2's) is not needed to read tensors, only where each one lies (`StoredTensor`)."""
    cfg = gguf_config(path)
    check_file_fits([path])
    stored = {}  # HF name -> where the tensor lies
    for tensor in open_gguf(path).tensors:
        if tensor.name == "rope_freqs.weight":  # read into the config (llama3 RoPE scaling)
            continue
        name = hf_name(tensor.name)
        if name is None:
            raise CheckpointError(
                f"{path}: unexpected tensor '{tensor.name}' for a Llama (is it another architecture?)"
            )
        stored[name] = stored_tensor(tensor)
    _reader.cache_clear()  # parsed again (~1 s) if the tokenizer or config is asked for later

    def read(name: str) -> torch.Tensor:  # one tensor, dequantized when `build_model` asks for it
        tensor, w = stored[name], dequantized(stored[name], path)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if name.endswith("q_proj.weight") else cfg.num_key_value_heads
            if w.ndim != 2 or w.shape[0] != heads * cfg.head_dim:
                raise CheckpointError(f"{path}: tensor '{tensor.name}' has shape {w.shape}, not [{heads}*head_dim, D]")
            w = np.ascontiguousarray(interleaved_to_half_split(w, heads))
        return torch.from_numpy(w)

    shapes = {name: t.shape for name, t in stored.items()}
    return build_model(cfg, LazyTensors(list(stored), read, shapes), str(path), dtype, device)


# ----------------------------------------------------------------------------------------------- tokenizer


def has_vocabulary(path: Path) -> bool:
    """Whether a GGUF file carries a tokenizer (`tokenizer.ggml.model`); a model-only file has none."""
    return "tokenizer.ggml.model" in open_gguf(path).fields


def load_gguf_tokenizer(path: Path) -> HFTokenizer:
    """The tokenizer of a GGUF file's vocabulary ("gpt2" byte-level BPE or "llama" sentencepiece type)."""
    tokenizers = optional_import("tokenizers", f"{path} (a GGUF tokenizer)")
    meta = Metadata(open_gguf(path), path)
    kind = meta.require("tokenizer.ggml.model")
    tokens = meta.require("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        backend = _byte_level_bpe(tokenizers, meta, tokens)
        add_bos_default = False
    elif kind == "llama":
        backend = _sentencepiece_bpe(tokenizers, meta, tokens, types)
        add_bos_default = True
    else:
        raise CheckpointError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (gpt2, llama)")
    # Control tokens (<|im_start|>, <s>) are matched whole in text, as llama.cpp does with special parsing.
    specials = [tokenizers.AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    backend.add_special_tokens(specials)
    backend.add_tokens([tokenizers.AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise CheckpointError(f"{path}: the GGUF vocabulary repeats tokens ({len(tokens)} listed)")
    stops = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eot", "eom")]
    return HFTokenizer(
        path,
        backend,
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_id=meta.get("tokenizer.ggml.eos_token_id"),
        add_bos=meta.get("tokenizer.ggml.add_bos_token", add_bos_default),
        stop_ids=[i for i in stops if i is not None],
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _byte_level_bpe(tokenizers, meta: Metadata, tokens: list[str]):
    """GPT-2-style byte-level BPE: the file's merges, the pre-tokenizer its `tokenizer.ggml.pre` names."""
    from tokenizers import Regex, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(
            f"{meta.path}: pre-tokenizer tokenizer.ggml.pre {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})"
        )
    merges = [tuple(m.split(" ", 1)) for m in meta.require("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in IGNORE_MERGES))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokenizers, meta: Metadata, tokens: list[str], types: list[int]):
    """Sentencepiece BPE from pieces and scores: the pair whose merged piece scores highest merges first."""
    from tokenizers import decoders, models, pre_tokenizers

    scores = meta.require("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens) or not all(isinstance(s, float) for s in scores):
        raise CheckpointError(f"{meta.path}: tokenizer.ggml.scores must hold one float per token ({len(tokens)})")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, kind in zip(tokens, types):
        if kind != 1:  # normal pieces only: control, unknown, byte and unused pieces are never merged into
            continue
        merges += [(piece[:k], piece[k:], scores[vocab[piece]]) for k in range(1, len(piece))
                   if piece[:k] in vocab and piece[k:] in vocab]  # fmt: skip
    merges.sort(key=lambda m: (-m[2], vocab[m[0]], vocab[m[1]]))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if unk is not None and not (isinstance(unk, int) and 0 <= unk < len(tokens)):
        raise CheckpointError(f"{meta.path}: tokenizer.ggml.unknown_token_id {unk!r} is not among {len(tokens)} ids")
    model = models.BPE(
        vocab,
        [(a, b) for a, b, _ in merges],
        unk_token=None if unk is None else tokens[unk],
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = tokenizers.Tokenizer(model)
    prefix = "first" if meta.get("tokenizer.ggml.add_space_prefix", True) else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prefix, split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix == "first" else [])
    )
    return backend
