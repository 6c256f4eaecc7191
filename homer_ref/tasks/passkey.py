"""The passkey-retrieval task: this project's own synthetic data, used by training, `eval` and `generate`.

A sample is a long haystack of filler sentences with one passkey sentence hidden at a chosen depth, followed by
the question; the model must answer with the 5-digit passkey (HOMER_SPEC.md J, the paper's passkey task).
HOMER gets the three parts separately (HOMER_SPEC.md A): prefix = BOS (+ `INSTRUCTION` when asked for),
context = the haystack, suffix = the question.

    [BOS] [instruction] | filler ... The pass key is 48219 . Do not forget 48219 . filler ... | What is ... is

Everything here is pure and seeded: a `random.Random` goes in, the same text comes out. The filler sentences and
the word list are this project's own. Text is written word by word with spaces around punctuation, and the
shipped tokenizer (trained by `scripts/train_passkey_model.py`) turns every word into one token and every digit
into one token, so `count_tokens` knows a text's length without a tokenizer.
"""

import random
import re
from dataclasses import dataclass

import torch

from homer_ref.data import PASSKEY_MODEL
from homer_ref.homer import HomerCache, HomerConfig

FILLER = (
    "The river runs past the old mill .",
    "A red boat waits by the stone bridge .",
    "Bread is baked in the morning before the market opens .",
    "The lamp in the tall window stays lit all night .",
    "Birds sing on the roof of the barn at dawn .",
    "A cold wind comes down from the hills in the evening .",
    "The road turns left after the old bridge .",
    "Snow covers the fields and the quiet town .",
)
SHIPPED_MODEL = PASSKEY_MODEL  # the model trained on this task
ANSWER_ROOM = 8  # tokens a prompt leaves free below its length for the answer ("▁" + 5 digits + "▁." + EOS)
ANSWER_TOKENS = 7  # tokens generated for an answer; the first integer in them is all that is scored
INSTRUCTION = "Find the pass key in the text and remember it ."
QUESTION_ASKED = "What is the pass key ?"
ANSWER_START = "The pass key is"  # in a chat prompt: the assistant's reply begins with it (the answer comes first)
QUESTION = f"{QUESTION_ASKED} {ANSWER_START}"
PASSKEY_DIGITS = 5


def passkey_sentence(passkey: int) -> str:
    return f"The pass key is {passkey} . Do not forget {passkey} ."


def vocabulary() -> list[str]:
    """Every word the task uses (digits excluded), sorted: the tokenizer must give each one a single token."""
    words = {w for text in (*FILLER, INSTRUCTION, QUESTION, passkey_sentence(0)) for w in text.split()}
    return sorted(w for w in words if not w.isdigit())


def count_tokens(text: str) -> int:
    """Tokens of `text` under the shipped tokenizer (no BOS): one per word, and a number is '▁' + one per digit."""
    return sum(len(w) + 1 if w.isdigit() else 1 for w in text.split())


def random_passkey(rng: random.Random) -> int:
    return rng.randrange(10 ** (PASSKEY_DIGITS - 1), 10**PASSKEY_DIGITS)  # no leading zero: "first integer" parses


def filler(rng: random.Random, n_tokens: int) -> list[str]:
    """Random filler sentences totalling exactly `n_tokens` tokens (or as close below as sentence lengths allow).

    Sentences are drawn independently while much room is left; the last few are chosen (in random order) so
    that the total is exact, which gives every prompt of a length the same token count (batched evaluation).
    """
    lengths = sorted({count_tokens(s) for s in FILLER})
    out, left = [], n_tokens
    while left > 4 * lengths[-1]:
        sentence = rng.choice(FILLER)
        out.append(sentence)
        left -= count_tokens(sentence)
    # The rest: fewest sentences summing to the largest reachable total <= left (a small exact-change problem).
    best: dict[int, list[int]] = {0: []}  # total -> sentence lengths reaching it
    for total in range(1, left + 1):
        options = [best[total - n] + [n] for n in lengths if total - n in best]
        if options:
            best[total] = min(options, key=len)
    tail = best[max(best)]
    rng.shuffle(tail)
    for n in tail:
        out.append(rng.choice([s for s in FILLER if count_tokens(s) == n]))
    return out


def make_sample(
    rng: random.Random, n_tokens_target: int, depth: float | None = None, instruction: bool = False
) -> tuple[str, str, str, int]:
    """(prefix_text, context_text, suffix_text, passkey) of a prompt of at most `n_tokens_target` tokens (BOS included).

    `depth` in [0, 1] places the passkey sentence that far into the filler (None: uniformly at random). The
    prefix text excludes BOS: encode it with bos=True. The prompt is as long as whole sentences allow (within one
    filler sentence of the target; exact for every target of at least ~60 tokens).
    """
    if depth is None:
        depth = rng.random()
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    passkey = random_passkey(rng)
    prefix = INSTRUCTION if instruction else ""
    needle = passkey_sentence(passkey)
    budget = n_tokens_target - 1 - count_tokens(prefix) - count_tokens(needle) - count_tokens(QUESTION)
    if budget < 0:
        raise ValueError(f"a passkey prompt needs at least {n_tokens_target - budget} tokens, got {n_tokens_target}")
    sentences = filler(rng, budget)
    at = round(depth * len(sentences))
    context = " ".join(sentences[:at] + [needle] + sentences[at:])
    return prefix, context, QUESTION, passkey


