"""`python -m homer_ref.explain --out FILE.html`: a picture of which tokens HOMER kept, where in its tree.

With no other argument it draws the demo's passkey prompt on the shipped model (8x its trained context: the prompt
`python -m homer_ref.generate` answers, `--seed` choosing it), the passkey's digits marked. `--model`, `--prompt` /
`--prompt-file`, `--prefix` / `--suffix`, `--chat` and the HOMER options are `generate`'s; `--mark TEXT`
(repeatable) outlines the tokens of any text of the prompt in every node that holds them. The page is
`homer_ref.picture.render_html`: one self-contained file (inline SVG and CSS, no script, nothing fetched).
"""

import argparse
import sys
from pathlib import Path

from homer_ref.atomic import replace_atomic
from homer_ref.cli.common import DTYPES, check_out, command_parser, open_model, open_tokenizer, progress, run_main
from homer_ref.cli.generate import (
    add_homer_options,
    add_prompt_options,
    check_homer_options,
    homer_config,
    homer_settings,
    load_shipped_model,
    read_prompt,
    run_homer,
)
from homer_ref.homer import homer_generate, plan
from homer_ref.picture import mark_text, render_html
from homer_ref.prompts import homer_parts
from homer_ref.tasks import passkey


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "explain",
        "Draw which tokens HOMER kept where in its tree, as one self-contained HTML file. With no "
        "other argument: the demo's passkey prompt on the shipped model (8x its trained context).",
    )
    p.add_argument("--out", required=True, type=Path, help="the .html file to write")
    add_prompt_options(p)
    p.add_argument(
        "--mark",
        action="append",
        default=[],
        metavar="TEXT",
        help="outline the tokens of TEXT wherever the prompt holds it, in every node (repeatable)",
    )
    p.add_argument("--max-new-tokens", type=int, default=2 * passkey.PASSKEY_DIGITS, help="greedy answer length (10)")
    p.add_argument("--seed", type=int, default=0, help="the demo prompt's seed, and the random reduction's (0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")
    add_homer_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_homer_options(parser, args)
    check_out(parser, args.out)
    if args.model is None and args.prompt is None and args.prompt_file is None:  # the demo
        model, tokenizer = load_shipped_model(args.dtype)
        trained = model.cfg.max_position_embeddings
        prompt = passkey.demo_prompt(tokenizer, trained, args.seed)
        parts, model_path = (prompt.prefix, prompt.context, prompt.suffix), passkey.SHIPPED_MODEL
        marked = {len(prompt.prefix) + i for i in prompt.digit_slots}  # sources of the passkey's digits
        config = passkey.homer_config(trained, args.max_chunk_len, **homer_settings(args))
        title = f"HOMER on a passkey prompt at {len(prompt.ids) / trained:.0f}x the trained context (seed {args.seed})"
        notes = [f"true passkey: {prompt.passkey} (its digits are marked)"]
    else:
        text = read_prompt(parser, args)
        if not ((args.prefix or "") + text + (args.suffix or "")).strip():
            raise ValueError("the prompt is empty, there is nothing to draw; pass --prompt TEXT or --prompt-file FILE")
        model_path = args.model or str(passkey.SHIPPED_MODEL)
        tokenizer = open_tokenizer(model_path, args.tokenizer)  # cheap checks before the weights are read
        model = open_model(model_path, tokenizer, DTYPES[args.dtype])
        config = homer_config(args, model.cfg.max_position_embeddings)
        parts = homer_parts(tokenizer, text, config.max_chunk_len, args.prefix, args.suffix, args.chat)
        marked, title, notes = set(), f"HOMER on a {sum(map(len, parts))}-token prompt", []
    texts = tokenizer.token_texts([i for part in parts for i in part])
    for needle in args.mark:
        found = mark_text(texts, needle)
        if not found:
            progress(f"warning: --mark {needle!r} does not occur in the prompt; nothing marked for it")
        marked |= found
    if args.mark:
        notes.append(f"marked: {', '.join(repr(m) for m in args.mark)}")
    cache = run_homer(model, tokenizer, parts, plan(model.cfg.num_hidden_layers, config, *map(len, parts)),
                      args.bias, model_path)  # fmt: skip
    answer = tokenizer.decode(homer_generate(model, cache, args.max_new_tokens, stop_ids=tokenizer.stop_ids))
    notes.append(f"HOMER's greedy continuation: {answer.strip()!r}")
    html = render_html(cache, texts, title, notes, marked)
    replace_atomic(args.out, lambda tmp: Path(tmp).write_text(html, encoding="utf-8"))
    progress(
        f"wrote {args.out}: {len(cache.nodes)} nodes, {len(cache.positions)} final slots; answer {answer.strip()!r}"
    )
    return 0


def entry() -> None:
    """`python -m homer_ref.explain` and the `homer-explain` console script."""
    sys.exit(run_main(main))
