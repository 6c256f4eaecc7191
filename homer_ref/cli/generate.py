"""`python -m homer_ref.generate`: continue a prompt with a Llama checkpoint, with HOMER when it is too long.

A prompt that fits the model's trained context runs plain; a longer one runs HOMER (`--mode` forces either).
HOMER needs the prompt split into prefix / context / suffix (HOMER_SPEC.md A):
- explicit: `--prefix TEXT` and/or `--suffix TEXT` around the prompt, or markers in the prompt text:
  everything before a line `<<<CONTEXT>>>` is the prefix, everything after a line `<<<SUFFIX>>>` the suffix;
- default: the prefix is BOS alone, the suffix the prompt's last line (the question at the end) — cut to its
  last max_chunk_len/4 tokens if longer — and the context everything before it.
Defaults follow the official scripts: M = T = trained context / 2, and W = 12 of every 32 layers (fewer where the
tree needs them; `plan.default_warmup_layers`). The bias
table is `homer_bias.safetensors` in the model directory, or `--bias FILE`; without one, HOMER calibrates on
the prompt's own context and says so (`--reduction` picks another mode).

Models: an HF directory (or its model.safetensors / config.json), a GGUF file, or a llama2.c .bin; the tokenizer
is the model's own (tokenizer.json or tokenizer.model beside it, the GGUF vocabulary) unless `--tokenizer`.
`--chat` wraps the prompt in the model's chat template (one user turn, then the assistant header). With HOMER the
template's opening (system prompt, user header) joins the prefix and its closing (end of the user turn,
assistant header) the suffix, so that every chunk sees both; the default split then keeps the prompt's last line
as the suffix, before the closing.

Token ids instead of text: `--prompt-ids FILE.json` holds a JSON list of ints (the whole prompt; with
`--prefix-ids` / `--suffix-ids` FILE.json around it for HOMER) or an object with `prefix_ids`, `context_ids`,
`suffix_ids` (the trace input's names). `--print-ids` prints the generated ids as one JSON list instead of text,
so a model without any tokenizer runs too.

stdout carries the generated continuation only (so it pipes); settings, the HOMER plan and timing go to stderr.
"""

import argparse
import json
import math
import sys
import textwrap
import time
from pathlib import Path

from homer_ref.cli.common import (
    DTYPES,
    MODEL_HELP,
    command_parser,
    open_model,
    open_tokenizer,
    progress,
    run_main,
    set_threads_for,
)
from homer_ref.decoding import check_ids, generate_plain, greedy_batch
from homer_ref.homer import homer_generate, homer_prefill
from homer_ref.homer.calibration import calibrate_on_context, find_bias
from homer_ref.homer.plan import REDUCTIONS, HomerConfig, plan
from homer_ref.homer.traversal import plain_kv
from homer_ref.llama import Llama
from homer_ref.loading import Tokenizer, load_model, load_tokenizer
from homer_ref.tasks import passkey

CONTEXT_MARKER, SUFFIX_MARKER = "<<<CONTEXT>>>", "<<<SUFFIX>>>"