def answer_text(passkey: int) -> str:
    """What the model is trained to continue the prompt with."""
    return f" {passkey} ."


def score(output_text: str, passkey: int) -> bool:
    """Correct when the first integer in the output is the passkey (HOMER_SPEC.md H.3)."""
    match = re.search(r"\d+", output_text)
    return match is not None and int(match.group()) == passkey


def tokenizer_corpus(rng: random.Random, lines: int = 400) -> list[str]:
    """Lines of text to train the tokenizer on: whole prompts and answers, with random passkeys."""
    out = []
    for i in range(lines):
        prefix, context, suffix, passkey = make_sample(rng, 160, instruction=i % 2 == 0)
        out.append(" ".join(t for t in (prefix, context, suffix) if t) + answer_text(passkey))
    return out


@dataclass
class PasskeyPrompt:
    """One sample as token ids, split as HOMER reads it, with where the answer sits in the context."""

    prefix: list[int]
    context: list[int]
    suffix: list[int]
    passkey: int
    digit_slots: list[int]  # indices into `context` of the tokens holding the passkey's digits (both copies)

    @property
    def ids(self) -> list[int]:
        return self.prefix + self.context + self.suffix

    def copies(self) -> tuple[list[int], list[int]]:
        """The digit slots of each copy of the passkey ("The pass key is K . Do not forget K ."): both copies are
        tokenized alike (the same neighbours), so each holds half of `digit_slots`."""
        half = len(self.digit_slots) // 2
        return self.digit_slots[:half], self.digit_slots[half:]


def digit_tokens(tok, ids: list[int]) -> list[int]:
    """Indices of the tokens in `ids` whose text holds a digit. In a passkey haystack (digit-free filler) these are
    exactly the passkey's tokens, however the tokenizer cuts numbers: one token per digit (SmolLM2, the shipped
    model), runs of up to three digits (Llama 3), or digits merged with a space ("▁4", GPT-2's " 482")."""
    has_digit = {t: any(c.isdigit() for c in tok.decode([t])) for t in set(ids)}
    return [i for i, t in enumerate(ids) if has_digit[t]]


def encode_prompt(tok, prefix: str, context: str, suffix: str, passkey: int, chat: bool = False) -> PasskeyPrompt:
    """A sample's texts as token ids, split as HOMER reads them: BOS when the model adds one (+ the instruction) |
    haystack | question.

    With `chat`, the prompt follows the model's chat template (`Tokenizer.chat_affixes`): its opening (system
    prompt, user header; BOS is the template's own) joins the prefix, and the suffix is the question asked in the
    user turn, the template's closing (end of turn, assistant header), then the start of the assistant's reply
    (`ANSWER_START`), so that the reply's first tokens are the answer in chat and plain prompts alike."""
    opening, closing = tok.chat_affixes() if chat else ("", "")
    if chat:
        asked = suffix.removesuffix(ANSWER_START).rstrip()
        suffix = asked + closing + (ANSWER_START if asked != suffix else "")
    # The parts are encoded apart (HOMER reads them apart), so the spaces between them are written out: a
    # byte-level BPE would otherwise glue "... ." to "What" (sentencepiece drops a leading space either way).
    context_ids = tok.encode((" " if prefix else "") + context, bos=False)
    return PasskeyPrompt(
        tok.encode(opening + prefix, bos=False if chat else None),
        context_ids,
        tok.encode(" " + suffix, bos=False),
        passkey,
        digit_tokens(tok, context_ids),
    )


def passkey_prompts(
    tok, length: int, samples: int, seed: int, instruction: bool = False, chat: bool = False
) -> list[PasskeyPrompt]:
    """`samples` prompts of `length - ANSWER_ROOM` tokens of `tok`, depths stratified over [0, 1], all seeded.

    `tok` is a `homer_ref.Tokenizer` (see `encode_prompt` for the split and `chat`). The haystack is sized in the
    shipped tokenizer's tokens (`count_tokens`); when `tok` cuts the prompt differently (a chat template's
    affixes, another vocabulary), the sample is drawn again from the same seed with the haystack corrected by the
    difference, so that every prompt of a length fits `length - ANSWER_ROOM` tokens of the model's own.
    """
    wanted = length - ANSWER_ROOM
    prompts = []
    for s in range(samples):
        budget, best = wanted, None
        for _ in range(4):  # converges at once when the filler tokenizes as counted; else within a few draws
            rng = random.Random(f"passkey:{seed}:{length}:{s}")
            depth = (s + rng.random()) / samples
            prompt = encode_prompt(tok, *make_sample(rng, budget, depth, instruction), chat=chat)
            if len(prompt.ids) <= wanted and (best is None or len(prompt.ids) > len(best.ids)):
                best = prompt
            if len(prompt.ids) == wanted:
                break
            budget += wanted - len(prompt.ids)
        if best is None:
            raise ValueError(f"no passkey prompt of {length} tokens fits this tokenizer: use a longer length")
        prompts.append(best)
    return prompts


