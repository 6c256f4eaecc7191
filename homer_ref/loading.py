"""Loading checkpoints and tokenizers: HF model directories and llama2.c legacy `.bin` files.

Everything that turns files into a `Llama` lives here, so that `llama.py` stays the forward pass only.
- `parse_config(dict)` reads an HF `config.json` (both the v4 `rope_scaling` + `rope_theta` spelling and the v5
  `rope_parameters` one) into a frozen `LlamaConfig`, refusing what the forward pass does not implement.
- `checkpoint_names(cfg)` is the one explicit map from our parameter names to HF checkpoint names.
- llama2.c checkpoints store q/k in Meta's interleaved RoPE layout; `_interleaved_to_half_split` is the one
  place where they are permuted to HF's half-split layout.
Nothing is ever unpickled: weights come from safetensors or raw float32 arrays. Every tensor is checked for its
name, shape, dtype and finiteness (NaN/Inf, or overflow of the requested dtype), and a checkpoint too large for
the memory available is refused before it is read (`budget.py`).
"""

import json
import math
import os
import struct
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from homer_ref.budget import check_fits
from homer_ref.llama import ROPE_TYPES, Llama, LlamaConfig, RopeScaling


class CheckpointError(ValueError):
    """A checkpoint, config or tokenizer that cannot be loaded; the message says what and how to fix it."""


# ----------------------------------------------------------------------------------------------- config

_REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _int_field(d: dict, key: str, where: str) -> int:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


def _number_field(d: dict, key: str, default: float, where: str) -> float:
    value = d.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{where}: '{key}' must be a positive number, got {value!r}")
    return float(value)


def _bool_field(d: dict, key: str, default: bool, where: str) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):  # bool("false") is True: never guess
        raise CheckpointError(f"{where}: '{key}' must be true or false, got {value!r}")
    return value


def _rope_scaling(d: dict, where: str) -> tuple[float, RopeScaling]:
    """(rope_theta, RopeScaling) from `rope_scaling` (transformers v4) or `rope_parameters` (v5)."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{where}: 'rope_scaling' must be an object or null, got {params!r}")
    theta = _number_field(params, "rope_theta", _number_field(d, "rope_theta", 10000.0, where), where)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{where}: rope_scaling type {rope_type!r} is not supported; use one of {', '.join(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, RopeScaling()
    if params.get("factor") is None:
        raise CheckpointError(f"{where}: rope_scaling type {rope_type!r} needs a positive 'factor'")
    kwargs = {"rope_type": rope_type, "factor": _number_field(params, "factor", 1.0, where)}
    for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor"):
        if params.get(key) is not None:
            kwargs[key] = _number_field(params, key, 1.0, where)
    if params.get("original_max_position_embeddings") is not None:
        kwargs["original_max_position_embeddings"] = _int_field(params, "original_max_position_embeddings", where)
    if "truncate" in params:
        kwargs["truncate"] = _bool_field(params, "truncate", True, where)
    scaling = RopeScaling(**kwargs)
    if rope_type == "llama3" and not scaling.high_freq_factor > scaling.low_freq_factor:
        raise CheckpointError(
            f"{where}: llama3 rope_scaling needs high_freq_factor > low_freq_factor, got "
            f"{scaling.high_freq_factor} and {scaling.low_freq_factor}"
        )
    return theta, scaling


def parse_config(d: dict, where: str = "config.json") -> LlamaConfig:
    """A validated `LlamaConfig` from the dict of an HF Llama `config.json`."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(d).__name__}")
    vocab, D, inter, L, Hq = (_int_field(d, key, where) for key in _REQUIRED_INTS)
    Hkv = _int_field(d, "num_key_value_heads", where) if d.get("num_key_value_heads") is not None else Hq
    if d.get("head_dim") is not None:
        Dh = _int_field(d, "head_dim", where)
    elif D % Hq:
        raise CheckpointError(f"{where}: hidden_size {D} is not divisible by num_attention_heads {Hq}")
    else:
        Dh = D // Hq
    if Hq % Hkv:
        raise CheckpointError(
            f"{where}: num_attention_heads {Hq} is not a multiple of num_key_value_heads {Hkv} (GQA groups)"
        )
    if Dh % 2:
        raise CheckpointError(f"{where}: head_dim {Dh} must be even for RoPE")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if d.get(key, ok) != ok:
            raise CheckpointError(f"{where}: {key}={d[key]!r} is not a Llama setting homer_ref implements ({ok!r})")
    theta, scaling = _rope_scaling(d, where)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=D,
        intermediate_size=inter,
        num_hidden_layers=L,
        num_attention_heads=Hq,
        num_key_value_heads=Hkv,
        head_dim=Dh,
        rms_norm_eps=_number_field(d, "rms_norm_eps", 1e-6, where),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_int_field(d, "max_position_embeddings", where)
        if d.get("max_position_embeddings") is not None
        else 2048,
        tie_word_embeddings=_bool_field(d, "tie_word_embeddings", False, where),
    )


