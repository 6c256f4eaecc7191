"""`python -m homer_ref.eval`: passkey retrieval and long-text perplexity, plain vs RoPE scaling vs HOMER.

    python -m homer_ref.eval passkey [--lengths 1,2,4,8] [--modes plain,linear,...] [--samples 50] [--json]
    python -m homer_ref.eval perplexity --model DIR_OR_BIN [--tokenizer FILE] [--json]

Results go to stdout (a table, or with --json one JSON object per line with at least `task`, `mode`, `length`,
`trained_context` and `accuracy` or `perplexity`, and what the cell cost: `seconds` (wall), `cpu_seconds`,
`peak_rss_mib` (the process's peak resident set during the cell, its mark reset when the cell starts) and
`rss_start_mib`); progress goes to stderr.

Modes (the paper's baselines, HOMER_SPEC.md J, and its ablation of the pruning criterion, J.5):
    plain                plain inference past the trained context
    linear, dynamic, yarn  plain inference with RoPE scaling (position interpolation, dynamic NTK, YaRN), the
                         factor being the length as a multiple of the trained context (no scaling at 1x)
    homer                HOMER with the calibrated significance (bias table from the model directory or --bias)
    homer-uncalibrated   HOMER without the bias
    homer-random         HOMER pruning random tokens (seeded)
    homer-yarn           (passkey only) HOMER on the model with YaRN by --homer-yarn-factor (default 2, as the
                         official scripts), M defaulting to that many trained contexts less the answer's room, with
                         its own bias table (--bias-yarn, from `calibrate --yarn`: YaRN scales the logits, I.1)
    homer-yarn-uncalibrated  the same without the bias
    homer-no-pruning     (passkey only) a diagnostic, not HOMER: the chunks merge without pruning anything, so a
                         failure here is caused by the merging (chunk-local lower layers, overlapping positions)
    sliding              (perplexity only) a sliding window of the trained context

Passkey (HOMER_SPEC.md H.3): prompts from `homer_ref.passkey` (BOS when the model adds one | filler with the
passkey sentence at a stratified random depth | question), `length` tokens of the model's own tokenizer in all
minus room for the answer; greedy decoding; correct when the first integer of the output is the passkey. When
the tokenizer has a chat template the prompt is one user turn of it by default (its opening joins the prefix; the
question, the template's closing and the reply's start "The pass key is" form the suffix); `--no-chat` gives the
plain text. The same prompts are used for every mode. HOMER gets prefix = BOS (+ the template's opening),
context = the filler, suffix = the question, and by default M = T = the trained context minus the answer's room,
so that every generated position stays inside the trained context. For HOMER rows, `digits_kept`
is the fraction of the passkey's digit tokens (both copies) still in the final cache and `copy_kept` the fraction
of samples that kept at least one complete copy: read from HOMER's trace, they tell a pruning failure from a
reading failure (`--explain` prints, per tree node, where a failed sample lost its digits).

Perplexity (HOMER_SPEC.md H.2): the official protocol and its baselines as `homer_ref.tasks.perplexity` runs
them (its docstring gives the steps), with the segment length ev defaulting to M = trained context / 2 and
P = S = M / 32. Only the parts that score tokens inside [--score-from, --score-to) are computed. Without --text
the document is sampled from the model itself (`sample_document`; BOS and the stop tokens are the tokenizer's, or
config.json's bos/eos_token_id for a model without one). Without --bias the `homer` mode calibrates on the
document's first 2·ev tokens, which every scored token has already seen.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from homer_ref.cli.common import (
    DTYPES,
    MODEL_HELP,
    Measured,
    command_parser,
    open_model,
    open_tokenizer,
    parse_list,
    parse_modes,
    progress,
    run_main,
)
from homer_ref.decoding import greedy_batch
from homer_ref.homer import HomerCache, homer_generate, homer_prefill
from homer_ref.homer.calibration import BIAS_FILE, calibrate_on_context, find_bias
from homer_ref.homer.plan import HomerConfig
from homer_ref.llama import Llama
from homer_ref.loading import Tokenizer
from homer_ref.loading.tokenizer import config_special_ids
from homer_ref.loading.weights import rope_scaled
from homer_ref.tasks import passkey, perplexity

ROPE_MODES = ("plain", "linear", "dynamic", "yarn")
HOMER_MODES = {
    "homer": "calibrated",
    "homer-uncalibrated": "uncalibrated",
    "homer-random": "random",
    "homer-yarn": "calibrated",  # HOMER on the model with YaRN (--homer-yarn-factor), its own table (--bias-yarn)
    "homer-yarn-uncalibrated": "uncalibrated",
    "homer-no-pruning": "none",  # a diagnostic, not HOMER: merging alone, nothing pruned
}
YARN_HOMER_MODES = ("homer-yarn", "homer-yarn-uncalibrated")
PASSKEY_MODES = ROPE_MODES + tuple(HOMER_MODES)
PASSKEY_DEFAULT_MODES = tuple(m for m in PASSKEY_MODES if m not in YARN_HOMER_MODES)  # these need a YaRN table
PASSKEY_ONLY = YARN_HOMER_MODES + ("homer-no-pruning",)
PERPLEXITY_MODES = ROPE_MODES + ("sliding",) + tuple(m for m in HOMER_MODES if m not in PASSKEY_ONLY)


# ----------------------------------------------------------------------------------------------- shared


class Emitter:
    """Results: one JSON object per line (--json), or a table at the end; both on stdout."""

    def __init__(self, as_json: bool):
        self.as_json, self.rows = as_json, []

    def emit(self, row: dict) -> None:
        self.rows.append(row)
        if self.as_json:
            print(json.dumps(row), flush=True)

    def finish(self, metric: str) -> None:
        if self.as_json or not self.rows:
            return
        lengths = sorted({r["length"] for r in self.rows})
        modes = list(dict.fromkeys(r["mode"] for r in self.rows))
        trained = self.rows[0]["trained_context"]
        cell = {(r["mode"], r["length"]): r[metric] for r in self.rows}
        head = "| mode | " + " | ".join(f"{n} ({n / trained:g}x)" for n in lengths) + " |"
        print(f"{self.rows[0]['task']}: {metric}, trained context {trained}")
        print(head)
        print("|---|" + "---:|" * len(lengths))
        for mode in modes:
            values = [cell.get((mode, n)) for n in lengths]
            text = ["—" if v is None else (f"{100 * v:.1f}%" if metric == "accuracy" else f"{v:.3f}") for v in values]
            print(f"| {mode} | " + " | ".join(text) + " |")


# ----------------------------------------------------------------------------------------------- passkey


def surviving_context(cache: HomerCache) -> list[int]:
    """Indices into the context of the context tokens held by HOMER's final cache."""
    return [i for part, i in cache.slot_sources() if part == "context"]