def demo_prompt(tok, trained_context: int, seed: int = 0, multiple: float = 8) -> PasskeyPrompt:
    """The demo's prompt: `multiple` times the trained context less the answer's room, the passkey at a random
    depth, all drawn from `random.Random(seed)` (`python -m homer_ref.generate` and `homer_ref.explain`)."""
    return encode_prompt(tok, *make_sample(random.Random(seed), round(multiple * trained_context) - ANSWER_ROOM))


def filler_windows(tok, seed: int, count: int, length: int) -> list[list[int]]:
    """`count` windows of BOS + filler sentences (no passkey), exactly `length` tokens each: ordinary text of
    this task for calibration (the shipped `homer_bias.safetensors` is `calibrate` on 32 of 256, seed 1)."""
    rng = random.Random(seed)
    windows = []
    for _ in range(count):
        ids = [tok.bos_id]
        while len(ids) < length:
            ids += tok.encode(rng.choice(FILLER), bos=False)
        windows.append(ids[:length])
    return windows


# ----------------------------------------------------------------------------------------------- HOMER on the task


def homer_config(
    trained_context: int, max_chunk_len: int | None = None, rope_factor: float = 1.0, **settings
) -> HomerConfig:
    """HOMER's settings on this task: M defaults to the (RoPE-scaled) trained context less the answer's room, so
    that every generated position stays inside the trained range (the shipped model's card measures with it:
    M = 256 - 8 = 248); `settings` are HomerConfig's other fields (T = M and W's rule as `plan` resolves them)."""
    M = round(rope_factor * trained_context) - ANSWER_ROOM if max_chunk_len is None else max_chunk_len
    return HomerConfig(M, **settings)


def surviving_context(cache: HomerCache) -> list[int]:
    """Indices into the context of the context tokens held by HOMER's final cache."""
    return [i for part, i in cache.slot_sources() if part == "context"]


def digits_kept(cache: HomerCache, prompt: PasskeyPrompt) -> tuple[float, bool]:
    """(fraction of the passkey's digit tokens in the final cache, whether one complete copy is there)."""
    kept = set(surviving_context(cache)) & set(prompt.digit_slots)
    return len(kept) / max(1, len(prompt.digit_slots)), any(set(c) <= kept for c in prompt.copies())


def _copy_text(tok, prompt: PasskeyPrompt, copy: list[int], present, kept) -> str:
    """One copy of the passkey as a node saw it: its digits where kept, '_' where removed, '.' where not present."""
    out = []
    for i in copy:
        text = tok.decode([prompt.context[i]]).strip()
        out.append(text if i in kept else ("_" if i in present else ".") * len(text))
    return "".join(out)


def explain_digits(tok, cache: HomerCache, prompt: PasskeyPrompt, answer: str) -> str:
    """Which passkey digits each tree node held and kept (with the ranks of the removed ones), and the final cache:
    where a HOMER sample lost the passkey, or that it kept a copy and misread it (`eval passkey --explain`)."""
    P, C = len(prompt.prefix), len(prompt.context)
    lines = []
    for t in cache.nodes:  # execution order: a node's children come before it
        sources = t.input_sources.tolist()
        slot = {s - P: j for j, s in enumerate(sources) if P <= s < P + C}  # context index -> input slot
        present = {i for i in prompt.digit_slots if i in slot}
        if not present:
            continue
        kept = {sources[j] - P for j in t.kept.tolist()} & present
        copies = [_copy_text(tok, prompt, c, present, kept) for c in prompt.copies()]
        ranks = ""
        if t.scores is not None and present - kept:
            order = torch.argsort(t.scores, descending=True, stable=True).tolist()  # rank 0: the most significant
            rank = {j: r for r, j in enumerate(order)}
            lost = ",".join(str(rank[slot[i]]) for i in sorted(present - kept))
            ranks = f"; removed at ranks {lost} of {len(sources)} (kept {len(t.kept)})"
        lines.append(
            f"    {t.name} layers {t.layers[0]}-{t.layers[1] - 1}: {' | '.join(copies)}"
            f" ({len(kept)} of {len(present)} digit tokens kept{ranks})"
        )
    final = set(surviving_context(cache))
    copies = [_copy_text(tok, prompt, c, set(prompt.digit_slots), final) for c in prompt.copies()]
    lines.append(f"    final cache: {' | '.join(copies)}; answered {answer!r}")
    return "\n".join(lines)


def shipped_model(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the shipped passkey model (the commands' demos and the tutorials run on it)."""
    from homer_ref.loading import load_model, load_tokenizer

    if not (SHIPPED_MODEL / "config.json").is_file():
        raise ValueError(f"the shipped model is missing ({SHIPPED_MODEL}); reinstall homer_ref or pass --model DIR")
    return load_model(SHIPPED_MODEL, dtype=dtype), load_tokenizer(SHIPPED_MODEL)