def add_prompt_options(p: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """The model and a text prompt, as `generate` takes them (shared with `explain`); returns the prompt group."""
    p.add_argument("--model", help=MODEL_HELP + " (default: the shipped model)")
    p.add_argument(
        "--tokenizer",
        help="tokenizer.json, sentencepiece .model or .gguf (default: the model's own: tokenizer.json or "
        "tokenizer.model beside it, or the GGUF file's vocabulary)",
    )
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (default: empty, i.e. start from BOS)")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    p.add_argument("--prefix", help="HOMER prefix text (given to every chunk), placed before the prompt")
    p.add_argument("--suffix", help="HOMER suffix text (e.g. the question), placed after the prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (one user turn)")
    return prompt


def add_homer_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """HOMER's settings, as `generate` takes them (shared with `explain`); returns the group."""
    h = p.add_argument_group("HOMER")
    h.add_argument("--max-chunk-len", type=int, help="M, affixes included (default: trained context / 2)")
    h.add_argument("--target-len", type=int, help="T, final cache length (default: M)")
    h.add_argument(
        "--warmup-layers",
        type=int,
        help="W, layers only the leaves run (default: 12 of every 32 as the official scripts; fewer if the tree needs)",
    )
    h.add_argument("--reduction", choices=REDUCTIONS, default="calibrated", help="token reduction mode")
    h.add_argument("--bias", type=Path, help="calibration table (default: homer_bias.safetensors in the model dir)")
    return h


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "generate",
        "Continue a prompt with a Llama model (HF directory, GGUF or llama2.c .bin); prompts longer than "
        "the trained context run HOMER. With no arguments: a passkey demo on the shipped model at 8x its "
        "trained context. The continuation goes to stdout, everything else to stderr.",
    )
    prompt = add_prompt_options(p)
    prompt.add_argument(
        "--prompt-ids",
        type=Path,
        help="JSON file of token ids: a list (the prompt), or an object with prefix_ids, context_ids, suffix_ids",
    )
    p.add_argument("--prefix-ids", type=Path, help="JSON list of token ids before --prompt-ids (HOMER's prefix)")
    p.add_argument("--suffix-ids", type=Path, help="JSON list of token ids after --prompt-ids (HOMER's suffix)")
    p.add_argument("--print-ids", action="store_true", help="print the generated token ids (a JSON list), not text")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")
    h = add_homer_options(p)
    h.add_argument(
        "--mode",
        choices=["auto", "plain", "homer"],
        default="auto",
        help="auto (default): plain if the prompt fits the trained context, else HOMER",
    )
    return p


def check_homer_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for the prompt and HOMER options that argparse cannot check alone."""
    for name in ("max_new_tokens", "warmup_layers"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("max_chunk_len", "target_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.model is None and (args.prompt is not None or args.prompt_file is not None):
        parser.error("--prompt needs --model (without --model the shipped passkey demo runs)")


def read_prompt(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The prompt text of --prompt or --prompt-file (empty without either)."""
    if args.prompt_file is None:
        return args.prompt or ""
    try:
        return args.prompt_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        parser.error(f"--prompt-file {args.prompt_file} is not UTF-8 text ({e.reason}); re-save it as UTF-8")
    except OSError as e:
        parser.error(f"--prompt-file {args.prompt_file}: {e.strerror}")


def split_prompt(text: str, prefix: str | None, suffix: str | None) -> tuple[str, str, str]:
    """(prefix, context, suffix) texts from explicit options, markers, or the default (see module docstring)."""
    if CONTEXT_MARKER in text or SUFFIX_MARKER in text:
        head, _, rest = text.partition(CONTEXT_MARKER) if CONTEXT_MARKER in text else ("", "", text)
        body, _, tail = rest.partition(SUFFIX_MARKER)
        return (prefix or "") + head.strip("\n"), body.strip("\n"), tail.strip("\n") + (suffix or "")
    if suffix is not None:
        return prefix or "", text, suffix
    body, _, last = text.rstrip("\n").rpartition("\n")
    return prefix or "", body, last


def encode_parts(tok: Tokenizer, prefix: str, context: str, suffix: str, max_suffix: int, bos: bool | None = None):
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


