"""A Llama forward pass in one file, written for reading (imports only torch).

Order: config, RoPE, RMSNorm, attention, MLP, model. Loading checkpoints lives in `loading/`; the memory-lean
loops that long prompts and token-by-token decoding need live beside decoding (`decoding.py`), so that this file
keeps one forward path.

Dimension legend (the same letters in every shape comment of homer_ref, reference/, the tests and tutorials):
    B batch, n tokens of this call, past tokens already in the cache, D hidden size, F MLP width, V vocabulary,
    L layers, Hq query heads, Hkv key/value heads (GQA when Hkv < Hq), Dh head dimension.
(HOMER's own letters, P C S M T W E N H e R K, are in `homer/plan.py`; H is the tree height there, never heads.)

Conventions, stated once:
- RoPE uses HF's *half-split* layout: dimension i is paired with i + Dh/2 (`rotate_half`). Meta's and llama2.c's
  checkpoints pair (2i, 2i+1) instead; `loading/` permutes their q/k weights in one documented place.
- Positions are explicit integers per token and may repeat or go backwards (HOMER reuses position ids);
  attention is causal by *sequence index*, never by position.
- Keys are cached *after* RoPE, so a cached key keeps the rotation of the position it was computed at.
- RMSNorm and softmax run in float32 (or float64 when the model is float64), as HF does.

The model exposes the two halves of a decoder layer separately (`attend`, then `feed_forward`), because HOMER
prunes tokens between them (HOMER_SPEC.md C.2).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Cache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k [B, Hkv, past, Dh] after RoPE, v [B, Hkv, past, Dh])
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` (or HF v5 `rope_parameters`) of config.json; fields unused by a type keep defaults."""

    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # yarn, llama3 (defaults to max_position_embeddings)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: scales cos and sin; default 0.1 ln(factor) + 1
    truncate: bool = True  # yarn


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # Hq
    num_key_value_heads: int  # Hkv
    head_dim: int  # Dh
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048  # the trained context
    tie_word_embeddings: bool = False


# ----------------------------------------------------------------------------------------------- RoPE


