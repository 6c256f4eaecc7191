"""The picture of a HOMER run: which tokens each tree node kept, as one self-contained HTML page.

    html = render_html(cache, tok.token_texts(prompt_ids), title, notes, marked)

`python -m homer_ref.explain` writes it for any prompt; tutorials call it. The page is XHTML that browsers read as
HTML (inline SVG and CSS, no script, nothing fetched), drawn from the run's records alone (`HomerCache.nodes`:
every node's input slots, their sources and positions, its scores, kept and removed slots):

- a short "how to read this page", the plan (every symbol explained), the tree: a box per node ("node h.i": level
  h, index i, the names of the trace format) with its layers, `slots in -> kept` and a strip of its input slots;
- every node, root first: its input tokens as text (spaces and newlines shown, the text wrapping), the removed
  ones struck out (a run of COLLAPSE or more collapsed into "... 37 pruned ..."), the kept ones shaded by their
  significance rank at the node's last layer (HOMER_SPEC.md D.1; the affixes are never pruned);
- the final cache: every slot, the same in all L layers, with its token and its position id (reused, B.3 / E.3).

Marked tokens (a passkey's digits, or any text: `mark_text`) are outlined in red wherever they go, an outline
that the significance shading leaves visible. Token texts come from `Tokenizer.token_texts`, so every vocabulary
reads as text (no '▁', 'Ġ', 'Ċ' or <0x0A>).
"""

from collections.abc import Collection, Sequence
from html import escape

from homer_ref.homer import HomerCache, NodeTrace

