"""Errors from the Python API: every bad input is refused with one exception whose one-line message names the problem.

One table per entry point — load_model (HF directories and llama2.c .bin), load_tokenizer / check_tokenizer,
homer_prefill, decoding, calibration, load_bias, load_trace — plus NaN/Inf weights (detected at load, or
reported instead of propagated) and the up-front memory estimates. Invalid input raises ValueError
(CheckpointError for files); an out-of-memory-sized request raises MemoryError before allocating; NaN produced at
run time raises RuntimeError.

Cases already pinned elsewhere are not repeated: test_loading.py (missing config.json, missing or mis-shaped
tensor, KV heads, unknown rope type, truncated stories260K.bin, missing tokenizer), test_plan.py (every HOMER_SPEC
N.2.6 configuration, bias layer count / length / NaN, ids outside the vocabulary, calibrated without bias),
test_deviations.py (batches, float ids), test_compare.py (missing, garbage, non-trace and future-version traces).
All models here are tiny (fixtures/models/mha: L=6, V=64, D=16) or written by the test.
"""

import json
import shutil
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, STORIES_DIR
from safetensors.torch import load_file, save_file

from homer_ref import CheckpointError, budget, load_model, load_tokenizer
from homer_ref.decoding import generate_plain
from homer_ref.homer import continuation_logits, homer_generate, homer_prefill
from homer_ref.homer.calibration import calibrate, calibrate_on_context, load_bias, windows_from_ids
from homer_ref.homer.plan import HomerConfig
from homer_ref.homer.prefill import homer_bytes
from homer_ref.loading import check_tokenizer
from homer_ref.testing import load_trace

STORIES_TOKENIZER = STORIES_DIR / "tok512.model"
MHA = ROOT / "fixtures" / "models" / "mha"  # L=6, V=64, D=16, Hq=Hkv=4, Dh=4, F=32, trained context 64
L, V = 6, 64
GOOD_IDS = dict(prefix_ids=[1], context_ids=list(range(2, 26)), suffix_ids=[3])  # 4 leaves of E=6 at M=8
GOOD_CONFIG = HomerConfig(8, 8, 0, "uncalibrated")


@dataclass(frozen=True)
class Case:
    make: object  # (root: Path) -> the argument to pass (a path, usually)
    error: type
    names: tuple[str, ...]  # fragments the one-line message must contain
    kwargs: dict = field(default_factory=dict)


def check_message(error: BaseException, names) -> None:
    message = str(error)
    assert "\n" not in message, f"multi-line message: {message!r}"
    for fragment in names:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def train_tokenizer(path: Path, vocab_size: int) -> Path:
    """A real sentencepiece model of `vocab_size` pieces, trained in ~40 ms on a made-up corpus."""
    import random

    import sentencepiece as spm

    words = "the cat sat on mat a dog ran to park and blue sky once upon time little girl named lily".split()
    rng = random.Random(0)
    corpus = path.with_suffix(".txt")
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size, model_type="bpe",
        minloglevel=2,
    )  # fmt: skip
    return path


# ----------------------------------------------------------------------------------------------- file builders


def model_dir(root: Path, name: str, config: dict | None = None, raw_config: bytes | None = None, tensors=None,
              weights: bytes | None = None) -> Path:  # fmt: skip
    """A copy of fixtures/models/mha under root/name with config.json changed (None deletes a key), config.json
    replaced by raw bytes, its tensors edited by `tensors(dict)`, or model.safetensors replaced by raw bytes."""
    d = root / name
    shutil.copytree(MHA, d)
    if config is not None:
        c = json.loads((d / "config.json").read_text())
        c.update(config)
        (d / "config.json").write_text(json.dumps({k: v for k, v in c.items() if v is not None}))
    if raw_config is not None:
        (d / "config.json").write_bytes(raw_config)
    if tensors is not None:
        t = load_file(d / "model.safetensors")
        tensors(t)
        save_file(t, d / "model.safetensors")
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    return d


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def replace_file_by_dir(d: Path, name: str) -> Path:
    (d / name).unlink()
    (d / name).mkdir()
    return d


def put(name: str, tensor: torch.Tensor):
    return lambda t: t.update({name: tensor})


