"""Fuzzing: random bytes and random JSON fed to every loader and to the trace input parser give a clean
error or a valid result, never an unexpected exception.

"Clean error": ValueError (CheckpointError for files), whose message is one line, or MemoryError for a request
estimated too large. "Valid result": a model that generates tokens (or reports NaN logits), a tokenizer, a HOMER
cache with the planned number of slots, a comparison report. Inputs start from valid files and are corrupted the
ways files get corrupted (truncated, bytes overwritten, fields replaced by other JSON values), so the fuzzing gets
past the first check. HOMER_REF_FUZZ_EXAMPLES=1000 runs longer than the default 60 examples per test.

GGUF files also get fixed corruptions, run every time: a large value in each count and length field. Some once
made the loader allocate or loop without bound (a count of ~10^18 items, 4 billion layers) until the OOM killer
ended the test run; they are now refused before anything is built, and are run under a memory guard.
"""

import contextlib
import io
import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_errors_api import MHA

from homer_ref import CheckpointError, load_model, load_tokenizer
from homer_ref.cli.common import run_main
from homer_ref.cli.trace import main as trace_main
from homer_ref.decoding import generate_plain
from homer_ref.homer import homer_prefill
from homer_ref.homer.calibration import load_bias
from homer_ref.testing import compare_traces, load_trace
from homer_ref.testing.trace import parse_input
from homer_ref.testing.validate import trace_problems

FUZZ = settings(
    max_examples=int(os.environ.get("HOMER_REF_FUZZ_EXAMPLES", 60)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CONFIG_BYTES = (MHA / "config.json").read_bytes()
WEIGHT_BYTES = (MHA / "model.safetensors").read_bytes()
CONFIG = json.loads(CONFIG_BYTES)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@st.composite
def corrupted(draw, valid: bytes) -> bytes:
    """`valid` truncated, with a slice overwritten by random bytes, or replaced by random bytes altogether."""
    how = draw(st.sampled_from(["truncate", "overwrite", "random"]))
    if how == "random":
        return draw(st.binary(max_size=400))
    at = draw(st.integers(0, len(valid)))
    if how == "truncate":
        return valid[:at]
    patch = draw(st.binary(min_size=1, max_size=16))
    return valid[:at] + patch + valid[at + len(patch) :]


def clean(error: BaseException, memory_ok: bool = True) -> None:
    """The error a bad input may raise: ValueError or (if `memory_ok`) MemoryError with a one-line message."""
    allowed = (ValueError, MemoryError) if memory_ok else ValueError
    assert isinstance(error, allowed), f"unexpected {type(error).__name__}: {error}"
    assert "\n" not in str(error), f"multi-line message: {error}"


def check_model(path, memory_ok: bool = True) -> None:
    """Load, then generate: a clean error, or tokens. Weights that are finite but huge (a corrupted float's
    exponent) cannot be told from real ones at load; their overflow must then be reported, not turned into tokens.
    `memory_ok=False`: a MemoryError is a failure (a small file must never need much memory)."""
    try:
        model = load_model(path)
    except Exception as e:
        clean(e, memory_ok)
        return
    try:
        tokens = generate_plain(model, [1, 2, 3, 60], 2)
    except RuntimeError as e:
        assert "NaN" in str(e) and "\n" not in str(e), e
        return
    assert len(tokens) == 2 and all(0 <= t < model.cfg.vocab_size for t in tokens)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def model_dir(fuzz_dir):
    return shutil.copytree(MHA, fuzz_dir / "model")


def restore(d) -> None:
    (d / "config.json").write_bytes(CONFIG_BYTES)
    (d / "model.safetensors").write_bytes(WEIGHT_BYTES)


# ----------------------------------------------------------------------------------------------- loaders


@FUZZ
@given(data=corrupted(CONFIG_BYTES))
def test_corrupted_config_json(model_dir, data):
    restore(model_dir)
    (model_dir / "config.json").write_bytes(data)
    check_model(model_dir)


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(sorted(CONFIG) + ["rope_scaling", "rope_parameters"]), json_values),
    removed=st.sets(st.sampled_from(sorted(CONFIG))),
)
def test_config_fields_replaced_by_random_json(model_dir, changes, removed):
    restore(model_dir)
    config = {k: v for k, v in {**CONFIG, **changes}.items() if k not in removed}
    (model_dir / "config.json").write_text(json.dumps(config))
    check_model(model_dir)


