"""Make the golden fixtures other HOMER implementations test against: `python scripts/make_fixtures.py`.

Writes `fixtures/` (or `--out DIR`):

    manifest.json                  every case: the rule it pins, its files, dtype, tolerance and plan
    README.md                      what is here and how to use it
    models/<name>/                 tiny random Llamas as HF directories: config.json + model.safetensors (float32)
    cases/<name>/input.json        the trace command's input: ids and HOMER settings (every optional key written)
    cases/<name>/bias.safetensors  calibration table "bias" [L, M] float32 (calibrated cases only)
    cases/<name>/trace.safetensors the answer key, written by `python -m homer_ref.trace --checkpoints`

(fixtures/test_conformance_template.py, the pytest template, is written by hand and left alone.) The stories260K
case runs the real llama2.c model vendored in homer_ref/data; it is not copied into fixtures/ (1 MiB): the manifest
names it `models/stories260K.bin` with its size and sha256, and the kit finds the package's copy when that file
is absent.

Everything but the traces is pure integer arithmetic, so it is byte-identical on every machine: the weights,
ids and bias values come from splitmix64 counters (no NumPy or torch random generator, whose streams may change
between versions); the stories260K ids come from its sentencepiece tokenizer. The models are built without
`transformers`: names and shapes come from `homer_ref.llama.Llama` and `homer_ref.loading.checkpoint_names`, the
one name map of homer_ref. The float32 traces may differ across machines in the last bits (BLAS kernels);
`tests/test_fixtures.py` checks them against a float64 regeneration, whose rounding does not depend on the kernel
at float32 scale. Every pruning decision of a case wins by a margin of at least MIN_MARGIN, so rounding cannot flip
one — except in the `ties` case, whose ties are exact by construction and decided by the (score, index) rule.

`python scripts/make_fixtures.py --spread` measures instead: the largest |Δ| between the committed traces and a
fresh regeneration in float32 and float64 in this environment (run it under other MKL_ENABLE_INSTRUCTIONS,
ATEN_CPU_CAPABILITY or `--threads`); tests/helpers.py records what it printed beside each tolerance.

Docs: docs/TRACE_FORMAT.md. Dimension legend as in homer_ref: L W M T (layers, warm-up, max chunk length,
target length), P C S (prefix, context, suffix lengths), N H (leaves, tree height), lpc lo (layers per level,
leftover layers).
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
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
from homer_ref.data import STORIES260K  # noqa: E402
from homer_ref.homer import homer_prefill  # noqa: E402
from homer_ref.homer.calibration import load_bias  # noqa: E402
from homer_ref.homer.plan import HomerConfig, plan  # noqa: E402
from homer_ref.llama import Llama  # noqa: E402
from homer_ref.loading import checkpoint_names, load_model, load_tokenizer, parse_config  # noqa: E402
from homer_ref.testing import DEFAULT_ATOL, DEFAULT_RTOL, decision_gaps, load_trace  # noqa: E402
from homer_ref.testing.trace import FORMAT_VERSION, parse_input, trace_tensors  # noqa: E402

FIXTURES = ROOT / "fixtures"
MIN_MARGIN = 1e-3  # smallest allowed gap between the last removed and the first kept score of a pruning node
FLOAT64_TOL = 1e-9  # float64 cases: two float64 implementations agree to ~1e-13 (homer_ref vs the NumPy oracle)
HAND_WRITTEN = ("test_conformance_template.py",)  # files of fixtures/ this script does not write
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

    The same counter-based generator as the `random` reduction mode (homer_ref/homer/reduction.py): exact integer
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
_ROPE_MODEL = {  # the four RoPE-scaling models: the same weights, head_dim 8 so that the scalings' bands show
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}
# Positions under HOMER stay below M = 16: the scalings are set to act there (trained context 8 to 10 tokens).
_ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},  # acts on calls whose largest position + 1 exceeds 10
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
}  # fmt: skip
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
    "mqa": {  # multi-query attention: 4 query heads share one KV head; 5 layers, enough for 16 leaves
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 5,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 4,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "head16": {  # a real head size: 16 dimensions per head (8 RoPE frequencies)
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
    "ties": {**_ROPE_MODEL, "num_hidden_layers": 4},  # q_proj is zero from layer 1 on: see ZERO_QUERY_LAYERS
    **{f"rope_{kind}": {**_ROPE_MODEL, "rope_scaling": scaling} for kind, scaling in _ROPE_SCALINGS.items()},
}
MAX_POSITIONS = {"rope_dynamic": 10}  # config max_position_embeddings (64 otherwise)
MODEL_SEEDS = {"mha": 1, "gqa": 2, "mqa": 4, "head16": 5, "ties": 6} | {f"rope_{k}": 3 for k in _ROPE_SCALINGS}
# Every query projection of these layers is zero, so the last query's logits are exactly 0 against every key there:
# the significance is -bias[layer][distance] alone, and equal bias values tie exactly, in any arithmetic.
ZERO_QUERY_LAYERS = {"ties": range(1, 4)}
# Models not written into fixtures/: the manifest names them with their size and hash; the kit finds homer_ref's copy.
EXTERNAL_MODELS = {
    "stories260K": {
        "path": "models/stories260K.bin",
        "format": "llama2.c",
        "package_file": "homer_ref/data/stories260K/stories260K.bin",
        "source": STORIES260K / "stories260K.bin",
    }
}


def model_files(name: str) -> dict[str, bytes]:
    """{"config.json": ..., "model.safetensors": ...} of model `name`: an HF Llama directory, float32."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **MODELS[name],
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS.get(name, 64),
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
        if ours.endswith("q_proj.weight") and int(ours.split(".")[1]) in ZERO_QUERY_LAYERS.get(name, ()):
            w = np.zeros(shape)
        tensors[theirs] = torch.from_numpy(w.astype(np.float32))
    return {
        "config.json": (json.dumps(config, indent=2) + "\n").encode(),
        "model.safetensors": safetensors_bytes(tensors, metadata={"format": "pt"}),
    }