def set_value(name: str, value: float, index=(0, 0)):
    def edit(t):
        t[name][index] = value

    return edit


def sharded(root: Path, name: str, index_text: str) -> Path:
    d = root / name
    shutil.copytree(MHA, d)
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(index_text)
    return d


def write_llama2c(path: Path, dim=8, hidden=16, layers=2, heads=2, kv_heads=2, vocab=-16, seq_len=8,
                  cut: int = 0, extra: bytes = b"", nan_at: int | None = None) -> Path:  # fmt: skip
    """A llama2.c legacy checkpoint (header + float32 arrays in the README's order), random weights.
    vocab < 0: untied head stored at the end. `cut` drops bytes from the end; `nan_at` puts a NaN at that float."""
    V, Dh = abs(vocab), dim // heads
    counts = [V * dim, layers * dim, layers * heads * Dh * dim, 2 * layers * kv_heads * Dh * dim]
    counts += [layers * dim * heads * Dh, layers * dim, 3 * layers * hidden * dim, dim, seq_len * Dh]
    counts += [V * dim] if vocab < 0 else []
    floats = np.random.default_rng(0).normal(0, 0.1, sum(counts)).astype("<f4")
    if nan_at is not None:
        floats[nan_at] = np.nan
    data = struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq_len) + floats.tobytes() + extra
    path.write_bytes(data[: len(data) - cut])
    return path


# ----------------------------------------------------------------------------------------------- load_model

_MAGIC_V1 = struct.pack("<I", 0x616B3432)

