"""Float64 NumPy Llama forward: the oracle ("the math") that homer_ref's torch Llama is checked against.

Implements the plain decoder-only Llama that HOMER_SPEC.md assumes everywhere (sections A, C.2, I.1): HF
checkpoint names, RMSNorm, RoPE in HF's half-split layout with the RoPE scalings of `transformers` (`linear`,
`dynamic`, `yarn`, `llama3`), grouped-query attention, SwiGLU MLP. Written from the HF conventions and
formulas, independently of the torch code in ``homer_ref/``. No batching; loops over heads; all float64.
HOMER itself (sections B-F, N) lives in ``homer_np.py``, built on the per-layer pieces exposed here.

Symbol legend (the same letters as the torch code, the tests and the tutorials):
    B   batch (always 1 here: one prompt at a time, so it never appears)
    n   tokens in the call (sequence length)
    D   hidden size
    Hq  query heads (``num_attention_heads``)
    Hkv key/value heads (``num_key_value_heads``); query head h uses KV head h // (Hq // Hkv)
    Dh  head dimension (``head_dim`` or D // Hq)
    V   vocabulary size
    F   MLP width (``intermediate_size``)
    HOMER's P C S T E N H e do not appear in this file (see homer_np.py): T is HOMER's target, H its tree height.

Numerical conventions, stated once:
- RMSNorm: x / sqrt(mean(x**2) + eps) * w, eps = ``rms_norm_eps``.
- RoPE, HF half-split layout: x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1],
  cos = [cos(pos * inv_freq), cos(pos * inv_freq)] (concatenated halves), cos and sin both multiplied by
  the attention scaling (YaRN's mscale; 1 otherwise). Meta's interleaved layout differs by a permutation of
  the q/k rows; HF checkpoints are already permuted for the half-split layout. Positions are arbitrary
  integers (repeats and non-monotonic orders allowed).
- Attention: logits = q . k / sqrt(Dh); causal by SEQUENCE index (token t sees tokens 0..t) whatever the
  positions; masked entries are excluded (-inf) before a max-subtracted softmax.
- HF computes the RoPE angles in float32; this oracle computes them in float64 ("the math"), so comparisons
  with HF need a tolerance of a few 1e-6 even when HF runs in float64.
"""

import json
import math
import os
import struct

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# Loading: safetensors parsed by hand, HF config.json kept as a plain dict.
# ----------------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": ("<f8", np.float64),
    "F32": ("<f4", np.float64),
    "F16": ("<f2", np.float64),
    "BF16": ("<u2", np.float64),  # decoded below: bf16 is the top half of a float32
    "I64": ("<i8", np.int64),
    "I32": ("<i4", np.int64),
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Parse a .safetensors file: float dtypes come back as float64, integer dtypes as int64."""
    with open(path, "rb") as f:
        blob = f.read()
    (header_len,) = struct.unpack("<Q", blob[:8])  # 8-byte little-endian header length
    header = json.loads(blob[8 : 8 + header_len].decode("utf-8"))
    data = memoryview(blob)[8 + header_len :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        if dtype not in _SAFETENSORS_DTYPES:
            supported = sorted(_SAFETENSORS_DTYPES)
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}; supported: {supported}")
        raw_dtype, out_dtype = _SAFETENSORS_DTYPES[dtype]
        begin, end = info["data_offsets"]
        raw = np.frombuffer(data[begin:end], dtype=raw_dtype)
        if dtype == "BF16":
            # bf16 -> float32: shift the 16 bits into the top half of a uint32 and reinterpret.
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = raw.astype(out_dtype).reshape(info["shape"])
    return out


def load_hf(model_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Read an HF Llama directory: (config.json as a dict, weights by HF name as float64 arrays)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return config, read_safetensors(single)
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    weights = {}
    for shard in sorted(set(weight_map.values())):
        weights.update(read_safetensors(os.path.join(model_dir, shard)))
    return config, weights


# ----------------------------------------------------------------------------------------------------------
# Config helpers
# ----------------------------------------------------------------------------------------------------------


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope_parameters(config: dict) -> dict:
    """One dict with rope_type, rope_theta and the scaling fields.

    Older HF configs write ``rope_scaling`` (with ``type`` or ``rope_type``) and a top-level ``rope_theta``;
    transformers >= 5 writes ``rope_parameters`` holding both. Where both are present, transformers takes a
    non-empty ``rope_scaling`` as a whole and ignores ``rope_parameters``; the base is the chosen dict's
    ``rope_theta``, else the top-level one, else 10000.
    """
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    return params


def _plain_inv_freq(base: float, dh: int) -> np.ndarray:
    return 1.0 / base ** (np.arange(0, dh, 2, dtype=np.float64) / dh)  # [Dh/2]


def rope_inv_freq(config: dict, seq_len: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [Dh/2] and the attention scaling that multiplies cos and sin.

    ``seq_len`` (= max(position) + 1 of the call) matters only for ``dynamic``.
    """
    p = _rope_parameters(config)
    rope_type, base, dh = p["rope_type"], float(p["rope_theta"]), head_dim(config)
    max_pos = config.get("max_position_embeddings")
    if rope_type == "default":
        return _plain_inv_freq(base, dh), 1.0
    if rope_type == "linear":
        return _plain_inv_freq(base, dh) / p["factor"], 1.0
    if rope_type == "dynamic":
        # HF dynamic NTK: grow the base once the call reaches past max_position_embeddings; plain otherwise.
        factor = p["factor"]
        if seq_len > max_pos:
            base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dh / (dh - 2))
        return _plain_inv_freq(base, dh), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(config, p, base, dh)
    if rope_type == "llama3":
        return _llama3_inv_freq(p, base, dh), 1.0
    raise ValueError(f"unsupported rope type {rope_type!r}; use default, linear, dynamic, yarn or llama3")


