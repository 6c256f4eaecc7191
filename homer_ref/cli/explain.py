"""`python -m homer_ref.explain --out FILE.html`: a picture of which tokens HOMER kept, where in its tree.

With no other argument it draws the demo's passkey prompt on the shipped model (8x its trained context: the prompt
`python -m homer_ref.generate` answers, `--seed` choosing it). `--model`, `--prompt` / `--prompt-file`,
`--prefix` / `--suffix` and the HOMER options are `generate`'s. The file is one self-contained page (XHTML that
browsers read as HTML: inline SVG and CSS, no script, nothing fetched):

- the tree: a box per node with its layers, `slots in -> kept`, and a strip of its input slots (kept, removed,
  marked), each box a link to
- every node, root first: its input tokens as text, the removed ones struck out (a run of COLLAPSE or more
  collapsed into "... 37 pruned ..."), the kept ones coloured by their significance rank at the node's last layer
  (HOMER_SPEC.md D.1; affixes are never pruned, and a node that prunes nothing has no scores);
- the final cache: every slot, the same in all L layers, with its token and its position id (reused, B.3 / E.3).

Marked tokens (the passkey's digits in the demo) are outlined wherever they go. `render_html` draws any
`HomerCache` from its slot-to-source map (`NodeTrace.input_sources`, `HomerCache.sources`); tutorials call it.
"""

import argparse
import sys
from collections.abc import Collection, Sequence
from html import escape
from pathlib import Path

from homer_ref.cli.common import (
    DTYPES,
    check_out,
    command_parser,
    open_model,
    open_tokenizer,
    progress,
    replace_atomic,
    run_main,
)
from homer_ref.cli.generate import (
    add_homer_options,
    add_prompt_options,
    check_homer_options,
    homer_parts,
    load_shipped_model,
    read_prompt,
    run_homer,
)
from homer_ref.homer import HomerCache, NodeTrace, homer_generate
from homer_ref.homer.traversal import plain_kv
from homer_ref.loading import Tokenizer
from homer_ref.tasks import passkey