# ----------------------------------------------------------------------------------------------- weights


def checkpoint_names(cfg: LlamaConfig) -> dict[str, str]:
    """Our parameter name -> HF checkpoint name. The only name map in homer_ref."""
    names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    per_layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    per_layer += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    per_layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    for i in range(cfg.num_hidden_layers):
        names.update({f"layers.{i}.{p}": f"model.layers.{i}.{p}" for p in per_layer})
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def num_parameters(cfg: LlamaConfig) -> int:
    """Parameters of a Llama with this config (a tied head counted once)."""
    D, F, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per_layer = D * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * Dh + cfg.num_attention_heads * Dh * D
    per_layer += 3 * D * F + 2 * D
    head = 1 if cfg.tie_word_embeddings else 2
    return head * cfg.vocab_size * D + cfg.num_hidden_layers * per_layer + D


def _check_file_fits(paths: list[Path]) -> None:
    """Refuse, before reading it, a checkpoint larger than the memory available."""
    needed = sum(p.stat().st_size for p in paths if p.is_file())
    check_fits(needed, f"reading {paths[0].parent if len(paths) > 1 else paths[0]}", "use a machine with more memory")


def _build(cfg: LlamaConfig, tensors: dict[str, torch.Tensor], source: str, dtype, device) -> Llama:
    """A `Llama` whose parameters are `tensors` (keyed by checkpoint name), every name and shape checked."""
    names = checkpoint_names(cfg)
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(k for k in tensors if k not in names.values() and k not in ignorable)
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]  # old HF buffers: recomputed
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all) for {cfg}")
    # Parameters are created without memory on the meta device for large models; small ones are built on the
    # CPU, because initialising on meta imports torch's compiler stack (~2 s per process).
    size = max(sum(t.numel() for t in tensors.values()), num_parameters(cfg))
    with torch.device("meta" if size > 200_000_000 else "cpu"):
        model = Llama(cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    state = {}
    for ours, theirs in names.items():
        if theirs not in tensors:
            raise CheckpointError(f"{source}: missing tensor '{theirs}'; is this a Llama checkpoint for this config?")
        t = tensors[theirs]
        if tuple(t.shape) != tuple(params[ours].shape):
            raise CheckpointError(
                f"{source}: tensor '{theirs}' has shape {tuple(t.shape)}, expected {tuple(params[ours].shape)}"
            )
        if t.is_floating_point() is False:
            raise CheckpointError(f"{source}: tensor '{theirs}' has integer dtype {t.dtype}")
    copies = [t for t in (tensors[theirs] for theirs in names.values()) if t.dtype != dtype or t.device != device]
    needed = sum(t.numel() for t in copies) * dtype.itemsize
    check_fits(needed, f"{source} in {dtype} on {device}", "load it in a smaller dtype or on a larger machine", device)
    for ours, theirs in names.items():
        t = tensors[theirs]
        state[ours] = t.to(dtype=dtype, device=device)
        if not torch.isfinite(state[ours]).all():  # detected here, never propagated into logits
            if torch.isfinite(t).all():
                raise CheckpointError(
                    f"{source}: tensor '{theirs}' overflows {dtype} (values up to {t.abs().max().item():.3g}); "
                    "load it in float32 or bfloat16"
                )
            bad = (~torch.isfinite(t)).sum().item()
            raise CheckpointError(
                f"{source}: tensor '{theirs}' holds {bad} NaN/Inf value(s); the checkpoint is corrupt: "
                "re-download or re-export it"
            )
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def _read_safetensors(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (keys if keys is not None else f.keys())}
    except (SafetensorError, OSError, RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-save it or re-download it") from e


def _load_hf_dir(path: Path, dtype, device) -> Llama:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{path}: no config.json; pass an HF model directory (config.json + model.safetensors) "
            "or a llama2.c .bin file"
        )
    try:
        d = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit number
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
    cfg = parse_config(d, str(config_path))
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        _check_file_fits([path / "model.safetensors"])
        tensors = _read_safetensors(path / "model.safetensors")
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, RecursionError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        _check_file_fits([path / shard for shard in sorted(set(weight_map.values()))])
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_read_safetensors(path / shard, [k for k, v in weight_map.items() if v == shard]))
    else:
        raise CheckpointError(
            f"{path}: no model.safetensors or model.safetensors.index.json (homer_ref never loads pickled "
            "pytorch_model.bin; convert it with save_pretrained(..., safe_serialization=True))"
        )
    return _build(cfg, tensors, str(path), dtype, device)


# ----------------------------------------------------------------------------------------------- llama2.c

_LLAMA2C_HEADER = struct.Struct("<7i")  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len


