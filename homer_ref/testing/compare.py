"""The oracle kit: compare a HOMER trace with homer_ref's, and name the first place they diverge.

A *trace* is what `python -m homer_ref.trace` writes (format: docs/TRACE_FORMAT.md): the final compact cache
(positions, keys, values, logits, last_position_id) and, for every tree node, the layers it ran, its target, its
input positions, its significance scores and the slots it kept. Another implementation (CUDA kernels, a JAX or
MLX port, a serving engine) writes the same tensors for the same input, and

    report = compare_traces("fixtures/cases/four_leaves/trace.safetensors", "mine.safetensors")
    print(report.first_divergence)   # e.g. "node (level 0, index 0), layer 1: kept slots differ at 2 of 15 ..."

walks both in execution order — every node in the expected trace's `node_order`, then the final cache — and
reports every difference, the first one being the place to start debugging: once one node keeps other slots,
everything after it differs too. Integers (layers, targets, positions, kept/removed slots) must be equal;
floats must satisfy |actual - expected| <= atol + rtol * |expected|, with +inf (the affixes' scores) equal.

`assert_traces_match` is the pytest form; `python -m homer_ref.compare` the command-line form (any language);
`load_trace` reads a trace file (or a dict of tensors, a `HomerCache`, or the NumPy oracle's result);
`decision_margin` says how close a trace's pruning decisions were to a tie.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_ATOL = 1e-4  # float32 against float32 or float64, through a few layers of O(1) activations
DEFAULT_RTOL = 1e-4
SUPPORTED_VERSIONS = ("1",)
_FINAL_KEYS = ("positions", "last_position_id", "logits")


# ----------------------------------------------------------------------------------------------- reading


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
        """(level, index) of every node, in execution order (empty when the trace has no node records)."""
        order = self.tensors.get("node_order")
        return [] if order is None else [(int(a), int(b)) for a, b in order.reshape(-1, 2)]

    def node(self, level: int, index: int, what: str) -> np.ndarray | None:
        return self.tensors.get(f"node.{level}.{index}.{what}")


def _to_numpy(x) -> np.ndarray:
    """A tensor or array as int64 (integers, bools) or float64 (floats), on the CPU."""
    if hasattr(x, "detach"):  # a torch tensor (bfloat16 has no NumPy dtype, so widen before converting)
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x.long()).numpy()
    x = np.asarray(x)
    return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x.astype(np.int64)


def _read_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open  # torch framework: reads bfloat16/float16 too

    if not path.is_file():
        raise ValueError(f"{path}: {'is a directory, not a trace file' if path.is_dir() else 'no such file'}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}, dict(f.metadata() or {})
    except ValueError:
        raise
    except Exception as e:  # safetensors raises several types for unreadable files
        raise ValueError(
            f"{path}: not a readable safetensors file ({e}); pass a trace as python -m homer_ref.trace writes it "
            "(docs/TRACE_FORMAT.md)"
        ) from e


def _from_result(result) -> dict[str, np.ndarray]:
    """The trace tensors of a `homer_ref.homer.HomerCache` or of the NumPy oracle's result dict."""
    if not isinstance(result, dict):  # a HomerCache: the trace CLI's own conversion
        from homer_ref.testing.trace import trace_tensors

        return {k: _to_numpy(v) for k, v in trace_tensors(result, result.logits.dtype).items()}
    out = {
        "positions": _to_numpy(result["positions"]),
        "logits": _to_numpy(result["logits"]),
        "last_position_id": np.array([int(result["last_position"])], dtype=np.int64),
        "node_order": np.array([[n["level"], n["index"]] for n in result["nodes"]], dtype=np.int64).reshape(-1, 2),
    }
    for layer, (k, v) in enumerate(zip(result["keys"], result["values"])):
        out[f"keys.{layer}"], out[f"values.{layer}"] = _to_numpy(k), _to_numpy(v)
    for n in result["nodes"]:
        name = f"node.{n['level']}.{n['index']}"
        out[f"{name}.layers"] = np.array(n["layers"], dtype=np.int64)
        out[f"{name}.target"] = np.array([n["target"]], dtype=np.int64)
        for what in ("input_positions", "kept", "removed"):
            out[f"{name}.{what}"] = _to_numpy(n[what])
        if n.get("scores") is not None:
            out[f"{name}.scores"] = _to_numpy(n["scores"]).astype(np.float32).astype(np.float64)
    return out


