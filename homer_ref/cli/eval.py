"""`python -m homer_ref.eval`: passkey retrieval and long-text perplexity, plain vs RoPE scaling vs HOMER.

    python -m homer_ref.eval passkey [--model M] [--lengths 1,2,4,8] [--modes plain,linear,...] [--samples 50] [--json]
    python -m homer_ref.eval perplexity --model DIR_OR_BIN [--tokenizer FILE] [--json]

Results go to stdout (a table, or with --json one JSON object per line with at least `task`, `mode`, `length`,
`trained_context` and `accuracy` or `perplexity`, and what the cell cost: `seconds` (wall), `cpu_seconds`,
`peak_rss_mib` (the process's peak resident set during the cell, its mark reset when the cell starts) and
`rss_start_mib`); progress goes to stderr (a bar per cell when stderr is a terminal).

Modes (the paper's baselines, HOMER_SPEC.md J, and its ablation of the pruning criterion, J.5):
    plain                plain inference past the trained context
    linear, dynamic, yarn  plain inference with RoPE scaling (position interpolation, dynamic NTK, YaRN), the
                         factor being the length as a multiple of the trained context (no scaling at 1x)
    homer                HOMER with the calibrated significance: the table from --bias, beside the model, the
                         user cache, or computed once on the default calibration text (`homer_ref.bias`)
    homer-uncalibrated   HOMER without the bias
    homer-random         HOMER pruning random tokens (seeded)
    homer-yarn           (passkey only) HOMER on the model with YaRN by --homer-yarn-factor (default 2, as the
                         official scripts), M defaulting to that many trained contexts less the answer's room,
                         with its own table (--bias-yarn, or the policy's, computed with YaRN active: YaRN scales
                         the logits, I.1)
    homer-yarn-uncalibrated  the same without the bias
    homer-no-pruning     (passkey only) a diagnostic, not HOMER: the chunks merge without pruning anything, so a
                         failure here is caused by the merging (chunk-local lower layers, overlapping positions)
    sliding              (perplexity only) a sliding window of the trained context

Passkey (HOMER_SPEC.md H.3; the task is `homer_ref.tasks.passkey`): prompts of `length` tokens of the model's own
tokenizer minus room for the answer; greedy decoding; correct when the first integer of the output is the
passkey. In the model's chat template by default when it has one (`--no-chat` for plain text). The same prompts
serve every mode. HOMER gets prefix = BOS (+ the template's opening, + the instruction with --instruction),
context = the filler, suffix = the question, and M = T = the trained context minus the answer's room
(`passkey.homer_config`). For HOMER rows, `digits_kept` is the fraction of the passkey's digit tokens (both copies)
still in the final cache and `copy_kept` the fraction of samples that kept a complete copy: they tell a pruning
failure from a reading failure (`--explain` prints, per tree node, where a failed sample lost its digits).

Perplexity (HOMER_SPEC.md H.2): the official protocol and its baselines as `homer_ref.tasks.perplexity` runs
them, with M, the segment length ev and P = S from `perplexity.Segments.for_model`. Only the parts that score
tokens inside [--score-from, --score-to) are computed. Without --text the document is sampled from the model
itself (`sample_document`; BOS and the stop tokens are the tokenizer's, or config.json's for a model without one).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from homer_ref.bias import BIAS_FILE, bias_for
from homer_ref.cli.common import (
    DTYPES,
    MODEL_HELP,
    command_parser,
    open_model,
    open_tokenizer,
    parse_list,
    parse_modes,
    progress,
    run_main,
)
from homer_ref.decoding import greedy_batch
from homer_ref.homer import HomerConfig, homer_generate, homer_prefill
from homer_ref.llama import Llama
from homer_ref.loading import Tokenizer
from homer_ref.loading.tokenizer import config_special_ids
from homer_ref.loading.weights import rope_scaled
from homer_ref.memory import Measured
from homer_ref.progress import progress_bar
from homer_ref.tasks import passkey, perplexity

ROPE_MODES = ("plain", "linear", "dynamic", "yarn")
HOMER_MODES = {
    "homer": "calibrated",
    "homer-uncalibrated": "uncalibrated",
    "homer-random": "random",
    "homer-yarn": "calibrated",  # HOMER on the model with YaRN (--homer-yarn-factor), its own table
    "homer-yarn-uncalibrated": "uncalibrated",
    "homer-no-pruning": "none",  # a diagnostic, not HOMER: merging alone, nothing pruned
}
YARN_HOMER_MODES = ("homer-yarn", "homer-yarn-uncalibrated")
PASSKEY_MODES = ROPE_MODES + tuple(HOMER_MODES)
PASSKEY_DEFAULT_MODES = tuple(m for m in PASSKEY_MODES if m not in YARN_HOMER_MODES)
PASSKEY_ONLY = YARN_HOMER_MODES + ("homer-no-pruning",)
PERPLEXITY_MODES = ROPE_MODES + ("sliding",) + tuple(m for m in HOMER_MODES if m not in PASSKEY_ONLY)


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
        print(f"{self.rows[0]['task']}: {metric}, trained context {trained}")
        print("| mode | " + " | ".join(f"{n} ({n / trained:g}x)" for n in lengths) + " |")
        print("|---|" + "---:|" * len(lengths))
        for mode in modes:
            values = [cell.get((mode, n)) for n in lengths]
            text = ["—" if v is None else (f"{100 * v:.1f}%" if metric == "accuracy" else f"{v:.3f}") for v in values]
            print(f"| {mode} | " + " | ".join(text) + " |")


# ----------------------------------------------------------------------------------------------- passkey


class HomerMode:
    """A HOMER mode's model (YaRN-scaled for homer-yarn), settings and bias table, resolved once per run."""

    def __init__(self, args, model: Llama, tok: Tokenizer, mode: str):
        yarn = mode in YARN_HOMER_MODES
        factor = args.homer_yarn_factor if yarn else 1.0
        self.model = rope_scaled(model, "yarn", factor) if yarn else model
        self.config = passkey.homer_config(model.cfg.max_position_embeddings, args.max_chunk_len, factor,
                                           target_len=args.target_len, warmup_layers=args.warmup_layers,
                                           reduction=HOMER_MODES[mode], seed=args.seed)  # fmt: skip
        self.bias, self.source, self.factor = None, "", factor if yarn else None
        if self.config.reduction == "calibrated":  # the table beside the model is for the model without YaRN
            given, beside = (args.bias_yarn, None) if yarn else (args.bias, args.model)
            self.bias, self.source = bias_for(self.model, tok, self.config.max_chunk_len, given, beside, progress)


