"""Tokenizers: a sentencepiece `.model` file -> `Tokenizer` (encode / decode / piece), checked against the model."""

import os
from pathlib import Path

from homer_ref.llama import LlamaConfig
from homer_ref.loading.config import CheckpointError


class Tokenizer:
    """A sentencepiece model: `encode(text, bos=True)` -> ids, `decode(ids)` -> text."""

    def __init__(self, path: Path):
        import sentencepiece

        self.path = path
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{path}: not a sentencepiece model ({e})") from e
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        """The vocabulary piece of one id, e.g. '▁time' (sentencepiece marks a leading space with ▁)."""
        return self.sp.id_to_piece(int(token_id))


def check_tokenizer(tokenizer: Tokenizer, cfg: LlamaConfig) -> None:
    """A ValueError unless the tokenizer's vocabulary is the model's (else ids go out of range, or mean other words)."""
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model's vocabulary is "
            f"{cfg.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)"
        )


def load_tokenizer(path) -> Tokenizer:
    """A `Tokenizer` from a `.model` file or a model directory holding `tokenizer.model`."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"load_tokenizer needs a path (str or Path), got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.model").is_file():
            raise CheckpointError(f"{path}: no tokenizer.model in this directory; pass --tokenizer FILE.model")
        path = path / "tokenizer.model"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such tokenizer file; pass a sentencepiece .model file")
    return Tokenizer(path)