LOAD_MODEL = {
    # --- paths, dtype, device
    "path is None": Case(lambda r: None, ValueError, ("needs a path",)),
    "path does not exist": Case(lambda r: r / "absent", CheckpointError, ("absent", "no such file or directory")),
    "config.json is a directory": Case(lambda r: replace_file_by_dir(model_dir(r, "cfgdir"), "config.json"),
                                       CheckpointError, ("no config.json",)),
    "model.safetensors is a directory": Case(lambda r: replace_file_by_dir(model_dir(r, "stdir"), "model.safetensors"),
                                             CheckpointError, ("no model.safetensors",)),
    "only a pickled pytorch_model.bin": Case(
        lambda r: (r / "pickled/model.safetensors").rename(r / "pickled/pytorch_model.bin").parent,
        CheckpointError, ("never loads pickled", "safe_serialization=True"),
    ),
    "a legacy torch.save pickle passed as the file": Case(
        lambda r: torch.save([1], r / "legacy.pt", _use_new_zipfile_serialization=False) or r / "legacy.pt",
        CheckpointError, ("pickled PyTorch checkpoint",),
    ),
    "a pickled pytorch_model.bin passed as the file": Case(
        lambda r: torch.save({"w": torch.ones(2)}, r / "pytorch_model.bin") or r / "pytorch_model.bin",
        CheckpointError, ("pickled PyTorch checkpoint", "safe_serialization=True"),
    ),
    "dtype not a floating torch.dtype": Case(lambda r: MHA, ValueError, ("dtype", "torch.int64"),
                                             dict(dtype=torch.int64)),
    "dtype given as a string": Case(lambda r: MHA, ValueError, ("dtype", "'float32'"), dict(dtype="float32")),
    "device that does not exist": Case(lambda r: MHA, ValueError, ("'nodevice'", "not a torch device"),
                                       dict(device="nodevice")),
    # --- config.json: unreadable, missing, wrong-typed or inconsistent fields
    "config.json not UTF-8": Case(lambda r: model_dir(r, "latin1", raw_config=b'{"vocab_size": "\xe9"}'),
                                  CheckpointError, ("config.json", "not valid JSON")),
    "config.json truncated": Case(lambda r: model_dir(r, "cut", raw_config=b'{"vocab_size": 64, "hid'),
                                  CheckpointError, ("config.json", "not valid JSON")),
    "config.json not an object": Case(lambda r: model_dir(r, "list", raw_config=b"[64, 16]"), CheckpointError,
                                      ("config.json", "expected a JSON object, got list")),
    "config.json nested too deep": Case(lambda r: model_dir(r, "deep", raw_config=b"[" * 100_000),
                                        CheckpointError, ("config.json", "not valid JSON")),
    "missing hidden_size": Case(lambda r: model_dir(r, "nohidden", config=dict(hidden_size=None)), CheckpointError,
                                ("'hidden_size' must be a positive integer, got None",)),
    "vocab_size a string": Case(lambda r: model_dir(r, "strvocab", config=dict(vocab_size="64")), CheckpointError,
                                ("'vocab_size'", "'64'")),
    "num_hidden_layers a float": Case(lambda r: model_dir(r, "floatL", config=dict(num_hidden_layers=6.0)),
                                      CheckpointError, ("'num_hidden_layers'", "6.0")),
    "num_hidden_layers 2^40 (names would fill memory)": Case(
        lambda r: model_dir(r, "hugeL", config=dict(num_hidden_layers=2**40)), CheckpointError,
        ("config says 1099511627776 layers but the checkpoint holds 6",)),
    "num_attention_heads zero": Case(lambda r: model_dir(r, "zeroH", config=dict(num_attention_heads=0)),
                                     CheckpointError, ("'num_attention_heads'",)),
    "heads not dividing hidden_size": Case(
        lambda r: model_dir(r, "heads", config=dict(num_attention_heads=3, num_key_value_heads=3, head_dim=None)),
        CheckpointError, ("hidden_size 16 is not divisible by num_attention_heads 3",),
    ),
    "num_key_value_heads above num_attention_heads": Case(
        lambda r: model_dir(r, "kv8", config=dict(num_key_value_heads=8)), CheckpointError,
        ("num_attention_heads 4 is not a multiple of num_key_value_heads 8",),
    ),
    "odd head_dim": Case(lambda r: model_dir(r, "odd", config=dict(head_dim=5)), CheckpointError, ("head_dim 5",)),
    "rms_norm_eps NaN": Case(lambda r: model_dir(r, "epsnan", raw_config=(MHA / "config.json").read_bytes()
                                                 .replace(b'"rms_norm_eps": 1e-05', b'"rms_norm_eps": NaN')),
                             CheckpointError, ("'rms_norm_eps'", "nan")),
    "rope_scaling not an object": Case(lambda r: model_dir(r, "rs", config=dict(rope_scaling="linear")),
                                       CheckpointError, ("'rope_scaling' must be an object",)),
    "rope_scaling without its factor": Case(
        lambda r: model_dir(r, "nofactor", config=dict(rope_scaling={"rope_type": "linear"})), CheckpointError,
        ("'linear' needs a positive 'factor'",),
    ),
    "llama3 rope with high_freq_factor <= low_freq_factor": Case(
        lambda r: model_dir(r, "llama3", config=dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                            "low_freq_factor": 4.0, "high_freq_factor": 4.0})),  # fmt: skip
        CheckpointError, ("high_freq_factor > low_freq_factor",),
    ),
    "tie_word_embeddings a string": Case(  # bool("false") is True: this used to load a silently wrong model
        lambda r: model_dir(r, "tiestr", config=dict(tie_word_embeddings="false")), CheckpointError,
        ("'tie_word_embeddings' must be true or false, got 'false'",),
    ),
    "hidden_act not silu": Case(lambda r: model_dir(r, "gelu", config=dict(hidden_act="gelu")), CheckpointError,
                                ("hidden_act='gelu'",)),
    "config describing a model that does not fit the file": Case(
        lambda r: model_dir(r, "huge", config=dict(vocab_size=10**12)), CheckpointError,  # built on meta: no alloc
        ("model.embed_tokens.weight", "(1000000000000, 16)"),
    ),
    # --- safetensors: corrupt, truncated, non-finite
    "model.safetensors empty": Case(lambda r: model_dir(r, "empty", weights=b""), CheckpointError,
                                    ("model.safetensors", "not a readable safetensors file")),
    "model.safetensors truncated": Case(
        lambda r: model_dir(r, "trunc", weights=(MHA / "model.safetensors").read_bytes()[:40_000]), CheckpointError,
        ("model.safetensors", "not a readable safetensors file", "re-download"),
    ),
    "model.safetensors with a garbage header": Case(
        lambda r: model_dir(r, "garbage", weights=struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 64),
        CheckpointError, ("not a readable safetensors file",),
    ),
    "integer tensor": Case(
        lambda r: model_dir(r, "int", tensors=put("model.norm.weight", torch.ones(16, dtype=torch.int32))),
        CheckpointError, ("model.norm.weight", "integer dtype"),
    ),
    "unexpected extra tensor": Case(
        lambda r: model_dir(r, "extra", tensors=put("model.layers.0.self_attn.q_proj.bias", torch.ones(16))),
        CheckpointError, ("unexpected tensor 'model.layers.0.self_attn.q_proj.bias'",),
    ),
    "NaN in a weight": Case(
        lambda r: model_dir(r, "nan", tensors=set_value("model.layers.3.mlp.up_proj.weight", np.nan)),
        CheckpointError, ("model.layers.3.mlp.up_proj.weight", "NaN/Inf", "corrupt"),
    ),
    "+Inf in a weight": Case(lambda r: model_dir(r, "inf", tensors=set_value("lm_head.weight", np.inf, (5, 2))),
                             CheckpointError, ("'lm_head.weight'", "1 NaN/Inf")),
    "weight overflowing float16": Case(
        lambda r: model_dir(r, "big", tensors=set_value("model.embed_tokens.weight", 1e6)), CheckpointError,
        ("model.embed_tokens.weight", "overflows torch.float16", "float32"), dict(dtype=torch.float16),
    ),
    # --- sharded checkpoints: a malformed index
    "index not JSON": Case(lambda r: sharded(r, "idxjson", "{weight_map"), CheckpointError,
                           ("model.safetensors.index.json", "not a valid safetensors index")),
    "index weight_map a list": Case(lambda r: sharded(r, "idxlist", '{"weight_map": ["a"]}'), CheckpointError,
                                    ("'weight_map' must map tensor names to shard file names",)),
    "index naming a missing shard": Case(
        lambda r: sharded(r, "idxmiss", json.dumps({"weight_map": {"model.norm.weight": "gone.safetensors"}})),
        CheckpointError, ("gone.safetensors", "not a readable safetensors file"),
    ),
    # --- llama2.c .bin
    "llama2.c shorter than its header": Case(lambda r: write(r / "short.bin", b"\1" * 10), CheckpointError,
                                             ("10 bytes is too short",)),
    "llama2.c v1/v2 export": Case(lambda r: write(r / "v1.bin", _MAGIC_V1 + b"\0" * 64), CheckpointError,
                                  ("export --version 0",)),
    "llama2.c negative dimension": Case(lambda r: write(r / "neg.bin", struct.pack("<7i", 8, 16, -2, 2, 2, 16, 8)),
                                        CheckpointError, ("(header)", "'num_hidden_layers'", "-2")),
    "llama2.c heads not dividing dim": Case(lambda r: write_llama2c(r / "heads.bin", heads=3, kv_heads=3),
                                            CheckpointError, ("(header)", "not divisible by num_attention_heads 3")),
    "llama2.c truncated": Case(lambda r: write_llama2c(r / "cut.bin", cut=100), CheckpointError,
                               ("truncated", "'lm_head.weight'", "re-download")),
    "llama2.c with trailing bytes": Case(lambda r: write_llama2c(r / "extra.bin", extra=b"\0" * 12), CheckpointError,
                                         ("12 unexpected bytes",)),
    "llama2.c with a NaN weight": Case(lambda r: write_llama2c(r / "nan.bin", nan_at=16 * 8 + 3), CheckpointError,
                                       ("model.layers.0.input_layernorm.weight", "NaN/Inf")),
}  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("errors-api")