@FUZZ
@given(
    scaling=st.fixed_dictionaries(
        {"rope_type": st.sampled_from(["linear", "dynamic", "yarn", "llama3", "ntk"])},
        optional={
            key: st.floats(-10, 1e6) | json_values
            for key in (
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "beta_fast",
                "beta_slow",
                "attention_factor",
                "original_max_position_embeddings",
                "truncate",
            )  # fmt: skip
        },
    ),
    theta=st.floats(1e-3, 1e7) | json_values,
)
def test_random_rope_scaling(model_dir, scaling, theta):
    """The rope fields reach the forward pass: a config that loads must give finite logits."""
    restore(model_dir)
    (model_dir / "config.json").write_text(json.dumps({**CONFIG, "rope_theta": theta, "rope_scaling": scaling}))
    check_model(model_dir)


@FUZZ
@given(data=corrupted(WEIGHT_BYTES))
def test_corrupted_safetensors(model_dir, data):
    restore(model_dir)
    (model_dir / "model.safetensors").write_bytes(data)
    check_model(model_dir)


@FUZZ
@given(header=st.dictionaries(st.sampled_from(["model.norm.weight", "lm_head.weight", "__metadata__"]), json_values),
       body=st.binary(max_size=64))  # fmt: skip
def test_safetensors_with_a_random_header(model_dir, header, body):
    restore(model_dir)
    text = json.dumps(header).encode()
    (model_dir / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + body)
    check_model(model_dir)


@FUZZ
@given(dims=st.tuples(*[st.integers(-3, 12)] * 7), body=st.integers(0, 6000), seed=st.integers(0, 3))
def test_llama2c_with_a_random_header(fuzz_dir, dims, body, seed):
    """Random small header values; a body of random length (of finite floats: sometimes exactly the right size)."""
    path = fuzz_dir / "fuzz.bin"
    floats = np.random.default_rng(seed).normal(0, 0.1, body).astype("<f4")
    path.write_bytes(struct.pack("<7i", *dims) + floats.tobytes())
    check_model(path)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_as_tokenizer_bias_and_trace(fuzz_dir, data):
    path = fuzz_dir / "fuzz.model"
    path.write_bytes(data)
    for load in (load_tokenizer, load_bias, load_trace):
        try:
            load(path)
        except Exception as e:
            clean(e)


# ----------------------------------------------------------------------------------------------- trace input

INPUT_KEYS = ["prefix_ids", "context_ids", "suffix_ids", "max_chunk_len", "target_len", "warmup_layers", "reduction"]
ids = st.lists(st.integers(-2, 70), max_size=40)
INPUT = st.fixed_dictionaries(
    {"prefix_ids": ids, "context_ids": ids, "suffix_ids": ids, "max_chunk_len": st.integers(-2, 40),
     "target_len": st.integers(-2, 40), "warmup_layers": st.integers(-1, 7)},
    optional={"reduction": st.sampled_from(["uncalibrated", "random", "calibrated", "top"]),
              "seed": st.integers(-(2**70), 2**70), "extra": json_values},
)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return load_model(MHA)


@FUZZ
@given(data=INPUT | json_values, replaced=st.dictionaries(st.sampled_from(INPUT_KEYS), json_values, max_size=2))
def test_random_trace_input(model, data, replaced):
    """parse_input, then the prefill: a ValueError naming the field, or a cache with the planned slots."""
    if isinstance(data, dict):
        data = {**data, **replaced}
    try:
        prefix, context, suffix, config = parse_input(data)
        cache = homer_prefill(model, prefix, context, suffix, config)
    except Exception as e:
        clean(e)
        return
    assert len(cache.positions) == cache.plan.final_len and torch.isfinite(cache.logits).all()


@settings(max_examples=25, deadline=None)
@given(data=corrupted(json.dumps({"prefix_ids": [1], "context_ids": list(range(2, 26)), "suffix_ids": [3],
       "max_chunk_len": 8, "target_len": 8, "warmup_layers": 0, "reduction": "random"}).encode()))  # fmt: skip