COLLAPSE = 4  # a run of at least this many removed, unmarked slots is drawn as one "... n pruned ..."
LEAF_WIDTH, BOX_WIDTH, BOX_HEIGHT, LEVEL_HEIGHT, MARGIN = 84, 76, 62, 92, 8  # the SVG tree's geometry, in px
SYMBOLS = {  # the plan's columns, explained on the page (HOMER_SPEC.md A, B.1, C.1, D.4)
    "L": "layers of the model",
    "W": "warm-up layers: run by the leaves alone",
    "M": "max chunk length, prefix and suffix included",
    "T": "target: slots of the final cache",
    "P": "prefix tokens (given to every chunk)",
    "C": "context tokens (chunked, and the only ones pruned)",
    "S": "suffix tokens (given to every chunk; its last token scores the others)",
    "E": "context tokens a chunk can hold, M − P − S",
    "N": "leaves (a power of two)",
    "H": "tree height: the root is level H",
    "e": "context tokens per leaf",
    "lpc": "layers per tree level",
    "lo": "leftover layers, given to the leaves",
    "R": "a child's reduced length, P + ⌊E/2⌋ + S",
    "K": "slots of the final cache, in every layer",
}

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1220px; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; } h3 { font-size: 1em; margin: 1.2em 0 .3em; }
h3 small { font-weight: normal; color: #555; }
.how { background: #f6f6f2; border: 1px solid #e4e4da; padding: .4em 1em; font-size: .92em; }
.how li { margin: .2em 0; }
table.plan { border-collapse: collapse; font-size: .9em; }
table.plan td, table.plan th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
.symbols { font-size: .82em; color: #555; }
.legend span, .legend del { margin-right: 1.2em; }
svg.tree { display: block; width: 100%; height: auto; }
svg text { font-size: 10px; text-anchor: middle; fill: #222; }
svg .name { font-weight: bold; } svg .mark { fill: #c00; font-weight: bold; }
svg rect.box { fill: #fff; stroke: #888; } svg a:hover rect.box { stroke: #c00; stroke-width: 2; }
svg path.edge { fill: none; stroke: #aaa; }
svg rect.k { fill: #f0a040; } svg rect.a { fill: #8fb4ff; } svg rect.r { fill: #ddd; } svg rect.m { fill: #c00; }
.tokens { font-family: ui-monospace, monospace; font-size: 12px; line-height: 2; margin: 0;
          white-space: pre-wrap; overflow-wrap: anywhere; }
.t { border-radius: 2px; padding: 1px 0; }
.a { background: #dbe6ff; font-style: italic; }
del.t { color: #999; }
.sp { color: #bbb; font-style: normal; }
.ws { border-bottom: 1px dotted #aaa; }
.m { outline: 2px solid #d00; outline-offset: -1px; color: #900; font-weight: bold; }
del.t.m { outline-style: dashed; color: #c66; }
.run { color: #999; font-style: italic; font-size: 11px; border: 1px dashed #ccc; border-radius: 8px; padding: 0 4px; }
.cache { display: flex; flex-wrap: wrap; gap: 3px; font-family: ui-monospace, monospace; font-size: 12px; }
.slot { display: inline-flex; flex-direction: column; align-items: center; border: 1px solid #ddd; padding: 1px 3px;
        max-width: 14em; overflow-wrap: anywhere; white-space: pre-wrap; }
.slot .pos { font-size: 9px; color: #777; }
"""


def node_name(trace: NodeTrace, height: int) -> str:
    """ "node h.i", with its role: "(leaf)", "(root)" or "(root, the only leaf)"."""
    role = (
        ("root, the only leaf" if height == 0 else "root")
        if trace.level == height
        else "leaf"
        if trace.level == 0
        else ""
    )
    return trace.name + (f" ({role})" if role else "")


def shown(text: str) -> str:
    """A token's text as escaped XHTML: newlines and tabs drawn faintly (↵, ⇥) before the break they make, other
    control characters as their code, and a token of blanks alone underlined so that it can be seen."""
    out = []
    for c in text:
        if c == "\n":
            out.append('<span class="sp">↵</span>\n')
        elif c == "\t":
            out.append('<span class="sp">⇥</span>\t')
        elif c < " " or c == "\x7f":
            out.append(f'<span class="sp">\\x{ord(c):02x}</span>')
        else:
            out.append(escape(c))
    html = "".join(out)
    return f'<span class="ws">{html}</span>' if text and not text.strip(" ") else html


def mark_text(texts: Sequence[str], needle: str) -> set[int]:
    """Indices of the tokens whose text overlaps an occurrence of `needle` in "".join(texts) (case-sensitive)."""
    if not needle:
        return set()
    starts, at = [], 0
    for t in texts:
        starts.append(at)
        at += len(t)
    joined, found, i = "".join(texts), set(), -1
    while (i := joined.find(needle, i + 1)) >= 0:
        end = i + len(needle)
        found |= {k for k, (s, t) in enumerate(zip(starts, texts)) if s < end and i < s + max(len(t), 1)}
    return found


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


def token_spans(cache: HomerCache, trace: NodeTrace, texts: Sequence[str], marked: Collection[int]) -> str:
    """A node's input slots as text: kept ones shaded by rank, removed ones struck out or collapsed in runs."""
    sources, positions = trace.input_sources.tolist(), trace.input_positions.tolist()
    removed, ranks = set(trace.removed.tolist()), significance_ranks(trace)
    out, j, n = [], 0, len(sources)
    while j < n:
        run = j
        while run < n and run in removed and sources[run] not in marked:
            run += 1
        if run - j >= COLLAPSE:  # a long run of pruned (unmarked) slots: one chip, its text in the tooltip
            text = "".join(texts[s] for s in sources[j:run])
            tip = f"slots {j}-{run - 1}, positions {positions[j]}..{positions[run - 1]}: {text}"
            out.append(
                f"<span{attributes(cls='run', data_slots=f'{j}-{run - 1}', title=tip)}>… {run - j} pruned …</span>"
            )
            j = run
            continue
        part, i = cache.plan.part(sources[j])
        cls = "t " + ("r" if j in removed else "k") + (" a" if part != "context" else "")
        cls += " m" if sources[j] in marked else ""
        tip = f"slot {j} · position {positions[j]} · {part} token {i}"
        style = None
        if j in ranks:
            rank, total = ranks[j]
            tip += f" · score {float(trace.scores[j]):.3f}, rank {rank + 1} of {total}"
            if j not in removed:  # strongest colour for the most significant slot
                style = f"background: hsl(30, 95%, {50 + 46 * rank / max(1, total - 1):.0f}%)"
        tag = "del" if j in removed else "span"
        attrs = attributes(cls=cls, data_slot=j, data_source=sources[j], data_position=positions[j])
        out.append(f"<{tag}{attrs}{attributes(style=style, title=tip)}>{shown(texts[sources[j]])}</{tag}>")
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
    """The tree as boxes (root on top), each with a strip of its input slots and a link to its section; it scales
    down to the page's width (viewBox), so the page never scrolls sideways."""
    p = cache.plan
    width, height = p.N * LEAF_WIDTH + 2 * MARGIN, (p.H + 1) * LEVEL_HEIGHT + MARGIN

    def box(level: int, index: int) -> tuple[float, float]:  # top-centre of a node's box
        return MARGIN + (index + 0.5) * LEAF_WIDTH * 2**level, MARGIN + (p.H - level) * LEVEL_HEIGHT

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" class="tree" '
             f'style="max-width: {width}px" preserveAspectRatio="xMinYMin meet">']  # fmt: skip
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
            (t.name, "name"),
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


def how_to_read(cache: HomerCache, marked: Collection[int]) -> str:
    p = cache.plan
    items = [
        f"The prompt was split into a prefix ({p.P} token{'s' * (p.P != 1)}), a context ({p.C}) and a suffix ({p.S}). "
        + (
            f"The context was cut into {p.N} leaves of at most {p.e} tokens; every leaf also got the prefix and the "
            "suffix, at positions reused from 0."
            if p.N > 1
            else "Everything fitted in one chunk: one node, the plain forward."
        ),
        f"The tree: each box is a node — its name (node h.i: level h, index i; the leaves are level 0, the root "
        f"level {p.H}), the layers it ran, and slots in → slots kept. Under it, its input slots from left to right: "
        "orange context kept, grey removed, blue prefix and suffix (never removed). Click a box to see its tokens.",
        "Each node's tokens: struck-out tokens were removed at the node's last layer (after its attention, before "
        "its MLP), by how much the last suffix token attended to them; kept ones are shaded, the darker the more "
        "significant. Hover a token for its slot, position, source and score.",
        f"The final cache holds the {len(cache.positions)} slots that survived every node, the same in every "
        "layer, with their position ids (they repeat and go backwards: positions are reused).",
    ]
    if marked:
        items.insert(3, "Tokens outlined in red are the marked ones, followed through every node that held them.")
    return '<ol class="how">' + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ol>"


def render_html(
    cache: HomerCache,
    texts: Sequence[str],  # the text of every prompt token, prefix + context + suffix (`Tokenizer.token_texts`)
    title: str,
    notes: Sequence[str] = (),  # lines under the title (the answer, the true passkey, ...)
    marked: Collection[int] = (),  # prompt indices (sources) of tokens to outline everywhere
) -> str:
    """One self-contained XHTML page: how to read it, the plan, the tree, the final cache and every node's tokens."""
    p, marked = cache.plan, set(marked)
    if len(texts) != p.P + p.C + p.S:
        raise ValueError(f"texts has {len(texts)} entries but the prompt has P+C+S = {p.P + p.C + p.S} tokens")
    notes = list(notes)
    if p.C == 0:
        notes.append("The prompt has no context part (nothing to chunk): HOMER is the plain forward, one node.")
    plan_cells = dict(L=p.L, W=p.W, M=p.M, T=p.T, P=p.P, C=p.C, S=p.S, E=p.E, N=p.N, H=p.H, e=p.e, lpc=p.lpc, lo=p.lo)
    plan_cells |= {"R": p.R, "K": len(cache.positions)}
    symbols = " · ".join(f"{k} {v}" for k, v in SYMBOLS.items())
    out = [
        '<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8"/>',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        "<ul>" + "".join(f"<li>{escape(line)}</li>" for line in notes) + "</ul>" if notes else "",
        "<h2>How to read this page</h2>" + how_to_read(cache, marked),
        '<h2>The plan</h2><table class="plan"><tr>',
        "".join(f"<th{attributes(title=SYMBOLS[k])}>{escape(k)}</th>" for k in plan_cells) + "</tr><tr>",
        "".join(f"<td>{v}</td>" for v in plan_cells.values()) + "</tr></table>",
        f'<p class="symbols">{escape(symbols)}. Peak live KV {cache.peak_kv_token_layers} token-layers (cached '
        f"tokens × layers, summed over what is held at once), against {(p.P + p.C + p.S) * p.L} for the plain "
        "cache. The rules: docs/HOMER_SPEC.md (B chunking, C.1 layers, D reduction, E merging, F refinement).</p>",
        '<p class="legend"><span class="t k" style="background: hsl(30, 95%, 50%)">kept, most significant</span>'
        '<span class="t k" style="background: hsl(30, 95%, 96%)">kept, least</span>'
        '<span class="t a">prefix / suffix (never pruned)</span><del class="t">removed</del>'
        '<span class="run">… n pruned …</span><span class="t k m" style="background: hsl(30, 95%, 70%)">marked</span>'
        '<span><span class="sp">↵</span> a newline</span></p>',
        '<h2 id="tree">The tree</h2>' + tree_svg(cache, marked),
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
            f'<span{attrs}><span class="st">{shown(texts[source])}</span><span class="pos">{position}</span></span>'
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
            f"<section{attrs}><h3>{escape(node_name(t, p.H))} <small>layers {t.layers[0]}–{t.layers[1] - 1} · "
            f"{n} slots in → {k} kept, {escape(action)}</small></h3>"
            f'<p class="tokens">{token_spans(cache, t, texts, marked)}</p></section>'
        )
    out.append("</body></html>\n")
    return "".join(out)
