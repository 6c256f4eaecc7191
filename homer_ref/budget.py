"""Memory estimates made before allocating: a request that cannot fit is refused up front with a `MemoryError`
naming its size, the memory available and a fix, instead of failing (or swapping) halfway through a run.

The estimates count only what a run must hold at its peak — the KV cache it keeps alive (for HOMER, from the
plan's simulated traversal), one chunk's or one prompt's activations, the logits it returns — and not the
weights, which are already loaded, so a refused request would not have fitted.
"""

import math
from pathlib import Path

import torch

from homer_ref.llama import LlamaConfig


def available_bytes(device="cpu") -> int | None:
    """Free memory on `device`: the GPU's free memory, or for the CPU MemAvailable (and the cgroup's limit, when
    one is set); None when unknown (then nothing is refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # a container's limit (cgroup v2), which MemAvailable does not show
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free if free is not None else math.inf, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def gib(n: int) -> str:
    """A byte count for people: 1.5 GiB, 12 MiB, 3 KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 2**10:.3g} KiB"


def check_fits(needed: int, what: str, fix: str, device="cpu") -> None:
    """Raise `MemoryError` when `needed` bytes exceed the memory available on `device`."""
    available = available_bytes(device)
    if available is not None and needed > available:
        raise MemoryError(f"{what} needs about {gib(needed)} but only {gib(available)} is available; {fix}")


def kv_bytes(cfg: LlamaConfig, token_layers: int, itemsize: int) -> int:
    """Bytes of K and V for `token_layers` (tokens x layers) cached slots."""
    return token_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize


def activation_bytes(cfg: LlamaConfig, tokens: int, itemsize: int) -> int:
    """Bytes of one layer's activations over `tokens` tokens: residual stream, q/k/v/o and the MLP's 2 F-wide ones."""
    width = 4 * cfg.hidden_size + (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    return tokens * (width + 2 * cfg.intermediate_size) * itemsize


def plain_bytes(cfg: LlamaConfig, prompt_len: int, new_tokens: int, itemsize: int) -> int:
    """The plain forward of a prompt, then decoding: its full KV cache, activations and the last token's logits."""
    n = prompt_len + new_tokens
    return (
        kv_bytes(cfg, n * cfg.num_hidden_layers, itemsize)
        + activation_bytes(cfg, prompt_len, itemsize)
        + cfg.vocab_size * max(itemsize, 4)
    )