COLLAPSE = 4  # a run of at least this many removed, unmarked slots is drawn as one "... n pruned ..."
BYTE_PIECES = {"<0x0A>": "↵", "<0x09>": "⇥"}  # byte-fallback pieces drawn as a symbol
LEAF_WIDTH, BOX_WIDTH, BOX_HEIGHT, LEVEL_HEIGHT, MARGIN = 84, 76, 62, 92, 8  # the SVG tree's geometry, in px

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; } h3 { font-size: 1em; margin: 1.2em 0 .3em; }
h3 small { font-weight: normal; color: #555; }
table.plan { border-collapse: collapse; font-size: .9em; }
table.plan td, table.plan th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
.legend span { margin-right: 1.2em; }
.scroll { overflow-x: auto; border: 1px solid #eee; }
svg text { font-size: 10px; text-anchor: middle; fill: #222; }
svg .name { font-weight: bold; } svg .mark { fill: #c00; font-weight: bold; }
svg rect.box { fill: #fff; stroke: #888; } svg a:hover rect.box { stroke: #c00; stroke-width: 2; }
svg path.edge { fill: none; stroke: #aaa; }
svg rect.k { fill: #f0a040; } svg rect.a { fill: #8fb4ff; } svg rect.r { fill: #ddd; } svg rect.m { fill: #c00; }
.tokens { font-family: ui-monospace, monospace; font-size: 12px; line-height: 2; white-space: pre-wrap; margin: 0; }
.t { border-radius: 2px; padding: 1px 0; }
.a { background: #dbe6ff; font-style: italic; }
del.t { color: #999; }
.t.m, .slot.m { background: #c00; color: #fff; font-weight: bold; margin: 0 1px; }
del.t.m { background: #fcc; color: #900; }
.run { color: #999; font-style: italic; font-size: 11px; border: 1px dashed #ccc; border-radius: 8px; padding: 0 4px; }
.cache { display: flex; flex-wrap: wrap; gap: 3px; font-family: ui-monospace, monospace; font-size: 12px; }
.slot { display: inline-flex; flex-direction: column; align-items: center; border: 1px solid #ddd; padding: 1px 3px; }
.slot .sp { font-size: 9px; color: #777; }
"""


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Display text of each token: sentencepiece's '▁' as a space, a newline as ↵, other control characters as
    their code."""
    out = []
    for t in ids:
        text = tokenizer.piece(t).replace("\u2581", " ")
        text = BYTE_PIECES.get(text, text)  # sentencepiece's byte fallback, e.g. "<0x0A>" for a newline
        out.append("".join(c if c >= " " else f"\\x{ord(c):02x}" for c in text))
    return out


def node_name(trace: NodeTrace, height: int) -> str:
    if trace.level == height:
        return "root" if height else "root (the only leaf)"
    return f"leaf {trace.index}" if trace.level == 0 else f"node {trace.level}.{trace.index}"


def attributes(**values) -> str:
    """` name="value"` pairs, escaped; `data_x` becomes `data-x`, `cls` becomes `class`; None is left out."""
    names = {"cls": "class"}
    return "".join(
        f' {names.get(k, k.replace("_", "-"))}="{escape(str(v))}"' for k, v in values.items() if v is not None
    )


def significance_ranks(trace: NodeTrace) -> dict[int, tuple[int, int]]:
    """slot -> (rank, of how many): the node's context slots by descending score (rank 0 the most significant)."""
    if trace.scores is None:
        return {}
    scores = trace.scores.tolist()
    context = sorted((j for j, s in enumerate(scores) if s != float("inf")), key=lambda j: -scores[j])
    return {j: (r, len(context)) for r, j in enumerate(context)}


def token_spans(cache: HomerCache, trace: NodeTrace, pieces: Sequence[str], marked: Collection[int]) -> str:
    """A node's input slots as text: kept ones coloured by rank, removed ones struck out or collapsed in runs."""
    sources, positions = trace.input_sources.tolist(), trace.input_positions.tolist()
    removed, ranks = set(trace.removed.tolist()), significance_ranks(trace)
    out, j, n = [], 0, len(sources)
    while j < n:
        run = j
        while run < n and run in removed and sources[run] not in marked:
            run += 1
        if run - j >= COLLAPSE:  # a long run of pruned (unmarked) slots: one chip, its text in the tooltip
            text = "".join(pieces[s] for s in sources[j:run])
            tip = f"slots {j}-{run - 1}, positions {positions[j]}..{positions[run - 1]}:{text}"
            out.append(
                f"<span{attributes(cls='run', data_slots=f'{j}-{run - 1}', title=tip)}>… {run - j} pruned …</span>"
            )
            j = run
            continue
        part, i = cache.plan.part(sources[j])
        cls = "t " + ("r" if j in removed else "k") + (" a" if part != "context" else "")
        cls += " m" if sources[j] in marked else ""
        tip = f"slot {j} · position {positions[j]} · {part} {i}"
        style = None
        if j in ranks:
            rank, total = ranks[j]
            tip += f" · score {float(trace.scores[j]):.3f}, rank {rank + 1} of {total}"
            if j not in removed:  # strongest colour for the most significant slot
                style = f"background: hsl(30, 95%, {50 + 46 * rank / max(1, total - 1):.0f}%)"
        tag = "del" if j in removed else "span"
        attrs = attributes(cls=cls, data_slot=j, data_source=sources[j], data_position=positions[j])
        out.append(f"<{tag}{attrs}{attributes(style=style, title=tip)}>{escape(pieces[sources[j]])}</{tag}>")
        j += 1
    return "".join(out)


def slot_strip(cache: HomerCache, trace: NodeTrace, left: float, top: float, marked: Collection[int]) -> str:
    """A node's input slots as one bar, left to right: context kept / removed, affixes, and ticks for marked ones."""
    sources, removed, width = trace.input_sources.tolist(), set(trace.removed.tolist()), BOX_WIDTH - 4
    n = len(sources)
    kinds = ["r" if j in removed else "a" if cache.plan.part(s)[0] != "context" else "k" for j, s in enumerate(sources)]
    out, start = [], 0
    for j in range(1, n + 1):  # one rect per run of equal kinds
        if j == n or kinds[j] != kinds[start]:
            x, w = left + width * start / n, width * (j - start) / n
            out.append(f'<rect class="{kinds[start]}" x="{x:.2f}" y="{top}" width="{w:.2f}" height="8"/>')
            start = j
    for j in (j for j, s in enumerate(sources) if s in marked):
        out.append(f'<rect class="m" x="{left + width * j / n:.2f}" y="{top - 2}" width="1.5" height="12"/>')
    return "".join(out)


def tree_svg(cache: HomerCache, marked: Collection[int]) -> str:
    """The tree as boxes (root on top), each with a strip of its input slots and a link to its section."""
    p = cache.plan
    width, height = p.N * LEAF_WIDTH + 2 * MARGIN, (p.H + 1) * LEVEL_HEIGHT + MARGIN

    def box(level: int, index: int) -> tuple[float, float]:  # top-centre of a node's box
        return MARGIN + (index + 0.5) * LEAF_WIDTH * 2**level, MARGIN + (p.H - level) * LEVEL_HEIGHT

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="tree">']
    for t in cache.nodes:
        x, y = box(t.level, t.index)
        if t.level > 0:
            for child in (2 * t.index, 2 * t.index + 1):
                cx, cy = box(t.level - 1, child)
                mid = y + BOX_HEIGHT + (cy - y - BOX_HEIGHT) / 2
                parts.append(f'<path class="edge" d="M{x:.1f},{y + BOX_HEIGHT} V{mid:.1f} H{cx:.1f} V{cy}"/>')
    for t in cache.nodes:
        x, y = box(t.level, t.index)
        left, n, removed = x - BOX_WIDTH / 2, len(t.input_sources), set(t.removed.tolist())
        held = [j for j, s in enumerate(t.input_sources.tolist()) if s in marked]
        lines = [
            (f"{node_name(t, p.H)}", "name"),
            (f"layers {t.layers[0]}–{t.layers[1] - 1}", ""),
            (f"{n} → {len(t.kept)}", ""),
            (f"★ {sum(j not in removed for j in held)}/{len(held)} kept" if held else "", "mark"),
        ]
        parts.append(f'<a href="#node-{t.level}-{t.index}"><rect class="box" x="{left:.1f}" y="{y}" rx="4"')
        parts.append(f' width="{BOX_WIDTH}" height="{BOX_HEIGHT}"/>')
        for k, (text, cls) in enumerate(lines):
            if text:
                parts.append(
                    f'<text x="{x:.1f}" y="{y + 12 + 11 * k}"{attributes(cls=cls or None)}>{escape(text)}</text>'
                )
        parts.append(slot_strip(cache, t, left + 2, y + 50, marked))
        parts.append("</a>")
    parts.append("</svg>")
    return "".join(parts)


def render_html(
    cache: HomerCache,
    pieces: Sequence[str],  # display text of every prompt token: prefix + context + suffix (`token_pieces`)
    title: str,
    notes: Sequence[str] = (),  # lines under the title (the answer, the true passkey, ...)
    marked: Collection[int] = (),  # prompt indices (sources) of tokens to outline everywhere
) -> str:
    """One self-contained XHTML page: the plan, the tree, every node's tokens, and the final cache."""
    p, marked = cache.plan, set(marked)
    if len(pieces) != p.P + p.C + p.S:
        raise ValueError(f"pieces has {len(pieces)} entries but the prompt has P+C+S = {p.P + p.C + p.S} tokens")
    plan_cells = dict(L=p.L, W=p.W, M=p.M, T=p.T, P=p.P, C=p.C, S=p.S, E=p.E, N=p.N, H=p.H, e=p.e, lpc=p.lpc, lo=p.lo)
    plan_cells |= {"R = P+⌊E/2⌋+S": p.R, "final slots K": len(cache.positions)}
    out = [
        '<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8"/>',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        "<ul>" + "".join(f"<li>{escape(line)}</li>" for line in notes) + "</ul>" if notes else "",
        '<table class="plan"><tr>' + "".join(f"<th>{escape(k)}</th>" for k in plan_cells) + "</tr><tr>",
        "".join(f"<td>{v}</td>" for v in plan_cells.values()) + "</tr></table>",
        f"<p>Peak live KV {cache.peak_kv_token_layers} token-layers, against {plain_kv(p)} for the plain cache. "
        "Symbols and rules: docs/HOMER_SPEC.md (B chunking, C.1 layers, D reduction, E merging, F refinement).</p>",
        '<p class="legend"><span class="t k" style="background: hsl(30, 95%, 50%)">kept, most significant</span>'
        '<span class="t k" style="background: hsl(30, 95%, 96%)">kept, least</span>'
        '<span class="t a">prefix / suffix (never pruned)</span><del class="t">removed</del>'
        '<span class="run">… n pruned …</span><span class="t m">marked</span> '
        "Hover a token for its slot, position, source and score.</p>",
        '<h2 id="tree">The tree</h2><div class="scroll">' + tree_svg(cache, marked) + "</div>",
        f"<h2>The final cache: {len(cache.positions)} slots, the same in each of the {p.L} layers</h2>",
        "<p>Each slot with its token and its position id (local positions, reused: they repeat and go backwards); "
        f"generation continues at position {cache.last_position + 1}.</p>",
        f'<div class="cache" id="cache" data-slots="{len(cache.positions)}">',
    ]
    for k, (source, position) in enumerate(zip(cache.sources.tolist(), cache.positions.tolist())):
        part, i = p.part(source)
        cls = "slot" + (" a" if part != "context" else "") + (" m" if source in marked else "")
        attrs = attributes(cls=cls, data_slot=k, data_source=source, data_position=position, title=f"{part} {i}")
        out.append(
            f'<span{attrs}><span class="st">{escape(pieces[source])}</span><span class="sp">{position}</span></span>'
        )
    out.append("</div><h2>Every node, root first</h2>")
    for t in sorted(cache.nodes, key=lambda t: (-t.level, t.index)):
        n, k = len(t.input_sources), len(t.kept)
        action = (
            f"{n - k} removed at layer {t.layers[1] - 1}, after its attention and before its MLP"
            if n > k
            else f"nothing removed (target {t.target} ≥ {n})"
        )
        attrs = attributes(
            cls="node", id=f"node-{t.level}-{t.index}", data_level=t.level, data_index=t.index,
            data_layers=f"{t.layers[0]}-{t.layers[1]}", data_target=t.target, data_inputs=n, data_kept=k,
        )  # fmt: skip
        out.append(
            f"<section{attrs}><h3>{escape(node_name(t, p.H))} <small>level {t.level} · layers {t.layers[0]}–"
            f"{t.layers[1] - 1} · {n} slots in → {k} kept, {escape(action)}</small></h3>"
            f'<p class="tokens">{token_spans(cache, t, pieces, marked)}</p></section>'
        )
    out.append("</body></html>\n")
    return "".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "explain",
        "Draw which tokens HOMER kept where in its tree, as one self-contained HTML file. With no "
        "other argument: the demo's passkey prompt on the shipped model (8x its trained context).",
    )
    p.add_argument("--out", required=True, type=Path, help="the .html file to write")
    add_prompt_options(p)
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
    if args.model is None:
        model, tokenizer = load_shipped_model(args.dtype)
        trained = model.cfg.max_position_embeddings
        prompt = passkey.demo_prompt(tokenizer, trained, args.seed)
        parts, model_path = (prompt.prefix, prompt.context, prompt.suffix), passkey.SHIPPED_MODEL
        marked = {len(prompt.prefix) + i for i in prompt.digit_slots}  # sources of the passkey's digits
        M = args.max_chunk_len or trained - passkey.ANSWER_ROOM  # as `generate`'s demo and the model card
        title = (
            f"HOMER on a passkey prompt at {sum(map(len, parts)) / trained:.0f}x the trained context (seed {args.seed})"
        )
        notes = [f"true passkey: {prompt.passkey} (its digits are marked)"]
    else:
        text = read_prompt(parser, args)
        if not ((args.prefix or "") + text + (args.suffix or "")).strip():
            raise ValueError("the prompt is empty, there is nothing to draw; pass --prompt TEXT or --prompt-file FILE")
        model_path = args.model
        tokenizer = open_tokenizer(model_path, args.tokenizer)  # cheap checks before the weights are read
        model = open_model(model_path, tokenizer, DTYPES[args.dtype])
        M = args.max_chunk_len or model.cfg.max_position_embeddings // 2
        parts = homer_parts(tokenizer, args, text, M)
        marked, title, notes = set(), f"HOMER on a {sum(map(len, parts))}-token prompt", []
    cache = run_homer(model, args, M, *parts, model_path)
    answer = tokenizer.decode(homer_generate(model, cache, args.max_new_tokens, stop_ids=tokenizer.stop_ids))
    notes.append(f"HOMER's greedy continuation: {answer.strip()!r}")
    pieces = token_pieces(tokenizer, [i for part in parts for i in part])
    html = render_html(cache, pieces, title, notes, marked)
    replace_atomic(args.out, lambda tmp: Path(tmp).write_text(html, encoding="utf-8"))
    progress(
        f"wrote {args.out}: {len(cache.nodes)} nodes, {len(cache.positions)} final slots; answer {answer.strip()!r}"
    )
    return 0


def entry() -> None:
    """`python -m homer_ref.explain` and the `homer-explain` console script."""
    sys.exit(run_main(main))
