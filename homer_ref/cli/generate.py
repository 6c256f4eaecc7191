"""`python -m homer_ref.generate`: continue a prompt with a Llama checkpoint, with HOMER when it is too long.

A prompt that fits the model's trained context runs plain; a longer one runs HOMER (`--mode` forces either).
HOMER needs the prompt split into prefix / context / suffix: `--prefix` / `--suffix`, markers in the prompt, or
the default (BOS | everything but the last line | the last line); `--chat` puts the chat template's opening in
the prefix and its closing in the suffix (`homer_ref.prompts` has the rules). Settings: M = half the trained
context unless `--max-chunk-len`, T = M, W by the official scripts' rule (`homer.plan`); the resolved plan is
printed before the prefill. The bias table: `--bias`, else `homer_bias.safetensors` beside the model, else the
user cache, else computed once on the default calibration text and cached (`homer_ref.bias`).

Models: an HF directory (or its model.safetensors / config.json), a GGUF file, or a llama2.c .bin; the tokenizer
is the model's own (tokenizer.json or tokenizer.model beside it, the GGUF vocabulary) unless `--tokenizer`.
Without `--model`, the shipped passkey model; without a prompt either, its passkey demo.

Token ids instead of text: `--prompt-ids` holds a JSON list of ints (the whole prompt; with `--prefix-ids` /
`--suffix-ids` around it for HOMER) or an object with `prefix_ids`, `context_ids`, `suffix_ids` (the trace
input's names), each given inline or as a file. `--print-ids` prints the generated ids as one JSON list instead
of text, so a model without any tokenizer runs too.

stdout carries the generated continuation only (so it pipes); settings, the HOMER plan, progress and timing go
to stderr.
"""

import argparse
import json
import math
import sys
import textwrap
import time
from pathlib import Path

from homer_ref.bias import bias_for
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
from homer_ref.homer import HomerCache, homer_generate, homer_prefill, plan
from homer_ref.homer.plan import DIAGNOSTIC_REDUCTIONS, REDUCTIONS, HomerConfig, Plan, generation_config
from homer_ref.homer.prefill import plan_work
from homer_ref.homer.traversal import plain_kv
from homer_ref.llama import Llama
from homer_ref.loading import Tokenizer, check_tokenizer, load_config
from homer_ref.progress import progress_bar
from homer_ref.prompts import homer_parts, plain_ids
from homer_ref.tasks import passkey


def add_prompt_options(p: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """The model and a text prompt, as `generate` takes them (shared with `explain`); returns the prompt group."""
    p.add_argument("--model", help=MODEL_HELP + " (default: the shipped passkey model)")
    p.add_argument(
        "--tokenizer",
        help="tokenizer.json, sentencepiece .model or .gguf (default: the model's own: tokenizer.json or "
        "tokenizer.model beside it, or the GGUF file's vocabulary)",
    )
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (default: the passkey demo)")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    p.add_argument("--prefix", help="HOMER prefix text (given to every chunk), placed before the prompt")
    p.add_argument("--suffix", help="HOMER suffix text (e.g. the question), placed after the prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (one user turn)")
    return prompt


def add_homer_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """HOMER's settings, as `generate` takes them (shared with `explain`); returns the group."""
    h = p.add_argument_group("HOMER")
    h.add_argument(
        "--max-chunk-len",
        type=int,
        help="M, affixes included (default: half the trained context; the passkey demo: the trained context less "
        f"the answer's room, {passkey.ANSWER_ROOM} tokens)",
    )
    h.add_argument("--target-len", type=int, help="T, final cache length (default: M)")
    h.add_argument(
        "--warmup-layers",
        type=int,
        help="W, layers only the leaves run (default: 12 of every 32 as the official scripts; fewer if the tree needs)",
    )
    h.add_argument(
        "--reduction",
        choices=REDUCTIONS + DIAGNOSTIC_REDUCTIONS,
        default="calibrated",
        help="token reduction mode (default calibrated; none is a diagnostic, not HOMER: nothing pruned, the chunks "
        "only merged)",
    )
    h.add_argument(
        "--bias",
        type=Path,
        help="calibration table (default: homer_bias.safetensors beside the model, else the user cache, else "
        "computed once and cached)",
    )
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
        help="token ids, as JSON or a JSON file: a list (the prompt), or an object with prefix_ids, context_ids, "
        "suffix_ids",
    )
    p.add_argument("--prefix-ids", help="HOMER prefix ids (a JSON list or a file holding one) before --prompt-ids")
    p.add_argument("--suffix-ids", help="HOMER suffix ids (a JSON list or a file holding one) after --prompt-ids")
    p.add_argument("--print-ids", action="store_true", help="print the generated token ids (a JSON list), not text")
    p.add_argument("--mode", choices=("auto", "plain", "homer"), default="auto", help="auto: HOMER when too long")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; the demo's first prompt (default 0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")
    add_homer_options(p)
    return p