def homer_parts(tok: Tokenizer, args: argparse.Namespace, text: str, M: int):
    """HOMER's (prefix, context, suffix) ids of a text prompt: the split of `split_prompt`, and under --chat the
    template's opening joined to the prefix and its closing to the suffix (so every chunk sees both)."""
    opening, closing = tok.chat_affixes() if args.chat else ("", "")
    prefix, context, suffix = split_prompt(text, args.prefix, args.suffix)
    bos = False if args.chat else None  # a chat template writes its own BOS
    return encode_parts(tok, opening + prefix, context, suffix + closing, max(1, M // 4), bos)


def read_ids(path: Path, name: str, parts: bool = False):
    """Token ids from a JSON file: a list of ints, or (when `parts`) also an object with prefix_ids, context_ids
    and suffix_ids, returned as a (prefix, context, suffix) tuple. A ValueError names what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{name} {path}: {e.strerror}") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, numbers too long or too deep
        raise ValueError(f"{name} {path}: not valid UTF-8 JSON ({e})") from e
    keys = ("prefix_ids", "context_ids", "suffix_ids")
    if parts and isinstance(data, dict):
        if set(data) != set(keys):
            raise ValueError(f"{name} {path}: a JSON object must have exactly the keys {', '.join(keys)}")
        return tuple(_id_list(data[key], f"{name} {path}: '{key}'") for key in keys)
    return _id_list(data, f"{name} {path}")


def _id_list(value, what: str) -> list[int]:
    if not isinstance(value, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in value):
        raise ValueError(f"{what} must be a JSON list of integer token ids")
    return value


def prompt_from_ids(args, parser):
    """(plain prompt ids, HOMER parts or None) from --prompt-ids / --prefix-ids / --suffix-ids."""
    given = read_ids(args.prompt_ids, "--prompt-ids", parts=True)
    if isinstance(given, tuple):
        if args.prefix_ids or args.suffix_ids:
            parser.error("--prefix-ids/--suffix-ids go with a --prompt-ids list, not an object that already has them")
        return [i for part in given for i in part], given
    if not (args.prefix_ids or args.suffix_ids):
        return given, None
    prefix = read_ids(args.prefix_ids, "--prefix-ids") if args.prefix_ids else []
    suffix = read_ids(args.suffix_ids, "--suffix-ids") if args.suffix_ids else []
    return prefix + given + suffix, (prefix, given, suffix)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_homer_options(parser, args)
    if not 0 <= args.temperature < math.inf:  # NaN fails too
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.model is None:
        if args.prompt_ids is not None:
            parser.error("--prompt-ids needs --model (without --model the shipped passkey demo runs)")
        return passkey_demo(args)
    if (args.prefix_ids or args.suffix_ids) and args.prompt_ids is None:
        parser.error("--prefix-ids/--suffix-ids need --prompt-ids (for text, use --prefix/--suffix)")
    if args.prompt_ids is not None and (args.prefix is not None or args.suffix is not None or args.chat):
        parser.error("--prefix/--suffix/--chat apply to text; with --prompt-ids give the ids of every part")
    text = read_prompt(parser, args)
    prompt_ids, id_parts = prompt_from_ids(args, parser) if args.prompt_ids is not None else (None, None)
    t0 = time.perf_counter()
    # Cheap checks first: the tokenizer, its vocabulary and the ids against the model's config, then the weights.
    tokenizer = open_tokenizer(args.model, args.tokenizer, required=prompt_ids is None or not args.print_ids)
    opening, closing = tokenizer.chat_affixes() if args.chat else ("", "")
    if prompt_ids is None:
        full = (args.prefix or "") + text + (args.suffix or "")
        prompt_ids = tokenizer.encode(opening + full + closing, bos=False if args.chat else None)
    mode = args.mode

    def check(cfg) -> None:  # before the weights are read
        nonlocal mode
        check_ids(prompt_ids, cfg.vocab_size, "the prompt")
        if mode == "auto":
            mode = "plain" if len(prompt_ids) <= cfg.max_position_embeddings else "homer"
        if mode == "homer" and args.prompt_ids is None and not text.strip():
            raise ValueError("the prompt is empty, there is nothing for HOMER to read; pass --prompt or --prompt-file")
        if mode == "homer" and args.prompt_ids is not None and id_parts is None:
            raise ValueError(
                "HOMER needs the prompt split into prefix / context / suffix: give --prompt-ids an object with "
                "prefix_ids, context_ids and suffix_ids, or add --prefix-ids / --suffix-ids (or use --mode plain)"
            )

    model = open_model(args.model, tokenizer, DTYPES[args.dtype], check)
    trained = model.cfg.max_position_embeddings
    progress(
        f"model {args.model} ({args.dtype}), prompt {len(prompt_ids)} tokens, trained context {trained}, mode {mode}"
        + (", chat template" if args.chat else "")
    )
    printed, out = "", []

    def stream(token: int) -> None:  # print the text as it grows (sentencepiece joins pieces context-dependently)
        nonlocal printed
        out.append(token)
        if args.print_ids:
            return
        decoded = tokenizer.decode(out)
        sys.stdout.write(decoded[len(printed) :])
        sys.stdout.flush()
        printed = decoded

    stop_ids = tokenizer.stop_ids if tokenizer is not None else ()
    sampling = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop_ids=stop_ids)
    t1 = time.perf_counter()
    if mode == "plain":
        generate_plain(model, prompt_ids, args.max_new_tokens, on_token=stream, **sampling)
    else:
        M = args.max_chunk_len or trained // 2
        parts = id_parts if args.prompt_ids is not None else homer_parts(tokenizer, args, text, M)
        cache = run_homer(model, args, M, *parts, args.model)
        homer_generate(model, cache, args.max_new_tokens, on_token=stream, **sampling)
    t2 = time.perf_counter()
    if args.print_ids:
        print(json.dumps(out))
    else:
        sys.stdout.write("\n" if sys.stdout.isatty() else "")
    progress(f"generated {len(out)} tokens in {t2 - t1:.2f} s (prefill included); load {t1 - t0:.2f} s")
    return 0


def run_homer(model, args, M: int, prefix_ids, context_ids, suffix_ids, model_path):
    """HOMER prefill with the command line's settings; reports the bias used and the plan on stderr."""
    config = HomerConfig(M, args.target_len, args.warmup_layers, args.reduction, args.seed)
    plan(model.cfg.num_hidden_layers, config, len(prefix_ids), len(context_ids), len(suffix_ids))  # errors first
    bias = None
    if args.reduction == "calibrated" and not context_ids:
        progress("bias: not needed (the prompt has no context part: HOMER is the plain forward)")
    elif args.reduction == "calibrated":
        bias, source = find_bias(model_path, M, args.bias)
        if bias is None:
            bias, source = calibrate_on_context(model, context_ids, M), "none found, calibrated on the prompt's context"
        progress(f"bias: {source}")
    else:
        progress(f"bias: none (reduction {args.reduction})")
    t = time.perf_counter()
    cache = homer_prefill(model, prefix_ids, context_ids, suffix_ids, config, bias=bias)
    p = cache.plan
    levels = ", ".join(f"h{h}: {p.nodes[(h, 0)].layers[0]}-{p.nodes[(h, 0)].layers[1] - 1}" for h in range(p.H + 1))
    progress(
        f"HOMER: P={p.P} C={p.C} S={p.S}, M={p.M} T={p.T} W={p.W}: {p.N} chunks, tree height {p.H}, layers {levels}; "
        f"final cache {len(cache.positions)} slots x {p.L} layers; peak live KV {cache.peak_kv_token_layers} "
        f"token-layers vs {plain_kv(p)} plain ({cache.peak_kv_token_layers / plain_kv(p):.2f}x); "
        f"prefill {time.perf_counter() - t:.2f} s"
    )
    return cache


def load_shipped_model(dtype: str) -> tuple[Llama, Tokenizer]:
    """The shipped passkey model and its tokenizer (the commands' demos run on it)."""
    if not (passkey.SHIPPED_MODEL / "config.json").is_file():
        raise ValueError(
            f"the shipped model is missing ({passkey.SHIPPED_MODEL}); reinstall homer_ref or pass --model DIR"
        )
    model = load_model(passkey.SHIPPED_MODEL, dtype=DTYPES[dtype])
    set_threads_for(model)
    return model, load_tokenizer(passkey.SHIPPED_MODEL)


DEMO_PROMPTS = 16  # prompts at 8x the trained context: a score, not an anecdote, in ~12 s on one core


def passkey_demo(args) -> int:
    """No arguments: the shipped model reads passkey prompts 8x longer than its trained context, plain and with HOMER.

    The prompts are `passkey.demo_prompt` for seeds --seed, --seed + 1, ... stderr: both scores, then one prompt in
    full where plain inference fails and HOMER answers right, with HOMER's plan. stdout: HOMER's continuation of
    that one prompt.
    """
    model, tok = load_shipped_model(args.dtype)
    trained = model.cfg.max_position_embeddings
    seeds = range(args.seed, args.seed + DEMO_PROMPTS)
    prompts = [passkey.demo_prompt(tok, trained, seed) for seed in seeds]
    # M as the model card measures it: the trained context less the answer's room, so that every generated
    # position stays inside the trained range.
    M = args.max_chunk_len or trained - passkey.ANSWER_ROOM
    config = HomerConfig(M, args.target_len, args.warmup_layers, args.reduction, args.seed)
    bias = find_bias(passkey.SHIPPED_MODEL, M, args.bias)[0] if args.reduction == "calibrated" else None
    n, first = len(prompts[0].ids), prompts[0]
    W = plan(model.cfg.num_hidden_layers, config, len(first.prefix), len(first.context), len(first.suffix)).W
    progress(f"passkey demo: the shipped model (trained context {trained}) reads {len(prompts)} prompts of {n} tokens "
             f"({n / trained:.1f}x), greedy; HOMER with M={M} T={config.target_len or M} W={W} "
             f"({config.reduction})")  # fmt: skip
    plain = [tok.decode(o) for o in greedy_batch(model, [p.ids for p in prompts], passkey.ANSWER_TOKENS)]
    homer = []
    for p in prompts:
        cache = homer_prefill(model, p.prefix, p.context, p.suffix, config, bias=bias)
        homer.append(tok.decode(homer_generate(model, cache, passkey.ANSWER_TOKENS)))
    plain_ok = [passkey.score(a, p.passkey) for a, p in zip(plain, prompts)]
    homer_ok = [passkey.score(a, p.passkey) for a, p in zip(homer, prompts)]
    progress(f"  plain inference: {sum(plain_ok):2d}/{len(prompts)} right")
    progress(f"  HOMER:           {sum(homer_ok):2d}/{len(prompts)} right")
    shown = next((i for i in range(len(prompts)) if homer_ok[i] and not plain_ok[i]), 0)
    p = prompts[shown]
    text = tok.decode(p.ids).replace(sentence := passkey.passkey_sentence(p.passkey), f">>> {sentence} <<<")
    progress(f"the prompt of seed {seeds[shown]} in full ({len(p.ids)} tokens; the passkey sentence between >>> <<<;"
             f" `python -m homer_ref.explain --seed {seeds[shown]} --out x.html` draws what HOMER kept):")  # fmt: skip
    progress(textwrap.fill(text, width=110, initial_indent="  ", subsequent_indent="  "))
    cache = run_homer(model, args, M, p.prefix, p.context, p.suffix, passkey.SHIPPED_MODEL)
    new_tokens = args.max_new_tokens if args.max_new_tokens != 100 else passkey.ANSWER_TOKENS
    answer = tok.decode(homer_generate(model, cache, new_tokens, temperature=args.temperature, seed=args.seed))
    print(answer.strip())
    verdict = {True: "right", False: "wrong"}
    progress(f"true passkey: {p.passkey}; HOMER answered {answer.strip()!r} "
             f"({verdict[passkey.score(answer, p.passkey)]}); plain inference answered {plain[shown].strip()!r} "
             f"({verdict[plain_ok[shown]]})")  # fmt: skip
    return 0


def entry() -> None:
    """`python -m homer_ref.generate` and the `homer-generate` console script."""
    sys.exit(run_main(main))
