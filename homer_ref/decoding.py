"""Token-by-token decoding on top of any KV cache: greedy, temperature and nucleus (top-p) sampling, seeded.

The same loop serves plain prompts and HOMER's compact cache: it only needs the logits of the last prompt
token, the cache, and the position id of the next token (HOMER_SPEC.md N.2.5: last_position_id + 1 for HOMER,
the prompt length for a plain prompt). Sampling settings apply to the first token too (N.2.5).
"""

import math
from collections.abc import Callable

import torch

from homer_ref.budget import check_fits, plain_bytes
from homer_ref.llama import Cache, Llama


def check_ids(ids, vocab_size: int, name: str) -> list[int]:
    """ids (a list or 1-D tensor of ints) as a list, or a ValueError: one prompt at a time (N.2.7), in range."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point():
            raise ValueError(f"{name} must be a 1-D integer tensor or list (one prompt); got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{name} must be a list of integer token ids, got {type(ids).__name__}")
    if any(isinstance(i, (list, tuple, torch.Tensor)) for i in ids):
        raise ValueError(f"{name} is a batch; HOMER processes one prompt at a time: call it once per prompt")
    if any(isinstance(i, (bool, float)) or not isinstance(i, int) for i in ids):
        raise ValueError(f"{name} must hold integer token ids")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(
            f"{name} holds token id {bad[0]} outside the vocabulary [0, {vocab_size}); check the tokenizer"
        )
    return list(ids)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from logits [V]: argmax when temperature == 0, else softmax(logits / t) cut to top-p mass."""
    if torch.isnan(logits).any():
        raise RuntimeError(
            "the model produced NaN logits (its weights hold NaN/Inf, or it overflowed in a 16-bit dtype); "
            "check the checkpoint or run in float32"
        )
    if temperature == 0:
        return int(torch.argmax(logits))  # the first maximum: deterministic ties
    probs = torch.softmax(logits.to(torch.float64) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def decode(
    model: Llama,
    last_logits: torch.Tensor,  # [V] logits after the last prompt token
    cache: Cache,  # per layer (k, v) [1, Hkv, S, Dh]; consumed (entries become None as they are replaced)
    next_position: int,  # position id of the first generated token
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Generate up to `max_new_tokens` ids (stopping after a stop id), each fed back at the next position."""
    if not 0 <= temperature < math.inf or not 0 < top_p <= 1:  # NaN fails both comparisons
        raise ValueError(f"temperature must be finite and >= 0, top_p in (0, 1]; got {temperature} and {top_p}")
    for name, value in (("max_new_tokens", max_new_tokens), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be a 64-bit integer, got {seed}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    device = last_logits.device
    out: list[int] = []
    for t in range(max_new_tokens):
        token = sample_next(last_logits.cpu(), temperature, top_p, generator)
        out.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop_ids or t == max_new_tokens - 1:
            break
        x = torch.tensor([[token]], device=device)
        position = torch.tensor([next_position + t], device=device)
        logits, cache = model.forward_cached(x, position, cache, consume_cache=True)
        last_logits = logits[0, -1]
    return out


@torch.no_grad()
def generate_plain(model: Llama, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """Plain (full-attention) generation: prefill the prompt, then `decode`."""
    prompt_ids = check_ids(prompt_ids, model.cfg.vocab_size, "prompt_ids")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: start from BOS alone ([tokenizer.bos_id]) for an unconditioned text")
    weight = model.embed_tokens.weight
    if isinstance(max_new_tokens, int):  # else `decode` says what is wrong with it
        needed = plain_bytes(model.cfg, len(prompt_ids), max(max_new_tokens, 0), weight.element_size())
        what = f"plain inference on {len(prompt_ids)} + {max_new_tokens} tokens"
        check_fits(needed, what, "shorten the prompt or use HOMER (--mode homer)", weight.device)
    logits, cache = model.forward_cached(torch.tensor([prompt_ids], device=weight.device))
    return decode(model, logits[0, -1], cache, len(prompt_ids), max_new_tokens, **kwargs)


@torch.no_grad()
def greedy_batch(model: Llama, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of prompts that all have the same length, decoded as one batch."""
    x = torch.tensor(prompts, device=model.embed_tokens.weight.device)  # [B, T]
    T = x.shape[1]
    logits, cache = model.forward_cached(x)
    out = []
    for t in range(max_new_tokens):
        token = logits[:, -1].argmax(-1)  # [B]: the first maximum, as `sample_next`
        out.append(token)
        if t < max_new_tokens - 1:
            position = torch.tensor([T + t], device=x.device)
            logits, cache = model.forward_cached(token[:, None], position, cache, consume_cache=True)
    return torch.stack(out, dim=1).tolist()
