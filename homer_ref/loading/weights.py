"""HF model directories: safetensors weights (single file or sharded) -> a `Llama`, and `save_hf` back.

`checkpoint_names(cfg)` is the one explicit map from our parameter names to HF checkpoint names, and
`build_model` the one place where named tensors become a model: every other format (llama2.c, GGUF) converts its
tensors to HF names and layouts and calls it. Nothing is ever unpickled. Every tensor is checked for its name,
shape, dtype and finiteness (NaN/Inf, or overflow of the requested dtype), and a checkpoint too large for the
memory available is refused before it is read (`budget.py`).

Memory: a model is never built twice. Its parameters are created on the meta device (no memory, no random
initialisation) and the checkpoint's tensors are assigned to them. The loaders hand `build_model` a `LazyTensors`
map that reads (or dequantizes) one tensor when asked; `build_model` converts it to the requested dtype and lets
the original go before asking for the next. So loading peaks at the weights in the requested dtype plus one
tensor in its stored form, not at two copies of the model (files are read, not memory-mapped, where a mapping's
pages would stay resident: `read_array`).
"""

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from homer_ref.budget import check_fits
from homer_ref.llama import Llama, LlamaConfig, RopeScaling
from homer_ref.loading.config import CheckpointError, hf_config_dict, parse_config


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


def interleaved_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute q/k rows of each head from Meta's RoPE pairs (2i, 2i+1) to HF's pairs (i, i + Dh/2).

    Meta's checkpoints, llama2.c and llama.cpp's GGUF files store q/k in the interleaved layout; `llama.py` uses
    HF's half-split one. This is the one place that converts."""
    rows, D = w.shape
    Dh = rows // n_heads
    return w.reshape(n_heads, Dh // 2, 2, D).transpose(0, 2, 1, 3).reshape(rows, D)


def check_file_fits(paths: list[Path]) -> None:
    """Refuse, before reading it, a checkpoint larger than the memory available."""
    needed = sum(p.stat().st_size for p in paths if p.is_file())
    check_fits(needed, f"reading {paths[0].parent if len(paths) > 1 else paths[0]}", "use a machine with more memory")


class LazyTensors(Mapping):
    """Checkpoint name -> tensor, read only when asked for (and again each time): `load(name)` does the reading.
    `shapes` (name -> shape, from the file's header) lets a shape be checked before anything is read."""

    def __init__(self, names: list[str], load: Callable[[str], torch.Tensor], shapes: dict[str, tuple[int, ...]]):
        self._names, self._load, self.shapes = list(names), load, shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def read_array(path: Path, offset: int, dtype, count: int) -> np.ndarray:
    """`count` items of `dtype` at byte `offset` of a file, read into a fresh array (no memory map, whose pages
    would stay in the process's resident set for as long as it is mapped)."""
    out = np.empty(count, dtype=dtype)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise CheckpointError(f"{path}: truncated: the file ends inside a tensor; re-download or re-export it")
    return out


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of `t` is finite. A finite sum proves it without a mask the size of the tensor (whose
    freed pages the allocator may keep: ~0.4x of a model's weights over a load); a non-finite sum (NaN/Inf, or a
    sum that overflowed) is checked value by value."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def build_model(cfg: LlamaConfig, tensors: Mapping[str, torch.Tensor], source: str, dtype, device) -> Llama:
    """A `Llama` whose parameters are `tensors` (keyed by checkpoint name), every name and shape checked.

    `tensors` may be a `LazyTensors`: each tensor is then read once, converted to `dtype` on `device`, checked, and
    released before the next is read (see the module docstring)."""
    held = {int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    if cfg.num_hidden_layers != len(held):  # before naming every layer's tensors: the config may say 2^40 layers
        raise CheckpointError(
            f"{source}: the config says {cfg.num_hidden_layers} layers but the checkpoint holds {len(held)}; "
            "is this config the checkpoint's own?"
        )
    names = checkpoint_names(cfg)
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(k for k in tensors if k not in names.values() and k not in ignorable)
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]  # old HF buffers: recomputed
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all) for {cfg}")
    missing = [theirs for theirs in names.values() if theirs not in tensors]
    if missing:
        raise CheckpointError(f"{source}: missing tensor '{missing[0]}'; is this a Llama checkpoint for this config?")
    model = Llama(cfg, device="meta")  # parameters without memory or random initialisation, replaced below
    params = dict(model.named_parameters(remove_duplicate=False))

    def check_shape(theirs: str, shape, expected) -> None:
        if tuple(shape) != tuple(expected):
            raise CheckpointError(f"{source}: tensor '{theirs}' has shape {tuple(shape)}, expected {tuple(expected)}")

    if isinstance(tensors, LazyTensors):  # every shape, before a byte is read
        for ours, theirs in names.items():
            check_shape(theirs, tensors.shapes[theirs], params[ours].shape)
    needed = sum(p.numel() for p in model.parameters()) * dtype.itemsize  # a tied head counted once
    check_fits(needed, f"{source} in {dtype} on {device}", "load it in a smaller dtype or on a larger machine", device)
    state = {}
    for ours, theirs in names.items():
        t = tensors[theirs]
        check_shape(theirs, t.shape, params[ours].shape)
        if t.is_floating_point() is False:
            raise CheckpointError(f"{source}: tensor '{theirs}' has integer dtype {t.dtype}")
        state[ours] = t.to(dtype=dtype, device=device)
        if not all_finite(state[ours]):  # detected here, never propagated into logits
            if all_finite(t):
                raise CheckpointError(
                    f"{source}: tensor '{theirs}' overflows {dtype} (values up to {t.abs().max().item():.3g}); "
                    "load it in float32 or bfloat16"
                )
            bad = (~torch.isfinite(t)).sum().item()
            raise CheckpointError(
                f"{source}: tensor '{theirs}' holds {bad} NaN/Inf value(s); the checkpoint is corrupt: "
                "re-download or re-export it"
            )
        del t  # the stored form goes now (a lazy map keeps nothing): one tensor beside the model at a time
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def with_config(model: Llama, cfg: LlamaConfig) -> Llama:
    """The same parameters (shared, not copied) under another config of the same shapes, e.g. a RoPE scaling."""
    ours = dict(model.named_parameters())  # a tied head appears once, as embed_tokens.weight
    tensors = {theirs: ours[name] for name, theirs in checkpoint_names(cfg).items() if name in ours}
    weight = model.embed_tokens.weight
    return build_model(cfg, tensors, "with_config", weight.dtype, weight.device)  # same dtype and device: no copy