def passkey_homer(args, tok: Tokenizer, prompts, mode: str, homer: HomerMode, bar) -> dict:
    """HOMER on every prompt: accuracy, and from the trace how many passkey digits survived (a pruning failure
    loses them; a reading failure keeps a complete copy and still answers wrong)."""
    correct, kept_fraction, copies = 0, 0.0, 0
    for i, prompt in enumerate(prompts):
        cache = homer_prefill(homer.model, prompt.prefix, prompt.context, prompt.suffix, homer.config, bias=homer.bias)
        answer = tok.decode(homer_generate(homer.model, cache, passkey.ANSWER_TOKENS))
        ok = passkey.score(answer, prompt.passkey)
        fraction, copy = passkey.digits_kept(cache, prompt)
        correct, kept_fraction, copies = correct + ok, kept_fraction + fraction, copies + copy
        if args.explain and not ok:
            progress(f"  {mode}: sample {i} (passkey {prompt.passkey}) failed\n"
                     f"{passkey.explain_digits(tok, cache, prompt, answer)}")  # fmt: skip
        if (i + 1) % args.progress_every == 0:
            progress(f"  {mode}: {i + 1}/{len(prompts)} correct {correct}")
        if bar is not None:
            bar.update(1)
    n, p = len(prompts), cache.plan
    row = {"correct": correct, "max_chunk_len": p.M, "target_len": p.T, "warmup_layers": p.W}
    row |= {"digits_kept": kept_fraction / n, "copy_kept": copies / n}
    return row | ({"rope_factor": homer.factor} if homer.factor else {})


def passkey_rope(args, model: Llama, tok: Tokenizer, prompts, mode: str, factor: float, bar) -> dict:
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
            if bar is not None:
                bar.update(len(batch))
    return {"correct": correct} | ({} if mode == "plain" else {"rope_factor": max(1.0, factor)})


def run_passkey(args) -> int:
    lengths = parse_list(args.lengths, float, "lengths")
    modes = parse_modes(args.modes, PASSKEY_MODES)
    tok = open_tokenizer(args.model, args.tokenizer)
    chat = tok.chat_template is not None if args.chat is None else args.chat
    if chat and tok.chat_template is None:
        raise ValueError(f"--chat: tokenizer {tok.path} has no chat template; drop --chat")
    model = open_model(args.model, tok, DTYPES[args.dtype])
    trained = model.cfg.max_position_embeddings
    homer = {mode: HomerMode(args, model, tok, mode) for mode in modes if mode in HOMER_MODES}
    out = Emitter(args.json)
    progress(
        f"passkey: model {args.model} (trained context {trained}), lengths {args.lengths} x {trained}, "
        f"modes {','.join(modes)}, {args.samples} samples, seed {args.seed}, "
        f"{'chat template' if chat else 'no chat template'}"
        + "".join(
            f"; {m}: M={h.config.max_chunk_len} T={h.config.target}" + (f", bias {h.source}" if h.source else "")
            for m, h in homer.items()
        )  # fmt: skip
    )
    for multiple in lengths:
        length = round(multiple * trained)
        prompts = passkey.passkey_prompts(tok, length, args.samples, args.seed, args.instruction, chat)
        for mode in modes:
            with Measured() as cost, progress_bar(len(prompts), f"passkey {mode} {length}", "prompt") as bar:
                if mode in HOMER_MODES:
                    result = passkey_homer(args, tok, prompts, mode, homer[mode], bar)
                else:
                    result = passkey_rope(args, model, tok, prompts, mode, length / trained, bar)
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


