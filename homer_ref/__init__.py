"""homer_ref: a readable reference implementation of HOMER (Hierarchical cOntext MERging, ICLR 2024).

    import homer_ref
    model = homer_ref.load_model("model_dir_or_file", dtype=torch.float32, device="cpu")
    tok = homer_ref.load_tokenizer("model_dir_or_file")
    config = homer_ref.HomerConfig(max_chunk_len=512, reduction="calibrated")
    bias = homer_ref.bias_for(model, tok, config.max_chunk_len, model_path="model_dir_or_file").table
    cache = homer_ref.homer_prefill(model, prefix_ids, context_ids, suffix_ids, config, bias=bias)
    new_ids = homer_ref.homer_generate(model, cache, max_new_tokens=20)

The package: the library (`llama.py`, `loading/`, `decoding.py`, `budget.py`, HOMER in `homer/`, where its
calibration table comes from in `bias.py`, text prompts split in `prompts.py`, the picture in `picture.py`), the
answer key for other implementations (`testing/`), the tasks HOMER is measured on (`tasks/`), the benchmarks
(`benchmark/`) and the commands (`cli/`, run as `python -m homer_ref.<command>`). The library never imports a
command.
"""

from homer_ref.bias import bias_for
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
    "bias_for",
    "continuation_logits",
    "homer_generate",
    "homer_prefill",
    "load_model",
    "load_tokenizer",
    "plan",
]
