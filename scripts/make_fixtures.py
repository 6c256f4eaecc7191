"""Make the golden fixtures other HOMER implementations test against: `python scripts/make_fixtures.py`.

Writes `fixtures/` (or `--out DIR`):

    manifest.json                  every case: what it covers, its files, its plan, the recommended tolerances
    models/{mha,gqa}/              tiny random Llamas as HF directories: config.json + model.safetensors (float32)
    cases/{name}/input.json        the trace CLI's input: ids and HOMER settings
    cases/{name}/bias.safetensors  calibration table "bias" [L, M] float32 (calibrated cases only)
    cases/{name}/trace.safetensors the answer key, written by `python -m homer_ref.trace` (float32)

Everything but the traces is pure integer arithmetic, so it is byte-identical on every machine: the weights,
ids and bias values come from splitmix64 counters (no NumPy or torch random generator, whose streams may change
between versions). The models are built without `transformers`: names and shapes come from
`homer_ref.llama.Llama` and `homer_ref.loading.checkpoint_names`, the one name map of homer_ref. The traces are
float32 computations, so they may differ across machines in the last bits (BLAS); `tests/test_fixtures.py`
regenerates everything and requires identical files, identical integers and floats within 1e-5. Every pruning
decision in the fixtures wins by a margin of at least MIN_MARGIN, so rounding cannot flip one.

Docs: docs/TRACE_FORMAT.md. Dimension legend as in homer_ref: L W M T (layers, warm-up, max chunk length,
target length), P C S (prefix, context, suffix lengths), N H (leaves, tree height), lpc lo (layers per level,
leftover layers).
"""

import argparse
import contextlib
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from homer_ref.cli import trace as trace_cli  # noqa: E402
from homer_ref.homer.plan import HomerConfig, plan  # noqa: E402
from homer_ref.llama import Llama  # noqa: E402
from homer_ref.loading import checkpoint_names, parse_config  # noqa: E402
from homer_ref.testing import DEFAULT_ATOL, DEFAULT_RTOL, decision_margin, load_trace  # noqa: E402
from homer_ref.testing.trace import FORMAT_VERSION  # noqa: E402

FIXTURES = ROOT / "fixtures"
MIN_MARGIN = 1e-3  # smallest allowed gap between the last removed and the first kept score of a pruning node
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


# ----------------------------------------------------------------------------------------------- numbers


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniforms(seed: int, name: str, n: int) -> np.ndarray:
    """n float64 numbers in [0, 1): u_j = splitmix64(key + j * golden) >> 11 * 2^-53, key from (seed, name).

    The same counter-based generator as the `random` reduction mode (homer_ref/reduction.py): exact integer
    arithmetic, so every machine and every NumPy version gives the same numbers.
    """
    key = _splitmix64(_splitmix64(seed) ^ zlib.crc32(name.encode()))
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2^64, as splitmix64 wants
        x = np.uint64(key) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
        z = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


# ----------------------------------------------------------------------------------------------- models

