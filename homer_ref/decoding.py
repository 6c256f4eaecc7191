"""Plain inference: the forward pass with its memory kept down, and token-by-token decoding on any KV cache.

`Llama.forward_cached` is the reference forward: every layer, every logit, the old cache left as it was. A long
prompt or a decoding loop needs less at once, and gets it here from the same two halves of each layer
(`Llama.attend`, `Llama.feed_forward`), with the same numbers:
- `prefill`: the MLP runs MLP_ROWS tokens at a time (its F-wide activations are the largest a layer makes), and
  only the last token's logits are computed (a long prompt's n x V logits are read by nobody);
- `step`: new tokens after a cache it consumes, each layer's old entry let go as its new one is made, so that a
  step never holds two full caches;
- `all_logits`: every token's logits with no cache kept (each layer's K/V freed at once), for perplexity.

Decoding (`decode`) serves plain prompts and HOMER's compact cache alike: it needs the logits of the last prompt
token, the cache, and the position id of the next token (HOMER_SPEC.md N.2.5: last_position + 1 for HOMER, the
prompt length for a plain prompt). Greedy, temperature and nucleus (top-p) sampling, seeded; sampling settings
apply to the first token too (N.2.5).
"""

import math
from collections.abc import Callable

import torch

from homer_ref.budget import check_fits, plain_bytes
from homer_ref.llama import Cache, Llama, rope_cos_sin
from homer_ref.progress import Progress

MLP_ROWS = 4096  # a longer input runs the MLP this many tokens at a time


def feed_forward_in_rows(model: Llama, layer: int, h: torch.Tensor) -> torch.Tensor:
    """`model.feed_forward` on h [B, n, D], MLP_ROWS tokens at a time: the MLP acts on each token alone, and its two
    [B, n, F] intermediates for a 16k-token prompt would be 0.2 GB beside the KV cache (F = 1536)."""
    if h.shape[1] <= MLP_ROWS:
        return model.feed_forward(layer, h)
    return torch.cat([model.feed_forward(layer, part) for part in h.split(MLP_ROWS, dim=1)], dim=1)


def run_layers(
    model: Llama,
    tokens: torch.Tensor,  # [B, n]
    positions: torch.Tensor,  # [n] or [B, n]
    cache: Cache | None,  # per layer (k, v) [B, Hkv, past, Dh]; consumed: each entry becomes None once replaced
    keep_cache: bool,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, Cache]:
    """Hidden states [B, n, D] after the last layer, and the new cache (empty unless `keep_cache`).

    The layers of `Llama.forward_cached`, holding one layer's old and new K/V at a time instead of two caches."""
    h = model.embed_tokens(tokens)  # [B, n, D]
    rope = rope_cos_sin(model.cfg, positions, h.dtype)  # the same positions in every layer: computed once
    new_cache: Cache = []
    for layer in range(model.cfg.num_hidden_layers):
        past = None if cache is None else cache[layer]
        if cache is not None:
            cache[layer] = None  # the caller gave the cache up: the old entry dies with `past` below
        h, k, v, _ = model.attend(layer, h, positions, past, rope=rope)
        del past
        h = feed_forward_in_rows(model, layer, h)
        if keep_cache:
            new_cache.append((k, v))
        del k, v
        if progress is not None:
            progress.update(1)
    return h, new_cache


@torch.no_grad()
def prefill(
    model: Llama, tokens: torch.Tensor, positions: torch.Tensor | None = None, progress: Progress | None = None
) -> tuple[torch.Tensor, Cache]:
    """A prompt tokens [B, n] from an empty cache: the last token's logits [B, V] and the cache of every token."""
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
    h, cache = run_layers(model, tokens, positions, None, keep_cache=True, progress=progress)
    return model.logits(h[:, -1:])[:, -1], cache


@torch.no_grad()
def step(model: Llama, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
    """tokens [B, n] after `cache`, which it consumes (its entries become None): the last logits [B, V] and the
    new cache (old entries, then the n new ones)."""
    h, cache = run_layers(model, tokens, positions, cache, keep_cache=True)
    return model.logits(h[:, -1:])[:, -1], cache


@torch.no_grad()
def all_logits(model: Llama, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, n, V] of every token of tokens [B, n] (positions 0..n-1), keeping no cache."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return model.logits(run_layers(model, tokens, positions, None, keep_cache=False)[0])


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
    cache: Cache,  # per layer (k, v) [1, Hkv, past, Dh]; consumed (entries become None as they are replaced)
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
        logits, cache = step(model, x, position, cache)
        last_logits = logits[0]
    return out


@torch.no_grad()
def generate_plain(
    model: Llama, prompt_ids: list[int], max_new_tokens: int, progress: Progress | None = None, **kwargs
) -> list[int]:
    """Plain (full-attention) generation: `prefill` the prompt (`progress` counts its layers), then `decode`."""
    prompt_ids = check_ids(prompt_ids, model.cfg.vocab_size, "prompt_ids")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: start from BOS alone ([tokenizer.bos_id]) for an unconditioned text")
    weight = model.embed_tokens.weight
    if isinstance(max_new_tokens, int):  # else `decode` says what is wrong with it
        needed = plain_bytes(model.cfg, len(prompt_ids), max(max_new_tokens, 0), weight.element_size())
        what = f"plain inference on {len(prompt_ids)} + {max_new_tokens} tokens"
        check_fits(needed, what, "shorten the prompt or use HOMER (--mode homer)", weight.device)
    logits, cache = prefill(model, torch.tensor([prompt_ids], device=weight.device), progress=progress)
    return decode(model, logits[0], cache, len(prompt_ids), max_new_tokens, **kwargs)


@torch.no_grad()
def greedy_batch(model: Llama, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of prompts that all have the same length, decoded as one batch."""
    x = torch.tensor(prompts, device=model.embed_tokens.weight.device)  # [B, n]
    n = x.shape[1]
    logits, cache = prefill(model, x)  # logits [B, V]
    out = []
    for t in range(max_new_tokens):
        token = logits.argmax(-1)  # [B]: the first maximum, as `sample_next`
        out.append(token)
        if t < max_new_tokens - 1:
            logits, cache = step(model, token[:, None], torch.tensor([n + t], device=x.device), cache)
    return torch.stack(out, dim=1).tolist()