def num_layers(model: str) -> int:
    return 5 if model == "stories260K" else MODELS[model]["num_hidden_layers"]


def vocab_size(model: str) -> int:
    return 512 if model == "stories260K" else MODELS[model]["vocab_size"]


# ----------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    rule: str  # the rule the case pins, with its HOMER_SPEC.md section
    model: str
    P: int
    C: int
    S: int
    M: int
    T: int
    W: int = 0
    reduction: str = "calibrated"
    seed: int = 0  # the random reduction mode's seed (input.json "seed")
    dtype: str = "float32"  # the compute dtype (input.json "dtype")
    bias_levels: int = 0  # > 0: bias values from {0, 1/4, ..., (levels-1)/4} (exact ties); 0: uniform in [-1, 1)
    salt: int = 0  # another draw of ids and bias, for a case whose first draw had a decision closer than MIN_MARGIN

    @property
    def tolerance(self) -> dict[str, float]:
        tol = FLOAT64_TOL if self.dtype == "float64" else DEFAULT_ATOL
        return {"atol": tol, "rtol": tol if self.dtype == "float64" else DEFAULT_RTOL}


CASES = [
    Case("one_chunk", "one chunk (N = 1), T >= P+C+S: no reduction, the plain forward's cache (N.3)", "mha",
         2, 8, 2, 16, 16),
    Case("one_chunk_target", "one chunk with T < P+C+S: the root itself prunes, positions 0..n-1 (B.3, D.4)", "mha",
         2, 10, 2, 16, 9),
    Case("two_leaves", "2 leaves, root target T = M: the children reduce to R = P + E/2 + S (D.4)", "mha",
         2, 20, 2, 16, 16),
    Case("four_leaves", "4 leaves: the significance of D.1 (head-max, pre-softmax, minus bias[layer][distance])",
         "mha", 2, 44, 2, 16, 16),
    Case("eight_leaves", "8 leaves, height 3; lpc = 1 with lo = 2 leftover layers given to the leaves (C.1)", "mha",
         1, 96, 2, 16, 16),
    Case("short_right", "N0 = 3 rounded up to 4 leaves; the short-right rule on the raw leaf length (B.1, D.4)",
         "mha", 2, 25, 2, 16, 16),
    Case("leftover_warmup", "W = 1 warm-up layer and lo = 1 leftover layer, both given to the leaves (C.1)", "mha",
         2, 20, 2, 16, 16, W=1),
    Case("warmup_two", "W = 2 warm-up layers with 4 leaves: the leaves run layers 0-3 (C.1)", "mha",
         2, 40, 2, 16, 16, W=2),
    Case("target_below_m", "T < M: the root prunes to T at the last layer (D.4)", "mha", 2, 40, 2, 16, 11),
    Case("no_prefix", "P = 0: the context starts at position 0 (B.3)", "mha", 0, 40, 3, 16, 16),
    Case("gqa_four_leaves", "GQA: query head h scores with KV head h // (Hq/Hkv) (N.2.2); tied head, lo = 2", "gqa",
         2, 40, 2, 16, 16),
    Case("gqa_two_leaves", "GQA with 2 leaves and T < M (N.2.2, D.4)", "gqa", 1, 22, 2, 16, 12),
    Case("mqa", "MQA: 4 query heads share one KV head; the head-max runs over all query heads (N.2.2)", "mqa",
         2, 40, 2, 16, 12),
    Case("sixteen_leaves", "16 leaves, height 4: the depth-first post-order and targets of a deep tree (B.1, G)",
         "mqa", 1, 125, 1, 16, 16, salt=1),
    Case("head_dim_16", "a real head size (Dh = 16, 8 RoPE frequencies): the half-split RoPE pairing j, j + Dh/2",
         "head16", 2, 40, 2, 16, 12),
    Case("rope_linear", "RoPE linear scaling (position interpolation, factor 2) in keys and scores (I.1)",
         "rope_linear", 2, 40, 2, 16, 16),
    Case("rope_dynamic", "RoPE dynamic NTK (factor 2): the base grows with each call's largest position + 1 (I.1)",
         "rope_dynamic", 2, 39, 2, 16, 16),
    Case("rope_yarn", "RoPE YaRN (factor 4): blended frequencies, cos and sin scaled by 0.1 ln(4) + 1 (I.1)",
         "rope_yarn", 2, 40, 2, 16, 16),
    Case("rope_llama3", "RoPE llama3 scaling (factor 4): long wavelengths divided, a smooth band between (I.1)",
         "rope_llama3", 2, 40, 2, 16, 16),
    Case("ties", "exact ties: among equal scores the earlier slot is removed first (N.2.3)", "ties",
         2, 44, 2, 16, 12, bias_levels=2),
    Case("float64", "float64 compute: float64 K/V, hidden states and logits; float32 scores (N.2.3)", "mha",
         2, 44, 2, 16, 12, dtype="float64"),
    Case("float64_gqa", "float64 compute on the GQA model, 2 leaves", "gqa", 1, 22, 2, 16, 12, dtype="float64"),
    Case("uncalibrated", "reduction = uncalibrated: no bias term (N.2.4)", "mha", 2, 44, 2, 16, 16,
         reduction="uncalibrated"),
    Case("random", "reduction = random: splitmix64 scores of (seed, level, index, slot), seed 7 (N.2.4)", "mha",
         2, 44, 2, 16, 16, reduction="random", seed=7),
    Case("stories260K", "the real stories260K model (llama2.c .bin, GQA 8/4, Dh = 8) on its own text, 4 leaves",
         "stories260K", 1, 40, 2, 16, 12),
]  # fmt: skip


