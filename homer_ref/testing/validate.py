"""Is it a trace? Every tensor name, dtype and shape of docs/TRACE_FORMAT.md, checked without an expected trace.

`trace_problems(tensors, metadata, dtypes)` lists every way a trace departs from the format, in a fixed order
(names, then the final cache, then the nodes, then the metadata). A problem is *fatal* when a comparison could not
rely on the tensor at all (a missing required tensor, a wrong rank, floats where integers belong, slot indices
outside the node's input); `load_trace` refuses a trace with a fatal problem and reports the first. The others
(a removed count that does not follow from the target, scores on a node that removes nothing, an unknown tensor
name, a missing checkpoint) are what `python -m homer_ref.compare --validate FILE` adds.

Symbols: K final cache slots, L layers, Hkv KV heads, Dh head dimension, V vocabulary, D hidden size, n a node's
input slots.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from homer_ref.testing.trace import FORMAT_VERSION, PLAN_KEYS, parse_input

SUPPORTED_VERSIONS = (FORMAT_VERSION,)  # format_version values this homer_ref reads
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtype names a reader of the kit accepts for floats
INT_DTYPES = ("I64", "I32")
NODE_FIELDS = ("layers", "target", "input_positions", "kept", "removed")  # every node record has these
CHECKPOINT_FIELDS = ("hidden", "keys", "values")

# Every tensor name of the format. A node's checkpoint K/V are `node.{level}.{index}.keys.{layer}`.
_NAME = re.compile(
    r"(?P<final>positions|sources|last_position_id|logits|node_order)"
    r"|(?P<kind>keys|values)\.(?P<layer>\d+)"
    r"|node\.(?P<level>\d+)\.(?P<index>\d+)\.(?:(?P<field>layers|target|input_positions|input_sources|kept|removed"
    r"|scores|hidden)|(?P<ckind>keys|values)\.(?P<clayer>\d+))"
)
# Rank, fixed sizes ("n": any) and kind of every tensor, by its final name part.
_LAYOUT = {"positions": (("n",), int), "sources": (("n",), int), "last_position_id": ((1,), int),
           "logits": (("n", "n"), float), "keys": (("n", "n", "n"), float), "values": (("n", "n", "n"), float),
           "node_order": (("n", 2), int), "layers": ((2,), int), "target": ((1,), int),
           "input_positions": (("n",), int), "input_sources": (("n",), int), "kept": (("n",), int),
           "removed": (("n",), int), "scores": (("n",), float), "hidden": (("n", "n"), float)}  # fmt: skip


def to_numpy(x) -> np.ndarray:
    """A tensor or array as int64 (integers, bools) or float64 (floats), on the CPU."""
    if hasattr(x, "detach"):  # a torch tensor (bfloat16 has no NumPy dtype, so widen before converting)
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x.long()).numpy()
    x = np.asarray(x)
    return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x.astype(np.int64)


def read_trace_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """(tensors, metadata, safetensors dtype names) of a file; ValueError for a missing or unreadable one."""
    from safetensors import safe_open  # torch framework: reads bfloat16/float16 too

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {'is a directory, not a trace file' if path.is_dir() else 'no such file'}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: to_numpy(f.get_tensor(k)) for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
            return tensors, dict(f.metadata() or {}), dtypes
    except Exception as e:  # safetensors raises several types for unreadable files
        raise ValueError(
            f"{path}: not a readable safetensors file ({e}); pass a trace as python -m homer_ref.trace writes it "
            "(docs/TRACE_FORMAT.md)"
        ) from e


@dataclass(frozen=True)
class Problem:
    message: str  # one line, naming the tensor or metadata key
    fatal: bool  # a comparison cannot rely on the trace


def _kind(name: str) -> str | None:
    """The layout key of a tensor name (`keys` for keys.3 and node.1.0.keys.3), None for an unknown name."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    return m["final"] or m["kind"] or m["field"] or m["ckind"]


def shape_text(a: np.ndarray) -> str:
    return "[" + ", ".join(str(d) for d in a.shape) + "]"