def rope_frequencies(cfg: LlamaConfig, seq_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [Dh/2] (float64) and the factor that scales cos and sin, as HF computes them.

    `seq_len` (largest position + 1 of the call) matters only to dynamic NTK scaling.
    """
    rs, dim, base = cfg.rope_scaling, cfg.head_dim, cfg.rope_theta
    if rs.rope_type == "dynamic" and seq_len > cfg.max_position_embeddings:
        # NTK-aware: grow the base with the sequence length instead of squeezing the positions.
        base *= (rs.factor * seq_len / cfg.max_position_embeddings - (rs.factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / base**exponents  # [Dh/2]
    if rs.rope_type == "linear":  # position interpolation: position p behaves like p / factor
        return inv_freq / rs.factor, 1.0
    original = rs.original_max_position_embeddings or cfg.max_position_embeddings
    if rs.rope_type == "yarn":
        # Keep fast-rotating dimensions (many turns within the trained context), interpolate slow ones, ramp between.
        def dim_of(turns: float) -> float:  # the dimension that makes `turns` rotations over `original` tokens
            return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

        low, high = dim_of(rs.beta_fast), dim_of(rs.beta_slow)
        if rs.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 0.001)).clamp(0, 1)
        inv_freq = inv_freq / rs.factor * ramp + inv_freq * (1 - ramp)
        scale = rs.attention_factor
        if scale is None:
            scale = 0.1 * math.log(rs.factor) + 1.0 if rs.factor > 1 else 1.0
        return inv_freq, scale
    if rs.rope_type == "llama3":
        # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly.
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        blended = (1 - smooth) * inv_freq / rs.factor + smooth * inv_freq
        long_wave, short_wave = wavelen > original / rs.low_freq_factor, wavelen < original / rs.high_freq_factor
        inv_freq = torch.where(long_wave, inv_freq / rs.factor, torch.where(short_wave, inv_freq, blended))
    return inv_freq, 1.0


def rope_cos_sin(cfg: LlamaConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., n, Dh] for integer positions [..., n] (any values: repeats and gaps are fine)."""
    inv_freq, scale = rope_frequencies(cfg, int(positions.max()) + 1 if positions.numel() else 0)
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(positions.device)  # [..., n, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)  # [..., n, Dh]: half-split layout
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, n, Dh] by cos/sin [n, Dh] or [B, 1, n, Dh]; pairs are (i, i + Dh/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ----------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # normalise in at least float32
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, device=None):
        super().__init__()
        D, Hq, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(D, Hq * Dh, bias=False, device=device)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=False, device=device)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=False, device=device)
        self.o_proj = nn.Linear(Hq * Dh, D, bias=False, device=device)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, device=device)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, device=device)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU: down(silu(gate(x)) * up(x)), x [..., D] -> [..., D], through two [..., F] buffers.

        silu and the product run in place (autograd keeps what it needs): the F-wide activations are the largest
        a layer makes, and two of them instead of three is both less memory and measurably faster."""
        gate = F.silu(self.gate_proj(x), inplace=True)  # [..., F]
        return self.down_proj(gate.mul_(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, device=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.self_attn = Attention(cfg, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.mlp = MLP(cfg, device)


# ----------------------------------------------------------------------------------------------- model


class Llama(nn.Module):
    """Parameter names follow HF's checkpoints without the leading `model.` (e.g. `layers.0.mlp.up_proj.weight`).

    `Llama(cfg)` holds randomly initialised parameters; `Llama(cfg, device="meta")` holds parameters without memory
    or initialisation, to be replaced by a checkpoint's tensors (`loading.weights.build_model` assigns them).
    """

    def __init__(self, cfg: LlamaConfig, device=None):
        super().__init__()
        self.cfg = cfg
        # On meta, an explicit empty weight: initialising one there would import torch's compiler (~1.5 s).
        meta = device is not None and torch.device(device).type == "meta"
        embedding = torch.empty(cfg.vocab_size, cfg.hidden_size, device="meta") if meta else None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=embedding, device=device)
        self.layers = nn.ModuleList(Block(cfg, device) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def attend(
        self,
        layer: int,
        h: torch.Tensor,  # [B, n, D] input of the layer (the residual stream)
        positions: torch.Tensor,  # [n] or [B, n] integer position ids of the n new tokens
        past: tuple[torch.Tensor, torch.Tensor] | None = None,  # this layer's cache (k, v) [B, Hkv, past, Dh]
        last_query: bool = False,  # also return the last query's logits (HOMER's significance)
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # rope_cos_sin(positions), when computed once
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """First half of decoder layer `layer`: h + attention(norm(h)), token i seeing the cache and new tokens <= i.

        Returns (h [B, n, D], k [B, Hkv, past+n, Dh] after RoPE, v [B, Hkv, past+n, Dh], last_logits). With
        `last_query`, last_logits [B, Hq, past+n] are the scaled pre-softmax logits of the last query against every
        key, in at least float32 — the significance HOMER prunes by (HOMER_SPEC.md D.1); else None, so that a plain
        forward does no HOMER work (HOMER asks only at a reduction layer, calibration at every layer).
        """
        cfg, blk = self.cfg, self.layers[layer]
        B, n, _ = h.shape
        Hq, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        x = blk.input_layernorm(h)
        q = blk.self_attn.q_proj(x).view(B, n, Hq, Dh).transpose(1, 2)  # [B, Hq, n, Dh]
        k = blk.self_attn.k_proj(x).view(B, n, Hkv, Dh).transpose(1, 2)  # [B, Hkv, n, Dh]
        v = blk.self_attn.v_proj(x).view(B, n, Hkv, Dh).transpose(1, 2)  # [B, Hkv, n, Dh]
        cos, sin = rope_cos_sin(cfg, positions, q.dtype) if rope is None else rope
        if cos.dim() == 3:  # per-batch positions [B, n, Dh] -> [B, 1, n, Dh] to broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # [B, Hkv, past+n, Dh]
        cached = k.shape[2] - n
        # Causal by sequence index: query i (at sequence index cached+i) sees keys 0..cached+i. With no cache this
        # is the plain lower triangle; with a cache the mask is shifted right by `cached` ("bottom-right").
        mask = None if cached == 0 else torch.ones(n, cached + n, dtype=torch.bool, device=h.device).tril(cached)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=cached == 0, enable_gqa=Hkv != Hq)
        h = h + blk.self_attn.o_proj(y.transpose(1, 2).reshape(B, n, Hq * Dh))
        if not last_query:
            return h, k, v, None
        # Last query against all keys; query head j reads KV head j // (Hq / Hkv), exactly as attention does.
        score_dtype = torch.promote_types(q.dtype, torch.float32)
        k_rep = k.to(score_dtype).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, past+n, Dh]
        last_logits = (k_rep @ q[:, :, -1, :, None].to(score_dtype)).squeeze(-1) / math.sqrt(Dh)  # [B, Hq, past+n]
        return h, k, v, last_logits

    def feed_forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Second half of decoder layer `layer`: h [B, n, D] -> h + MLP(norm(h))."""
        blk = self.layers[layer]
        return h + blk.mlp(blk.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output head: h [B, n, D] -> logits [B, n, V] in float32 (or float64)."""
        logits = self.lm_head(self.norm(h))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def forward_cached(
        self,
        tokens: torch.Tensor,  # [B, n] token ids
        positions: torch.Tensor | None = None,  # [n] or [B, n]; default past, past+1, ..., past+n-1
        cache: Cache | None = None,  # per layer (k, v) [B, Hkv, past, Dh]; left as it is
    ) -> tuple[torch.Tensor, Cache]:
        """Logits [B, n, V] of every token, and the cache extended by them: per layer (k, v) [B, Hkv, past+n, Dh].

        The whole forward pass, one layer after the other. For long prompts and token-by-token decoding,
        `homer_ref.decoding` runs the same two halves per layer with less memory (it keeps only what it needs).
        """
        past = 0 if cache is None else cache[0][0].shape[2]
        if positions is None:
            positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)
        h = self.embed_tokens(tokens)  # [B, n, D]
        rope = rope_cos_sin(self.cfg, positions, h.dtype)  # the same positions in every layer: computed once
        new_cache: Cache = []
        for layer in range(self.cfg.num_hidden_layers):
            h, k, v, _ = self.attend(layer, h, positions, None if cache is None else cache[layer], rope=rope)
            h = self.feed_forward(layer, h)
            new_cache.append((k, v))
        return self.logits(h), new_cache

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: Cache | None = None):
        """tokens [B, n] -> logits [B, n, V] of every token. `forward_cached` also returns the KV cache."""
        return self.forward_cached(tokens, positions, cache)[0]
