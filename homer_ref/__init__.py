"""homer_ref: a readable reference implementation of HOMER (Hierarchical cOntext MERging, ICLR 2024)."""

from homer_ref.llama import Llama, LlamaConfig
from homer_ref.loading import CheckpointError, Tokenizer, load_model, load_tokenizer

__all__ = ["CheckpointError", "Llama", "LlamaConfig", "Tokenizer", "load_model", "load_tokenizer"]