@pytest.mark.parametrize("name", sorted(LOAD_MODEL))
def test_load_model_refuses(root, name):
    case = LOAD_MODEL[name]
    if name == "only a pickled pytorch_model.bin":
        model_dir(root, "pickled")
    with pytest.raises(case.error) as info:
        load_model(case.make(root), **case.kwargs)
    check_message(info.value, case.names)


def test_the_llama2c_writer_and_the_fixture_are_valid(root):
    """The good inputs the table corrupts load fine, so each case fails for its one defect."""
    model = load_model(write_llama2c(root / "good.bin"))
    assert (model.cfg.num_hidden_layers, model.cfg.vocab_size, model.cfg.tie_word_embeddings) == (2, 16, False)
    assert load_model(write_llama2c(root / "dim128.bin", dim=128)).cfg.hidden_size == 128  # starts with byte 0x80
    assert load_model(MHA, dtype=torch.float16).embed_tokens.weight.dtype == torch.float16
    index = {"weight_map": {k: "model-00001-of-00001.safetensors" for k in load_file(MHA / "model.safetensors")}}
    assert load_model(sharded(root, "good-shard", json.dumps(index))).cfg.vocab_size == V


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_load_model_on_cuda_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model(MHA, device="cuda")


# ----------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok64(root) -> Path:
    return train_tokenizer(root / "tok64.model", 64)