def trace_problems(
    tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None, dtypes: dict[str, str] | None = None
) -> list[Problem]:
    """Every departure from the trace format. `tensors` as `load_trace` holds them (int64 / float64 arrays);
    `dtypes` the safetensors dtype names of a file (None for in-memory traces, whose dtypes are not checked)."""
    out: list[Problem] = []

    def bad(message: str, fatal: bool = False) -> None:
        out.append(Problem(message, fatal))

    # --- names, ranks, dtypes
    for name, a in tensors.items():
        kind = _kind(name)
        if kind is None:
            bad(f"unknown tensor '{name}' (not a name of docs/TRACE_FORMAT.md: a typo?)")
            continue
        shape, want = _LAYOUT[kind]
        if a.ndim != len(shape) or any(s != "n" and got != s for got, s in zip(a.shape, shape)):
            bad(f"'{name}' has shape {shape_text(a)}, expected [{', '.join(map(str, shape))}]", fatal=True)
        if want is int and not np.issubdtype(a.dtype, np.integer):
            bad(f"'{name}' holds {a.dtype} values, expected integers (I64 or I32)", fatal=True)
        if want is float and not np.issubdtype(a.dtype, np.floating):
            bad(f"'{name}' holds {a.dtype} values, expected floats (F32, F64, F16 or BF16)", fatal=True)
        if dtypes and name in dtypes:
            allowed = INT_DTYPES if want is int else FLOAT_DTYPES
            if dtypes[name] not in allowed:
                bad(f"'{name}' has dtype {dtypes[name]}, expected one of {', '.join(allowed)}", fatal=True)
    if any(p.fatal for p in out):
        return out  # the checks below index into the tensors

    # --- the final cache
    missing = [k for k in ("positions", "last_position_id", "logits", "keys.0", "values.0") if k not in tensors]
    if missing:
        found = ", ".join(sorted(tensors)[:6]) or "nothing"
        bad(f"no {', '.join(missing)} tensor (found {found})", fatal=True)
        return out
    L = sum(1 for k in tensors if re.fullmatch(r"keys\.\d+", k))
    for layer in range(L):
        for kind in ("keys", "values"):
            if f"{kind}.{layer}" not in tensors:
                bad(f"no '{kind}.{layer}' tensor: keys.l and values.l are needed for every layer l = 0 .. L-1", True)
    if any(p.fatal for p in out):
        return out
    positions = tensors["positions"]
    K = positions.size
    Hkv, _, Dh = tensors["keys.0"].shape
    if K == 0:
        bad("'positions' is empty: the final cache holds at least the suffix")
    elif int(tensors["last_position_id"][0]) != int(positions[-1]):
        bad(
            f"'last_position_id' is {int(tensors['last_position_id'][0])}, but the last slot's position is "
            f"{int(positions[-1])}"
        )
    for layer in range(L):
        for kind in ("keys", "values"):
            a = tensors[f"{kind}.{layer}"]
            if a.shape != (Hkv, K, Dh):
                bad(
                    f"'{kind}.{layer}' has shape {shape_text(a)}, expected [Hkv, K, Dh] = [{Hkv}, {K}, {Dh}] "
                    "(as keys.0 and positions)"
                )
    if tensors["logits"].shape[0] != K:
        bad(f"'logits' has shape {shape_text(tensors['logits'])}, expected [K, V] with K = {K} slots")
    if "sources" in tensors and tensors["sources"].size != K:
        bad(f"'sources' has {tensors['sources'].size} entries for {K} slots")

    # --- the nodes
    out += _node_problems(tensors, metadata or {}, L, K, Hkv, Dh)

    # --- the metadata
    out += _metadata_problems(metadata or {})
    return out


