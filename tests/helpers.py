"""What the Llama tests share: the tolerances (the only place they are written), a comparison that explains its
failures, tiny random HF checkpoints, an independent llama2.c -> HF converter, and the shared test data.

Goldens come only from sources independent of homer_ref: the float64 NumPy oracle (`reference/llama_np.py`),
HF `transformers` (`LlamaForCausalLM`, built here from tiny random configs: nothing is downloaded), and
llama2.c's expected greedy text for stories260K.

Dimension legend (as in homer_ref): B n D V Hq Hkv Dh (n tokens); L layers; F MLP width.
"""

import copy
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent  # the project root
STORIES_DIR = ROOT / "homer_ref" / "data" / "stories260K"  # llama2.c's stories260K, vendored (see its README)


# ----------------------------------------------------------------------------------------------- tolerances


@dataclass(frozen=True)
class Tol:
    """An element passes when |actual - expected| <= atol + rtol * |expected|."""

    atol: float
    rtol: float = 0.0


TOL = {
    # torch float64 vs the float64 oracle: the same math in a different order, so rounding only (~1e-14 seen).
    "oracle_float64": Tol(1e-9),
    # torch float32 vs the float64 oracle: float32 rounding through L layers of O(1) activations.
    "oracle_float32": Tol(1e-4),
    # torch float32 vs HF float32: both float32, and HF also computes RoPE angles in float32 (we use float64).
    "hf_float32": Tol(1e-4),
    # bf16 weights upcast to float32 are exact, so a bf16 checkpoint loaded in float32 is a float32 comparison.
    "hf_bf16_weights": Tol(1e-4),
    # torch float64 layer halves (attend / feed_forward) vs the oracle's, including the last-query logits.
    "layer_float64": Tol(1e-10),
    # the same float64 model run incrementally (KV cache) vs in one call: same math, different reduction shapes.
    "cache_float64": Tol(1e-10),
    # RoPE identities in float64 (norms, relative positions): exact up to rounding of O(1..100) numbers.
    "rope_float64": Tol(1e-10, 1e-12),
    # our inverse frequencies vs HF's (HF computes them in float32: relative error ~1e-7).
    "rope_inv_freq_hf": Tol(0.0, 1e-6),
    # cos/sin vs HF's rotary embedding at positions < 256: HF's float32 angles drift by ~position * 6e-8.
    "rope_cos_sin_hf": Tol(5e-5),
    # a llama2.c .bin vs its independent HF conversion run through the oracle (float32 weights, float32 run).
    "stories_oracle_float32": Tol(1e-4),
    # GGUF weights dequantized by homer_ref (gguf.quants, float32) vs by transformers (its own torch code): the same
    # block formulas in another order of float32 operations (0.0 measured for SmolLM2's Q4_1 / Q8_0 / F32).
    "gguf_dequantized": Tol(1e-6),
    # SmolLM2-135M (30 layers) float32 logits vs HF float32 on 300+ tokens: float32 rounding through 30 layers
    # of logits of magnitude ~20 (measured: 9.3e-5 at 300 tokens, 4.6e-4 to 8.1e-4 at 2,000, across kernels).
    "smollm2_float32": Tol(1e-3),
    # A committed float32 fixture trace (fixtures/cases/*/trace.safetensors) vs the same case regenerated in float64
    # (tests/test_fixtures.py): float32 rounding through the tiny models. `python scripts/make_fixtures.py --spread`
    # on an AMD EPYC (AVX2, no AVX-512), under MKL_ENABLE_INSTRUCTIONS=SSE4_2 and =AVX2, ATEN_CPU_CAPABILITY=default
    # and 1 and 2 torch threads: max |Δ| 1.22e-05 in every setting (stories260K's logits; <= 7.4e-06 on the random
    # models), because the float64 side moved by <= 9.1e-15 across them. A float32 regeneration instead moves with
    # the kernels: 0 under the generating settings, up to 1.22e-05 with 2 threads and 1.14e-05 with
    # ATEN_CPU_CAPABILITY=default (1.05e-05 on gqa_four_leaves) — past the 1e-5 a float32-vs-float32 check used.
    "fixture_float32_vs_float64": Tol(5e-5, 5e-5),
    # a committed float64 fixture trace vs its float64 regeneration: max |Δ| 9.1e-15 over the same settings.
    "fixture_float64": Tol(1e-12),
}

