"""`python -m homer_ref.trace`: run HOMER on given token ids and write everything it did to a safetensors file.

The entry point other implementations call to get an answer key. Input JSON:
    {"prefix_ids": [...], "context_ids": [...], "suffix_ids": [...], "max_chunk_len": M, "target_len": T,
     "warmup_layers": W, "reduction": "calibrated" | "uncalibrated" | "random" (optional), "seed": 0 (optional)}
Output tensors (see README "Trace format"): `positions` int64 [K], `logits` [K, V], `keys.{l}` / `values.{l}`
[Hkv, K, Dh] (keys after RoPE), `last_position_id` int64 [1], `node_order` int64 [nodes, 2] (level, index in
execution order), and per node `node.{level}.{index}.{layers,target,input_positions,kept,removed}` plus
`.scores` (float32, +inf on affixes) for nodes that pruned. Float tensors are float32, or float64 with
--dtype float64. Metadata (JSON strings): format_version, input, plan, dtype, model.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from homer_ref.cli import DTYPES, check_out, progress, run_main, set_threads_for
from homer_ref.homer import HomerCache, homer_prefill
from homer_ref.loading import load_model
from homer_ref.plan import REDUCTIONS, HomerConfig

FORMAT_VERSION = "1"
_INPUT_KEYS = {"prefix_ids", "context_ids", "suffix_ids", "max_chunk_len", "target_len", "warmup_layers"}


def parse_input(data) -> tuple[list[int], list[int], list[int], HomerConfig]:
    """(prefix, context, suffix, config) from the input JSON object, or a ValueError naming the bad field."""
    if not isinstance(data, dict):
        raise ValueError(f"the input must be a JSON object with keys {sorted(_INPUT_KEYS)}")
    missing = sorted(_INPUT_KEYS - data.keys())
    if missing:
        raise ValueError(f"the input JSON lacks {', '.join(missing)}")
    unknown = sorted(data.keys() - _INPUT_KEYS - {"reduction", "seed"})
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
    reduction = data.get("reduction", "calibrated")
    if reduction not in REDUCTIONS:
        raise ValueError(f"'reduction' must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    config = HomerConfig(
        data["max_chunk_len"], data["target_len"], data["warmup_layers"], reduction, data.get("seed", 0)
    )
    return ids[0], ids[1], ids[2], config


def trace_tensors(result: HomerCache, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The flat name -> tensor dict written to the trace file."""
    out = {
        "positions": result.positions.to(torch.int64),
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
        out[f"{name}.kept"] = t.kept.to(torch.int64)
        out[f"{name}.removed"] = t.removed.to(torch.int64)
        if t.scores is not None:
            out[f"{name}.scores"] = t.scores.to(torch.float32)
    return {
        k: v.detach().cpu().contiguous().clone() for k, v in out.items()
    }  # clone: safetensors refuses shared storage


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file beside `path`, then rename: an interrupted run leaves no partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_bias(path) -> torch.Tensor:
    """The `"bias"` tensor [L, R] of a safetensors file (its values are checked by `homer.check_bias`)."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for unreadable files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if "bias" not in tensors:
        raise ValueError(f"{path}: no tensor named 'bias' (found {', '.join(sorted(tensors)) or 'none'})")
    bias = tensors["bias"]
    if bias.dim() != 2 or not bias.is_floating_point():
        raise ValueError(
            f"{path}: 'bias' is {str(bias.dtype).removeprefix('torch.')} {list(bias.shape)}, expected a float "
            "[num_layers, R] table; compute one with python -m homer_ref.calibrate"
        )
    return bias


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m homer_ref.trace",
        description="Run HOMER on the token ids of an input JSON and write the compact cache, logits and every "
        "tree node's decisions to a safetensors trace (the answer key for other implementations).",
    )
    p.add_argument("--model", required=True, help="HF model directory or llama2.c .bin checkpoint")
    p.add_argument("--input", required=True, type=Path, help="input JSON (ids and HOMER settings)")
    p.add_argument("--bias", type=Path, help="calibration table: safetensors file with a [L, R] tensor 'bias'")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="compute dtype (float32)")
    p.add_argument("--traversal", choices=["depth_first", "level_order"], default="depth_first")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.input.read_text(encoding="utf-8"))
    except OSError as e:
        parser.error(f"--input {args.input}: {e.strerror}")
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError, too deep or too long numbers
        parser.error(f"--input {args.input}: not valid UTF-8 JSON ({e})")
    check_out(parser, args.out)
    prefix, context, suffix, config = parse_input(data)
    bias = load_bias(args.bias) if args.bias is not None else None
    dtype = DTYPES[args.dtype]
    model = load_model(args.model, dtype=dtype)
    set_threads_for(model)
    result = homer_prefill(model, prefix, context, suffix, config, bias=bias, traversal=args.traversal)
    metadata = {
        "format_version": FORMAT_VERSION,
        "input": json.dumps(data),
        "plan": json.dumps({k: getattr(result.plan, k) for k in "L W M T P C S E N H e lpc lo R".split()}),
        "dtype": args.dtype,
        "model": str(args.model),
        "bias": str(args.bias) if args.bias else "",
    }
    save_atomic(trace_tensors(result, dtype), args.out, metadata)
    progress(
        f"wrote {args.out}: {len(result.positions)} slots x {len(result.keys)} layers, {len(result.nodes)} nodes, "
        f"last_position_id {result.last_position}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
