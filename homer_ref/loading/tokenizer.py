"""Tokenizers: one `Tokenizer` interface over a sentencepiece `.model`, an HF `tokenizer.json` or a GGUF vocabulary.

    tok = load_tokenizer("model_dir_or_file")   # .model, tokenizer.json, a model directory, .gguf, .bin, .safetensors
    tok.encode(text)          # ids, BOS prepended when the model's own files say so (bos=True/False forces it)
    tok.decode(ids), tok.piece(id), tok.vocab_size, tok.bos_id, tok.eos_id, tok.stop_ids
    tok.token_texts(ids)      # the text each token stands for in place ("".join gives the text; pictures use it)
    tok.chat_template         # the Jinja source from the model's files, or None
    tok.apply_chat([{"role": "user", "content": "Hi"}])  # the prompt text, rendered as transformers renders it

Conventions come from the model's files, never from guesses: `add_bos_token` of `tokenizer_config.json` (else
whether tokenizer.json's post-processor prepends BOS), `tokenizer.ggml.add_bos_token` of a GGUF file; a
sentencepiece `.model` alone prepends BOS (llama2.c's and the shipped models' convention). `stop_ids` is EOS plus
the `eos_token_id` list of `generation_config.json` / `config.json` (instruct models end a turn with a token that
is not EOS) or GGUF's end-of-turn token.

Which file a path means (`find_tokenizer_file`): a directory's `tokenizer.json` is preferred over its
`tokenizer.model` when both exist, as transformers prefers the fast tokenizer it was saved with (tokenizer.json
also carries the added special tokens that a `.model` lacks); a model *file* (`.bin`, `.safetensors`) means the
tokenizer in its directory, where the only `*.model` file also counts (llama2.c ships `tok512.model`).

`tokenizers` (HF's own library, which tokenizer.json files are written for), `gguf` and `jinja2` are optional:
`pip install 'homer_ref[models]'`; without them sentencepiece models work as before.
"""

import codecs
import importlib
import json
import os
import re
from functools import cached_property
from pathlib import Path

from homer_ref.llama import LlamaConfig
from homer_ref.loading.config import CheckpointError

MODELS_EXTRA = "pip install 'homer_ref[models]'"
CHAT_SENTINEL = "\x00HOMER-USER-TURN\x00"  # stands for the user's text when the chat template is split (chat_affixes)


def optional_import(module: str, what: str):
    """`import module`, or one line saying which extra installs it (tokenizers, gguf, jinja2 are optional)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise CheckpointError(f"{what} needs the '{module}' package: {MODELS_EXTRA}") from e


class Tokenizer:
    """The interface every command uses. Subclasses provide `_encode` (text -> ids, nothing added), `decode`
    and `piece`, and set the attributes below in their constructor."""

    path: Path
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool  # the model's own convention, used by encode(text) with bos=None
    stop_ids: tuple[int, ...]  # generation stops after any of these (EOS first)
    chat_template: str | None  # Jinja source, or None

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        """Text of `ids`; special tokens (BOS, EOS, chat markers) decode to nothing, as in sentencepiece."""
        raise NotImplementedError

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of one id as stored, e.g. '▁time' (sentencepiece) or 'Ġtime' (byte-level BPE)."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token stands for in a text (a piece of a character, for a byte token); a special
        token (BOS, a chat marker) stands for its name, e.g. b"<s>"."""
        raise NotImplementedError

    def is_special(self, token_id: int) -> bool:
        """Whether a token is a control token (BOS, EOS, chat markers): text never contains it."""
        raise NotImplementedError

    def token_texts(self, ids) -> list[str]:
        """The text each token of `ids` stands for where it is: spaces and newlines included, whatever the
        vocabulary's spelling ('▁' of sentencepiece, 'Ġ' and 'Ċ' of byte-level BPE, byte pieces like <0x0A>).
        A character whose bytes span several tokens belongs to the token that completes it, so that
        "".join(token_texts(ids)) is the text; special tokens appear as their names."""
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        return [utf8.decode(self.token_bytes(int(i))) for i in ids]

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS first when `bos` (None: when the model's files say so)."""
        add = self.add_bos if bos is None else bos
        if add and self.bos_id is None:
            raise ValueError(f"tokenizer {self.path} has no BOS token; encode with bos=False")
        return ([self.bos_id] if add else []) + (self._encode(text) if text else [])

    def special_token_texts(self) -> dict[str, str]:
        """`bos_token` / `eos_token` as text, the names chat templates use."""
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id}
        return {name: self.piece(i) for name, i in names.items() if i is not None}

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template rendered on `messages` (a list of {"role", "content"}), as transformers renders it:
        jinja2's sandbox with trim_blocks and lstrip_blocks, `raise_exception`, `tojson`, and the special tokens.
        The text holds its own BOS when the template writes one: encode it with bos=False."""
        if self.chat_template is None:
            raise ValueError(
                f"tokenizer {self.path} has no chat template; drop --chat or use an instruct model's files"
            )
        return render_chat(self.chat_template, messages, add_generation_prompt, self.special_token_texts())

    def chat_affixes(self) -> tuple[str, str]:
        """(opening, closing): the rendered template of one user turn before and after the user's text.

        HOMER gives the opening (system prompt, user header) to the prefix and the closing (end of the user turn,
        assistant header) to the suffix, so that every chunk sees both (generate --chat)."""
        text = self.apply_chat([{"role": "user", "content": CHAT_SENTINEL}])
        if text.count(CHAT_SENTINEL) != 1:
            raise ValueError(f"tokenizer {self.path}: the chat template does not write the user's text verbatim once")
        opening, _, closing = text.partition(CHAT_SENTINEL)
        return opening, closing


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool, special: dict[str, str]) -> str:
    """Render an HF chat template the way transformers does (its `render_jinja_template` settings)."""
    jinja2 = optional_import("jinja2", "a chat template")
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"the chat template refused the messages: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template cannot be rendered ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------- sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file; BOS is prepended by default (its models' convention)."""

    def __init__(self, path: Path):
        import sentencepiece

        self.path = path
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{path}: not a sentencepiece model ({e})") from e
        self.vocab_size = self._sp.vocab_size()
        self.bos_id, self.eos_id = _id_or_none(self._sp.bos_id()), _id_or_none(self._sp.eos_id())
        self.add_bos = self.bos_id is not None
        self.stop_ids = () if self.eos_id is None else (self.eos_id,)
        self.chat_template = None

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        return _spm_piece_bytes(self.piece(token_id), self._sp.is_byte(int(token_id)))

    def is_special(self, token_id: int) -> bool:
        return bool(self._sp.is_control(int(token_id)))


BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte fallback: one byte of a rarer character


def _spm_piece_bytes(piece: str, is_byte: bool) -> bytes:
    """A sentencepiece-style piece as text bytes: '▁' a space, a byte piece <0xNN> the byte NN."""
    match = BYTE_PIECE.fullmatch(piece) if is_byte or piece.startswith("<0x") else None
    return bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode()


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): each byte is spelled by one printable character, itself for the
    printable bytes ! .. ~, ¡ .. ¬, ® .. ÿ, and chr(256 + k) for the k-th of the others in byte order (so a space
    is 'Ġ', a newline 'Ċ'). Returns the inverse: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}


def _id_or_none(i: int) -> int | None:
    return None if i < 0 else i  # sentencepiece says -1 for "no such token"


# ----------------------------------------------------------------------------------------------- HF tokenizers


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer`: read from an HF `tokenizer.json`, or built from a GGUF vocabulary (`gguf.py`)."""

    def __init__(self, path: Path, backend, *, bos_id, eos_id, add_bos, stop_ids, chat_template, special=None):
        self.path, self._tk = path, backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.stop_ids = tuple(dict.fromkeys(i for i in ((eos_id,) if eos_id is not None else ()) + tuple(stop_ids)))
        self.chat_template = chat_template
        self._special = special or {}

    def _encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def piece(self, token_id: int) -> str:
        return self._tk.id_to_token(int(token_id))

    def special_token_texts(self) -> dict[str, str]:
        return super().special_token_texts() | self._special

    @cached_property
    def _spelling(self) -> str:
        """How the vocabulary spells text: "byte_level" (GPT-2's alphabet), "metaspace" ('▁' and <0xNN> pieces,
        sentencepiece's), or "plain" (pieces are text), read from the tokenizer's decoder."""
        decoder = json.dumps(json.loads(self._tk.to_str()).get("decoder"), ensure_ascii=False)
        if '"ByteLevel"' in decoder:
            return "byte_level"
        return "metaspace" if "\u2581" in decoder or "Metaspace" in decoder or "ByteFallback" in decoder else "plain"

    @cached_property
    def _special_ids(self) -> set[int]:
        return {i for i, t in self._tk.get_added_tokens_decoder().items() if t.special}

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.piece(token_id)
        if self.is_special(token_id) or piece is None:
            return (piece or "").encode()
        if self._spelling == "byte_level":
            table = _BYTE_LEVEL
            return bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()
        if self._spelling == "metaspace":
            return _spm_piece_bytes(piece, False)
        return self._tk.decode([int(token_id)], skip_special_tokens=False).encode()


_BYTE_LEVEL = _byte_level_table()


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value) -> str | None:
    """`"<s>"` or `{"content": "<s>", ...}` (both spellings of tokenizer_config.json) -> "<s>"."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _id_list(value) -> list[int]:
    """`eos_token_id` of config.json / generation_config.json: an int, a list of ints, or absent."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def config_special_ids(model_path) -> tuple[int | None, int | None]:
    """(bos_token_id, eos_token_id) of an HF model directory's config.json (None when absent): the model's own
    BOS/EOS when it comes without a tokenizer."""
    path = Path(model_path)
    folder = path if path.is_dir() else path.parent
    d = _read_json(folder / "config.json")
    bos, eos = _id_list(d.get("bos_token_id")), _id_list(d.get("eos_token_id"))
    return (bos[0] if bos else None), (eos[0] if eos else None)


def _chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    """The chat template: `chat_template.jinja` (transformers >= 4.43 saves it apart), else tokenizer_config's
    `chat_template` (a string, or a list of named templates of which "default" is used)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_tokenizer_json(path: Path) -> HFTokenizer:
    """An HF `tokenizer.json`, with the conventions of `tokenizer_config.json`, `generation_config.json` and
    `config.json` beside it."""
    tokenizers = optional_import("tokenizers", f"{path} (an HF tokenizer.json)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({_first_line(e)})") from e
    folder = path.parent
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    model_config, generation = _read_json(folder / "config.json"), _read_json(folder / "generation_config.json")

    def token_id(name: str) -> int | None:  # from the token text of tokenizer_config, else config.json's id
        text = _token_text(tokenizer_config.get(name))
        if text is not None and backend.token_to_id(text) is not None:
            return backend.token_to_id(text)
        ids = _id_list(generation.get(f"{name}_id", model_config.get(f"{name}_id")))
        return ids[0] if ids else None

    bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
    # The post-processor's convention: the token it puts before a text, if any (BOS when nothing else names one).
    plain, with_special = backend.encode("a", add_special_tokens=False).ids, backend.encode("a").ids
    prepended = with_special[0] if len(with_special) > len(plain) and with_special[1:] == plain else None
    bos_id = prepended if bos_id is None else bos_id
    add_bos = tokenizer_config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = prepended is not None and prepended == bos_id
    stop_ids = _id_list(generation.get("eos_token_id")) + _id_list(model_config.get("eos_token_id"))
    return HFTokenizer(
        path,
        backend,
        bos_id=bos_id,
        eos_id=eos_id,
        add_bos=add_bos,
        stop_ids=stop_ids,
        chat_template=_chat_template(folder, tokenizer_config),
    )


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ----------------------------------------------------------------------------------------------- finding and checking


def find_tokenizer_file(path: Path) -> Path:
    """The tokenizer file that `path` (a tokenizer file, a model directory or a model file) stands for."""
    if path.is_file() and path.suffix in (".bin", ".safetensors"):
        folder = path.parent
    elif path.is_dir():
        folder = path
    elif path.is_file():
        return path
    else:
        raise CheckpointError(f"{path}: no such tokenizer file or directory; pass a tokenizer.json or .model file")
    for name in ("tokenizer.json", "tokenizer.model"):
        if (folder / name).is_file():
            return folder / name
    models = sorted(folder.glob("*.model"))
    if len(models) == 1:
        return models[0]
    found = f" (found {', '.join(p.name for p in models)}: pass one)" if models else ""
    raise CheckpointError(
        f"{folder}: no tokenizer.json or tokenizer.model in this directory{found}; pass --tokenizer FILE "
        "(a tokenizer.json, a sentencepiece .model or a .gguf), or give token ids (--prompt-ids, --print-ids)"
    )


def load_tokenizer(path) -> Tokenizer:
    """A `Tokenizer` from a sentencepiece `.model`, an HF `tokenizer.json`, a `.gguf` file, or a model directory
    or model file (`.bin`, `.safetensors`) beside one (see the module docstring for which file is chosen)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"load_tokenizer needs a path (str or Path), got {type(path).__name__}")
    path = find_tokenizer_file(Path(path))
    if path.suffix == ".gguf":
        from homer_ref.loading.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if path.suffix == ".json":
        return load_tokenizer_json(path)
    return SentencePieceTokenizer(path)


def check_tokenizer(tokenizer: Tokenizer, cfg: LlamaConfig) -> None:
    """A ValueError unless the tokenizer's vocabulary is the model's (else ids go out of range, or mean other words).

    HF models often pad their embedding matrix past the tokenizer (to a multiple of 64 or 128 rows), so a
    tokenizer smaller than the model by fewer than 128 ids is accepted; a larger one never is."""
    n, V = tokenizer.vocab_size, cfg.vocab_size
    if not 0 <= V - n < (128 if isinstance(tokenizer, HFTokenizer) else 1):
        raise ValueError(
            f"tokenizer {tokenizer.path} has {n} pieces but the model's vocabulary is {V}; pass the tokenizer "
            "the model was trained with (--tokenizer)"
        )