def load_trace(source, name: str = "trace") -> Trace:
    """A `Trace` from a .safetensors path, a `Trace`, a dict of tensors/arrays (trace names), a dict in the NumPy
    oracle's result layout (positions, keys, values, logits, last_position, nodes), or a `HomerCache`.

    Raises ValueError, naming the problem, for a missing or unreadable file or one that is not a trace.
    """
    if isinstance(source, Trace):
        return source
    metadata: dict[str, str] = {}
    if isinstance(source, (str, Path)):
        tensors, metadata = _read_file(Path(source))
        name = str(source)  # a file is named by its path
    elif isinstance(source, dict) and "nodes" in source and "keys" in source:
        tensors = _from_result(source)
    elif isinstance(source, dict):
        tensors = {k: _to_numpy(v) for k, v in source.items()}
    elif hasattr(source, "keys") and hasattr(source, "nodes"):
        tensors = _from_result(source)
    else:
        raise ValueError(f"cannot read a trace from {type(source).__name__}; pass a .safetensors path or a dict")
    missing = [k for k in (*_FINAL_KEYS, "keys.0", "values.0") if k not in tensors]
    if missing:
        found = ", ".join(sorted(tensors)[:6]) or "nothing"
        raise ValueError(f"{name}: not a HOMER trace: no {', '.join(missing)} tensor (found {found})")
    _check_layout(tensors, name)
    version = metadata.get("format_version", SUPPORTED_VERSIONS[-1])
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"{name}: trace format_version {version!r}; this homer_ref reads {', '.join(SUPPORTED_VERSIONS)}"
        )
    return Trace(tensors, metadata, name)


# The shape every comparison relies on, per tensor name: a number is a fixed size, "n" any size; integer or float.
_LAYOUT = {"positions": (("n",), int), "last_position_id": ((1,), int), "logits": (("n", "n"), float),
           "keys": (("n", "n", "n"), float), "values": (("n", "n", "n"), float), "node_order": (("n", 2), int),
           "layers": ((2,), int), "target": ((1,), int), "input_positions": (("n",), int), "kept": (("n",), int),
           "removed": (("n",), int), "scores": (("n",), float)}  # fmt: skip
_NODE_FIELDS = ("layers", "target", "input_positions", "kept", "removed")


def _check_layout(tensors: dict[str, np.ndarray], name: str) -> None:
    """A ValueError naming the first tensor that is not as docs/TRACE_FORMAT.md says: its rank, a fixed size, integer
    values, a layer or node field missing, slot indices or scores not matching the node's input slots."""
    invalid = f"{name}: not a valid HOMER trace (docs/TRACE_FORMAT.md):"
    for key, a in tensors.items():
        kind = key.split(".")[-1] if key.startswith("node.") else key.split(".")[0]
        if kind not in _LAYOUT:
            continue
        shape, dtype = _LAYOUT[kind]
        if a.ndim != len(shape) or any(want != "n" and got != want for got, want in zip(a.shape, shape)):
            raise ValueError(f"{invalid} '{key}' has shape {_shape(a)}, expected [{', '.join(map(str, shape))}]")
        if dtype is int and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{invalid} '{key}' holds {a.dtype} values, expected integers")
    layers = sum(k.startswith("keys.") for k in tensors)
    needed = [f"{kind}.{layer}" for layer in range(layers) for kind in ("keys", "values")]
    for level, index in tensors.get("node_order", []):
        needed += [f"node.{level}.{index}.{what}" for what in _NODE_FIELDS]
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise ValueError(f"{invalid} no '{missing[0]}' tensor ({len(missing)} missing in all)")
    for key, a in tensors.items():  # a node's slot indices and scores refer to its input slots
        inputs = tensors.get(key.rsplit(".", 1)[0] + ".input_positions") if key.startswith("node.") else None
        if inputs is None or not key.endswith((".kept", ".removed", ".scores")):
            continue
        if key.endswith(".scores") and a.size != inputs.size:
            raise ValueError(f"{invalid} '{key}' has {a.size} scores for {inputs.size} input slots")
        if not key.endswith(".scores") and a.size and not (a.min() >= 0 and a.max() < inputs.size):
            raise ValueError(f"{invalid} '{key}' holds slot indices outside [0, {inputs.size})")