def _interleaved_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute q/k rows of each head from Meta's RoPE pairs (2i, 2i+1) to HF's pairs (i, i + Dh/2)."""
    rows, D = w.shape
    Dh = rows // n_heads
    return w.reshape(n_heads, Dh // 2, 2, D).transpose(0, 2, 1, 3).reshape(rows, D)


def _load_llama2c(path: Path, dtype, device) -> Llama:
    _check_file_fits([path])
    data = path.read_bytes()
    if len(data) < _LLAMA2C_HEADER.size:
        raise CheckpointError(f"{path}: {len(data)} bytes is too short for a llama2.c header (28 bytes)")
    if data.startswith((b"PK\x03\x04", b"\x80\x02\x8a\x0a")):  # torch.save's zip archive, or its legacy pickle
        raise CheckpointError(
            f"{path}: a pickled PyTorch checkpoint, which homer_ref never loads; convert it to an HF directory "
            "with save_pretrained(..., safe_serialization=True)"
        )
    dim, hidden, L, Hq, Hkv, vocab, seq_len = _LLAMA2C_HEADER.unpack_from(data)
    if dim == 0x616B3432:  # "ak42": llama2.c version-1/2 export
        raise CheckpointError(f"{path}: llama2.c v1/v2 export; only the legacy format is read (export --version 0)")
    tied = vocab > 0
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
        "tie_word_embeddings": tied,
    }
    cfg = parse_config(cfg_dict, f"{path} (header)")
    V, D, Dh, F = cfg.vocab_size, dim, cfg.head_dim, hidden
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
    offset, tensors = _LLAMA2C_HEADER.size, {}
    for name, shape, per_layer in layout:
        count = math.prod(shape) * (L if per_layer else 1)
        if offset + 4 * count > len(data):
            raise CheckpointError(
                f"{path}: truncated: the file ends inside tensor '{name}' "
                f"(needs {offset + 4 * count} bytes, has {len(data)}); re-download or re-export it"
            )
        array = np.frombuffer(data, dtype="<f4", count=count, offset=offset)
        offset += 4 * count
        if per_layer:
            for i, w in enumerate(array.reshape(L, *shape)):
                if name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                    w = _interleaved_to_half_split(w, Hq if name.startswith("self_attn.q") else Hkv)
                tensors[f"model.layers.{i}.{name}"] = torch.from_numpy(w.copy())
        elif not name.startswith("rope_"):
            tensors[name] = torch.from_numpy(array.reshape(shape).copy())
    if offset != len(data):
        raise CheckpointError(f"{path}: {len(data) - offset} unexpected bytes after the last tensor")
    return _build(cfg, tensors, str(path), dtype, device)


# ----------------------------------------------------------------------------------------------- public


def hf_config_dict(cfg: LlamaConfig) -> dict:
    """The HF `config.json` fields of a `LlamaConfig` (transformers v4 spelling, which v5 also reads)."""
    rs = cfg.rope_scaling
    scaling = None
    if rs.rope_type != "default":
        scaling = {k: v for k, v in asdict(rs).items() if v is not None}
        scaling["type"] = rs.rope_type
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
    }


def save_hf(model: Llama, path, dtype: torch.dtype | None = None) -> None:
    """Write `model` as an HF model directory (config.json + model.safetensors), the inverse of `load_model`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = dict(model.state_dict())
    tensors = {hf: state[ours].detach().to("cpu", dtype or state[ours].dtype).contiguous().clone()
               for ours, hf in checkpoint_names(model.cfg).items()}  # fmt: skip
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config_dict(model.cfg), indent=2) + "\n", encoding="utf-8")


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
        return _load_hf_dir(path, dtype, device)
    if path.is_file():
        if path.name == "config.json":
            return _load_hf_dir(path.parent, dtype, device)
        if path.suffix == ".safetensors":
            return _load_hf_dir(path.parent, dtype, device)
        return _load_llama2c(path, dtype, device)
    raise CheckpointError(f"{path}: no such file or directory; pass an HF model directory or a llama2.c .bin file")


class Tokenizer:
    """A sentencepiece model: `encode(text, bos=True)` -> ids, `decode(ids)` -> text."""

    def __init__(self, path: Path):
        import sentencepiece

        self.path = path
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{path}: not a sentencepiece model ({e})") from e
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        """The vocabulary piece of one id, e.g. '▁time' (sentencepiece marks a leading space with ▁)."""
        return self.sp.id_to_piece(int(token_id))


def check_tokenizer(tokenizer: Tokenizer, cfg: LlamaConfig) -> None:
    """A ValueError unless the tokenizer's vocabulary is the model's (else ids go out of range, or mean other words)."""
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model's vocabulary is "
            f"{cfg.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)"
        )


def load_tokenizer(path) -> Tokenizer:
    """A `Tokenizer` from a `.model` file or a model directory holding `tokenizer.model`."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"load_tokenizer needs a path (str or Path), got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.model").is_file():
            raise CheckpointError(f"{path}: no tokenizer.model in this directory; pass --tokenizer FILE.model")
        path = path / "tokenizer.model"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such tokenizer file; pass a sentencepiece .model file")
    return Tokenizer(path)