def check_homer_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for the HOMER options that argparse cannot check alone."""
    for name in ("max_new_tokens", "warmup_layers"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("max_chunk_len", "target_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


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


def read_ids(value: str, name: str, parts: bool = False):
    """Token ids given as JSON text or as a JSON file: a list of ints, or (when `parts`) also an object with
    prefix_ids, context_ids and suffix_ids, returned as a (prefix, context, suffix) tuple. A ValueError names
    what is wrong."""
    if value.lstrip().startswith(("[", "{")):
        text, where = value, name
    else:
        try:
            text, where = Path(value).read_text(encoding="utf-8"), f"{name} {value}"
        except OSError as e:
            raise ValueError(f"{name} {value}: {e.strerror} (give a JSON list of ids, or a file holding one)") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{name} {value}: not valid UTF-8 JSON ({e})") from e
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, numbers too long or too deep
        raise ValueError(f"{where}: not valid UTF-8 JSON ({e})") from e
    keys = ("prefix_ids", "context_ids", "suffix_ids")
    if parts and isinstance(data, dict):
        if set(data) != set(keys):
            raise ValueError(f"{where}: a JSON object must have exactly the keys {', '.join(keys)}")
        return tuple(_id_list(data[key], f"{where}: '{key}'") for key in keys)
    return _id_list(data, where)


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


def homer_settings(args) -> dict:
    """HomerConfig's fields as the command line gives them (None where the library resolves the default)."""
    return dict(target_len=args.target_len, warmup_layers=args.warmup_layers, reduction=args.reduction, seed=args.seed)


def homer_config(args, trained_context: int) -> HomerConfig:
    """The command line's HOMER settings, the defaults resolved by the library (`generation_config`)."""
    return generation_config(trained_context, args.max_chunk_len, **homer_settings(args))