def copy_text(tok: Tokenizer, prompt: passkey.PasskeyPrompt, copy: list[int], present, kept) -> str:
    """One copy of the passkey as a node saw it: its digits where kept, '_' where removed, '.' where not present."""
    out = []
    for i in copy:
        text = tok.decode([prompt.context[i]]).strip()
        out.append(text if i in kept else ("_" if i in present else ".") * len(text))
    return "".join(out)


def explain(tok: Tokenizer, cache: HomerCache, prompt: passkey.PasskeyPrompt, answer: str) -> str:
    """Which passkey digits each tree node held and kept (with the ranks of the removed ones), and the final cache:
    where a HOMER sample lost the passkey, or that it kept a copy and misread it."""
    P, C = len(prompt.prefix), len(prompt.context)
    lines = []
    for t in cache.nodes:  # execution order: a node's children come before it
        sources = t.input_sources.tolist()
        slot = {s - P: j for j, s in enumerate(sources) if P <= s < P + C}  # context index -> input slot
        present = {i for i in prompt.digit_slots if i in slot}
        if not present:
            continue
        kept = {sources[j] - P for j in t.kept.tolist()} & present
        copies = [copy_text(tok, prompt, c, present, kept) for c in prompt.copies()]
        ranks = ""
        if t.scores is not None and present - kept:
            order = torch.argsort(t.scores, descending=True, stable=True).tolist()  # rank 0: the most significant
            rank = {j: r for r, j in enumerate(order)}
            lost = ",".join(str(rank[slot[i]]) for i in sorted(present - kept))
            ranks = f"; removed at ranks {lost} of {len(sources)} (kept {len(t.kept)})"
        lines.append(
            f"    node L{t.level}.{t.index} layers {t.layers[0]}-{t.layers[1] - 1}: {' | '.join(copies)}"
            f" ({len(kept)} of {len(present)} digit tokens kept{ranks})"
        )
    final = set(surviving_context(cache))
    copies = [copy_text(tok, prompt, c, set(prompt.digit_slots), final) for c in prompt.copies()]
    lines.append(f"    final cache: {' | '.join(copies)}; answered {answer!r}")
    return "\n".join(lines)


