"""Token-by-token decoding on top of any KV cache: greedy, temperature and nucleus (top-p) sampling, seeded.

The same loop serves plain prompts and HOMER's compact cache: it only needs the logits of the last prompt
token, the cache, and the position id of the next token (HOMER_SPEC.md N.2.5: last_position_id + 1 for HOMER,
the prompt length for a plain prompt). Sampling settings apply to the first token too (N.2.5).
"""

from collections.abc import Callable, Iterator

import torch

from homer_ref.llama import Cache, Llama


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from logits [V]: argmax when temperature == 0, else softmax(logits / t) cut to top-p mass."""
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
    cache: Cache,  # per layer (k, v) [1, Hkv, S, Dh]
    next_position: int,  # position id of the first generated token
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Generate up to `max_new_tokens` ids (stopping after a stop id), each fed back at the next position."""
    return list(
        _decode_iter(
            model, last_logits, cache, next_position, max_new_tokens, temperature, top_p, seed, stop_ids, on_token
        )
    )


def _decode_iter(
    model, last_logits, cache, position, max_new_tokens, temperature, top_p, seed, stop_ids, on_token
) -> Iterator[int]:
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1]; got {temperature} and {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    device = last_logits.device
    for t in range(max_new_tokens):
        token = sample_next(last_logits.cpu(), temperature, top_p, generator)
        if on_token is not None:
            on_token(token)
        yield token
        if token in stop_ids or t == max_new_tokens - 1:
            return
        x = torch.tensor([[token]], device=device)
        logits, cache = model.forward_cached(x, torch.tensor([position + t], device=device), cache)
        last_logits = logits[0, -1]


@torch.no_grad()
def generate_plain(model: Llama, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """Plain (full-attention) generation: prefill the prompt, then `decode`."""
    device = model.embed_tokens.weight.device
    logits, cache = model.forward_cached(torch.tensor([prompt_ids], device=device))
    return decode(model, logits[0, -1], cache, len(prompt_ids), max_new_tokens, **kwargs)
