"""`python -m homer_ref.generate`: continue a prompt with a Llama checkpoint.

stdout carries the generated continuation only (so it pipes); settings and timing go to stderr.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from homer_ref.cli import DTYPES, progress, run_main
from homer_ref.decoding import generate_plain
from homer_ref.loading import load_model, load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m homer_ref.generate",
        description="Continue a prompt with a Llama model (HF directory or llama2.c .bin). "
        "The continuation goes to stdout, everything else to stderr.",
    )
    p.add_argument("--model", required=True, help="HF model directory or llama2.c .bin checkpoint")
    p.add_argument("--tokenizer", help="sentencepiece .model file (default: tokenizer.model in the model directory)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="prompt text (default: empty, i.e. start from BOS)")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    text = args.prompt
    if args.prompt_file is not None:
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            parser.error(f"--prompt-file {args.prompt_file} is not UTF-8 text ({e.reason}); re-save it as UTF-8")
        except OSError as e:
            parser.error(f"--prompt-file {args.prompt_file}: {e.strerror}")
    model_path = Path(args.model)
    t0 = time.perf_counter()
    model = load_model(model_path, dtype=DTYPES[args.dtype])
    tokenizer = load_tokenizer(args.tokenizer if args.tokenizer else model_path)
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary is {model.cfg.vocab_size}; "
            "pass the tokenizer the model was trained with (--tokenizer)"
        )
    prompt_ids = tokenizer.encode(text, bos=True)
    progress(
        f"model {model_path} ({args.dtype}), prompt {len(prompt_ids)} tokens, mode plain, "
        f"temperature {args.temperature}, top-p {args.top_p}, seed {args.seed}"
    )
    printed = ""
    out: list[int] = []

    def stream(token: int) -> None:  # print the text as it grows (sentencepiece joins pieces context-dependently)
        nonlocal printed
        out.append(token)
        text = tokenizer.decode(out)
        sys.stdout.write(text[len(printed) :])
        sys.stdout.flush()
        printed = text

    t1 = time.perf_counter()
    with torch.no_grad():
        generate_plain(
            model,
            prompt_ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop_ids=(tokenizer.eos_id,),
            on_token=stream,
        )
    t2 = time.perf_counter()
    sys.stdout.write("\n" if sys.stdout.isatty() else "")
    progress(
        f"generated {len(out)} tokens in {t2 - t1:.2f} s ({len(out) / max(t2 - t1, 1e-9):.1f} tok/s); "
        f"load {t1 - t0:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
