"""Reading a HOMER trace: `load_trace` from a file, a dict of tensors, a `HomerCache` or the NumPy oracle's result,
and how close its pruning decisions came to a tie (`decision_gaps`, `decision_margin`). The format is
docs/TRACE_FORMAT.md; `validate.py` checks it, `compare.py` compares two traces.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from homer_ref.testing.validate import read_trace_file, to_numpy, trace_problems


@dataclass
class Trace:
    """A trace in memory: float tensors as float64, integer tensors as int64, metadata as strings."""

    tensors: dict[str, np.ndarray]
    metadata: dict[str, str] = field(default_factory=dict)
    name: str = "trace"  # where it came from, for messages

    @property
    def num_layers(self) -> int:
        return sum(1 for k in self.tensors if k.startswith("keys."))

    @property
    def nodes(self) -> list[tuple[int, int]]:
        """(level, index) of every node, in execution order (empty when the trace has no node_order)."""
        order = self.tensors.get("node_order")
        return [] if order is None else [(int(a), int(b)) for a, b in order.reshape(-1, 2)]

    @property
    def recorded_nodes(self) -> list[tuple[int, int]]:
        """(level, index) of every node that has tensors, whether or not node_order lists it."""
        named = {tuple(int(x) for x in k.split(".")[1:3]) for k in self.tensors if k.startswith("node.")}
        return self.nodes + sorted(named - set(self.nodes))

    def node(self, level: int, index: int, what: str) -> np.ndarray | None:
        return self.tensors.get(f"node.{level}.{index}.{what}")

    def has_checkpoints(self, level: int, index: int) -> bool:
        return self.node(level, index, "hidden") is not None

    def affixes(self) -> tuple[int, int, int] | None:
        """(P, C, S) from the input metadata, None when the trace has none."""
        try:
            data = json.loads(self.metadata["input"])
            return len(data["prefix_ids"]), len(data["context_ids"]), len(data["suffix_ids"])
        except (KeyError, TypeError, ValueError):
            return None


def trace_tensors_of(result) -> dict[str, np.ndarray]:
    """The trace tensors of a `homer_ref.homer.HomerCache` or of the NumPy oracle's result dict."""
    if not isinstance(result, dict):  # a HomerCache: the trace CLI's own conversion
        from homer_ref.testing.trace import trace_tensors

        return {k: to_numpy(v) for k, v in trace_tensors(result, result.logits.dtype).items()}
    out = {
        "positions": to_numpy(result["positions"]),
        "logits": to_numpy(result["logits"]),
        "last_position_id": np.array([int(result["last_position"])], dtype=np.int64),
        "node_order": np.array([[n["level"], n["index"]] for n in result["nodes"]], dtype=np.int64).reshape(-1, 2),
    }
    for layer, (k, v) in enumerate(zip(result["keys"], result["values"])):
        out[f"keys.{layer}"], out[f"values.{layer}"] = to_numpy(k), to_numpy(v)
    for n in result["nodes"]:
        name = f"node.{n['level']}.{n['index']}"
        out[f"{name}.layers"] = np.array(n["layers"], dtype=np.int64)
        out[f"{name}.target"] = np.array([n["target"]], dtype=np.int64)
        for what in ("input_positions", "kept", "removed"):
            out[f"{name}.{what}"] = to_numpy(n[what])
        if n.get("scores") is not None:
            out[f"{name}.scores"] = to_numpy(n["scores"]).astype(np.float32).astype(np.float64)
        if n.get("hidden") is not None:  # checkpoints: {layer: [Hkv, kept, Dh]} per layer run
            out[f"{name}.hidden"] = to_numpy(n["hidden"])
            for kind in ("keys", "values"):
                out.update({f"{name}.{kind}.{layer}": to_numpy(t) for layer, t in n[kind].items()})
    return out


def load_trace(source, name: str = "trace") -> Trace:
    """A `Trace` from a .safetensors path, a `Trace`, a dict of tensors/arrays (trace names), a dict in the NumPy
    oracle's result layout (positions, keys, values, logits, last_position, nodes; a node's optional checkpoints
    are `hidden` and `keys`/`values`: {layer: array}), or a `HomerCache`.

    Raises ValueError, naming the problem, for a missing or unreadable file, one that is not a trace, or one the
    comparison could not rely on (`validate.trace_problems`, its fatal problems).
    """
    if isinstance(source, Trace):
        return source
    metadata: dict[str, str] = {}
    dtypes = None
    if isinstance(source, (str, Path)):
        tensors, metadata, dtypes = read_trace_file(Path(source))
        name = str(source)  # a file is named by its path
    elif isinstance(source, dict) and "nodes" in source and "keys" in source:
        tensors = trace_tensors_of(source)
    elif isinstance(source, dict):
        tensors = {k: to_numpy(v) for k, v in source.items()}
    elif hasattr(source, "keys") and hasattr(source, "nodes"):
        tensors = trace_tensors_of(source)
    else:
        raise ValueError(f"cannot read a trace from {type(source).__name__}; pass a .safetensors path or a dict")
    fatal = [p for p in trace_problems(tensors, metadata, dtypes) if p.fatal]
    if fatal:
        raise ValueError(f"{name}: not a valid HOMER trace (docs/TRACE_FORMAT.md): {fatal[0].message}")
    return Trace(tensors, metadata, name)


def decision_gaps(trace) -> dict[tuple[int, int], float]:
    """For every node that removed slots, (level, index) -> its lowest kept score minus its highest removed score.

    Affix scores (+inf) are left out. 0 is an exact tie at the cut, decided by the (score, index) rule.
    """
    trace = load_trace(trace)
    gaps = {}
    for level, index in trace.nodes:
        scores = trace.node(level, index, "scores")
        removed = trace.node(level, index, "removed")
        if scores is None or removed is None or removed.size == 0:
            continue
        kept = np.setdiff1d(np.arange(scores.size), removed)
        kept_scores = scores[kept][np.isfinite(scores[kept])]
        if kept_scores.size:
            gaps[(level, index)] = float(kept_scores.min() - scores[removed].max())
    return gaps


def decision_margin(trace) -> float:
    """The smallest of `decision_gaps`: far above float32 rounding (~1e-6), another correct implementation makes
    the same decisions; 0 means an exact tie decided by the (score, index) rule; +inf when no node pruned."""
    return min(decision_gaps(trace).values(), default=math.inf)