def _node_problems(tensors, metadata, L, K, Hkv, Dh) -> list[Problem]:
    out: list[Problem] = []
    named = sorted({(int(m["level"]), int(m["index"])) for k in tensors if (m := _NAME.fullmatch(k)) and m["level"]})
    if "node_order" not in tensors:
        if named:
            out.append(
                Problem(
                    "node records but no 'node_order' tensor ([nodes, 2]: (level, index) of every node "
                    "in execution order)",
                    False,
                )
            )
        return out
    order = [(int(a), int(b)) for a, b in tensors["node_order"]]
    if len(set(order)) != len(order):
        out.append(Problem("'node_order' lists a node twice", False))
    for level, index in sorted(set(named) - set(order)):
        out.append(
            Problem(f"node.{level}.{index}.* tensors, but (level {level}, index {index}) is not in 'node_order'", False)
        )
    P, S = _affix_lengths(metadata)
    for level, index in order:
        name = f"node.{level}.{index}"
        t = {f: tensors.get(f"{name}.{f}") for f in (*NODE_FIELDS, "input_sources", "scores", "hidden")}
        lacking = [f for f in NODE_FIELDS if t[f] is None]
        if lacking:
            out.append(
                Problem(
                    f"no '{name}.{lacking[0]}' tensor (every node in node_order needs {', '.join(NODE_FIELDS)})", True
                )
            )
            continue
        n, fatal_before = t["input_positions"].size, len(out)
        for f in ("kept", "removed"):
            if t[f].size and not (t[f].min() >= 0 and t[f].max() < n):
                out.append(Problem(f"'{name}.{f}' holds slot indices outside [0, {n}), the node's input slots", True))
        if t["scores"] is not None and t["scores"].size != n:
            out.append(Problem(f"'{name}.scores' has {t['scores'].size} scores for {n} input slots", True))
        if len(out) > fatal_before:  # every problem so far in this node is fatal
            continue
        first, last = (int(x) for x in t["layers"])
        target = int(t["target"][0])
        kept, removed = t["kept"], t["removed"]
        if not 0 <= first < last <= L:
            out.append(Problem(f"'{name}.layers' is [{first}, {last}): expected 0 <= first < last <= L = {L}", False))
        if not (np.array_equal(np.union1d(kept, removed), np.arange(n)) and kept.size + removed.size == n):
            out.append(
                Problem(
                    f"'{name}.kept' and '{name}.removed' must split the input slots 0 .. {n - 1} between them", False
                )
            )
        elif np.any(np.diff(kept) < 0) or np.any(np.diff(removed) < 0):
            out.append(Problem(f"'{name}.kept' and '{name}.removed' must be ascending", False))
        if removed.size != max(0, n - target):
            out.append(
                Problem(
                    f"'{name}.removed' holds {removed.size} slots; a node of {n} input slots and target "
                    f"{target} removes max(0, n - target) = {max(0, n - target)}",
                    False,
                )
            )
        if removed.size and t["scores"] is None:
            out.append(Problem(f"no '{name}.scores': a node that removes slots records their scores", False))
        if not removed.size and t["scores"] is not None:
            out.append(
                Problem(
                    f"'{name}.scores' on a node that removes nothing: write scores only for nodes that remove slots",
                    False,
                )
            )
        if t["scores"] is not None and P is not None and n >= P + S:
            affix = np.r_[t["scores"][:P], t["scores"][n - S :]]
            if not np.all(np.isposinf(affix)):
                out.append(
                    Problem(f"'{name}.scores' is finite on a prefix or suffix slot: the affixes score +inf", False)
                )
        if t["input_sources"] is not None and t["input_sources"].size != n:
            out.append(
                Problem(f"'{name}.input_sources' has {t['input_sources'].size} entries for {n} input slots", False)
            )
        out += _checkpoint_problems(tensors, name, first, last, kept.size, Hkv, Dh)
    if order:
        root = max(order)  # the highest level; its index is 0
        name = f"node.{root[0]}.{root[1]}"
        if name + ".kept" in tensors and tensors[name + ".kept"].size != K:
            out.append(
                Problem(
                    f"the root {name} keeps {tensors[name + '.kept'].size} slots but the final cache holds {K}", False
                )
            )
    return out


