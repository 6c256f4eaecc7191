"""The benchmarks' results as the README's markdown tables (one table writer, column specs per table)."""


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def columns(rows: list[dict], spec: list[tuple[str, str]]) -> list[str]:
    """A markdown table of `rows`: one column per (header, format string applied to the row's fields)."""
    return table([h for h, _ in spec], [[fmt.format(**r) for _, fmt in spec] for r in rows])


def text_plot(rows: list[dict], width: int = 60) -> list[str]:
    """Bars of live KV per length: '#' depth-first HOMER, '=' level-order HOMER, '.' plain."""
    scale = width / max(r["plain_kv"] for r in rows)
    lines = []
    for r in rows:
        for mark, key in (("#", "homer_depth_first_kv"), ("=", "homer_level_order_kv"), (".", "plain_kv")):
            label = f"{r['length']:>6}" if mark == "#" else " " * 6
            lines.append(f"{label} {mark * max(1, round(r[key] * scale)):<{width}} {r[key]:>9,}")
    return lines


MEMORY_COLUMNS = [
    ("tokens", "{length}"),
    ("live KV depth-first / plain", "{peak_kv_ratio:.3f}"),
    ("level-order / plain", "{level_order_kv_ratio:.3f}"),
    ("G.2 bound / plain", "{g2_ratio:.3f}"),
    ("peak RSS growth plain / HOMER (MiB)", "{plain_rss_mib:.0f} / {homer_depth_first_rss_mib:.0f}"),
    ("time HOMER / plain", "{time_ratio:.2f}"),
    ("MACs HOMER / plain", "{macs_ratio:.2f}"),
]
STORIES_COLUMNS = [MEMORY_COLUMNS[i] for i in (0, 1, 2, 5)]
LLAMA2_COLUMNS = [
    ("tokens", "{length}"),
    ("leaves", "{leaves}"),
    ("full cache GiB", "{full_gib:.2f}"),
    ("depth-first peak GiB", "{depth_first_gib:.2f}"),
    ("depth-first / full", "{depth_first_ratio:.3f}"),
    ("level-order / full", "{level_order_ratio:.3f}"),
]
HF_COLUMNS = [
    ("tokens", "{length}"),
    ("homer_ref s", "{ours_s:.3f}"),
    ("HF s", "{hf_s:.3f}"),
    ("ratio (median of rounds)", "{ratio:.3f}"),
    ("quartiles", "{ratio_q1:.3f}-{ratio_q3:.3f}"),
    ("max abs logit diff", "{max_abs_logit_diff:.1e}"),
]
USER_PATH_COLUMNS = [
    ("run", "{run}"),
    ("command", "`{command}`"),
    ("prompt tokens", "{tokens:,}"),
    ("wall s", "{wall_seconds:.1f}"),
    ("CPU s", "{cpu_seconds:.1f}"),
    ("peak RSS MiB", "{peak_rss_mib:.0f}"),
    ("above the short run MiB", "{extra_rss_mib:.0f}"),
]


def suites_markdown(result: dict) -> str:
    """The README's results tables of `python -m homer_ref.bench --markdown`."""
    out = [
        f"Machine: {result['machine']}. Command: `{result['command']}` ({result['total_s']:.0f} s).",
        "",
        "**Bench model** (16 layers, D=256, 8 heads / 4 KV heads, random weights), M = T = 512, P = S = 16, W = 0:",
        "",
    ]
    out += columns(result["memory"], MEMORY_COLUMNS)
    out += ["", "Live KV against context length (bench model; one character = 1/60 of the plain cache at the longest):"]
    out += ["", "```"] + text_plot(result["memory"]) + ["```"]
    if result["stories"]:
        out += ["", "**stories260K** (5 layers), M = T = 512, within its depth limit:", ""]
        out += columns(result["stories"], STORIES_COLUMNS)
    shape = "**Llama-2-7B shape** (L=32, W=12, M=T=2048, P=S=100), from the plan (fp16 K+V, 16 KiB per token-layer):"
    out += ["", shape, ""]
    llama2 = [r | {"level_order_ratio": r["level_order_kv"] / r["full_kv"]} for r in result["llama2_7b"]]
    out += columns(llama2, LLAMA2_COLUMNS)
    if result["forward_vs_hf"]:
        out += ["", "**Forward pass, homer_ref vs HF transformers** (bench model, float32, rounds back to back):", ""]
        out += columns(result["forward_vs_hf"], HF_COLUMNS)
    return "\n".join(out)


def model_markdown(result: dict) -> str:
    """The `--model` measurements as a table."""
    out = [
        f"**{result['model']}** ({result['dtype']}), HOMER M = {result['M']}, T = {result['T']}, W = {result['W']}, "
        f"uncalibrated; weights {result['weights_mib']:.0f} MiB, loading peaked {result['load_peak_mib']:.0f} MiB "
        f"above the process ({result['load_ratio']:.2f}x the weights)",
        "",
    ]
    modes = [m for m in ("plain", "homer") if f"{m}_seconds" in result["rows"][0]]
    spec = [("tokens", "{length}")]
    for m in modes:
        spec += [(f"{m} CPU s", f"{{{m}_seconds:.1f}}"), (f"{m} wall s", f"{{{m}_wall_seconds:.1f}}"),
                 (f"{m} peak RSS above model MiB", f"{{{m}_rss_growth_mib:.0f}}"),
                 (f"{m} live KV MiB", f"{{{m}_live_kv_mib:.0f}}")]  # fmt: skip
    if len(modes) == 2:
        spec += [("time HOMER / plain", "{time_ratio:.2f}"), ("peak RSS HOMER / plain", "{rss_ratio:.2f}"),
                 ("live KV HOMER / plain", "{live_kv_ratio:.2f}")]  # fmt: skip
    out += columns(result["rows"], spec)
    for r in result.get("forward_vs_hf", []):
        out += ["", f"Forward pass at {r['length']} tokens: homer_ref {r['ours_s']:.2f} s, HF transformers "
                f"{r['hf_s']:.2f} s CPU (medians of {r['repeats']}): forward_time_ratio_vs_hf = {r['ratio']:.3f}, "
                f"quartiles {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} (max abs logit diff "
                f"{r['max_abs_logit_diff']:.1e})"]  # fmt: skip
    return "\n".join(out)


def user_path_markdown(result: dict) -> str:
    """The user's path: one row per `generate` run, then the targets with their measured ratios."""
    out = [f"Machine: {result['machine']}. Model: {result['model']}; an empty user cache "
           f"(HOMER_REF_CACHE={result['cache']}); each run a fresh process.", ""]  # fmt: skip
    out += columns(result["runs"], USER_PATH_COLUMNS)
    out += ["", "| target | measured | met |", "|---|---|---|"]
    out += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in result["targets"]]
    return "\n".join(out)