# HF config.json fields. Small enough for kilobytes, large enough for trees of height 3 (L - W >= H + 1).
MODELS = {
    "mha": {  # multi-head attention, untied head
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 4,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "gqa": {  # grouped-query attention (3 query heads per KV head), tied head, small RoPE base
        "vocab_size": 64,
        "hidden_size": 24,
        "intermediate_size": 48,
        "num_hidden_layers": 5,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 4,
        "rope_theta": 500.0,
        "tie_word_embeddings": True,
    },
}
MODEL_SEEDS = {"mha": 1, "gqa": 2}


def model_files(name: str) -> dict[str, bytes]:
    """{"config.json": ..., "model.safetensors": ...} of model `name`: an HF Llama directory, float32."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **MODELS[name],
        "hidden_act": "silu",
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    cfg = parse_config(config)
    with torch.device("meta"):  # shapes only
        shapes = {n: tuple(p.shape) for n, p in Llama(cfg).named_parameters()}
    tensors = {}
    for ours, theirs in checkpoint_names(cfg).items():
        shape = shapes[ours]
        u = uniforms(MODEL_SEEDS[name], theirs, math.prod(shape)).reshape(shape)
        if len(shape) == 1:  # RMSNorm gains in [0.5, 1.5): a norm applied in the wrong place shows
            w = 0.5 + u
        elif ours == "embed_tokens.weight":  # unit variance
            w = (2 * u - 1) * math.sqrt(3)
        else:  # [out, in] projections: unit-variance outputs for unit-variance inputs, so logits are O(1)
            w = (2 * u - 1) * math.sqrt(3 / shape[1])
        tensors[theirs] = torch.from_numpy(w.astype(np.float32))
    return {
        "config.json": (json.dumps(config, indent=2) + "\n").encode(),
        "model.safetensors": safetensors_bytes(tensors, metadata={"format": "pt"}),
    }


# ----------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    covers: str  # what the case is there for
    model: str
    P: int
    C: int
    S: int
    M: int
    T: int
    W: int = 0
    reduction: str = "calibrated"
    seed: int = 0  # the random reduction mode's seed (input.json "seed")


CASES = [
    Case("one_chunk", "one chunk (N = 1): no reduction, the plain forward's cache", "mha", 2, 8, 2, 16, 16),
    Case("one_chunk_target", "one chunk with T < P+C+S: the root itself prunes", "mha", 2, 10, 2, 16, 9),
    Case("two_leaves", "2 leaves; the root does not prune (T = M)", "mha", 2, 20, 2, 16, 16),
    Case("four_leaves", "4 leaves, calibrated (the perturbation example)", "mha", 2, 44, 2, 16, 16),
    Case("eight_leaves", "8 leaves, height 3; lpc = 1 with lo = 2 leftover layers", "mha", 1, 96, 2, 16, 16),
    Case("short_right", "N0 = 3 rounded up to 4 leaves; the short-right rule at node (1, 1)", "mha", 2, 25, 2, 16, 16),
    Case("leftover_warmup", "W = 1 warm-up layer and lo = 1 leftover layer, both given to the leaves",
         "mha", 2, 20, 2, 16, 16, W=1),
    Case("target_below_m", "T < M: the root prunes to T at the last layer", "mha", 2, 40, 2, 16, 11),
    Case("no_prefix", "P = 0: the context starts at position 0", "mha", 0, 40, 3, 16, 16),
    Case("gqa_four_leaves", "GQA (6 query heads, 2 KV heads), tied head, lo = 2", "gqa", 2, 40, 2, 16, 16),
    Case("gqa_two_leaves", "GQA, 2 leaves, T < M", "gqa", 1, 22, 2, 16, 12),
    Case("uncalibrated", "reduction = uncalibrated (no bias)", "mha", 2, 44, 2, 16, 16, reduction="uncalibrated"),
    Case("random", "reduction = random (splitmix64 scores, seed 7)", "mha", 2, 44, 2, 16, 16, reduction="random",
         seed=7),
]  # fmt: skip


def case_files(case: Case) -> dict[str, bytes]:
    """{"input.json": ..., and "bias.safetensors": ... for calibrated cases} of one case."""
    V, L = MODELS[case.model]["vocab_size"], MODELS[case.model]["num_hidden_layers"]

    def ids(part: str, n: int) -> list[int]:
        return [int(x) for x in np.floor(uniforms(0, f"{case.name}.{part}", n) * V)]

    data = {
        "prefix_ids": ids("prefix", case.P),
        "context_ids": ids("context", case.C),
        "suffix_ids": ids("suffix", case.S),
        "max_chunk_len": case.M,
        "target_len": case.T,
        "warmup_layers": case.W,
        "reduction": case.reduction,
        "seed": case.seed,
    }
    files = {"input.json": (json.dumps(data) + "\n").encode()}
    if case.reduction == "calibrated":
        # Random, not calibrated: noise of the same O(1) size as the logits is what catches a bias indexed by
        # sequence instead of position distance, or by the wrong layer.
        bias = (2 * uniforms(0, f"{case.name}.bias", L * case.M) - 1).reshape(L, case.M).astype(np.float32)
        files["bias.safetensors"] = safetensors_bytes({"bias": torch.from_numpy(bias)})
    return files


def manifest() -> dict:
    """The index a vendoring project reads: cases, their files (relative to the fixtures folder) and plans."""
    cases = []
    for case in CASES:
        folder = f"cases/{case.name}"
        config = HomerConfig(case.M, case.T, case.W, case.reduction, case.seed)
        p = plan(MODELS[case.model]["num_hidden_layers"], config, case.P, case.C, case.S)
        cases.append(
            {
                "name": case.name,
                "covers": case.covers,
                "model": f"models/{case.model}",
                "input": f"{folder}/input.json",
                "bias": f"{folder}/bias.safetensors" if case.reduction == "calibrated" else None,
                "trace": f"{folder}/trace.safetensors",
                "plan": {k: getattr(p, k) for k in "L W M T P C S E N H e lpc lo R".split()}
                | {"final_len": p.final_len, "nodes": len(p.nodes)},
            }
        )
    return {
        "format_version": FORMAT_VERSION,
        "generator": "python scripts/make_fixtures.py (homer_ref)",
        "docs": "docs/TRACE_FORMAT.md",
        "tolerance": {"atol": DEFAULT_ATOL, "rtol": DEFAULT_RTOL},
        "models": {name: {"path": f"models/{name}", "attention": _attention(name)} for name in MODELS},
        "cases": cases,
    }


def _attention(name: str) -> str:
    m = MODELS[name]
    return "GQA" if m["num_key_value_heads"] < m["num_attention_heads"] else "MHA"


def readme() -> str:
    """fixtures/README.md: what is here and how to use it (the details are in docs/TRACE_FORMAT.md)."""
    rows = "\n".join(
        f"| `{c.name}` | {c.model} | {c.P} | {c.C} | {c.S} | {c.M} | {c.T} | {c.W} | {c.reduction} | {c.covers} |"
        for c in CASES
    )
    return f"""# homer_ref golden fixtures (trace format {FORMAT_VERSION})

Answer keys for other HOMER implementations, made by `python scripts/make_fixtures.py` and checked in CI
(`tests/test_fixtures.py`: regenerated traces must not drift, and the independent NumPy oracle must agree).
Copy this folder into your project; `manifest.json` lists every case with its files and its HOMER plan.
Format, conventions and the comparison rules: `docs/TRACE_FORMAT.md`.

For each case: run your implementation on `models/<model>` with the ids and settings of `cases/<name>/input.json`
(and the table `bias` of `cases/<name>/bias.safetensors` for calibrated cases), write a trace, and compare it:
`python -m homer_ref.compare cases/<name>/trace.safetensors yours.safetensors` (exit 0 = match), or
`homer_ref.testing.assert_traces_match(...)` in pytest. Recommended tolerance: atol = rtol = {DEFAULT_ATOL:g}.

Models (HF Llama directories, float32, random weights): `mha` (6 layers, 4 heads, untied head) and `gqa`
(5 layers, 6 query heads sharing 2 KV heads, tied head, RoPE base 500).

| case | model | P | C | S | M | T | W | reduction | covers |
|---|---|---|---|---|---|---|---|---|---|
{rows}
"""


def static_files() -> dict[str, bytes]:
    """Every fixture file except the traces, by path relative to the fixtures folder: machine-independent bytes."""
    files = {}
    for name in MODELS:
        files.update({f"models/{name}/{k}": v for k, v in model_files(name).items()})
    for case in CASES:
        files.update({f"cases/{case.name}/{k}": v for k, v in case_files(case).items()})
    files["manifest.json"] = (json.dumps(manifest(), indent=2) + "\n").encode()
    files["README.md"] = readme().encode()
    return files


# ----------------------------------------------------------------------------------------------- traces


@contextlib.contextmanager
def _working_directory(path: Path):
    """Run the trace CLI from inside the fixtures folder, so the paths it records are relative to it."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def make_trace(out: Path, case: Case) -> Path:
    """cases/{name}/trace.safetensors through the trace CLI's own code path (float32, depth-first)."""
    folder = f"cases/{case.name}"
    argv = ["--model", f"models/{case.model}", "--input", f"{folder}/input.json"]
    argv += ["--out", f"{folder}/trace.safetensors"]
    if case.reduction == "calibrated":
        argv += ["--bias", f"{folder}/bias.safetensors"]
    with _working_directory(out):
        trace_cli.main(argv)
    return out / folder / "trace.safetensors"


def make_fixtures(out: Path) -> None:
    """Write every fixture under `out`, then check that every pruning decision has a safe margin."""
    for rel, data in static_files().items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for case in CASES:
        margin = decision_margin(load_trace(make_trace(out, case)))
        if margin < MIN_MARGIN:
            raise RuntimeError(
                f"case {case.name}: a pruning decision wins by only {margin:.2e} < {MIN_MARGIN:g}, so float32 "
                "rounding on another machine could flip it; change the case's ids (its name seeds them) or sizes"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/make_fixtures.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=FIXTURES, help=f"output folder (default {FIXTURES})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    make_fixtures(args.out)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {len(CASES)} cases and {len(MODELS)} models to {args.out} ({total / 1024:.0f} KiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