def run_homer(model: Llama, tok: Tokenizer | None, parts, p: Plan, bias, model_path) -> HomerCache:
    """HOMER prefill as the commands run it, on the plan made for `parts`: the plan printed, the bias table found
    or computed (`homer_ref.bias`), a progress bar, and a summary line on stderr."""
    progress(str(p))
    table = None
    if p.config.reduction == "calibrated" and not p.prunes and bias is None:
        progress("bias: not needed (no node removes anything: one chunk holds the whole prompt)")
    elif p.config.reduction == "calibrated":  # a --bias given is checked even where it is not needed
        table, source = bias_for(model, tok, p.M, bias, model_path, report=progress)
        if not source.startswith("computed"):  # bias_for has said where a computed table went, and its cost
            progress(f"bias: {source}")
    t = time.perf_counter()
    with progress_bar(plan_work(p), f"HOMER prefill, {p.N} leaves", "tok-layer") as bar:
        cache = homer_prefill(model, *parts, p, bias=table, progress=bar)
    progress(
        f"HOMER: final cache {len(cache.positions)} slots x {p.L} layers; peak live KV {cache.peak_kv_token_layers} "
        f"token-layers vs {plain_kv(p)} plain ({cache.peak_kv_token_layers / plain_kv(p):.2f}x); "
        f"prefill {time.perf_counter() - t:.2f} s"
    )
    return cache


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_homer_options(parser, args)
    if not 0 <= args.temperature < math.inf:  # NaN fails too
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if (args.prefix_ids or args.suffix_ids) and args.prompt_ids is None:
        parser.error("--prefix-ids/--suffix-ids need --prompt-ids (for text, use --prefix/--suffix)")
    if args.prompt_ids is not None and (args.prefix is not None or args.suffix is not None or args.chat):
        parser.error("--prefix/--suffix/--chat apply to text; with --prompt-ids give the ids of every part")
    if args.model is None and args.prompt is None and args.prompt_file is None and args.prompt_ids is None:
        return passkey_demo(args)
    model_path = args.model or str(passkey.SHIPPED_MODEL)
    text = read_prompt(parser, args)
    prompt_ids, id_parts = prompt_from_ids(args, parser) if args.prompt_ids is not None else (None, None)
    t0 = time.perf_counter()
    # Cheap checks first: the model's config, the tokenizer, its vocabulary, the ids and the plan; then the weights.
    cfg = load_config(model_path)
    trained = cfg.max_position_embeddings
    tokenizer = open_tokenizer(model_path, args.tokenizer, required=prompt_ids is None or not args.print_ids)
    if prompt_ids is None:
        prompt_ids = plain_ids(tokenizer, text, args.prefix, args.suffix, args.chat)
    mode = args.mode if args.mode != "auto" else "plain" if len(prompt_ids) <= trained else "homer"
    if mode == "homer" and args.prompt_ids is None and not text.strip():
        raise ValueError("the prompt is empty, there is nothing for HOMER to read; pass --prompt or --prompt-file")
    if mode == "homer" and args.prompt_ids is not None and id_parts is None:
        raise ValueError(
            "HOMER needs the prompt split into prefix / context / suffix: give --prompt-ids an object with "
            "prefix_ids, context_ids and suffix_ids, or add --prefix-ids / --suffix-ids (or use --mode plain)"
        )
    config = homer_config(args, trained)
    parts = id_parts
    if mode == "homer" and parts is None:
        parts = homer_parts(tokenizer, text, config.max_chunk_len, args.prefix, args.suffix, args.chat)
    if tokenizer is not None:
        check_tokenizer(tokenizer, cfg)
    check_ids(prompt_ids, cfg.vocab_size, "the prompt")
    homer_plan = plan(cfg.num_hidden_layers, config, *map(len, parts)) if mode == "homer" else None
    model = open_model(model_path, None, DTYPES[args.dtype])  # the weights, after every cheap check
    progress(
        f"model {model_path} ({args.dtype}), prompt {len(prompt_ids)} tokens, trained context {trained}, mode {mode}"
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
        with progress_bar(model.cfg.num_hidden_layers, f"prefill, {len(prompt_ids)} tokens", "layer") as bar:
            generate_plain(model, prompt_ids, args.max_new_tokens, progress=bar, on_token=stream, **sampling)
    else:
        cache = run_homer(model, tokenizer, parts, homer_plan, args.bias, model_path)
        homer_generate(model, cache, args.max_new_tokens, on_token=stream, **sampling)
    t2 = time.perf_counter()
    if args.print_ids:
        print(json.dumps(out))
    else:
        sys.stdout.write("\n" if sys.stdout.isatty() else "")
    progress(f"generated {len(out)} tokens in {t2 - t1:.2f} s (prefill included); load {t1 - t0:.2f} s")
    return 0


def load_shipped_model(dtype: str) -> tuple[Llama, Tokenizer]:
    """The shipped passkey model and its tokenizer, with the commands' thread setting."""
    model, tok = passkey.shipped_model(DTYPES[dtype])
    set_threads_for(model)
    return model, tok


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
    config = passkey.homer_config(trained, args.max_chunk_len, **homer_settings(args))
    first = prompts[0]
    p = plan(model.cfg.num_hidden_layers, config, len(first.prefix), len(first.context), len(first.suffix))
    bias = (
        bias_for(model, tok, p.M, args.bias, passkey.SHIPPED_MODEL).table
        if p.config.reduction == "calibrated"
        else None
    )
    n = len(first.ids)
    progress(f"passkey demo: the shipped model (trained context {trained}) reads {len(prompts)} prompts of {n} tokens "
             f"({n / trained:.1f}x), greedy; HOMER with M={p.M} T={p.T} W={p.W} ({config.reduction})")  # fmt: skip
    plain = [tok.decode(o) for o in greedy_batch(model, [q.ids for q in prompts], passkey.ANSWER_TOKENS)]
    homer = []
    for q in prompts:
        cache = homer_prefill(model, q.prefix, q.context, q.suffix, config, bias=bias)
        homer.append(tok.decode(homer_generate(model, cache, passkey.ANSWER_TOKENS)))
    plain_ok = [passkey.score(a, q.passkey) for a, q in zip(plain, prompts)]
    homer_ok = [passkey.score(a, q.passkey) for a, q in zip(homer, prompts)]
    progress(f"  plain inference: {sum(plain_ok):2d}/{len(prompts)} right")
    progress(f"  HOMER:           {sum(homer_ok):2d}/{len(prompts)} right")
    shown = next((i for i in range(len(prompts)) if homer_ok[i] and not plain_ok[i]), 0)
    q = prompts[shown]
    text = tok.decode(q.ids).replace(sentence := passkey.passkey_sentence(q.passkey), f">>> {sentence} <<<")
    progress(f"the prompt of seed {seeds[shown]} in full ({len(q.ids)} tokens; the passkey sentence between >>> <<<;"
             f" `python -m homer_ref.explain --seed {seeds[shown]} --out x.html` draws what HOMER kept):")  # fmt: skip
    progress(textwrap.fill(text, width=110, initial_indent="  ", subsequent_indent="  "))
    parts = q.prefix, q.context, q.suffix
    cache = run_homer(model, tok, parts, plan(p.L, config, *map(len, parts)), args.bias, passkey.SHIPPED_MODEL)
    new_tokens = args.max_new_tokens if args.max_new_tokens != 100 else passkey.ANSWER_TOKENS
    answer = tok.decode(homer_generate(model, cache, new_tokens, temperature=args.temperature, seed=args.seed))
    print(answer.strip())
    verdict = {True: "right", False: "wrong"}
    progress(f"true passkey: {q.passkey}; HOMER answered {answer.strip()!r} "
             f"({verdict[passkey.score(answer, q.passkey)]}); plain inference answered {plain[shown].strip()!r} "
             f"({verdict[plain_ok[shown]]})")  # fmt: skip
    return 0


def entry() -> None:
    """`python -m homer_ref.generate` and the `homer-generate` console script."""
    sys.exit(run_main(main))