def _stories_ids(case: Case) -> tuple[list[int], list[int], list[int]]:
    """BOS as the prefix, then the model's own story (llama2.c's golden greedy text), tokenized."""
    tokenizer = load_tokenizer(STORIES260K / "tok512.model")
    text = (STORIES260K / "expected_greedy_200.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text, bos=True)
    return ids[: case.P], ids[case.P : case.P + case.C], ids[case.P + case.C : case.P + case.C + case.S]


def case_files(case: Case) -> dict[str, bytes]:
    """{"input.json": ..., and "bias.safetensors": ... for calibrated cases} of one case."""
    V, L = vocab_size(case.model), num_layers(case.model)

    def ids(part: str, n: int) -> list[int]:
        return [int(x) for x in np.floor(uniforms(case.salt, f"{case.name}.{part}", n) * V)]

    if case.model == "stories260K":
        prefix, context, suffix = _stories_ids(case)
    else:
        prefix, context, suffix = ids("prefix", case.P), ids("context", case.C), ids("suffix", case.S)
    data = {
        "prefix_ids": prefix,
        "context_ids": context,
        "suffix_ids": suffix,
        "max_chunk_len": case.M,
        "target_len": case.T,
        "warmup_layers": case.W,
        "reduction": case.reduction,
        "seed": case.seed,
        "dtype": case.dtype,
    }
    files = {"input.json": (json.dumps(data) + "\n").encode()}
    if case.reduction == "calibrated":
        u = uniforms(case.salt, f"{case.name}.bias", L * case.M).reshape(L, case.M)
        if case.bias_levels:  # a few exactly representable values: equal distances' scores tie exactly
            bias = np.floor(u * case.bias_levels) / 4
        else:  # random noise of the logits' O(1) size: catches a bias indexed by sequence distance, or wrong layer
            bias = 2 * u - 1
        files["bias.safetensors"] = safetensors_bytes({"bias": torch.from_numpy(bias.astype(np.float32))})
    return files


def case_plan(case: Case):
    config = HomerConfig(case.M, case.T, case.W, case.reduction, case.seed)
    return plan(num_layers(case.model), config, case.P, case.C, case.S)


def _model_path(model: str) -> str:
    return EXTERNAL_MODELS[model]["path"] if model in EXTERNAL_MODELS else f"models/{model}"


def manifest() -> dict:
    """The index a vendoring project reads: cases, their files (relative to the fixtures folder) and plans."""
    cases = []
    for case in CASES:
        folder = f"cases/{case.name}"
        p = case_plan(case)
        cases.append(
            {
                "name": case.name,
                "rule": case.rule,
                "model": _model_path(case.model),
                "input": f"{folder}/input.json",
                "bias": f"{folder}/bias.safetensors" if case.reduction == "calibrated" else None,
                "trace": f"{folder}/trace.safetensors",
                "dtype": case.dtype,
                "tolerance": case.tolerance,
                "plan": {k: getattr(p, k) for k in "L W M T P C S E N H e lpc lo R".split()}
                | {"final_len": p.final_len, "nodes": len(p.nodes)},
            }
        )
    models = {name: {"path": f"models/{name}", "format": "hf", "attention": _attention(name)} for name in MODELS}
    for name, m in EXTERNAL_MODELS.items():
        data = m["source"].read_bytes()
        models[name] = {
            "path": m["path"],
            "format": m["format"],
            "attention": "GQA",
            "shipped": False,  # not in this folder: copy it to `path`, or let the kit use homer_ref's copy
            "package_file": m["package_file"],
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    return {
        "format_version": FORMAT_VERSION,
        "generator": "python scripts/make_fixtures.py (homer_ref)",
        "docs": "docs/TRACE_FORMAT.md",
        "tolerance": {"atol": DEFAULT_ATOL, "rtol": DEFAULT_RTOL},  # of the float32 cases; each case has its own
        "models": models,
        "cases": cases,
    }


def _attention(name: str) -> str:
    m = MODELS[name]
    return "MHA" if m["num_key_value_heads"] == m["num_attention_heads"] else "MQA" if m["num_key_value_heads"] == 1 \
        else "GQA"  # fmt: skip


def readme() -> str:
    """fixtures/README.md: what is here and how to use it (the details are in docs/TRACE_FORMAT.md)."""
    rows = "\n".join(
        f"| `{c.name}` | {c.model} | {c.P} | {c.C} | {c.S} | {c.M} | {c.T} | {c.W} | {c.reduction} | {c.dtype} | "
        f"{c.rule} |"
        for c in CASES
    )
    models = "\n".join(
        f"- `{name}`: {m['num_hidden_layers']} layers, {m['num_attention_heads']} query heads over "
        f"{m['num_key_value_heads']} KV head{'s' if m['num_key_value_heads'] > 1 else ''} of {m['head_dim']} dimensions"
        + (f", RoPE {m['rope_scaling']['rope_type']} scaling" if "rope_scaling" in m else "")
        + (", query projection zero from layer 1 on (exact ties)" if name in ZERO_QUERY_LAYERS else "")
        for name, m in MODELS.items()
    )
    return f"""# homer_ref golden fixtures (trace format {FORMAT_VERSION})

Answer keys for other HOMER implementations, made by `python scripts/make_fixtures.py` and checked in CI
(`tests/test_fixtures.py`: the traces agree with a float64 regeneration and with the independent NumPy oracle).
Copy this folder into your project; `manifest.json` lists every case with the rule it pins, its files, its compute
dtype, its tolerance and its HOMER plan. Format, conventions and the comparison rules: `docs/TRACE_FORMAT.md`.

## Checking an implementation

One command runs your implementation on every case and compares its traces with the answer keys:

    python -m homer_ref.conformance --fixtures path/to/fixtures \\
        --cmd "mytool --model {{model}} --input {{input}} --bias {{bias}} --out {{out}}"

`{{model}}` is a model directory (or the stories260K `.bin`), `{{input}}` the case's `input.json`, `{{bias}}` its
calibration table, or an empty argument for cases without one (`uncalibrated`, `random`: treat an empty `--bias` as
no table), `{{out}}` where to write the trace. It prints one line per case and a summary; exit 0 when every case
matches, 1 when any diverges or fails, 2 for invalid arguments. `--cases a b` runs a subset, `--json` prints JSON.

In pytest: `test_conformance_template.py` (in this folder) runs every case through `run_implementation`, a function
you replace; it uses `homer_ref.testing.load_cases` and `check_case`. Outside Python:
`python -m homer_ref.compare cases/<name>/trace.safetensors yours.safetensors`, with the case's tolerance.

Each case's `input.json` holds every key, defaults included; `dtype` is the compute dtype of its answer key (the
`float64` cases need float64 everywhere, RoPE angles included, to meet their 1e-9 tolerance). The traces hold
per-node checkpoints (each node's output hidden states and the K/V of the layers it ran), compared when your trace
has them too.

## Models

HF Llama directories (float32, random weights from splitmix64 counters):
{models}

and `stories260K` (llama2.c's real TinyStories model, GQA 8/4, Dh = 8), not copied here: put
`stories260K.bin` at `models/stories260K.bin` (sha256 in `manifest.json`) or let the kit use the copy inside
homer_ref (`homer_ref/data/stories260K/`).

## Cases

| case | model | P | C | S | M | T | W | reduction | dtype | rule it pins (HOMER_SPEC.md) |
|---|---|---|---|---|---|---|---|---|---|---|
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
def _in_fixtures(path: Path, case: Case):
    """Run the trace command from inside the fixtures folder, so the paths it records are relative to it; an
    external model is copied to its manifest path for the run and removed after."""
    old = Path.cwd()
    external = path / EXTERNAL_MODELS[case.model]["path"] if case.model in EXTERNAL_MODELS else None
    if external is not None:
        shutil.copyfile(EXTERNAL_MODELS[case.model]["source"], external)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
        if external is not None:
            external.unlink()


def make_trace(out: Path, case: Case, dtype: str | None = None, name: str = "trace.safetensors") -> Path:
    """cases/<name>/trace.safetensors through the trace command's own code path (depth-first, with checkpoints),
    in the case's dtype unless `dtype` says otherwise."""
    folder = f"cases/{case.name}"
    argv = ["--model", _model_path(case.model), "--input", f"{folder}/input.json", "--out", f"{folder}/{name}"]
    argv += ["--checkpoints"] + (["--bias", f"{folder}/bias.safetensors"] if case.reduction == "calibrated" else [])
    argv += ["--dtype", dtype] if dtype else []
    with _in_fixtures(out, case):
        trace_cli.main(argv)
    return out / folder / name


def check_decisions(trace, case: Case) -> None:
    """Every decision of a case wins by >= MIN_MARGIN; in the `ties` case some are exact ties instead (and every
    other one still wins by MIN_MARGIN). A RuntimeError otherwise."""
    gaps = decision_gaps(trace)
    close = {node: gap for node, gap in gaps.items() if gap < MIN_MARGIN and not (case.bias_levels and gap == 0)}
    if close:
        node, gap = min(close.items(), key=lambda kv: kv[1])
        raise RuntimeError(
            f"case {case.name}: node {node} decides by only {gap:.2e} < {MIN_MARGIN:g}, so float32 rounding on another "
            "machine could flip it; change the case's ids (its name seeds them) or sizes"
        )
    if case.bias_levels and not any(gap == 0 for gap in gaps.values()):
        raise RuntimeError(f"case {case.name}: no decision is an exact tie; change its bias levels or sizes")


def make_fixtures(out: Path) -> None:
    """Write every fixture under `out`, then check that every pruning decision has a safe margin."""
    for rel, data in static_files().items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for case in CASES:
        check_decisions(load_trace(make_trace(out, case)), case)


# ----------------------------------------------------------------------------------------------- spread


def regenerate(folder: Path, case: Case, dtype: str, threads: int) -> dict[str, np.ndarray]:
    """A fresh trace of a committed case (as tensors), computed by the library with `threads` torch threads."""
    data = json.loads((folder / "cases" / case.name / "input.json").read_text())
    prefix, context, suffix, config = parse_input(data)
    bias = load_bias(folder / "cases" / case.name / "bias.safetensors") if case.reduction == "calibrated" else None
    model_path = folder / _model_path(case.model)
    if not model_path.exists():
        model_path = EXTERNAL_MODELS[case.model]["source"]
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = load_model(model_path, dtype=torch_dtype)
        result = homer_prefill(model, prefix, context, suffix, config, bias=bias, all_logits=True, checkpoints=True)
    finally:
        torch.set_num_threads(before)
    return {k: v.numpy().astype(np.float64 if v.is_floating_point() else np.int64) for k, v in
            trace_tensors(result, torch_dtype).items()}  # fmt: skip


def spread(committed: dict[str, np.ndarray], fresh: dict[str, np.ndarray]) -> tuple[float, bool]:
    """(max |Δ| over every float tensor, whether every integer tensor is equal) of two traces' tensors."""
    largest, decisions = 0.0, committed.keys() == fresh.keys()
    for key, a in committed.items():
        b = fresh.get(key)
        if b is None or a.shape != b.shape:
            decisions = False
        elif np.issubdtype(a.dtype, np.floating):
            finite = np.isfinite(a)
            if not np.array_equal(np.isfinite(b), finite) or not np.array_equal(a[~finite], b[~finite]):
                decisions = False
            largest = max(largest, float(np.abs(a[finite] - b[finite]).max(initial=0.0)))
        else:
            decisions &= bool(np.array_equal(a, b))
    return largest, decisions


def print_spread(folder: Path, threads: int) -> None:
    """The largest |Δ| per case between the committed traces and fresh float32 / float64 regenerations."""
    env = {k: os.environ.get(k, "-") for k in ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")}
    print(f"# {env}, torch threads {threads}, {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'case':18s} {'dtype':8s} {'f32 regen':>10s} {'f64 regen':>10s}  decisions")
    worst = {"float32": [0.0, 0.0], "float64": [0.0, 0.0]}
    for case in CASES:
        committed = load_trace(folder / "cases" / case.name / "trace.safetensors").tensors
        row = []
        for dtype in ("float32", "float64"):
            largest, same = spread(committed, regenerate(folder, case, dtype, threads))
            row.append((largest, same))
            worst[case.dtype][dtype == "float64"] = max(worst[case.dtype][dtype == "float64"], largest)
        same = "same" if all(s for _, s in row) else "DIFFER"
        print(f"{case.name:18s} {case.dtype:8s} {row[0][0]:10.2e} {row[1][0]:10.2e}  {same}")
    for dtype, (f32, f64) in worst.items():
        print(f"# {dtype} cases: max |committed - float32 regen| {f32:.2e}, max |committed - float64 regen| {f64:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/make_fixtures.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=FIXTURES, help=f"output folder (default {FIXTURES})")
    parser.add_argument("--spread", action="store_true", help="measure regenerations against --out instead")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for --spread (1)")
    args = parser.parse_args(argv)
    if args.spread:
        print_spread(args.out, args.threads)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    make_fixtures(args.out)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {len(CASES)} cases and {len(MODELS)} models to {args.out} ({total / 1024:.0f} KiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
