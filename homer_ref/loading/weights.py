"""HF model directories: safetensors weights (single file or sharded) -> a `Llama`, and `save_hf` back.

`checkpoint_names(cfg)` is the one explicit map from our parameter names to HF checkpoint names, and
`build_model` the one place where named tensors become a model: every other format (llama2.c, GGUF) converts its
tensors to HF names and layouts and calls it. Nothing is ever unpickled. Every tensor is checked for its name,
shape, dtype and finiteness (NaN/Inf, or overflow of the requested dtype), and a checkpoint too large for the
memory available is refused before it is read (`budget.py`).
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from homer_ref.budget import check_fits
from homer_ref.llama import Llama, LlamaConfig
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


def build_model(cfg: LlamaConfig, tensors: dict[str, torch.Tensor], source: str, dtype, device) -> Llama:
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
        check_file_fits([path / "model.safetensors"])
        tensors = _read_safetensors(path / "model.safetensors")
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, RecursionError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        check_file_fits([path / shard for shard in sorted(set(weight_map.values()))])
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_read_safetensors(path / shard, [k for k, v in weight_map.items() if v == shard]))
    else:
        raise CheckpointError(
            f"{path}: no model.safetensors or model.safetensors.index.json (homer_ref never loads pickled "
            "pytorch_model.bin; convert it with save_pretrained(..., safe_serialization=True))"
        )
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