def rope_scaled(model: Llama, mode: str, factor: float) -> Llama:
    """The same weights with RoPE scaling `mode` (linear | dynamic | yarn) by `factor`; `model` itself if none."""
    if mode == "plain" or factor <= 1:
        return model
    trained = model.cfg.max_position_embeddings
    scaling = RopeScaling(mode, factor=float(factor), original_max_position_embeddings=trained)
    return with_config(model, replace(model.cfg, rope_scaling=scaling))


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, from its header (nothing is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-save it or re-download it") from e


def _read_safetensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file. The file is opened for this tensor alone: safetensors memory-maps it,
    and the mapped pages it touched leave the resident set when it is closed."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-save it or re-download it") from e


def hf_dir_config(path: Path) -> LlamaConfig:
    """The `LlamaConfig` of an HF model directory, from its config.json alone."""
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
    return parse_config(d, str(config_path))


def load_hf_dir(path: Path, dtype, device) -> Llama:
    cfg = hf_dir_config(path)
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        shards = [path / "model.safetensors"]
        shapes = _safetensors_shapes(shards[0])
        where = dict.fromkeys(shapes, shards[0])
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, RecursionError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        shards = [path / shard for shard in sorted(set(weight_map.values()))]
        where, shapes = {}, {}
        for shard in shards:
            stored = _safetensors_shapes(shard)
            where |= {k: shard for k, v in weight_map.items() if path / v == shard and k in stored}
            shapes |= {k: stored[k] for k in stored if where.get(k) == shard}
        listed = [k for k in weight_map if k not in where]
        if listed:
            raise CheckpointError(f"{weight_map[listed[0]]}: the index lists '{listed[0]}' but the shard lacks it")
    else:
        raise CheckpointError(
            f"{path}: no model.safetensors or model.safetensors.index.json (homer_ref never loads pickled "
            "pytorch_model.bin; convert it with save_pretrained(..., safe_serialization=True))"
        )
    check_file_fits(shards)
    tensors = LazyTensors(list(where), lambda key: _read_safetensor(where[key], key), shapes)
    return build_model(cfg, tensors, str(path), dtype, device)


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