MEASURED: dict[str, float] = {}  # tolerance key -> largest max |Δ| seen in this pytest run (printed by conftest)
# (mistake, the cases that catch it, the first divergence) of each mutation run (tests/test_mutations.py; conftest)
MUTATION_TABLE: list[tuple[str, str, str]] = []


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close(actual, expected, tol: str, what: str = "") -> float:
    """Assert |actual - expected| <= TOL[tol] elementwise; on failure say how far, where, and where it starts."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    t = TOL[tol]
    diff = np.abs(a - e)
    diff_or_inf = np.where(np.isnan(diff), np.inf, diff)  # NaN counts as the worst possible difference
    largest = float(diff_or_inf.max()) if diff.size else 0.0
    MEASURED[tol] = max(MEASURED.get(tol, 0.0), largest)
    bad = ~(diff <= t.atol + t.rtol * np.abs(e))
    if bad.any():
        worst = np.unravel_index(int(diff_or_inf.argmax()), diff.shape)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: max |Δ| = {largest:.3e} at index {tuple(int(i) for i in worst)} "
            f"(actual {a[worst]:.10g}, expected {e[worst]:.10g}); mean |Δ| = {float(np.nanmean(diff)):.3e}; "
            f"{int(bad.sum())} of {bad.size} elements exceed atol {t.atol:g} + rtol {t.rtol:g}·|expected| "
            f"('{tol}'), the first at index {first}"
        )
    return largest


# ----------------------------------------------------------------------------------------------- tiny HF models


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter O(1)-scale random values, so logits vary by O(1) and every part of the model matters.

    RMSNorm gains are drawn from U(0.5, 1.5), away from HF's all-ones init, so a norm applied in the wrong place,
    or a gain not applied, shows. A tied lm_head is the embedding itself and is drawn once.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm gains
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
            else:  # [out, in] projections: unit-variance outputs for unit-variance inputs
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(p.shape[1]))


def hf_config(
    *,
    vocab_size: int = 61,
    hidden_size: int = 24,
    intermediate_size: int = 40,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 6,
    tie_word_embeddings: bool = False,
    rope_parameters: dict | None = None,
    max_position_embeddings: int = 64,
    rms_norm_eps: float = 1e-5,
):
    """A `transformers.LlamaConfig` (v5 spelling: `rope_parameters` holds rope_theta and the scaling)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters=dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}),
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        attn_implementation="eager",  # the plainest HF attention: an explicit causal mask and softmax
    )


def make_hf_llama(out_dir: Path, *, seed: int = 0, save_dtype=None, max_shard_size=None, **config):
    """Build a random tiny HF `LlamaForCausalLM` (float32), save it as safetensors in `out_dir`, return it.

    `config` goes to `hf_config`; `save_dtype` (e.g. torch.bfloat16) converts a copy before saving (the returned
    model stays float32); `max_shard_size` (e.g. "8KB") saves a sharded checkpoint with an index.
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bars in captured output
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config(**config)).eval()
    randomize_(model, seed)
    saved = model if save_dtype is None else copy.deepcopy(model).to(save_dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    saved.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    return model


def hf_logits(model, tokens: list[int], positions: list[int] | None = None) -> np.ndarray:
    """HF logits [n, V] (float64 copy) for one sequence, position ids given explicitly when not None.

    The explicit all-ones attention mask matters: without one, transformers 5 reads position ids that do not
    step by 1 as *packed sequences* and masks attention between them; we want one causal sequence.
    """
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([tokens]),
            attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
            position_ids=None if positions is None else torch.tensor([positions]),
            use_cache=False,
        )
    return to_numpy(out.logits[0])


def our_logits(model, tokens: list[int], positions: list[int] | None = None) -> np.ndarray:
    """homer_ref logits [n, V] (float64 copy) for one sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens]), None if positions is None else torch.tensor(positions))
    return to_numpy(logits[0])