def read_document(args, tok: Tokenizer | None, model: Llama, n: int, bos: int | None, eos: int | None):
    """(ids, where they came from): the first n tokens of --text, or a document the model samples itself."""
    if args.text is not None:
        try:
            text = args.text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--text {args.text}: cannot read it as UTF-8 text ({e})") from e
        ids = tok.encode(text)
        trained = model.cfg.max_position_embeddings
        if len(ids) < n:
            raise ValueError(f"--text {args.text} has {len(ids)} tokens, fewer than --length {args.length} x {trained}")
        return ids[:n], str(args.text)
    progress(f"perplexity: sampling a {n}-token document from the model (seed {args.seed})")
    stop = tuple(i for i in (bos, eos) + (tok.stop_ids if tok is not None else ()) if i is not None)
    ids = perplexity.sample_document(model, n, args.seed, bos, stop, lambda message: progress(f"  {message}"))
    return ids, f"sampled from the model, seed {args.seed}"


def run_perplexity(args) -> int:
    modes = parse_modes(args.modes, PERPLEXITY_MODES)
    tok = open_tokenizer(args.model, args.tokenizer, required=args.text is not None)
    bos, eos = (tok.bos_id, tok.eos_id) if tok is not None else config_special_ids(Path(args.model))
    if args.text is None and bos is None:
        raise ValueError(
            f"sampling a document needs the model's BOS token: {args.model} has neither a tokenizer nor a "
            "bos_token_id in config.json; pass --tokenizer or --text"
        )
    model = open_model(args.model, tok, DTYPES[args.dtype])
    trained = model.cfg.max_position_embeddings
    n = round(args.length * trained)
    ids, source = read_document(args, tok, model, n, bos, eos)
    lo = args.score_from if args.score_from is not None else n // 2
    hi = args.score_to if args.score_to is not None else n
    if not 1 <= lo < hi <= n:
        raise ValueError(f"--score-from/--score-to must satisfy 1 <= from < to <= {n}; got {lo} and {hi}")
    seg = perplexity.Segments.for_model(trained, args.max_chunk_len, args.segment_len, args.affix_len)
    M, ev = seg.max_chunk_len, seg.segment_len
    if any(m in HOMER_MODES for m in modes) and ev + M > trained:
        progress(f"warning: cached positions (< M = {M}) + segment ({ev}) exceed the trained context {trained}")
    bias, bias_source = bias_for(model, tok, M, args.bias, args.model, progress) if "homer" in modes else (None, "")
    progress(
        f"perplexity: model {args.model} (trained context {trained}), {n} tokens ({source}), scoring tokens "
        f"[{lo}, {hi}), modes {','.join(modes)}" + (f", bias: {bias_source}" if bias_source else "")
    )
    out = Emitter(args.json)
    window = args.window or trained
    for mode in modes:
        config = HomerConfig(M, args.target_len, args.warmup_layers, HOMER_MODES.get(mode, "none"), args.seed)
        with Measured() as cost:
            if mode in ROPE_MODES:
                scored = perplexity.nll_plain(model, ids, lo, hi, rope=mode)
            elif mode == "sliding":
                scored = perplexity.nll_sliding(model, ids, lo, hi, window, args.stride or window // 2)
            else:
                report = lambda message, mode=mode: progress(f"  {mode}: {message}")  # noqa: E731
                scored = perplexity.nll_homer(model, ids, lo, hi, config, ev, seg.affix_len,
                                              bias if mode == "homer" else None, report)  # fmt: skip
        row = {"task": "perplexity", "mode": mode, "length": n, "trained_context": trained}
        row |= {"perplexity": math.exp(sum(scored.values()) / len(scored)), "score_from": lo, "score_to": hi}
        row |= {"tokens_scored": len(scored), "document": source} | cost.row()
        if mode in HOMER_MODES:
            W = args.warmup_layers  # None: the plan's default rule, recorded per segment in `warmup_layers`
            row |= {
                "max_chunk_len": M,
                "target_len": config.target,
                "warmup_layers": "default" if W is None else W,
            }
            row |= {"segment_len": ev, "prefix_len": seg.affix_len, "suffix_len": seg.affix_len}
        elif mode == "sliding":
            row |= {"window": window, "stride": args.stride or window // 2}
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
        s.add_argument(
            "--bias",
            type=Path,
            help=f"calibration table (default: {BIAS_FILE} beside the model, else the user cache, else computed once "
            "on the default calibration text and cached)",
        )
        s.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")
        s.add_argument("--json", action="store_true", help="print one JSON object per result line")

    pk = sub.add_parser("passkey", help="passkey retrieval accuracy (greedy)")
    pk.add_argument(
        "--model", default=str(passkey.SHIPPED_MODEL), help=MODEL_HELP + " (default: the shipped passkey model)"
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
    pk.add_argument("--bias-yarn", type=Path, help="calibration table of homer-yarn (default: the policy's, with YaRN)")
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