def homer_settings(args, model: Llama, mode: str) -> tuple[Llama, int]:
    """(the model HOMER runs on, M) for a HOMER mode: the model itself, M = the trained context less the answer's
    room; for homer-yarn, the model with YaRN by --homer-yarn-factor, whose context is that many times longer."""
    trained = model.cfg.max_position_embeddings
    if mode not in YARN_HOMER_MODES:
        return model, args.max_chunk_len or trained - passkey.ANSWER_ROOM
    factor = args.homer_yarn_factor
    return rope_scaled(model, "yarn", factor), args.max_chunk_len or round(factor * trained) - passkey.ANSWER_ROOM


def passkey_homer(args, model: Llama, tok: Tokenizer, prompts, mode: str, bias) -> dict:
    """HOMER on every prompt: accuracy, and from the trace how many passkey digits survived (a pruning failure
    loses them; a reading failure keeps a complete copy and still answers wrong)."""
    model, M = homer_settings(args, model, mode)
    config = HomerConfig(M, args.target_len, args.warmup_layers, HOMER_MODES[mode], args.seed)
    correct, kept_fraction, copies = 0, 0.0, 0
    for i, prompt in enumerate(prompts):
        cache = homer_prefill(model, prompt.prefix, prompt.context, prompt.suffix, config, bias=bias)
        answer = tok.decode(homer_generate(model, cache, passkey.ANSWER_TOKENS))
        ok = passkey.score(answer, prompt.passkey)
        correct += ok
        kept = set(surviving_context(cache)) & set(prompt.digit_slots)
        kept_fraction += len(kept) / max(1, len(prompt.digit_slots))
        copies += any(set(c) <= kept for c in prompt.copies())
        if args.explain and not ok:
            progress(f"  {mode}: sample {i} (passkey {prompt.passkey}) failed\n{explain(tok, cache, prompt, answer)}")
        if (i + 1) % args.progress_every == 0:
            progress(f"  {mode}: {i + 1}/{len(prompts)} correct {correct}")
    n = len(prompts)
    row = {"correct": correct, "max_chunk_len": M, "target_len": args.target_len or M}
    row |= {"warmup_layers": cache.plan.W, "digits_kept": kept_fraction / n, "copy_kept": copies / n}
    return row | ({"rope_factor": args.homer_yarn_factor} if mode in YARN_HOMER_MODES else {})


def passkey_rope(args, model: Llama, tok: Tokenizer, prompts, mode: str, factor: float) -> dict:
    """Plain inference (with RoPE scaling `mode` by `factor`) on every prompt, equal lengths batched together."""
    scaled = rope_scaled(model, mode, factor)
    groups: dict[int, list[passkey.PasskeyPrompt]] = {}
    for prompt in prompts:
        groups.setdefault(len(prompt.ids), []).append(prompt)
    correct, done = 0, 0
    for group in groups.values():
        for start in range(0, len(group), args.batch_size):
            batch = group[start : start + args.batch_size]
            outputs = greedy_batch(scaled, [p.ids for p in batch], passkey.ANSWER_TOKENS)
            correct += sum(passkey.score(tok.decode(o), p.passkey) for o, p in zip(outputs, batch))
            done += len(batch)
            progress(f"  {mode}: {done}/{len(prompts)} correct {correct}")
    return {"correct": correct} | ({} if mode == "plain" else {"rope_factor": max(1.0, factor)})