def rewrite_config(model_dir: Path, **changes) -> None:
    """Edit config.json in place: a value of None deletes the key."""
    path = Path(model_dir) / "config.json"
    d = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    path.write_text(json.dumps(d, indent=2))


# ----------------------------------------------------------------------------------------------- llama2.c


def llama2c_to_hf_dir(bin_path: Path, out_dir: Path) -> None:
    """Convert a llama2.c legacy .bin to an HF directory, written from the format notes in the data's README only
    (not from homer_ref/loading/), so that the oracle can check homer_ref's llama2.c loader.

    Config in the older spelling (top-level `rope_theta`, no rope_scaling), float32 safetensors.
    """
    from safetensors.numpy import save_file

    data = Path(bin_path).read_bytes()
    dim, hidden, L, Hq, Hkv, vocab, seq_len = struct.unpack_from("<7i", data)
    V, D, F, Dh = abs(vocab), dim, hidden, dim // Hq
    floats = np.frombuffer(data, dtype="<f4", offset=28)
    cursor = 0

    def take(*shape):
        nonlocal cursor
        n = math.prod(shape)
        out = floats[cursor : cursor + n].reshape(shape)
        cursor += n
        return out

    def meta_to_hf(w, n_heads):  # README: per-head permutation from interleaved pairs to half-split
        return np.ascontiguousarray(w.reshape(n_heads, Dh // 2, 2, D).swapaxes(1, 2).reshape(n_heads * Dh, D))

    w = {"model.embed_tokens.weight": take(V, D)}
    attn_norm, wq, wk = take(L, D), take(L, Hq * Dh, D), take(L, Hkv * Dh, D)
    wv, wo, ffn_norm = take(L, Hkv * Dh, D), take(L, D, Hq * Dh), take(L, D)
    w1, w2, w3 = take(L, F, D), take(L, D, F), take(L, F, D)
    w["model.norm.weight"] = take(D)
    take(seq_len, Dh // 2), take(seq_len, Dh // 2)  # precomputed RoPE cos/sin: not needed
    if vocab < 0:
        w["lm_head.weight"] = take(V, D)
    assert cursor == floats.size, f"{bin_path}: {floats.size - cursor} floats left over"
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = attn_norm[i]
        w[p + "self_attn.q_proj.weight"] = meta_to_hf(wq[i], Hq)
        w[p + "self_attn.k_proj.weight"] = meta_to_hf(wk[i], Hkv)
        w[p + "self_attn.v_proj.weight"] = wv[i]
        w[p + "self_attn.o_proj.weight"] = wo[i]
        w[p + "post_attention_layernorm.weight"] = ffn_norm[i]
        w[p + "mlp.gate_proj.weight"] = w1[i]
        w[p + "mlp.down_proj.weight"] = w2[i]
        w[p + "mlp.up_proj.weight"] = w3[i]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()}, str(out_dir / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": V,
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": L,
        "num_attention_heads": Hq,
        "num_key_value_heads": Hkv,
        "max_position_embeddings": seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": vocab > 0,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


# ----------------------------------------------------------------------------------------------- bad inputs


@dataclass(frozen=True)
class BadInput:
    """One malformed input: the CLI arguments that hit it, the API call that hits it, and what the error names."""

    argv: list[str]  # arguments of `python -m homer_ref.generate`
    api: object  # a zero-argument callable that must raise `api_error`, or None for a CLI-only case
    api_error: type
    names: tuple[str, ...]  # substrings the one-line message must contain (the tensor, field or file at fault)


# Where stories260K.bin ends inside wq (README layout: 28-byte header, then float32 arrays in order).
_STORIES_FLOATS_BEFORE_WQ = 512 * 64 + 5 * 64  # token embedding [V, D], attention RMSNorm [L, D]


BAD_INPUTS = (  # the cases of `build_bad_inputs`: each raises through the API and exits 2 through `generate`
    "directory without config.json",
    "safetensors missing a tensor",
    "mis-shaped tensor",
    "num_key_value_heads not dividing num_attention_heads",
    "unknown rope type (rope_parameters)",
    "unknown rope type (rope_scaling)",
    "tokenizer path that does not exist",
    "--max-new-tokens -1",
    "truncated llama2.c .bin",
    "tokenizer of another vocabulary",  # a command-line case only (the API takes no tokenizer with a model)
)


def build_bad_inputs(root: Path, good_dir: Path) -> dict[str, BadInput]:
    """Malformed copies of the good tiny HF checkpoint `good_dir` and of the vendored stories260K under `root`,
    one per name of BAD_INPUTS."""
    import shutil

    from safetensors.torch import load_file, save_file

    from homer_ref import CheckpointError, load_model, load_tokenizer
    from homer_ref.decoding import generate_plain

    tokenizer = STORIES_DIR / "tok512.model"
    ids = root / "ids.json"  # the models have no tokenizer: token ids in, token ids out
    ids.write_text("[1, 2]")

    def copy(name: str) -> Path:
        return Path(shutil.copytree(good_dir, root / name))

    def model_case(path: Path, *names: str) -> BadInput:
        argv = ["--model", str(path), "--prompt-ids", str(ids), "--print-ids", "--max-new-tokens", "3"]
        return BadInput(argv, lambda: load_model(path), CheckpointError, names)

    cases = {}
    d = copy("no-config")
    (d / "config.json").unlink()
    cases["directory without config.json"] = model_case(d, "config.json")

    d = copy("missing-tensor")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    cases["safetensors missing a tensor"] = model_case(d, "model.layers.1.mlp.up_proj.weight", "missing")

    d = copy("misshaped-tensor")
    tensors = load_file(d / "model.safetensors")
    k = tensors["model.layers.0.self_attn.k_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = k.T.contiguous()
    save_file(tensors, d / "model.safetensors")
    cases["mis-shaped tensor"] = model_case(d, "model.layers.0.self_attn.k_proj.weight", str(tuple(k.T.shape)))

    d = copy("kv-heads")
    rewrite_config(d, num_attention_heads=4, num_key_value_heads=3)
    cases["num_key_value_heads not dividing num_attention_heads"] = model_case(d, "num_key_value_heads")

    d = copy("rope-type-v5")
    rewrite_config(d, rope_parameters={"rope_type": "ntk-magic", "factor": 2.0, "rope_theta": 10000.0})
    cases["unknown rope type (rope_parameters)"] = model_case(d, "'ntk-magic'")

    d = copy("rope-type-v4")
    rewrite_config(d, rope_parameters=None, rope_scaling={"type": "su", "factor": 2.0}, rope_theta=10000.0)
    cases["unknown rope type (rope_scaling)"] = model_case(d, "'su'", "rope_scaling")

    missing_tokenizer = root / "no-such-tokenizer.model"
    cases["tokenizer path that does not exist"] = BadInput(
        ["--model", str(good_dir), "--tokenizer", str(missing_tokenizer)],
        lambda: load_tokenizer(missing_tokenizer),
        CheckpointError,
        (str(missing_tokenizer),),
    )

    def negative_tokens():
        generate_plain(load_model(good_dir), [1, 2], -1)

    cases["--max-new-tokens -1"] = BadInput(
        ["--model", str(good_dir), "--prompt-ids", str(ids), "--print-ids", "--max-new-tokens", "-1"],
        negative_tokens,
        ValueError,
        ("must be >= 0, got -1",),
    )

    cut = 28 + 4 * _STORIES_FLOATS_BEFORE_WQ + 100  # 25 floats into wq
    truncated = root / "truncated.bin"
    truncated.write_bytes((STORIES_DIR / "stories260K.bin").read_bytes()[:cut])
    cases["truncated llama2.c .bin"] = model_case(truncated, "truncated", "q_proj")
    cases["tokenizer of another vocabulary"] = BadInput(
        ["--model", str(good_dir), "--tokenizer", str(tokenizer)], None, ValueError, ("512", "61")
    )
    assert tuple(cases) == BAD_INPUTS, sorted(cases)
    return cases


# ----------------------------------------------------------------------------------------------- GGUF


GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
GGUF_NAMES = {  # HF name (per-layer suffix) -> llama.cpp's, from llama.cpp's documented tensor names
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# K-quant blocks of 256 values (gguf cannot quantize these): byte layout and where the float16 scales sit.
K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,))}  # block bytes, offsets of its float16 scale fields


def hf_to_gguf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter `permute`: HF's half-split q/k rows -> Meta's interleaved pairs (written from its docs)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `hf_to_gguf_rows`."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode_gguf_tensor(w: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """`w` [rows, cols] in GGUF type `qtype`: quantized by `gguf.quants` where it can, else (K-quants) random blocks
    of the documented layout whose float16 scales are set to small finite values (every such block is valid)."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return w.astype(np.float32)
    if qtype == "F16":
        return w.astype(np.float16)
    if qtype not in K_BLOCKS:
        return gguf.quants.quantize(w.astype(np.float32), t)
    block, scale_offsets = K_BLOCKS[qtype]
    rows, cols = w.shape
    data = rng.integers(0, 256, size=(rows, cols // 256, block), dtype=np.uint8)
    for off in scale_offsets:
        scales = rng.uniform(0.002, 0.02, size=(rows, cols // 256)).astype(np.float16)
        data[:, :, off : off + 2] = scales.view(np.uint8).reshape(rows, cols // 256, 2)
    return data.reshape(rows, -1)


def write_tiny_gguf(path: Path, hf_model, qtype: str, *, tokenizer_model: Path | None = None, seed: int = 0,
                    metadata: dict | None = None, skip: tuple[str, ...] = (), extra: dict | None = None,
                    ) -> dict[str, np.ndarray]:  # fmt: skip
    """Write `hf_model` (a transformers LlamaForCausalLM) as a llama.cpp-style GGUF file, 2-D weights in `qtype`
    (norms F32, as llama.cpp keeps them), with the vocabulary of the sentencepiece `tokenizer_model` (type "llama").

    Returns the HF-layout float32 weights the file encodes: `gguf.quants.dequantize` of each stored tensor with the
    q/k permutation undone — the expected result of loading it. `metadata` overrides keys (None removes one);
    `skip` leaves tensors (GGUF names) out; `extra` adds float32 tensors (GGUF name -> array).
    """
    import gguf

    cfg = hf_model.config
    rng = np.random.default_rng(seed)
    Hq, Hkv, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    keys = {
        "general.architecture": "llama",
        "llama.block_count": L,
        "llama.context_length": cfg.max_position_embeddings,
        "llama.embedding_length": cfg.hidden_size,
        "llama.feed_forward_length": cfg.intermediate_size,
        "llama.attention.head_count": Hq,
        "llama.attention.head_count_kv": Hkv,
        "llama.rope.freq_base": float(cfg.rope_parameters["rope_theta"]),
        "llama.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "llama.rope.dimension_count": cfg.head_dim,
        "llama.vocab_size": cfg.vocab_size,
    }
    if tokenizer_model is not None:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
        pieces = range(sp.vocab_size())

        def kind(i):  # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 5 unused, 6 byte
            return (
                3
                if sp.is_control(i)
                else 2
                if sp.is_unknown(i)
                else 6
                if sp.is_byte(i)
                else 5
                if sp.is_unused(i)
                else 1
            )

        keys |= {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in pieces],
            "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in pieces],
            "tokenizer.ggml.token_type": [kind(i) for i in pieces],
            "tokenizer.ggml.bos_token_id": sp.bos_id(),
            "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        }
    keys |= metadata or {}
    writer = gguf.GGUFWriter(str(path), keys.pop("general.architecture"))
    for key, value in keys.items():
        if value is None:
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    expected = {}
    for name, p in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        prefix, _, rest = name.partition("model.layers.")
        layer, _, suffix = rest.partition(".")
        gguf_name = GGUF_NAMES[name] if not rest else f"blk.{layer}.{GGUF_NAMES[suffix]}"
        if gguf_name in skip:
            continue
        w = p.detach().to(torch.float32).numpy()
        heads = Hq if suffix == "self_attn.q_proj.weight" else Hkv if suffix == "self_attn.k_proj.weight" else 0
        if heads:
            w = hf_to_gguf_rows(w, heads)
        stored = encode_gguf_tensor(w, qtype, rng) if w.ndim == 2 else w.astype(np.float32)
        t = gguf.GGMLQuantizationType[qtype if w.ndim == 2 else "F32"]
        if stored.dtype == np.uint8:
            writer.add_tensor(gguf_name, stored, raw_shape=stored.shape, raw_dtype=t)
        else:
            writer.add_tensor(gguf_name, stored)
        values = gguf.quants.dequantize(stored, t).reshape(w.shape).astype(np.float32)
        expected[name] = gguf_to_hf_rows(values, heads) if heads else values
    for name, array in (extra or {}).items():
        writer.add_tensor(name, np.asarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for HF's llama3 `rope_parameters`, by its converter's documented formula:
    per frequency, 1 (short wavelengths), `factor` (long ones), or 1 / ((1 - smooth) / factor + smooth) between."""
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low, high, orig, factor = (rope[k] for k in ("low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings", "factor"))  # fmt: skip
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def assert_same_as_oracle(ours, ref, what=""):
    """A torch HomerCache against the NumPy oracle's result: every node's decisions exactly, floats within
    oracle_float64 (scores: both float32 casts of float64 logits, within a float32 ulp or two)."""
    assert ours.positions.tolist() == ref["positions"].tolist(), what
    assert ours.last_position == ref["last_position"], what
    got = [(t.level, t.index) for t in ours.nodes]
    assert got == [(n["level"], n["index"]) for n in ref["nodes"]], f"{what}: execution order"
    for t, n in zip(ours.nodes, ref["nodes"]):
        node = f"{what} node {(t.level, t.index)}"
        assert tuple(t.layers) == tuple(n["layers"]) and t.target == n["target"], node
        assert t.input_positions.tolist() == n["input_positions"].tolist(), f"{node}: input positions"
        assert t.kept.tolist() == n["kept"].tolist(), f"{node}: kept slots"
        assert t.removed.tolist() == n["removed"].tolist(), f"{node}: removed slots"
        assert (t.scores is None) == (n["scores"] is None), f"{node}: scores recorded"
        if t.scores is not None:  # both float32 from float64 logits: equal up to the last bit or two
            np.testing.assert_allclose(t.scores.numpy(), n["scores"], rtol=1e-6, atol=1e-6, err_msg=node)
    for layer, (k, v) in enumerate(zip(ours.keys, ours.values)):
        assert_close(k, ref["keys"][layer], "oracle_float64", f"{what} keys.{layer}")
        assert_close(v, ref["values"][layer], "oracle_float64", f"{what} values.{layer}")
    assert_close(ours.logits, ref["logits"], "oracle_float64", f"{what} logits")


def tiny_llama(L=4, V=32, D=16, Hq=4, Hkv=2, Dh=None, seed=0, dtype=torch.float64):
    """A random homer_ref Llama with O(1) weights (unit-variance projections, RMSNorm gains in [0.5, 1.5))."""
    from homer_ref.llama import Llama, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=2 * D,
        num_hidden_layers=L,
        num_attention_heads=Hq,
        num_key_value_heads=Hkv,
        head_dim=Dh or D // Hq,
        rope_theta=100.0,  # a small base: positions 0..20 turn every frequency pair noticeably
    )
    model = Llama(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5)
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    return model.eval()
