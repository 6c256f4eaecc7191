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

stdout carries the generated continuation only (so it pipes); settings, the HOMER plan and timing go to stderr.
"""

import argparse
import math
import sys
import textwrap
import time
from pathlib import Path

from homer_ref.cli.common import DTYPES, progress, run_main, set_threads_for
from homer_ref.decoding import generate_plain, greedy_batch
from homer_ref.homer import homer_generate, homer_prefill
from homer_ref.homer.calibration import calibrate_on_context, find_bias
from homer_ref.homer.plan import REDUCTIONS, HomerConfig, plan
from homer_ref.homer.traversal import plain_kv
from homer_ref.llama import Llama
from homer_ref.loading import Tokenizer, check_tokenizer, load_model, load_tokenizer
from homer_ref.tasks import passkey

CONTEXT_MARKER, SUFFIX_MARKER = "<<<CONTEXT>>>", "<<<SUFFIX>>>"


def add_prompt_options(p: argparse.ArgumentParser) -> None:
    """The model and the prompt, as `generate` takes them (shared with `explain`)."""
    p.add_argument("--model", help="HF model directory or llama2.c .bin checkpoint (default: the shipped model)")
    p.add_argument("--tokenizer", help="sentencepiece .model file (default: tokenizer.model in the model directory)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (default: empty, i.e. start from BOS)")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    p.add_argument("--prefix", help="HOMER prefix text (given to every chunk), placed before the prompt")
    p.add_argument("--suffix", help="HOMER suffix text (e.g. the question), placed after the prompt")


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
    p = argparse.ArgumentParser(
        prog="python -m homer_ref.generate",
        description="Continue a prompt with a Llama model (HF directory or llama2.c .bin); prompts longer than "
        "the trained context run HOMER. With no arguments: a passkey demo on the shipped model at 8x its "
        "trained context. The continuation goes to stdout, everything else to stderr.",
    )
    add_prompt_options(p)
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


def encode_parts(tok: Tokenizer, prefix: str, context: str, suffix: str, max_suffix: int):
    """Token ids of the three parts: BOS starts the prefix; an over-long suffix moves its head into the context."""
    prefix_ids, context_ids = tok.encode(prefix, bos=True), tok.encode(context, bos=False) if context else []
    suffix_ids = tok.encode(suffix, bos=False) if suffix else []
    if len(suffix_ids) > max_suffix:
        context_ids, suffix_ids = context_ids + suffix_ids[:-max_suffix], suffix_ids[-max_suffix:]
    return prefix_ids, context_ids, suffix_ids


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_homer_options(parser, args)
    if not 0 <= args.temperature < math.inf:  # NaN fails too
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.model is None:
        return passkey_demo(args)
    text = read_prompt(parser, args)
    t0 = time.perf_counter()
    model = load_model(args.model, dtype=DTYPES[args.dtype])
    set_threads_for(model)
    tokenizer = load_tokenizer(args.tokenizer if args.tokenizer else args.model)
    check_tokenizer(tokenizer, model.cfg)
    full = (args.prefix or "") + text + (args.suffix or "")
    trained = model.cfg.max_position_embeddings
    n_prompt = len(tokenizer.encode(full, bos=True))
    mode = args.mode if args.mode != "auto" else ("plain" if n_prompt <= trained else "homer")
    if mode == "homer" and not full.strip():
        raise ValueError("the prompt is empty, there is nothing for HOMER to read; pass --prompt or --prompt-file")
    progress(f"model {args.model} ({args.dtype}), prompt {n_prompt} tokens, trained context {trained}, mode {mode}")
    printed, out = "", []

    def stream(token: int) -> None:  # print the text as it grows (sentencepiece joins pieces context-dependently)
        nonlocal printed
        out.append(token)
        decoded = tokenizer.decode(out)
        sys.stdout.write(decoded[len(printed) :])
        sys.stdout.flush()
        printed = decoded

    sampling = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop_ids=(tokenizer.eos_id,))
    t1 = time.perf_counter()
    if mode == "plain":
        generate_plain(model, tokenizer.encode(full, bos=True), args.max_new_tokens, on_token=stream, **sampling)
    else:
        M = args.max_chunk_len or trained // 2
        parts = encode_parts(tokenizer, *split_prompt(text, args.prefix, args.suffix), max_suffix=max(1, M // 4))
        cache = run_homer(model, args, M, *parts, args.model)
        homer_generate(model, cache, args.max_new_tokens, on_token=stream, **sampling)
    t2 = time.perf_counter()
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
