"""Calibration: the distance bias subtracted from HOMER's significance score (HOMER_SPEC.md D.2, N.2.4).

Tokens close to the end of a chunk receive large attention logits from the last query just for being close
(RoPE's long-term decay). To rank tokens by content rather than position, HOMER subtracts the average logit
observed at each distance:

    bias[layer][d] = mean over calibration windows of  max over heads  <q_last, k_{last-d}> / sqrt(Dh)

computed exactly like the significance (pre-softmax, RoPE applied, max over query heads, GQA groups) on plain
windows of ordinary text, d in [0, M). Each window of M tokens contributes one value per distance.

Deviation (N.2.4): the official repository ships pickled tables for Llama-2 but no code to make them; here
calibration is part of the library and the table is a safetensors file (key "bias", [L, width] float32, never
pickle). Where a run's table comes from — given, beside the model as `homer_bias.safetensors`, the user cache, or
computed once on the default calibration text — is one policy, `homer_ref.bias`. `calibrate_on_context` makes a
table from any token ids (a document's own beginning, as tutorial 08 does).
"""

import torch
from safetensors.torch import load_file

from homer_ref.decoding import check_ids, feed_forward_in_rows
from homer_ref.llama import Llama
from homer_ref.progress import Progress


@torch.no_grad()
def calibrate(model: Llama, windows: list[list[int]], progress: Progress | None = None) -> torch.Tensor:
    """bias [L, n] float32 from token windows that all have the same length n (use n = max_chunk_len).

    `progress` advances by one per layer of every window (len(windows) x L in all)."""
    if not windows or len({len(w) for w in windows}) != 1 or len(windows[0]) < 1:
        raise ValueError("calibration needs at least one window, all of the same non-zero length")
    windows = [check_ids(w, model.cfg.vocab_size, "a calibration window") for w in windows]
    n, L = len(windows[0]), model.cfg.num_hidden_layers
    device = model.embed_tokens.weight.device
    total = torch.zeros(L, n, dtype=torch.float64, device=device)
    positions = torch.arange(n, device=device)
    for window in windows:
        h = model.embed_tokens(torch.tensor([window], device=device))  # [1, n, D]
        for layer in range(L):
            h, _, _, last_logits = model.attend(layer, h, positions, last_query=True)  # last_logits [1, Hq, n]
            head_max = last_logits[0].amax(dim=0)  # [n]: slot i sits at distance n-1-i from the last token
            total[layer] += head_max.flip(0).to(torch.float64)  # index by distance d = n-1-i
            h = feed_forward_in_rows(model, layer, h)  # windows longer than MLP_ROWS: in rows
            if progress is not None:
                progress.update(1)
    return (total / len(windows)).to(torch.float32)


def windows_from_ids(ids: list[int], length: int, samples: int) -> list[list[int]]:
    """`samples` windows of `length` tokens spread evenly over `ids` (overlapping when the text is short)."""
    if length < 1:
        raise ValueError(f"the calibration window length (max_chunk_len) must be >= 1, got {length}")
    if len(ids) < length:
        raise ValueError(
            f"calibration text has {len(ids)} tokens, fewer than one window of max_chunk_len={length}; "
            "use a longer text or a smaller max_chunk_len"
        )
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    last_start = len(ids) - length
    starts = [round(i * last_start / max(samples - 1, 1)) for i in range(samples)]
    return [list(ids[s : s + length]) for s in starts]


def calibrate_on_context(
    model: Llama, ids: list[int], max_chunk_len: int, samples: int = 8, progress: Progress | None = None
) -> torch.Tensor:
    """A bias table [L, max_chunk_len] from `samples` windows of any token ids (a calibration text, a document's
    own beginning). Windows longer than the text are impossible, so a short text gives windows of its own length
    and the distances they cannot reach the last calibrated value."""
    if not ids:
        raise ValueError("cannot calibrate on an empty context; pass a bias table or choose reduction='uncalibrated'")
    length = min(max_chunk_len, len(ids))
    bias = calibrate(model, windows_from_ids(ids, length, samples), progress)  # [L, length]
    if length < max_chunk_len:
        bias = torch.cat([bias, bias[:, -1:].expand(-1, max_chunk_len - length)], dim=1)
    return bias


def check_bias(bias: torch.Tensor, num_layers: int, max_chunk_len: int) -> torch.Tensor:
    """The bias table as float32 [L, width], or a ValueError naming what is wrong with it."""
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.dim() != 2:
        raise ValueError(
            "the bias table must be a float tensor [num_layers, width]; compute one with homer_ref.calibrate"
        )
    if bias.shape[0] != num_layers:
        raise ValueError(f"the bias table has {bias.shape[0]} layers but the model has {num_layers}: wrong model?")
    if bias.shape[1] < max_chunk_len:
        raise ValueError(
            f"the bias table covers distances < {bias.shape[1]} but max_chunk_len is {max_chunk_len}: "
            f"recalibrate with --max-chunk-len {max_chunk_len} or lower max_chunk_len"
        )
    if not torch.isfinite(bias).all():
        raise ValueError("the bias table holds NaN or Inf values; recalibrate it")
    return bias.to(torch.float32)


def load_bias(path) -> torch.Tensor:
    """The `"bias"` tensor [L, width] of a safetensors file (its values are checked by `check_bias`)."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for unreadable files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if "bias" not in tensors:
        raise ValueError(f"{path}: no tensor named 'bias' (found {', '.join(sorted(tensors)) or 'none'})")
    bias = tensors["bias"]
    if bias.dim() != 2 or not bias.is_floating_point():
        raise ValueError(
            f"{path}: 'bias' is {str(bias.dtype).removeprefix('torch.')} {list(bias.shape)}, expected a float "
            "[num_layers, width] table; compute one with python -m homer_ref.calibrate"
        )
    return bias