def test_corrupted_trace_input_file(fuzz_dir, data):
    """The command itself on corrupted input files: exit 0 (a trace written) or 2 (one error line)."""
    d = fuzz_dir
    (d / "in.json").write_bytes(data)
    out = d / "fuzz-trace.safetensors"
    out.unlink(missing_ok=True)
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        try:
            code = run_main(trace_main, ["--model", str(MHA), "--input", str(d / "in.json"), "--out", str(out)])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    err = stderr.getvalue()
    assert code in (0, 2) and "Traceback" not in err, err
    assert out.is_file() == (code == 0)
    if code == 2:
        assert err.splitlines()[-1].count("error: ") == 1


# ----------------------------------------------------------------------------------------------- traces

FOUR_LEAVES = MHA.parent.parent / "cases" / "four_leaves" / "trace.safetensors"
TRACE = load_trace(FOUR_LEAVES).tensors
random_arrays = hnp.arrays(
    st.sampled_from([np.int64, np.int32, np.float64, np.float32]),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=20),
    elements=st.integers(-3, 40),
)


@st.composite
def replacement(draw, key: str):
    """Delete the tensor, replace it by a random array, or shift its values (same shape, maybe out of range)."""
    how = draw(st.sampled_from(["delete", "random", "shift"]))
    if how == "delete":
        return None
    if how == "random":
        return draw(random_arrays)
    return TRACE[key] + draw(st.integers(-20, 20))


@FUZZ
@given(data=st.data(), keys=st.sets(st.sampled_from(sorted(TRACE)), min_size=1, max_size=3), swap=st.booleans())
def test_structurally_corrupted_traces(data, keys, swap):
    """compare_traces (the compare command) either reports divergences or refuses the file; exit 1 means 'diverge',
    so an unexpected exception there would be misread as a divergence. The validator lists problems, never raises."""
    corrupted = dict(TRACE)
    for key in keys:
        value = data.draw(replacement(key), label=key)
        if value is None:
            del corrupted[key]
        else:
            corrupted[key] = value
    problems = trace_problems({k: np.asarray(v) for k, v in corrupted.items()})  # --validate: a list, never a raise
    assert all(isinstance(p.message, str) and p.message for p in problems)
    expected, actual = (corrupted, FOUR_LEAVES) if swap else (FOUR_LEAVES, corrupted)
    try:
        report = compare_traces(expected, actual)
    except Exception as e:
        clean(e)
        return
    assert report.format() and report.to_dict()["ok"] == report.ok


# ----------------------------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_bytes(fuzz_dir) -> bytes:
    """A valid tiny GGUF file (F32, 64 ids, tok512's vocabulary cut to none: the model only)."""
    pytest.importorskip("gguf", reason="needs the models extra: pip install 'homer_ref[models]'")
    from helpers import make_hf_llama, write_tiny_gguf

    hf = make_hf_llama(fuzz_dir / "hf", vocab_size=64, hidden_size=16, intermediate_size=32, head_dim=4)
    write_tiny_gguf(fuzz_dir / "valid.gguf", hf, "F32")
    return (fuzz_dir / "valid.gguf").read_bytes()


GGUF_EXAMPLES = iter(range(10**9))  # a new file name per example: the reader is kept per (path, mtime, size)


@FUZZ
@given(data=st.data())
def test_corrupted_gguf(fuzz_dir, gguf_bytes, data):
    """Truncated, overwritten or random GGUF files: a clean error from load_model and load_tokenizer, or a model.
    Never a MemoryError: a 28 KB file needs no more than a few MB (one under `ulimit -v` is a blow-up caught)."""
    path = fuzz_dir / f"fuzz{next(GGUF_EXAMPLES)}.gguf"
    path.write_bytes(data.draw(corrupted(gguf_bytes)))
    check_model(path, memory_ok=False)
    try:
        load_tokenizer(path)
    except Exception as e:
        clean(e, memory_ok=False)
    path.unlink()


def after(data: bytes, name: str) -> int:
    """Where the field after the GGUF string `name` (a metadata key or tensor name) starts."""
    raw = name.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)


def put(where, fmt: str, *values):
    """A corruption: `values` packed as `fmt` over the bytes at `where(data)`."""

    def corrupt(data: bytes) -> bytes:
        at, raw = where(data), struct.pack(fmt, *values)
        return data[:at] + raw + data[at + len(raw) :]

    return corrupt


