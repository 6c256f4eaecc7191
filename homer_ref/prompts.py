"""How a text prompt becomes HOMER's three parts, prefix / context / suffix (HOMER_SPEC.md A).

    prefix_ids, context_ids, suffix_ids = homer_parts(tok, text, max_chunk_len, prefix=None, suffix=None, chat=False)

Every chunk gets the prefix and the suffix; only the context is chunked and pruned, and the suffix's last token
decides what is pruned (it is the query whose attention scores the context). The split, in order of precedence:
- explicit: `prefix` and/or `suffix` text placed around the prompt;
- markers in the prompt: everything before a line `<<<CONTEXT>>>` is the prefix, everything after a line
  `<<<SUFFIX>>>` the suffix;
- the default: the prefix is BOS alone (when the model adds one), the suffix the prompt's last line (the question
  at the end) and the context everything before it.
A suffix longer than M / 4 tokens keeps its last M / 4 and gives the rest to the context.

With `chat`, the model's chat template wraps the prompt as one user turn: the template's opening (system prompt,
user header, its own BOS) joins the prefix and its closing (end of the turn, the assistant header) the suffix,
so that every chunk sees both (`Tokenizer.chat_affixes`). `plain_ids` gives the same prompt as one sequence, for
plain inference.
"""

from homer_ref.loading import Tokenizer

CONTEXT_MARKER, SUFFIX_MARKER = "<<<CONTEXT>>>", "<<<SUFFIX>>>"


def split_prompt(text: str, prefix: str | None = None, suffix: str | None = None) -> tuple[str, str, str]:
    """(prefix, context, suffix) texts from explicit affixes, markers, or the default (module docstring)."""
    if CONTEXT_MARKER in text or SUFFIX_MARKER in text:
        head, _, rest = text.partition(CONTEXT_MARKER) if CONTEXT_MARKER in text else ("", "", text)
        body, _, tail = rest.partition(SUFFIX_MARKER)
        return (prefix or "") + head.strip("\n"), body.strip("\n"), tail.strip("\n") + (suffix or "")
    if suffix is not None:
        return prefix or "", text, suffix
    body, _, last = text.rstrip("\n").rpartition("\n")
    return prefix or "", body, last


def encode_parts(
    tok: Tokenizer, prefix: str, context: str, suffix: str, max_suffix: int, bos: bool | None = None
) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the three parts: BOS (when the model adds one; `bos` forces it) starts the prefix; an over-long
    suffix moves its head into the context."""
    prefix_ids, context_ids, suffix_ids = (
        tok.encode(prefix, bos=bos),
        tok.encode(context, False),
        tok.encode(suffix, False),
    )
    if len(suffix_ids) > max_suffix:
        context_ids, suffix_ids = context_ids + suffix_ids[:-max_suffix], suffix_ids[-max_suffix:]
    return prefix_ids, context_ids, suffix_ids


def homer_parts(
    tok: Tokenizer,
    text: str,
    max_chunk_len: int,
    prefix: str | None = None,
    suffix: str | None = None,
    chat: bool = False,
) -> tuple[list[int], list[int], list[int]]:
    """HOMER's (prefix, context, suffix) ids of a text prompt: `split_prompt`, and with `chat` the template's
    opening joined to the prefix and its closing to the suffix."""
    opening, closing = tok.chat_affixes() if chat else ("", "")
    head, body, tail = split_prompt(text, prefix, suffix)
    bos = False if chat else None  # a chat template writes its own BOS
    return encode_parts(tok, opening + head, body, tail + closing, max(1, max_chunk_len // 4), bos)


def plain_ids(tok: Tokenizer, text: str, prefix: str | None = None, suffix: str | None = None, chat: bool = False):
    """The whole prompt as one sequence of ids (plain inference): prefix + text + suffix, in the chat template's
    user turn with `chat`."""
    opening, closing = tok.chat_affixes() if chat else ("", "")
    return tok.encode(opening + (prefix or "") + text + (suffix or "") + closing, bos=False if chat else None)