def decision_margin(trace) -> float:
    """The smallest gap, over every node that pruned, between its lowest kept and its highest removed score.

    Affix scores (+inf) are left out. A margin far above float32 rounding (~1e-6) means another correct
    implementation makes the same decisions; +inf when the trace has no pruning node.
    """
    trace = load_trace(trace)
    margin = math.inf
    for level, index in trace.nodes:
        scores = trace.node(level, index, "scores")
        removed = trace.node(level, index, "removed")
        if scores is None or removed is None or removed.size == 0:
            continue
        kept = np.setdiff1d(np.arange(scores.size), removed)
        kept_scores = scores[kept][np.isfinite(scores[kept])]
        if kept_scores.size:
            margin = min(margin, float(kept_scores.min() - scores[removed].max()))
    return margin


# ----------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Divergence:
    where: str  # "node (level 1, index 0), layer 5", "final cache, layer 3", "logits", "metadata", ...
    what: str  # one sentence: what differs, the first differing element, expected vs got

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class Report:
    """The outcome of `compare_traces`: every divergence, in execution order."""

    expected: str
    actual: str
    atol: float
    rtol: float
    divergences: list[Divergence] = field(default_factory=list)
    summary: str = ""  # what was compared: nodes, layers, slots

    @property
    def ok(self) -> bool:
        return not self.divergences

    @property
    def first_divergence(self) -> str | None:
        """The first divergence in execution order, as one line; None when the traces match."""
        return str(self.divergences[0]) if self.divergences else None

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "expected": self.expected,
            "actual": self.actual,
            "atol": self.atol,
            "rtol": self.rtol,
            "compared": self.summary,
            "first_divergence": self.first_divergence,
            "divergences": [{"where": d.where, "what": d.what} for d in self.divergences],
        }

    def format(self, limit: int | None = 20) -> str:
        head = f"expected: {self.expected}\nactual:   {self.actual}\n"
        tol = f"atol {self.atol:g}, rtol {self.rtol:g}"
        if self.ok:
            return head + f"traces match ({self.summary}; {tol})"
        lines = [head + f"traces DIVERGE: {len(self.divergences)} divergence(s) ({self.summary}; {tol})"]
        lines.append(f"first divergence: {self.first_divergence}")
        lines.append("all, in execution order:")
        shown = self.divergences if limit is None else self.divergences[:limit]
        lines += [f"  {i + 1}. {d}" for i, d in enumerate(shown)]
        if len(shown) < len(self.divergences):
            lines.append(f"  ... and {len(self.divergences) - len(shown)} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


# ----------------------------------------------------------------------------------------------- comparing


def _fmt(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) and abs(x) < 1e4 else f"{x:.4g}"


def _shape(a: np.ndarray) -> str:
    return "[" + ", ".join(str(d) for d in a.shape) + "]"


def _bad_floats(expected: np.ndarray, actual: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    """Boolean mask of elements outside tolerance; infinities must match exactly, NaN never passes."""
    with np.errstate(invalid="ignore"):  # inf - inf
        close = np.isfinite(expected) & (np.abs(actual - expected) <= atol + rtol * np.abs(expected))
    same_inf = np.isinf(expected) & (expected == actual)
    return ~(close | same_inf)


def _abs_diff(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """|actual - expected|, with NaN (including inf - inf of unequal infinities) counted as +inf."""
    with np.errstate(invalid="ignore"):
        diff = np.abs(actual - expected)
    diff[(expected == actual)] = 0.0  # equal infinities
    return np.where(np.isnan(diff), np.inf, diff)


class _Comparer:
    """Walks two traces in execution order, collecting a `Divergence` for every difference."""

    def __init__(self, expected: Trace, actual: Trace, atol: float, rtol: float):
        self.e, self.a, self.atol, self.rtol = expected, actual, atol, rtol
        self.out: list[Divergence] = []

    def add(self, where: str, what: str) -> None:
        self.out.append(Divergence(where, what))

    # --- metadata: a different input or plan explains everything after it
    def metadata(self) -> None:
        for key in ("input", "plan"):
            if key not in self.e.metadata or key not in self.a.metadata:
                continue
            try:
                e, a = json.loads(self.e.metadata[key]), json.loads(self.a.metadata[key])
            except json.JSONDecodeError:
                e, a = self.e.metadata[key], self.a.metadata[key]
            if e == a:
                continue
            if isinstance(e, dict) and isinstance(a, dict):
                diff = [k for k in sorted(e.keys() | a.keys()) if e.get(k) != a.get(k)]
                first = diff[0]
                detail = f"{first} expected {_short(e.get(first))}, got {_short(a.get(first))}"
                self.add(f"metadata '{key}'", f"the traces come from different {key}s: {detail}")
            else:
                self.add(f"metadata '{key}'", "differs")

    # --- nodes, in the expected trace's execution order
    def nodes(self) -> None:
        expected_nodes, actual_nodes = self.e.nodes, self.a.nodes
        if not expected_nodes:
            return
        if not actual_nodes:
            self.add("nodes", "the actual trace has no node records (node_order); compare the final cache only "
                     "with nodes=False (--final-only)")  # fmt: skip
            return
        for level, index in expected_nodes:
            self.node(level, index, set(actual_nodes))
        for level, index in actual_nodes:
            if (level, index) not in set(expected_nodes):
                self.add(f"node (level {level}, index {index})", "in the actual trace but not in the expected one")

    def node(self, level: int, index: int, actual_nodes: set) -> None:
        e = lambda what: self.e.node(level, index, what)
        a = lambda what: self.a.node(level, index, what)
        where = f"node (level {level}, index {index})"
        if (level, index) not in actual_nodes:
            self.add(where, "missing from the actual trace")
            return
        for what in ("layers", "target", "input_positions", "kept", "removed"):
            if a(what) is None:
                self.add(where, f"the actual trace lacks node.{level}.{index}.{what}")
                return
        layers = e("layers")
        if not np.array_equal(layers, a("layers")):
            self.add(where, f"ran layers {_span(a('layers'))}, expected {_span(layers)}")
            return
        where_layer = f"{where}, layer {int(layers[1]) - 1}"  # the reduction layer
        if int(e("target")[0]) != int(a("target")[0]):
            self.add(where, f"target expected {int(e('target')[0])}, got {int(a('target')[0])}")
            return
        pos_e, pos_a = e("input_positions"), a("input_positions")
        if pos_e.shape != pos_a.shape:
            self.add(where, f"input has {pos_a.size} slots, expected {pos_e.size}")
            return
        if not np.array_equal(pos_e, pos_a):
            bad = np.flatnonzero(pos_e != pos_a)
            i = int(bad[0])
            self.add(
                where,
                f"input positions differ at {bad.size} of {pos_e.size} slots; first: slot {i}, "
                f"expected position {int(pos_e[i])}, got {int(pos_a[i])}",
            )
            return
        scores_e, scores_a = e("scores"), a("scores")
        if not self.kept(where_layer, pos_e, e("kept"), a("kept"), scores_e, scores_a):
            return
        if not np.array_equal(e("removed"), a("removed")):
            self.add(where_layer, f"removed slots {_short(a('removed'))}, expected {_short(e('removed'))}")
            return
        self.scores(where_layer, pos_e, scores_e, scores_a)

    def kept(self, where, positions, kept_e, kept_a, scores_e, scores_a) -> bool:
        """Compare the kept slots; True when they agree."""
        n = positions.size
        if kept_e.size != kept_a.size:
            self.add(where, f"kept {kept_a.size} of {n} slots, expected {kept_e.size}")
            return False
        if np.array_equal(kept_e, kept_a):
            return True
        only_e = np.setdiff1d(kept_e, kept_a)  # kept by the expected implementation only
        only_a = np.setdiff1d(kept_a, kept_e)
        i, j = int(only_e[0]), int(only_a[0])  # same counts: kept sizes are equal

        def score(scores, slot):
            return "-" if scores is None or slot >= scores.size else _fmt(float(scores[slot]))

        self.add(
            where,
            f"kept slots differ at {only_e.size + only_a.size} of {n} input slots; first: expected slot {i} "
            f"(position {int(positions[i])}), got slot {j} (position {int(positions[j])}); "
            f"scores expected/actual: slot {i} {score(scores_e, i)}/{score(scores_a, i)}, "
            f"slot {j} {score(scores_e, j)}/{score(scores_a, j)}",
        )
        return False

    def scores(self, where, positions, scores_e, scores_a) -> None:
        if scores_e is None and scores_a is None:
            return
        if scores_e is None or scores_a is None:
            has, lacks = ("the actual", "the expected") if scores_e is None else ("the expected", "the actual")
            self.add(where, f"{has} trace has scores (the node pruned) but {lacks} has none")
            return
        if scores_e.shape != scores_a.shape:
            self.add(where, f"scores have shape {_shape(scores_a)}, expected {_shape(scores_e)}")
            return
        bad = _bad_floats(scores_e, scores_a, self.atol, self.rtol)
        if bad.any():
            diff = np.where(bad, _abs_diff(scores_e, scores_a), 0.0)
            w = int(diff.argmax())
            self.add(
                where,
                f"scores differ at {int(bad.sum())} of {bad.size} slots; largest at slot {w} "
                f"(position {int(positions[w])}): expected {_fmt(scores_e[w])}, got {_fmt(scores_a[w])}",
            )

    # --- the final cache
    def final(self) -> None:
        pos_e, pos_a = self.e.tensors["positions"], self.a.tensors["positions"]
        if pos_e.shape != pos_a.shape:
            self.add("final cache", f"holds {pos_a.size} slots, expected {pos_e.size}")
            return
        if not np.array_equal(pos_e, pos_a):
            bad = np.flatnonzero(pos_e != pos_a)
            i = int(bad[0])
            self.add(
                "final cache",
                f"positions differ at {bad.size} of {pos_e.size} slots; first: slot {i}, "
                f"expected {int(pos_e[i])}, got {int(pos_a[i])}",
            )
        last_e, last_a = int(self.e.tensors["last_position_id"][0]), int(self.a.tensors["last_position_id"][0])
        if last_e != last_a:
            self.add("final cache", f"last_position_id expected {last_e}, got {last_a}")
        L = self.e.num_layers
        if self.a.num_layers != L:
            self.add("final cache", f"has {self.a.num_layers} layers, expected {L}")
        for layer in range(min(L, self.a.num_layers)):
            for kind in ("keys", "values"):
                key = f"{kind}.{layer}"
                if key not in self.a.tensors:
                    self.add(f"final cache, layer {layer}", f"the actual trace lacks {key}")
                    continue
                self.tensor(f"final cache, layer {layer}", kind, self.e.tensors[key], self.a.tensors[key], pos_e)
        self.tensor("logits", "logits", self.e.tensors["logits"], self.a.tensors["logits"], pos_e)

    def tensor(self, where, kind, expected, actual, positions) -> None:
        """keys/values [Hkv, K, Dh] or logits [K, V], within tolerance."""
        if expected.shape != actual.shape:
            self.add(where, f"{kind} have shape {_shape(actual)}, expected {_shape(expected)}")
            return
        bad = _bad_floats(expected, actual, self.atol, self.rtol)
        if not bad.any():
            return
        diff = _abs_diff(expected, actual)
        worst = np.unravel_index(int(diff.argmax()), diff.shape)
        first = tuple(int(i) for i in np.argwhere(bad)[0])

        def at(index) -> str:
            if kind == "logits":
                return f"slot {index[0]} (position {int(positions[index[0]])}), token {index[1]}"
            return f"head {index[0]}, slot {index[1]} (position {int(positions[index[1]])}), dim {index[2]}"

        self.add(
            where,
            f"{kind} differ at {int(bad.sum())} of {bad.size} elements; first at {at(first)}; max |Δ| "
            f"{diff[worst]:.3g} at {at(worst)}: expected {_fmt(expected[worst])}, got {_fmt(actual[worst])}",
        )


def _span(layers: np.ndarray) -> str:
    first, last = int(layers[0]), int(layers[1])
    return f"{first}-{last - 1}" if last > first else f"none ([{first}, {last}))"


def _short(value) -> str:
    text = json.dumps(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def compare_traces(
    expected, actual, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, nodes: bool = True
) -> Report:
    """Compare `actual` with `expected` (paths, dicts or `Trace`s, see `load_trace`); a `Report` of every
    divergence in execution order: metadata (input, plan), then every node of the expected `node_order`
    (layers, target, input positions, kept and removed slots, scores), then the final cache (positions,
    last_position_id, keys and values layer by layer, logits). `nodes=False` compares the final cache only.
    """
    if not (atol >= 0 and rtol >= 0):  # NaN tolerances would make every element diverge
        raise ValueError(f"atol and rtol must be >= 0, got {atol} and {rtol}")
    e, a = load_trace(expected, "expected"), load_trace(actual, "actual")
    c = _Comparer(e, a, atol, rtol)
    c.metadata()
    if nodes:
        c.nodes()
    c.final()
    summary = f"{len(e.nodes)} nodes, " if nodes else "final cache only, "
    summary += f"{e.num_layers} layers, {e.tensors['positions'].size} slots"
    return Report(e.name, a.name, atol, rtol, c.out, summary)


def assert_traces_match(
    expected, actual, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, nodes: bool = True
) -> Report:
    """`compare_traces`, raising AssertionError with the full report when the traces diverge (for pytest)."""
    report = compare_traces(expected, actual, atol=atol, rtol=rtol, nodes=nodes)
    if not report.ok:
        raise AssertionError(f"{report.first_divergence}\n{report}")
    return report