def passkey_biases(args, model_path: Path, model: Llama, modes: list[str]) -> dict[str, tuple]:
    """(bias, where from) for the calibrated HOMER modes: `homer` from --bias or the model directory's table,
    `homer-yarn` from --bias-yarn (a table made with YaRN active: YaRN scales the logits, HOMER_SPEC.md I.1)."""
    biases = {}
    if "homer" in modes:
        biases["homer"] = find_bias(model_path, homer_settings(args, model, "homer")[1], args.bias)
        if biases["homer"][0] is None:
            raise ValueError(
                f"mode 'homer' needs a calibration table: none beside {model_path} and no --bias; compute one with "
                "`python -m homer_ref.calibrate` or use the modes homer-uncalibrated / homer-random"
            )
    if "homer-yarn" in modes:
        if args.bias_yarn is None:
            raise ValueError(
                "mode 'homer-yarn' needs a calibration table made with YaRN active: compute one with `python -m "
                f"homer_ref.calibrate --yarn {args.homer_yarn_factor:g}` and pass it as --bias-yarn, or use the mode "
                "homer-yarn-uncalibrated"
            )
        biases["homer-yarn"] = find_bias(model_path, homer_settings(args, model, "homer-yarn")[1], args.bias_yarn)
    return biases


def run_passkey(args) -> int:
    model_path = Path(args.model)
    lengths = parse_list(args.lengths, float, "lengths")
    modes = parse_modes(args.modes, PASSKEY_MODES)
    tok = open_tokenizer(args.model, args.tokenizer)
    chat = tok.chat_template is not None if args.chat is None else args.chat
    if chat and tok.chat_template is None:
        raise ValueError(f"--chat: tokenizer {tok.path} has no chat template; drop --chat")
    model = open_model(args.model, tok, DTYPES[args.dtype])
    trained = model.cfg.max_position_embeddings
    biases = passkey_biases(args, model_path, model, modes)
    out = Emitter(args.json)
    M = homer_settings(args, model, "homer")[1]
    progress(
        f"passkey: model {model_path} (trained context {trained}), lengths {args.lengths} x {trained}, "
        f"modes {','.join(modes)}, {args.samples} samples, seed {args.seed}, "
        f"{'chat template' if chat else 'no chat template'}, HOMER M={M} T={args.target_len or M} "
        f"W={'default' if args.warmup_layers is None else args.warmup_layers}"
        + "".join(f", {mode} bias {where}" for mode, (_, where) in biases.items())
    )
    for multiple in lengths:
        length = round(multiple * trained)
        prompts = passkey.passkey_prompts(tok, length, args.samples, args.seed, args.instruction, chat)
        for mode in modes:
            with Measured() as cost:
                if mode in HOMER_MODES:
                    result = passkey_homer(args, model, tok, prompts, mode, biases.get(mode, (None,))[0])
                else:
                    result = passkey_rope(args, model, tok, prompts, mode, length / trained)
            row = {"task": "passkey", "mode": mode, "length": length, "trained_context": trained}
            row |= {"accuracy": result["correct"] / len(prompts), "samples": len(prompts), "seed": args.seed}
            row |= {"prompt_tokens": max(len(p.ids) for p in prompts), "chat": chat} | result | cost.row()
            progress(
                f"passkey {mode} {length} ({length / trained:g}x): accuracy {row['accuracy']:.3f} in {row['seconds']} s"
                f", peak RSS {row['peak_rss_mib']} MiB"
            )
            out.emit(row)
    out.finish("accuracy")
    return 0


# ----------------------------------------------------------------------------------------------- perplexity


