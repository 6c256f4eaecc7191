"""HF `config.json` -> `LlamaConfig`, and back: the one place where checkpoint settings are read and written.

Both spellings of RoPE settings are read, with the rule transformers follows: a non-empty `rope_scaling`
(transformers v4) replaces `rope_parameters` (v5) as a whole; the base comes from the chosen dict's `rope_theta`,
else the top-level `rope_theta`, else 10000. Anything the forward pass does not implement is refused with a
`CheckpointError` naming the field.
"""

import math
from dataclasses import asdict

from homer_ref.llama import ROPE_TYPES, LlamaConfig, RopeScaling


class CheckpointError(ValueError):
    """A checkpoint, config or tokenizer that cannot be loaded; the message says what and how to fix it."""


_REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _int_field(d: dict, key: str, where: str) -> int:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


def _number_field(d: dict, key: str, default: float, where: str) -> float:
    value = d.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{where}: '{key}' must be a positive number, got {value!r}")
    return float(value)


def _bool_field(d: dict, key: str, default: bool, where: str) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):  # bool("false") is True: never guess
        raise CheckpointError(f"{where}: '{key}' must be true or false, got {value!r}")
    return value


def _rope_scaling(d: dict, where: str) -> tuple[float, RopeScaling]:
    """(rope_theta, RopeScaling) from `rope_scaling` (transformers v4) or `rope_parameters` (v5).

    As transformers does: a non-empty `rope_scaling` wins and replaces `rope_parameters` as a whole.
    """
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"{where}: 'rope_scaling' must be an object or null, got {params!r}")
    theta = _number_field(params, "rope_theta", _number_field(d, "rope_theta", 10000.0, where), where)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{where}: rope_scaling type {rope_type!r} is not supported; use one of {', '.join(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, RopeScaling()
    if params.get("factor") is None:
        raise CheckpointError(f"{where}: rope_scaling type {rope_type!r} needs a positive 'factor'")
    kwargs = {"rope_type": rope_type, "factor": _number_field(params, "factor", 1.0, where)}
    for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor"):
        if params.get(key) is not None:
            kwargs[key] = _number_field(params, key, 1.0, where)
    if params.get("original_max_position_embeddings") is not None:
        kwargs["original_max_position_embeddings"] = _int_field(params, "original_max_position_embeddings", where)
    if "truncate" in params:
        kwargs["truncate"] = _bool_field(params, "truncate", True, where)
    scaling = RopeScaling(**kwargs)
    if rope_type == "llama3" and not scaling.high_freq_factor > scaling.low_freq_factor:
        raise CheckpointError(
            f"{where}: llama3 rope_scaling needs high_freq_factor > low_freq_factor, got "
            f"{scaling.high_freq_factor} and {scaling.low_freq_factor}"
        )
    return theta, scaling


def parse_config(d: dict, where: str = "config.json") -> LlamaConfig:
    """A validated `LlamaConfig` from the dict of an HF Llama `config.json`."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(d).__name__}")
    vocab, D, inter, L, Hq = (_int_field(d, key, where) for key in _REQUIRED_INTS)
    Hkv = _int_field(d, "num_key_value_heads", where) if d.get("num_key_value_heads") is not None else Hq
    if d.get("head_dim") is not None:
        Dh = _int_field(d, "head_dim", where)
    elif D % Hq:
        raise CheckpointError(f"{where}: hidden_size {D} is not divisible by num_attention_heads {Hq}")
    else:
        Dh = D // Hq
    if Hq % Hkv:
        raise CheckpointError(
            f"{where}: num_attention_heads {Hq} is not a multiple of num_key_value_heads {Hkv} (GQA groups)"
        )
    if Dh % 2:
        raise CheckpointError(f"{where}: head_dim {Dh} must be even for RoPE")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if d.get(key, ok) != ok:
            raise CheckpointError(f"{where}: {key}={d[key]!r} is not a Llama setting homer_ref implements ({ok!r})")
    theta, scaling = _rope_scaling(d, where)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=D,
        intermediate_size=inter,
        num_hidden_layers=L,
        num_attention_heads=Hq,
        num_key_value_heads=Hkv,
        head_dim=Dh,
        rms_norm_eps=_number_field(d, "rms_norm_eps", 1e-6, where),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_int_field(d, "max_position_embeddings", where)
        if d.get("max_position_embeddings") is not None
        else 2048,
        tie_word_embeddings=_bool_field(d, "tie_word_embeddings", False, where),
    )


def hf_config_dict(cfg: LlamaConfig) -> dict:
    """The HF `config.json` fields of a `LlamaConfig` (transformers v4 spelling, which v5 also reads)."""
    rs = cfg.rope_scaling
    scaling = None
    if rs.rope_type != "default":
        scaling = {k: v for k, v in asdict(rs).items() if v is not None}
        scaling["type"] = rs.rope_type
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
    }