TOKENIZER = {
    "path is None": Case(lambda r: None, ValueError, ("needs a path",)),
    "random bytes": Case(lambda r: write(r / "g.model", b"\x8f\x01" * 50), CheckpointError,
                         ("g.model", "not a sentencepiece model")),
    "empty file": Case(lambda r: write(r / "e.model", b""), CheckpointError, ("e.model", "not a sentencepiece model")),
    "a text file": Case(
        lambda r: write(r / "notes.txt", b"hello"), CheckpointError, ("notes.txt", "not a sentencepiece model")
    ),
    "a JSON file that is not a tokenizer.json": Case(
        lambda r: MHA / "config.json", CheckpointError, ("config.json", "not a readable tokenizer.json")
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TOKENIZER))
def test_load_tokenizer_refuses(root, name):
    case = TOKENIZER[name]
    with pytest.raises(case.error) as info:
        load_tokenizer(case.make(root))
    check_message(info.value, case.names)


def test_tokenizer_and_model_vocabularies_must_agree(tok64):
    tok, cfg = load_tokenizer(tok64), load_model(MHA).cfg
    check_tokenizer(tok, cfg)  # 64 == 64
    with pytest.raises(ValueError) as info:
        check_tokenizer(tok, replace(cfg, vocab_size=61))
    check_message(info.value, ("64 pieces", "vocabulary is 61", "--tokenizer"))


# ----------------------------------------------------------------------------------------------- homer_prefill


@pytest.fixture(scope="module")
def model():
    return load_model(MHA)


def nan_model(where: str = "model.layers.0.mlp.up_proj.weight"):
    m = load_model(MHA)
    m.get_parameter(where.removeprefix("model.")).data[0, 0] = float("nan")
    return m


PREFILL = {
    # name: (changes to GOOD_IDS / config / bias / traversal, error, fragments)
    "config a dict": (dict(config={"max_chunk_len": 8}), ValueError, ("HomerConfig", "dict")),
    "max_chunk_len a string": (dict(config=HomerConfig("8")), ValueError, ("max_chunk_len must be an integer",)),
    "max_chunk_len a bool": (dict(config=HomerConfig(True)), ValueError, ("max_chunk_len must be an integer",)),
    "negative warmup_layers": (dict(config=HomerConfig(8, warmup_layers=-1)), ValueError, ("W=-1",)),
    "unknown reduction": (dict(config=HomerConfig(8, reduction="topk")), ValueError, ("reduction", "'topk'")),
    "context_ids None": (dict(context_ids=None), ValueError, ("context_ids", "list of integer token ids")),
    "context_ids a string": (dict(context_ids="the cat"), ValueError, ("context_ids", "got str")),
    "suffix_ids a float tensor": (dict(suffix_ids=torch.tensor([3.0])), ValueError, ("suffix_ids", "1-D integer")),
    "unknown traversal": (dict(traversal="breadth"), ValueError, ("traversal must be one of", "'breadth'")),
    "bias a list": (dict(bias=[[0.0] * 8] * L), ValueError, ("bias table must be a float tensor",)),
    "bias of integers": (dict(bias=torch.zeros(L, 8, dtype=torch.int64)), ValueError, ("float tensor",)),
    "bias 1-D": (dict(bias=torch.zeros(8)), ValueError, ("[num_layers, width]",)),
    "bias with +Inf": (dict(bias=torch.zeros(L, 8).index_fill(1, torch.tensor([2]), float("inf"))), ValueError,
                       ("NaN or Inf", "recalibrate")),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PREFILL))