def _yarn_inv_freq(config: dict, p: dict, base: float, dh: int) -> tuple[np.ndarray, float]:
    """YaRN as in transformers' ``_compute_yarn_parameters``: interpolated and extrapolated blend."""
    max_pos = config.get("max_position_embeddings")
    # A top-level original_max_position_embeddings takes priority, as in HF's standardize_rope_params.
    original_max = (
        config.get("original_max_position_embeddings") or p.get("original_max_position_embeddings") or max_pos
    )
    factor = p.get("factor")
    if factor is None:
        factor = max_pos / original_max

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = get_mscale(factor, p["mscale"]) / get_mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # the dimension whose wavelength makes `num_rotations` turns over the original context
        return (dh * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dh - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp, as HF does
    ramp = np.clip((np.arange(dh // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)  # [Dh/2]
    extrapolation_weight = 1.0 - ramp
    inv_extrapolation = _plain_inv_freq(base, dh)
    inv_interpolation = inv_extrapolation / factor
    inv_freq = inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def _llama3_inv_freq(p: dict, base: float, dh: int) -> np.ndarray:
    """Llama 3.1 scaling: long wavelengths divided by factor, short ones kept, a smooth blend in between."""
    inv_freq = _plain_inv_freq(base, dh)
    factor, low_ff, high_ff = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context = p["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low_ff, old_context / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------


def rope_cos_sin(config: dict, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [n, Dh] for integer positions [n], scaled by the rope attention factor."""
    positions = np.asarray(positions, dtype=np.int64)
    seq_len = int(positions.max()) + 1 if positions.size else 0
    inv_freq, scaling = rope_inv_freq(config, seq_len)  # [Dh/2]
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # [n, Dh/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [n, Dh]  half-split layout
    return np.cos(angles) * scaling, np.sin(angles) * scaling


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [heads, T, Dh] -> x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half: [-x2, x1]
    return x * cos[None] + rotated * sin[None]


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x [n, D] -> x / sqrt(mean(x^2) + eps) * w."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _linear(weights: dict, name: str, x: np.ndarray) -> np.ndarray:
    """x [n, in] @ W.T with HF's [out, in] weights, plus the bias if the checkpoint has one."""
    y = x @ weights[name + ".weight"].T
    bias = weights.get(name + ".bias")
    return y if bias is None else y + bias


def _eps(config: dict) -> float:
    return float(config.get("rms_norm_eps", 1e-6))


def embed(config: dict, weights: dict, tokens) -> np.ndarray:
    """Token ids [n] -> hidden states [n, D]."""
    tokens = np.asarray(tokens, dtype=np.int64)
    table = weights["model.embed_tokens.weight"]  # [V, D]
    if tokens.size and not (0 <= tokens.min() and tokens.max() < table.shape[0]):
        v = table.shape[0]
        raise ValueError(f"token ids must lie in [0, V = {v}); got {tokens.min()}..{tokens.max()}")
    return table[tokens].astype(np.float64)


def attention_layer(config: dict, weights: dict, layer: int, h: np.ndarray, positions):
    """One attention sub-block with its residual.

    h [n, D], positions [n] -> (h + attn(rmsnorm(h)) [n, D], k [Hkv, n, Dh] after RoPE, v [Hkv, n, Dh],
    last_logits [Hq, n] = scaled pre-softmax logits of the LAST query against every key, RoPE applied).
    """
    pre = f"model.layers.{layer}."
    n_heads, n_kv, dh = config["num_attention_heads"], config.get("num_key_value_heads"), head_dim(config)
    n_kv = n_kv or n_heads
    group = n_heads // n_kv  # query heads per KV head
    t = h.shape[0]
    x = rmsnorm(h, weights[pre + "input_layernorm.weight"], _eps(config))  # [n, D]
    q = _linear(weights, pre + "self_attn.q_proj", x).reshape(t, n_heads, dh).transpose(1, 0, 2)  # [Hq, n, Dh]
    k = _linear(weights, pre + "self_attn.k_proj", x).reshape(t, n_kv, dh).transpose(1, 0, 2)  # [Hkv, n, Dh]
    v = _linear(weights, pre + "self_attn.v_proj", x).reshape(t, n_kv, dh).transpose(1, 0, 2)  # [Hkv, n, Dh]
    cos, sin = rope_cos_sin(config, positions)  # [n, Dh]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    causal = np.tril(np.ones((t, t), dtype=bool))  # by sequence index, never by position
    out = np.empty((t, n_heads, dh))
    last_logits = np.empty((n_heads, t))
    for head in range(n_heads):
        kv = head // group
        logits = q[head] @ k[kv].T / math.sqrt(dh)  # [n, n]  (query, key)
        last_logits[head] = logits[-1]  # the last query sees every key
        logits = np.where(causal, logits, -np.inf)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        out[:, head] = probs @ v[kv]  # [n, Dh]
    attn = _linear(weights, pre + "self_attn.o_proj", out.reshape(t, n_heads * dh))  # [n, D]
    return h + attn, k, v, last_logits


def mlp_layer(config: dict, weights: dict, layer: int, h: np.ndarray) -> np.ndarray:
    """h [n, D] -> h + down(silu(gate(x)) * up(x)), x = rmsnorm(h)."""
    pre = f"model.layers.{layer}."
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config.get('hidden_act')!r} is not supported; Llama uses 'silu'")
    x = rmsnorm(h, weights[pre + "post_attention_layernorm.weight"], _eps(config))
    gate = _linear(weights, pre + "mlp.gate_proj", x)  # [n, F]
    up = _linear(weights, pre + "mlp.up_proj", x)  # [n, F]
    return h + _linear(weights, pre + "mlp.down_proj", silu(gate) * up)


def lm_head_weight(config: dict, weights: dict) -> np.ndarray:
    """[V, D]: ``lm_head.weight``, or the embedding when the checkpoint ties them (and so omits lm_head)."""
    if "lm_head.weight" in weights:
        return weights["lm_head.weight"]
    if config.get("tie_word_embeddings", False):
        return weights["model.embed_tokens.weight"]
    raise KeyError("lm_head.weight is missing and tie_word_embeddings is false")


def final_logits(config: dict, weights: dict, h: np.ndarray) -> np.ndarray:
    """h [n, D] -> logits [n, V] (final RMSNorm, then lm_head)."""
    return rmsnorm(h, weights["model.norm.weight"], _eps(config)) @ lm_head_weight(config, weights).T


def forward_cache(config: dict, weights: dict, tokens, positions=None):
    """Plain forward: (logits [n, V], keys, values); keys/values: L arrays [Hkv, n, Dh], keys after RoPE."""
    tokens = list(tokens)
    positions = np.arange(len(tokens)) if positions is None else np.asarray(positions, dtype=np.int64)
    if positions.shape != (len(tokens),):
        raise ValueError(f"positions need one entry per token: {positions.shape} for {len(tokens)} tokens")
    h = embed(config, weights, tokens)  # [n, D]
    keys, values = [], []
    for layer in range(config["num_hidden_layers"]):
        h, k, v, _ = attention_layer(config, weights, layer, h, positions)
        keys.append(k)
        values.append(v)
        h = mlp_layer(config, weights, layer, h)
    return final_logits(config, weights, h), keys, values


def forward(config: dict, weights: dict, tokens: list[int], positions: list[int] | None = None) -> np.ndarray:
    """Logits [n, V] float64; positions default to 0..n-1; attention causal by sequence index."""
    return forward_cache(config, weights, tokens, positions)[0]