def perplexity_nll(args, model: Llama, ids: list[int], mode: str, bias, lo: int, hi: int) -> dict[int, float]:
    """NLL of each scored target t in [lo, hi) (t >= 1), keyed by t, for one mode (`homer_ref.tasks.perplexity`)."""
    if mode in ROPE_MODES:
        return perplexity.nll_plain(model, ids, lo, hi, rope=mode)
    if mode == "sliding":
        window = args.window or model.cfg.max_position_embeddings
        return perplexity.nll_sliding(model, ids, lo, hi, window, args.stride or window // 2)
    # the HOMER settings were resolved once, by `run_perplexity`
    config = HomerConfig(args.max_chunk_len, args.target_len, args.warmup_layers, HOMER_MODES[mode], args.seed)
    report = lambda message: progress(f"  {mode}: {message}")  # noqa: E731
    return perplexity.nll_homer(model, ids, lo, hi, config, args.segment_len, args.affix_len, bias, report)


def run_perplexity(args) -> int:
    model_path = Path(args.model)
    modes = parse_modes(args.modes, PERPLEXITY_MODES)
    tok = open_tokenizer(args.model, args.tokenizer, required=args.text is not None)
    bos, eos = (tok.bos_id, tok.eos_id) if tok is not None else config_special_ids(model_path)
    if args.text is None and bos is None:
        raise ValueError(
            f"sampling a document needs the model's BOS token: {model_path} has neither a tokenizer nor a "
            "bos_token_id in config.json; pass --tokenizer or --text"
        )
    model = open_model(args.model, tok, DTYPES[args.dtype])
    trained = model.cfg.max_position_embeddings
    n = round(args.length * trained)
    if args.text is not None:
        try:
            text = args.text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--text {args.text}: cannot read it as UTF-8 text ({e})") from e
        ids = tok.encode(text)
        if len(ids) < n:
            raise ValueError(f"--text {args.text} has {len(ids)} tokens, fewer than --length {args.length} x {trained}")
        ids, source = ids[:n], str(args.text)
    else:
        progress(f"perplexity: sampling a {n}-token document from the model (seed {args.seed})")
        stop = tuple(i for i in (bos, eos) + (tok.stop_ids if tok is not None else ()) if i is not None)
        ids = perplexity.sample_document(model, n, args.seed, bos, stop, lambda message: progress(f"  {message}"))
        source = f"sampled from the model, seed {args.seed}"
    lo = args.score_from if args.score_from is not None else n // 2
    hi = args.score_to if args.score_to is not None else n
    if not 1 <= lo < hi <= n:
        raise ValueError(f"--score-from/--score-to must satisfy 1 <= from < to <= {n}; got {lo} and {hi}")
    # HOMER's settings, resolved once: M = the trained context / 2 (the segment's room), ev = M, P = S = M / 32.
    M = args.max_chunk_len = args.max_chunk_len or trained // 2
    ev = args.segment_len = args.segment_len or M
    args.affix_len = args.affix_len if args.affix_len is not None else max(1, M // 32)
    if any(m in HOMER_MODES for m in modes) and ev + M > trained:
        progress(f"warning: cached positions (< M = {M}) + segment ({ev}) exceed the trained context {trained}")
    bias, bias_source = find_bias(model_path, M, args.bias) if "homer" in modes else (None, "")
    if "homer" in modes and bias is None:
        bias = calibrate_on_context(model, ids[: min(2 * ev, n)], M)
        bias_source = f"calibrated on the document's first {min(2 * ev, n)} tokens"
    progress(
        f"perplexity: model {model_path} (trained context {trained}), {n} tokens ({source}), scoring tokens "
        f"[{lo}, {hi}), modes {','.join(modes)}" + (f", bias: {bias_source}" if bias_source else "")
    )
    out = Emitter(args.json)
    for mode in modes:
        with Measured() as cost:
            scored = perplexity_nll(args, model, ids, mode, bias if mode == "homer" else None, lo, hi)
        row = {
            "task": "perplexity",
            "mode": mode,
            "length": n,
            "trained_context": trained,
            "perplexity": math.exp(sum(scored.values()) / len(scored)),
            "score_from": lo,
            "score_to": hi,
            "tokens_scored": len(scored),
            "document": source,
        } | cost.row()
        if mode in HOMER_MODES:
            W = args.warmup_layers  # None: the plan's default rule, recorded per segment in `warmup_layers`
            row |= {
                "max_chunk_len": M,
                "target_len": args.target_len or M,
                "warmup_layers": "default" if W is None else W,
            }
            row |= {"segment_len": ev, "prefix_len": args.affix_len, "suffix_len": args.affix_len}
        elif mode == "sliding":
            row |= {"window": args.window or trained, "stride": args.stride or (args.window or trained) // 2}
        progress(f"perplexity {mode}: {row['perplexity']:.3f} in {row['seconds']} s")
        out.emit(row)
    out.finish("perplexity")
    return 0


# ----------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "eval",
        "Evaluate long-context inference: passkey retrieval and perplexity, plain vs RoPE scaling "
        "vs HOMER. Results go to stdout, progress to stderr.",
    )
    sub = p.add_subparsers(dest="task", required=True)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("--tokenizer", help="tokenizer.json, sentencepiece .model or .gguf (default: the model's own)")
        s.add_argument("--seed", type=int, default=0, help="seed of the samples and of homer-random (default 0)")
        s.add_argument(
            "--max-chunk-len",
            type=int,
            help=f"HOMER's M (default: passkey: the trained context - {passkey.ANSWER_ROOM}, the answer's room; "
            "perplexity: half the trained context, the segment's room)",
        )
        s.add_argument("--target-len", type=int, help="HOMER's T (default: M)")
        s.add_argument(
            "--warmup-layers",
            type=int,
            help="HOMER's W (default: 12 of every 32 layers, as the official scripts; fewer if the tree needs)",
        )
        s.add_argument("--bias", type=Path, help=f"calibration table (default: {BIAS_FILE} in the model directory)")
        s.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")
        s.add_argument("--json", action="store_true", help="print one JSON object per result line")

    pk = sub.add_parser("passkey", help="passkey retrieval accuracy (greedy)")
    pk.add_argument(
        "--model", default=str(passkey.SHIPPED_MODEL), help="HF directory, .gguf or .bin (default: the shipped model)"
    )
    pk.add_argument("--lengths", default="1,2,4,8", help="prompt lengths as multiples of the trained context")
    pk.add_argument(
        "--modes",
        default=",".join(PASSKEY_DEFAULT_MODES),
        help=f"comma-separated: {', '.join(PASSKEY_MODES)} (default: all but the homer-yarn ones)",
    )
    pk.add_argument("--samples", type=int, default=50, help="prompts per length (default 50)")
    pk.add_argument("--batch-size", type=int, default=8, help="prompts per batch for the plain modes (default 8)")
    pk.add_argument("--instruction", action="store_true", help="put the task's short instruction after BOS")
    pk.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        help="wrap each prompt in the model's chat template: its opening joins the prefix, the question is asked "
        "in the user turn and the reply starts 'The pass key is' (default: when the tokenizer has a template; "
        "--no-chat for plain text)",
    )
    pk.add_argument("--explain", action="store_true", help="for each failed HOMER sample, where the digits went")
    pk.add_argument(
        "--homer-yarn-factor",
        type=float,
        default=2.0,
        help="YaRN factor of the homer-yarn modes (default 2, the official scripts'); their M defaults to the "
        "factor times the trained context, less the answer's room",
    )
    pk.add_argument("--bias-yarn", type=Path, help="calibration table of homer-yarn, made with calibrate --yarn")
    pk.add_argument("--progress-every", type=int, default=10, help="progress line every N HOMER samples")
    common(pk)

    pp = sub.add_parser("perplexity", help="perplexity of a long document (HOMER_SPEC.md H.2 protocol)")
    pp.add_argument("--model", required=True, help=MODEL_HELP)
    pp.add_argument("--text", type=Path, help="UTF-8 document (default: sample one from the model, --seed)")
    pp.add_argument("--length", type=float, default=8, help="document length, multiple of the trained context (8)")
    pp.add_argument("--modes", default="plain,sliding,homer", help=f"comma-separated: {', '.join(PERPLEXITY_MODES)}")
    pp.add_argument("--score-from", type=int, help="first scored token index (default: half the document)")
    pp.add_argument("--score-to", type=int, help="end of the scored tokens, exclusive (default: the document end)")
    pp.add_argument("--segment-len", type=int, help="ev: tokens fed after each HOMER cache (default: M)")
    pp.add_argument("--affix-len", type=int, help="P = S, HOMER's prefix and suffix lengths (default: M / 32)")
    pp.add_argument("--window", type=int, help="sliding window length (default: the trained context)")
    pp.add_argument("--stride", type=int, help="sliding window stride (default: window / 2)")
    common(pp)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("samples", "batch_size", "progress_every", "max_chunk_len", "target_len", "segment_len", "window"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup_layers is not None and args.warmup_layers < 0:
        parser.error(f"--warmup-layers must be >= 0, got {args.warmup_layers}")
    torch.manual_seed(args.seed)
    return run_passkey(args) if args.task == "passkey" else run_perplexity(args)


def entry() -> None:
    """`python -m homer_ref.eval` and the `homer-eval` console script."""
    sys.exit(run_main(main))