def test_homer_prefill_refuses(model, name):
    changes, error, names = PREFILL[name]
    kwargs = {**GOOD_IDS, "config": GOOD_CONFIG, **changes}
    if "bias" in changes:
        kwargs["config"] = HomerConfig(8, 8, 0, "calibrated")
    with pytest.raises(error) as info:
        homer_prefill(model, **kwargs)
    check_message(info.value, names)


def test_nan_weights_are_reported_not_propagated():
    """A model holding NaN (built in Python, so not caught by the loader): pruning refuses NaN scores; without
    pruning (one leaf, nothing removed) the prefill refuses NaN logits instead of returning them."""
    m = nan_model()
    with pytest.raises(ValueError, match="significance scores contain NaN"):
        homer_prefill(m, **GOOD_IDS, config=GOOD_CONFIG)
    with pytest.raises(RuntimeError) as info:
        homer_prefill(m, [1], [], [3, 4], GOOD_CONFIG)
    check_message(info.value, ("NaN/Inf logits", "float32"))
    with pytest.raises(RuntimeError, match="NaN logits"):
        generate_plain(m, [1, 2, 3], 2)


# ----------------------------------------------------------------------------------------------- decoding

DECODING = {
    # name: (prompt, max_new_tokens, sampling kwargs, fragments) -> ValueError
    "empty prompt": ([], 3, {}, ("prompt_ids is empty", "BOS")),
    "prompt None": (None, 3, {}, ("prompt_ids", "got NoneType")),
    "id at the vocabulary size": ([1, 64], 3, {}, ("token id 64", "[0, 64)")),
    "negative id": ([-1, 5], 3, {}, ("token id -1",)),
    "temperature NaN": ([1], 3, dict(temperature=float("nan")), ("temperature must be finite",)),
    "temperature +Inf": ([1], 3, dict(temperature=float("inf")), ("temperature must be finite",)),
    "negative temperature": ([1], 3, dict(temperature=-0.5), ("temperature",)),
    "top_p 0": ([1], 3, dict(top_p=0.0), ("top_p in (0, 1]",)),
    "top_p above 1": ([1], 3, dict(top_p=1.5), ("top_p in (0, 1]",)),
    "max_new_tokens a float": ([1], 2.5, {}, ("max_new_tokens must be an integer",)),
    "seed a string": ([1], 3, dict(seed="7"), ("seed must be an integer",)),
    "seed beyond 64 bits": ([1], 3, dict(seed=2**64), ("seed must be a 64-bit integer",)),
}


@pytest.mark.parametrize("name", sorted(DECODING))
def test_decoding_refuses(model, name):
    prompt, n, sampling, names = DECODING[name]
    with pytest.raises(ValueError) as info:
        generate_plain(model, prompt, n, **sampling)
    check_message(info.value, names)


def test_homer_continuation_refuses_bad_ids_and_sampling(model):
    cache = homer_prefill(model, **GOOD_IDS, config=GOOD_CONFIG)
    with pytest.raises(ValueError, match="token id 99"):
        continuation_logits(model, cache, [5, 99])
    with pytest.raises(ValueError, match="top_p"):
        homer_generate(model, cache, 3, top_p=2.0)


# ----------------------------------------------------------------------------------------------- calibration

CALIBRATION = {
    "no windows": (lambda m: calibrate(m, []), ("at least one window",)),
    "windows of different lengths": (lambda m: calibrate(m, [[1, 2], [1]]), ("same non-zero length",)),
    "window id outside the vocabulary": (lambda m: calibrate(m, [[1, 64]]), ("calibration window", "token id 64")),
    "window length 0": (lambda m: windows_from_ids([1, 2, 3], 0, 2), ("must be >= 1, got 0",)),
    "0 samples": (lambda m: windows_from_ids([1, 2, 3], 2, 0), ("samples must be >= 1",)),
    "empty context": (lambda m: calibrate_on_context(m, [], 8), ("empty context", "uncalibrated")),
}


@pytest.mark.parametrize("name", sorted(CALIBRATION))
def test_calibration_refuses(model, name):
    call, names = CALIBRATION[name]
    with pytest.raises(ValueError) as info:
        call(model)
    check_message(info.value, names)


# ----------------------------------------------------------------------------------------------- bias and trace files