def _checkpoint_problems(tensors, name, first, last, kept, Hkv, Dh) -> list[Problem]:
    """A node's checkpoints are all or nothing: hidden [kept, D] and keys/values.r [Hkv, kept, Dh] per layer run."""
    present = [k for k in tensors if k.startswith(name + ".") and k.split(".")[3] in CHECKPOINT_FIELDS]
    if not present:
        return []
    out = []
    wanted = [f"{name}.hidden"] + [f"{name}.{kind}.{r}" for r in range(first, last) for kind in ("keys", "values")]
    for key in wanted:
        if key not in tensors:
            out.append(
                Problem(
                    f"no '{key}': a node with checkpoints has hidden and keys/values of every layer it "
                    f"ran ({first} .. {last - 1})",
                    False,
                )
            )
    for key in sorted(set(present) - set(wanted)):
        out.append(
            Problem(f"'{key}': a checkpoint of a layer node {name[5:]} did not run ({first} .. {last - 1})", False)
        )
    for key in set(present) & set(wanted):
        a = tensors[key]
        want = (kept,) if key.endswith(".hidden") else (Hkv, kept, Dh)
        if a.shape[: len(want)] != want:
            what = "[kept, D]" if len(want) == 1 else f"[Hkv, kept, Dh] = [{Hkv}, {kept}, {Dh}]"
            out.append(
                Problem(f"'{key}' has shape {shape_text(a)}, expected {what}: the node's {kept} kept slots", False)
            )
    return out


def _affix_lengths(metadata: dict[str, str]) -> tuple[int | None, int]:
    """(P, S) from the input metadata, (None, 0) when it is absent or unreadable."""
    try:
        data = json.loads(metadata["input"])
        return len(data["prefix_ids"]), len(data["suffix_ids"])
    except (KeyError, TypeError, ValueError):
        return None, 0


def _metadata_problems(metadata: dict[str, str]) -> list[Problem]:
    out = []
    version = metadata.get("format_version")
    if version is None:
        out.append(Problem(f"no 'format_version' in the metadata: write \"{FORMAT_VERSION}\"", False))
    elif version not in SUPPORTED_VERSIONS:
        out.append(Problem(f"format_version {version!r}; this homer_ref reads {', '.join(SUPPORTED_VERSIONS)}", True))
    if "input" in metadata:
        try:
            parse_input(json.loads(metadata["input"]))
        except ValueError as e:  # JSONDecodeError too
            out.append(Problem(f"metadata 'input' is not a valid input: {e}", False))
    if "plan" in metadata:
        try:
            plan = json.loads(metadata["plan"])
        except ValueError:
            plan = None
        if not isinstance(plan, dict):
            out.append(Problem("metadata 'plan' is not a JSON object", False))
        else:
            lacking = [k for k in PLAN_KEYS if isinstance(plan.get(k), bool) or not isinstance(plan.get(k), int)]
            if lacking:
                out.append(
                    Problem(
                        f"metadata 'plan' lacks the integer(s) {', '.join(lacking)} (keys: {' '.join(PLAN_KEYS)})",
                        False,
                    )
                )
    return out


def validate_trace(path) -> tuple[list[Problem], str]:
    """(every problem of a trace file, a one-line description of what it holds). ValueError for a missing or
    unreadable file (not a problem of the format: there is nothing to check)."""
    tensors, metadata, dtypes = read_trace_file(Path(path))
    problems = trace_problems(tensors, metadata, dtypes)
    layers = sum(1 for k in tensors if re.fullmatch(r"keys\.\d+", k))
    nodes = tensors["node_order"].shape[0] if "node_order" in tensors and tensors["node_order"].ndim == 2 else 0
    with_checkpoints = sum(1 for k in tensors if k.endswith(".hidden"))
    slots = tensors["positions"].size if "positions" in tensors else 0
    described = f"{layers} layers, {slots} slots, {nodes} nodes" + (
        f", checkpoints on {with_checkpoints}" if with_checkpoints else ""
    )
    return problems, described
