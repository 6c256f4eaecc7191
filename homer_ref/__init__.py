"""homer_ref: a readable reference implementation of HOMER (Hierarchical cOntext MERging, ICLR 2024).

    import homer_ref
    model = homer_ref.load_model("model_dir_or_file", dtype=torch.float32, device="cpu")
    tok = homer_ref.load_tokenizer("model_dir_or_file")
    cache = homer_ref.homer_prefill(model, prefix_ids, context_ids, suffix_ids, homer_ref.HomerConfig(512))
    new_ids = homer_ref.homer_generate(model, cache, max_new_tokens=20)

The package: the library (`llama.py`, `loading/`, `decoding.py`, `budget.py`, and HOMER in `homer/`), the answer
key for other implementations (`testing/`), the passkey task (`tasks/`) and the commands (`cli/`, run as
`python -m homer_ref.<command>`). The library never imports a command.
"""

from homer_ref.homer import HomerCache, HomerConfig, continuation_logits, homer_generate, homer_prefill, plan
from homer_ref.llama import Llama, LlamaConfig
from homer_ref.loading import CheckpointError, Tokenizer, load_model, load_tokenizer

__all__ = [
    "CheckpointError",
    "HomerCache",
    "HomerConfig",
    "Llama",
    "LlamaConfig",
    "Tokenizer",
    "continuation_logits",
    "homer_generate",
    "homer_prefill",
    "load_model",
    "load_tokenizer",
    "plan",
]