def _safetensors(path: Path, tensors: dict) -> Path:
    save_file(tensors, str(path))
    return path


BIAS_FILES = {
    "missing": (lambda r: r / "absent.safetensors", ("absent.safetensors", "not a readable safetensors file")),
    "a JSON file": (lambda r: MHA / "config.json", ("config.json", "not a readable safetensors file")),
    "no 'bias' tensor": (lambda r: _safetensors(r / "nb.st", {"scale": torch.zeros(L, 8)}),
                         ("no tensor named 'bias'", "found scale")),
    "bias 1-D": (lambda r: _safetensors(r / "b1.st", {"bias": torch.zeros(8)}), ("float32 [8]", "[num_layers, width]")),
    "bias of integers": (lambda r: _safetensors(r / "bi.st", {"bias": torch.zeros(L, 8, dtype=torch.int32)}),
                         ("int32 [6, 8]", "python -m homer_ref.calibrate")),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BIAS_FILES))
def test_load_bias_refuses(root, name):
    make, names = BIAS_FILES[name]
    with pytest.raises(ValueError) as info:
        load_bias(make(root))
    check_message(info.value, names)


@pytest.mark.parametrize("what", ["directory", "input JSON"])
def test_load_trace_refuses_what_is_not_a_trace_file(what):
    path = ROOT / "fixtures" / "cases" if what == "directory" else MHA / "config.json"
    with pytest.raises(ValueError) as info:
        load_trace(path)
    check_message(info.value, ("is a directory",) if what == "directory" else ("TRACE_FORMAT.md",))


# ----------------------------------------------------------------------------------------------- memory


def test_available_memory_is_known_on_linux():
    free = budget.available_bytes("cpu")
    assert free is None or free > 0
    assert budget.available_bytes("meta") is None


def test_the_prefill_estimate_covers_the_measured_kv(model):
    """The estimate checked up front includes exactly the live KV the traversal then measures (plus more)."""
    for traversal in ("depth_first", "level_order"):
        cache = homer_prefill(model, **GOOD_IDS, config=GOOD_CONFIG, traversal=traversal)
        estimate = homer_bytes(model.cfg, cache.plan, traversal, 4)
        assert budget.kv_bytes(model.cfg, cache.peak_kv_token_layers, 4) == cache.peak_kv_bytes
        assert estimate > cache.peak_kv_bytes


def test_out_of_memory_requests_are_refused_up_front(model, monkeypatch):
    # Real requests too large for any machine: a trillion new tokens.
    with pytest.raises(MemoryError) as info:
        generate_plain(model, [1, 2, 3], 10**12)
    check_message(info.value, ("plain inference on 3 + 1000000000000 tokens", "GiB", "available", "HOMER"))
    cache = homer_prefill(model, **GOOD_IDS, config=GOOD_CONFIG)
    with pytest.raises(MemoryError, match="generating 1000000000000 tokens"):
        homer_generate(model, cache, 10**12)
    # A machine with 1 KiB free: the prefill and the loader refuse before allocating.
    monkeypatch.setattr(budget, "available_bytes", lambda device="cpu": 1024)
    with pytest.raises(MemoryError) as info:
        homer_prefill(model, **GOOD_IDS, config=GOOD_CONFIG)
    check_message(info.value, ("HOMER on 26 tokens (4 leaves)", "only 1 KiB is available", "max_chunk_len"))
    with pytest.raises(MemoryError, match="reading .*model.safetensors"):
        load_model(MHA)