def field(name: str, skip: int = 0):
    """Where a field after the GGUF string `name` starts, `skip` bytes on. After a metadata key: its type (u32) at
    0, its value at 4. After a tensor name: n_dims (u32) at 0, dims (u64 each) at 4, then its type (u32) and
    offset (u64): for a 2-D tensor, at 20 and 24."""
    return lambda data: after(data, name) + skip


# name -> (corruption, a part of load_model's message): a large value in each count and length field. Offsets are
# found from the names, so that the cases follow changes to the test file (key order, names). "(*)": once blew up.
GGUF_CORRUPTIONS = {
    # (*) A loop over the layers (the checkpoint names): 4 billion of them, or 16 million (~20 GB of names).
    "llama.block_count 2**32-1": (put(field("llama.block_count", 4), "<I", 2**32 - 1), "block_count"),
    "llama.block_count 2**24": (put(field("llama.block_count", 4), "<I", 2**24), "block_count"),
    # (*) A key's type turned into 9 (array): its element type and count are read from the value's bytes (~10^18
    # items); the reader's slices past the end of the file are empty arrays, not errors, and it keeps each one.
    "a string key typed as an array": (put(field("general.architecture"), "<I", 9), "corrupt GGUF"),
    "an array of 2**62 uint8": (put(field("llama.block_count"), "<IIQ", 9, 0, 2**62), "corrupt GGUF"),
    "an int key typed as an array": (put(field("llama.context_length"), "<I", 9), "corrupt GGUF"),
    "tensor count 2**62": (put(lambda d: 8, "<Q", 2**62), "corrupt GGUF"),
    "metadata count 2**64-1": (put(lambda d: 16, "<Q", 2**64 - 1), "corrupt GGUF"),
    "a key 2**40 bytes long": (put(lambda d: 24, "<Q", 2**40), "corrupt GGUF"),
    "a string value 2**62 bytes long": (put(field("general.architecture", 4), "<Q", 2**62), "corrupt GGUF"),
    # (*) Dimensions read from the next fields: an offset of ~10^18, an OSError from seek().
    "n_dims 4 for a 2-D tensor": (put(field("output.weight", 0), "<I", 4), "corrupt GGUF"),
    "n_dims 2**32-1": (put(field("token_embd.weight", 0), "<I", 2**32 - 1), "corrupt GGUF"),
    "a dimension of 2**62": (put(field("token_embd.weight", 12), "<Q", 2**62), "corrupt GGUF"),
    "dims 2**32 x 2**32 (a uint64 product of 0)": (put(field("token_embd.weight", 4), "<QQ", 2**32, 2**32), "corrupt"),
    "a tensor offset of 2**63": (put(field("output.weight", 24), "<Q", 2**63), "corrupt GGUF"),
    "an unknown tensor type": (put(field("output.weight", 20), "<I", 2**32 - 1), "corrupt GGUF"),
    "a newline in a tensor name": (put(field("output.weight", -4), "<B", 10), "corrupt GGUF"),  # (*) 2-line error
}


@contextlib.contextmanager
def address_space_guard(headroom: int = 1 << 30):
    """While inside, a MemoryError (not the OOM killer) for mapping more than `headroom` bytes beyond what the
    process maps now: the soft RLIMIT_AS, restored after (Linux; elsewhere no guard)."""
    try:
        import resource

        with open("/proc/self/status") as f:
            mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration):
        mapped = None
    if mapped is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + headroom
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize("name", sorted(GGUF_CORRUPTIONS))
def test_corrupted_gguf_fields(fuzz_dir, gguf_bytes, name):
    """Each is refused with one line (CheckpointError) before anything large is allocated; under a guard, so that a
    regression fails here with a MemoryError instead of taking the machine's memory."""
    corrupt, expected = GGUF_CORRUPTIONS[name]
    path = fuzz_dir / f"known{sorted(GGUF_CORRUPTIONS).index(name)}.gguf"
    data = corrupt(gguf_bytes)
    assert len(data) == len(gguf_bytes) and data != gguf_bytes
    path.write_bytes(data)
    for load in (load_model, load_tokenizer):
        with address_space_guard(), pytest.raises(CheckpointError) as info:
            load(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value), info.value
        if load is load_model:
            assert expected in str(info.value), info.value
