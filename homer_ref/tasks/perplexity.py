"""Language modelling past the trained context: the perplexity protocol of HOMER_SPEC.md H.2, and its baselines.

Every function returns the negative log-likelihood of each scored target token, keyed by its index t in `ids`
(token t predicted from tokens 0..t-1), for the targets in [lo, hi) with t >= 1; only the forwards that score such
targets are run. Perplexity is exp(mean NLL). Three ways to predict:

    nll_plain     one forward over the whole text (with a RoPE scaling: linear | dynamic | yarn, by the text's
                  length as a multiple of the trained context; none at or below 1x)
    nll_sliding   a window of W tokens moved by `stride`: the first window scores its own tokens, each later one
                  the targets it adds
    nll_homer     the official protocol, with ev = the segment length and P = S = the affix length:
                  the first 2·ev tokens are scored by one plain forward; then for end = 2·ev, 3·ev, ...:
                  prefix = ids[:P], suffix = ids[end-S:end], context = everything between, compressed by
                  HOMER; the tokens [end, end+ev) are fed after the compact cache, each logit scoring the next
                  token. Every target is predicted exactly once (the cache's own last logit, which would predict
                  token `end` again, is not used).

`sample_document` writes an in-domain text with the model itself, for a model that comes without one.
`Segments.for_model` resolves the protocol's settings from the trained context (the defaults live there only).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from homer_ref.decoding import all_logits, decode, prefill
from homer_ref.homer import HomerConfig, continuation_logits, homer_prefill
from homer_ref.llama import Llama
from homer_ref.loading.weights import rope_scaled


@dataclass(frozen=True)
class Segments:
    """The protocol's settings: M (HOMER's max chunk length), ev (tokens fed after each cache) and P = S."""

    max_chunk_len: int
    segment_len: int
    affix_len: int

    @classmethod
    def for_model(cls, trained_context: int, max_chunk_len=None, segment_len=None, affix_len=None) -> "Segments":
        """Defaults from the trained context, as the official protocol: M = trained / 2 (a cache of < M positions
        plus a segment of ev = M tokens stays inside the trained context), ev = M, P = S = M / 32."""
        M = max_chunk_len or trained_context // 2
        return cls(M, segment_len or M, affix_len if affix_len is not None else max(1, M // 32))


@torch.no_grad()
def sample_document(
    model: Llama,
    n_tokens: int,
    seed: int,
    bos: int,
    stop: tuple[int, ...],
    report: Callable[[str], None] | None = None,
) -> list[int]:
    """A text of `n_tokens` ids sampled from the model itself (temperature 1, seeded): stories from BOS, each within
    the trained context and none longer than what is still missing, so a model with a long context is never asked
    for more than `n_tokens`. Stop tokens end a story and are not kept. `report(message)` sees the progress."""
    ids, story = [], 0
    trained = model.cfg.max_position_embeddings
    while len(ids) < n_tokens:
        logits, cache = prefill(model, torch.tensor([[bos]], device=model.embed_tokens.weight.device))
        wanted = min(trained, n_tokens - len(ids)) - 1  # new tokens after this story's BOS
        new = decode(model, logits[0], cache, 1, wanted, temperature=1.0, seed=seed * 100003 + story, stop_ids=stop)
        ids += [bos] + [t for t in new if t not in stop]
        story += 1
        if report is not None:
            report(f"sampled {min(len(ids), n_tokens)}/{n_tokens} tokens ({story} stories)")
    return ids[:n_tokens]


def nll_of(logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """Per-token negative log-likelihood [n] (float64) of `targets` under logits [n, V]."""
    target = torch.tensor(targets, device=logits.device)
    return F.cross_entropy(logits.to(torch.float64), target, reduction="none")


class _Scores:
    """The NLL of the targets in [lo, hi), filled from blocks of logits."""

    def __init__(self, ids: list[int], lo: int, hi: int):
        self.ids, self.lo, self.hi, self.nll = ids, lo, hi, {}

    def wants(self, first: int, last: int) -> bool:  # does any target in [first, last] count?
        return first < self.hi and last >= self.lo

    def add(self, first_target: int, logits: torch.Tensor) -> None:  # logits [n, V]: row j predicts first_target + j
        targets = range(first_target, min(first_target + logits.shape[0], len(self.ids)))
        wanted = [t for t in targets if self.lo <= t < self.hi]
        if wanted:
            rows = torch.tensor([t - first_target for t in wanted], device=logits.device)
            self.nll.update(zip(wanted, nll_of(logits[rows], [self.ids[t] for t in wanted]).tolist()))


def _forward(model: Llama, ids: list[int]) -> torch.Tensor:
    return all_logits(model, torch.tensor([ids], device=model.embed_tokens.weight.device))[0]  # [n, V]: every row


@torch.no_grad()
def nll_plain(model: Llama, ids: list[int], lo: int, hi: int, rope: str = "plain") -> dict[int, float]:
    """One forward over all of `ids`, RoPE scaled by `rope` (plain | linear | dynamic | yarn) by len / trained."""
    scores = _Scores(ids, lo, hi)
    scores.add(1, _forward(rope_scaled(model, rope, len(ids) / model.cfg.max_position_embeddings), ids))
    return scores.nll


@torch.no_grad()
def nll_sliding(model: Llama, ids: list[int], lo: int, hi: int, window: int, stride: int) -> dict[int, float]:
    """A sliding window of `window` tokens, moved by `stride`."""
    scores, n = _Scores(ids, lo, hi), len(ids)
    covered = min(window, n)  # the first window scores targets 1 .. covered - 1
    scores.add(1, _forward(model, ids[:covered]))
    while covered < n - 1:  # then each window, `stride` further, scores the targets it adds
        stop = min(covered + stride, n)
        start = max(0, stop - window)
        if scores.wants(covered + 1, stop):
            scores.add(covered + 1, _forward(model, ids[start:stop])[covered - start :])
        covered = stop
    return scores.nll


@torch.no_grad()
def nll_homer(
    model: Llama,
    ids: list[int],
    lo: int,
    hi: int,
    config: HomerConfig,
    segment_len: int,
    affix_len: int,
    bias: torch.Tensor | None = None,
    report: Callable[[str], None] | None = None,
) -> dict[int, float]:
    """The official protocol (module docstring) with `config`, ev = `segment_len`, P = S = `affix_len`."""
    scores, n, ev, P = _Scores(ids, lo, hi), len(ids), segment_len, affix_len
    if scores.wants(1, 2 * ev):
        scores.add(1, _forward(model, ids[: 2 * ev]))  # targets 1 .. 2ev, plainly
    for end in range(2 * ev, n, ev):  # the part fed [end, end + ev) scores targets end + 1 .. end + ev
        if not scores.wants(end + 1, end + ev):
            continue
        cache = homer_prefill(model, ids[:P], ids[P : end - P], ids[end - P : end], config, bias=bias)
        scores.add(end + 1, continuation_logits(model, cache, ids[end : end + ev]))
        if report is not None:
            report(f"segment [{end}, {min(end + ev, n)}) of {n}: {len(cache.positions)} cached slots")
    return scores.nll
