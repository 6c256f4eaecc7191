"""The trace format, written: what a HOMER run did, as flat tensors (the answer key other implementations test
against). The format is specified once, in docs/TRACE_FORMAT.md; this module writes it and reads the input JSON.

- `parse_input(data)`: the input JSON (token ids and HOMER settings, with the documented defaults) -> arguments;
  `input_with_defaults(data)`: the same JSON with every optional key present.
- `trace_tensors(result, dtype)`: a `HomerCache` -> the name -> tensor dict of the format (with the optional
  slot sources, and the optional per-node checkpoints when the prefill recorded them).
- `trace_metadata(...)`: the format's metadata strings (format_version, input, plan, dtype, model, bias).
"""

import json

import torch

from homer_ref.homer.plan import REDUCTIONS, HomerConfig
from homer_ref.homer.prefill import HomerCache

FORMAT_VERSION = "1"
INPUT_KEYS = ("prefix_ids", "context_ids", "suffix_ids", "max_chunk_len", "target_len", "warmup_layers")
# Optional input keys and their values when absent. `dtype` is the compute dtype the answer key was made with.
INPUT_DEFAULTS = {"reduction": "calibrated", "seed": 0, "dtype": "float32"}
INPUT_DTYPES = ("float32", "float64")
PLAN_KEYS = ("L", "W", "M", "T", "P", "C", "S", "E", "N", "H", "e", "lpc", "lo", "R")  # the `plan` metadata


def parse_input(data) -> tuple[list[int], list[int], list[int], HomerConfig]:
    """(prefix, context, suffix, config) from the input JSON object, or a ValueError naming the bad field."""
    if not isinstance(data, dict):
        raise ValueError(f"the input must be a JSON object with keys {sorted(set(INPUT_KEYS))}")
    missing = sorted(set(INPUT_KEYS) - data.keys())
    if missing:
        raise ValueError(f"the input JSON lacks {', '.join(missing)}")
    unknown = sorted(data.keys() - set(INPUT_KEYS) - INPUT_DEFAULTS.keys())
    if unknown:
        raise ValueError(f"the input JSON has unknown key(s) {', '.join(unknown)}")
    ids = []
    for key in ("prefix_ids", "context_ids", "suffix_ids"):
        value = data[key]
        if not isinstance(value, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in value):
            raise ValueError(f"'{key}' must be a list of integers")
        ids.append(value)
    for key in ("max_chunk_len", "target_len", "warmup_layers", "seed"):
        if key in data and (isinstance(data[key], bool) or not isinstance(data[key], int)):
            raise ValueError(f"'{key}' must be an integer, got {data[key]!r}")
    reduction = data.get("reduction", INPUT_DEFAULTS["reduction"])
    if reduction not in REDUCTIONS:
        raise ValueError(f"'reduction' must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    seed = data.get("seed", INPUT_DEFAULTS["seed"])
    if data.get("dtype", INPUT_DEFAULTS["dtype"]) not in INPUT_DTYPES:
        raise ValueError(f"'dtype' must be one of {', '.join(INPUT_DTYPES)}, got {data['dtype']!r}")
    config = HomerConfig(data["max_chunk_len"], data["target_len"], data["warmup_layers"], reduction, seed)
    return ids[0], ids[1], ids[2], config


def input_with_defaults(data: dict) -> dict:
    """The input JSON with every optional key present (its documented default when absent)."""
    return {**INPUT_DEFAULTS, **data}


def trace_tensors(result: HomerCache, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The flat name -> tensor dict written to the trace file."""
    out = {
        "positions": result.positions.to(torch.int64),
        "sources": result.sources.to(torch.int64),
        "logits": result.logits.to(dtype),
        "last_position_id": torch.tensor([result.last_position], dtype=torch.int64),
        "node_order": torch.tensor([[t.level, t.index] for t in result.nodes], dtype=torch.int64),
    }
    for layer, (k, v) in enumerate(zip(result.keys, result.values)):
        out[f"keys.{layer}"], out[f"values.{layer}"] = k.to(dtype), v.to(dtype)
    for t in result.nodes:
        name = f"node.{t.level}.{t.index}"
        out[f"{name}.layers"] = torch.tensor(t.layers, dtype=torch.int64)
        out[f"{name}.target"] = torch.tensor([t.target], dtype=torch.int64)
        out[f"{name}.input_positions"] = t.input_positions.to(torch.int64)
        out[f"{name}.input_sources"] = t.input_sources.to(torch.int64)
        out[f"{name}.kept"] = t.kept.to(torch.int64)
        out[f"{name}.removed"] = t.removed.to(torch.int64)
        if t.scores is not None:
            out[f"{name}.scores"] = t.scores.to(torch.float32)
        if t.hidden is not None:  # checkpoints: the node's state at its end
            out[f"{name}.hidden"] = t.hidden.to(dtype)
            for layer, k, v in zip(range(*t.layers), t.keys, t.values):
                out[f"{name}.keys.{layer}"], out[f"{name}.values.{layer}"] = k.to(dtype), v.to(dtype)
    # clone: safetensors refuses tensors that share storage
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def trace_metadata(result: HomerCache, data: dict, model: str, bias: str, dtype: str) -> dict[str, str]:
    """The format's metadata strings: the input JSON as given, the plan's integers, and where things came from."""
    return {
        "format_version": FORMAT_VERSION,
        "input": json.dumps(data),
        "plan": json.dumps({k: getattr(result.plan, k) for k in PLAN_KEYS}),
        "dtype": dtype,
        "model": model,
        "bias": bias,
    }