# ----------------------------------------------------------------------------------------------- GGUF files


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random HF Llama (float32) to write GGUF files from."""
    from helpers import make_hf_llama

    pytest.importorskip("gguf", reason="needs the models extra: pip install 'homer_ref[models]'")
    return make_hf_llama(tmp_path_factory.mktemp("hf") / "m", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip


def gguf_file(root: Path, hf, name: str, **kwargs) -> Path:
    from helpers import write_tiny_gguf

    write_tiny_gguf(root / name, hf, "F32", **kwargs)
    return root / name


def cut_gguf(root: Path, hf, keep: float) -> Path:
    path = gguf_file(root, hf, f"cut{keep}.gguf")
    data = path.read_bytes()
    return write(root / f"truncated{keep}.gguf", data[: int(len(data) * keep)])


LOAD_GGUF = {
    "not a GGUF file": (lambda r, hf: write(r / "x.gguf", b"GGML" + b"\0" * 64), ("x.gguf", "not a GGUF file")),
    "empty file": (lambda r, hf: write(r / "e.gguf", b""), ("e.gguf", "not a GGUF file")),
    "GGUF version 1": (lambda r, hf: write(r / "v1.gguf", b"GGUF\x01\0\0\0" + b"\0" * 64), ("version 1",)),
    "truncated in the metadata": (lambda r, hf: cut_gguf(r, hf, 0.01), ("truncated0.01.gguf", "truncated or corrupt")),
    "truncated in the tensors": (lambda r, hf: cut_gguf(r, hf, 0.9), ("truncated0.9.gguf", "truncated or corrupt")),
    "another architecture": (
        lambda r, hf: gguf_file(r, hf, "qwen.gguf", metadata={"general.architecture": "qwen2"}),
        ("architecture 'qwen2' is not supported", "llama"),
    ),
    "a missing metadata key": (
        lambda r, hf: gguf_file(r, hf, "nokey.gguf", metadata={"llama.block_count": None}),
        ("missing GGUF metadata key 'llama.block_count'",),
    ),
    "a missing tensor": (
        lambda r, hf: gguf_file(r, hf, "notensor.gguf", skip=("blk.1.ffn_up.weight",)),
        ("missing tensor 'model.layers.1.mlp.up_proj.weight'",),
    ),
    "per-frequency RoPE factors that are not llama3's": (
        lambda r, hf: gguf_file(r, hf, "ropefreqs.gguf", extra={"rope_freqs.weight": [1.0, 2.0, 1.0, 3.0]}),
        ("rope_freqs.weight", "llama3"),
    ),
    "an unsupported RoPE scaling type": (
        lambda r, hf: gguf_file(r, hf, "longrope.gguf", metadata={"llama.rope.scaling.type": "longrope"}),
        ("'longrope' is not supported",),
    ),
}


@pytest.mark.parametrize("name", sorted(LOAD_GGUF))
def test_load_gguf_refuses(root, tiny_hf, name):
    make, names = LOAD_GGUF[name]
    with pytest.raises(CheckpointError) as info:
        load_model(make(root, tiny_hf))
    check_message(info.value, names)


def test_gguf_tokenizer_errors(root, tiny_hf):
    """A GGUF file without a vocabulary, or with a tokenizer type homer_ref does not build, names the key."""
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(gguf_file(root, tiny_hf, "novocab.gguf"))
    check_message(info.value, ("missing GGUF metadata key 'tokenizer.ggml.model'",))
    path = gguf_file(
        root, tiny_hf, "bert.gguf", metadata={"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}
    )
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(path)
    check_message(info.value, ("tokenizer.ggml.model 'bert' is not supported",))


@pytest.mark.parametrize(
    "module, make",
    [
        ("gguf", lambda r, hf: gguf_file(r, hf, "noextra.gguf")),
        ("tokenizers", lambda r, hf: write(r / "tokenizer.json", b"{}")),
    ],
)
def test_missing_models_extra_is_one_line_naming_it(root, tiny_hf, monkeypatch, module, make):
    """Without the optional packages, a GGUF file or a tokenizer.json says which extra to install."""
    import sys

    path = make(root, tiny_hf)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(CheckpointError) as info:
        (load_model if path.suffix == ".gguf" else load_tokenizer)(path)
    check_message(info.value, (f"'{module}' package", "pip install 'homer_ref[models]'"))


def test_missing_jinja2_for_a_chat_template(root, tiny_hf, monkeypatch):
    import sys

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    metadata = {"tokenizer.chat_template": template}
    tok = load_tokenizer(gguf_file(root, tiny_hf, "chat.gguf", tokenizer_model=STORIES_TOKENIZER, metadata=metadata))
    assert tok.apply_chat([{"role": "user", "content": "hi"}]) == "<user>hi"
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(CheckpointError) as info:
        tok.apply_chat([{"role": "user", "content": "hi"}])
    check_message(info.value, ("'jinja2' package", "pip install 'homer_ref[models]'"))
