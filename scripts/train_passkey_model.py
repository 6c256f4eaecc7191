"""Train the shipped passkey model: `python scripts/train_passkey_model.py --out homer_ref/data/passkey_model`.

A small Llama (homer_ref.llama.Llama, float32, AdamW, seeded) learns this project's synthetic passkey task
(`homer_ref/tasks/passkey.py`) within a trained context of 256 tokens. The directory it writes is an HF Llama
checkpoint that `homer_ref.load_model` reads: config.json, model.safetensors (float16, HF names),
tokenizer.model (sentencepiece BPE trained here on the task's own text, digits split), homer_bias.safetensors
(HOMER's calibration table, computed with `homer_ref.homer.calibration.calibrate` on filler windows) and README.md
(the model card).

Why the model looks the way it does (measured on a throwaway prototype; see the model card):
- HOMER prunes by the attention logits of the *last prompt token* (HOMER_SPEC.md D.1), at the last layer of
  every tree node, i.e. at almost any layer depending on the input length. A plain LM only needs that token to
  find the first digit (an induction match on "key is"), so the other digits rank low and are pruned. During
  training only, a small linear head predicts all five digits from the last prompt token's final hidden state
  (its LM head predicts the space before the digits), and a selection loss acts on the ranking itself: at every
  layer, the last prompt token's head-max pre-softmax logit should put the digit tokens first among the context
  tokens (a cross-entropy over the context). The head is thrown away: the shipped model is the plain LM.
- Per-layer heads on each layer's attention output (`--layer-heads`) are off: without the selection loss they
  left the digits ranked low at layers 4-7 (71.5% at 8x); with it they made the model read merged caches worse
  than without them. The model card records how the recipe was found.
- 8 heads, so that the max over heads covers every digit at every reduction layer.
HOMER stays training-free: nothing here sees HOMER's intermediate states.

`--card-from RESULTS.jsonl` rewrites only the model card, with a table made from `python -m homer_ref.eval
--json` lines (the card's measured numbers are never typed by hand); the card's hand-written section on how the
recipe was found is kept as it is.
"""

import argparse
import hashlib
import io
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from homer_ref.homer.calibration import calibrate
from homer_ref.llama import Llama, LlamaConfig, apply_rope, rope_cos_sin
from homer_ref.loading import checkpoint_names, hf_config_dict, load_model, load_tokenizer
from homer_ref.tasks import passkey

TRAINED_CONTEXT = 256
ANSWER_ROOM = 8  # tokens kept free after a prompt for the answer ("▁" + 5 digits + " ." + EOS)
VOCAB_SIZE = 288
BIAS_WINDOWS = 32
FILES = ("config.json", "model.safetensors", "tokenizer.model", "homer_bias.safetensors")
HISTORY_HEADING = "## How this recipe was found"  # a hand-written section of the card, kept when it is rewritten


def recorded_history(card: Path) -> str:
    """The card's hand-written training history (from its heading to the next one), or "" for a new card."""
    text = card.read_text() if card.is_file() else ""
    if HISTORY_HEADING not in text:
        return ""
    section = text[text.index(HISTORY_HEADING) :]
    end = section.find("\n## ", len(HISTORY_HEADING))
    return section if end < 0 else section[: end + 1]


def ranks_section(ranks: str) -> str:
    """Where the shipped model's last prompt token ranks the passkey's digits, layer by layer (generated)."""
    return f"""## Where the passkey's digits rank
Where the passkey's digit tokens rank among the context tokens under the last prompt token's head-max logit
(HOMER's uncalibrated significance), as a fraction of the context (0 = most significant; 40 prompts of 248
tokens; mean over digits / worst digit), printed by `python scripts/train_passkey_model.py --ranks-of DIR`:

{ranks}

"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(seed: int) -> bytes:
    """A sentencepiece BPE model (bos=1, eos=2, unk=0, digits split) in which every task word is one piece."""
    import sentencepiece

    lines = passkey.tokenizer_corpus(random.Random(seed))
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # the task's text is plain ASCII; also keeps the file small
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    proto = buf.getvalue()
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    split = [w for w in passkey.vocabulary() if len(sp.encode(w)) != 1]
    if split:
        raise RuntimeError(f"the tokenizer splits task words {split}; raise VOCAB_SIZE")
    return proto


# ----------------------------------------------------------------------------------------------- data


def encode_sample(tok, rng: random.Random, n_tokens: int):
    """(ids of prompt + answer + EOS, index of the last prompt token, the 5 digit ids of the passkey,
    the context's span [start, end) in the ids (the tokens HOMER may prune), the passkey sentence's span)."""
    prefix, context, suffix, key = passkey.make_sample(rng, n_tokens, instruction=rng.random() < 0.5)
    head, body = tok.encode(prefix, bos=True), tok.encode(context, bos=False)
    prompt = head + body + tok.encode(suffix, bos=False)
    answer = tok.encode(passkey.answer_text(key), bos=False)
    digits = tok.encode(str(key), bos=False)[1:]  # drop the leading "▁"
    assert len(digits) == passkey.PASSKEY_DIGITS and answer[1:6] == digits, (answer, digits)
    assert len(prompt) == 1 + sum(map(passkey.count_tokens, (prefix, context, suffix))), "count_tokens is off"
    needle = tok.encode(passkey.passkey_sentence(key), bos=False)
    at = next(i for i in range(len(body)) if body[i : i + len(needle)] == needle) + len(head)
    return (
        prompt + answer + [tok.eos_id],
        len(prompt) - 1,
        digits,
        (len(head), len(head) + len(body)),
        (at, at + len(needle)),
    )


def make_batch(tok, rng: random.Random, batch: int, n_tokens: int, pad_id: int):
    """tokens [B, n], loss weights [B, n-1] (0 on padding), last-prompt index [B], digit ids [B, 5],
    context mask [B, n] (True on the context: the tokens HOMER may prune), needle mask [B, n] (True on the
    passkey sentence).

    Every prompt of a batch targets the same length (they differ by less than one sentence: little padding).
    """
    samples = [encode_sample(tok, rng, n_tokens) for _ in range(batch)]
    T = max(len(s[0]) for s in samples)
    tokens = torch.full((batch, T), pad_id, dtype=torch.long)
    valid = torch.zeros(batch, T - 1)
    context = torch.zeros(batch, T, dtype=torch.bool)
    needle = torch.zeros(batch, T, dtype=torch.bool)
    for b, (ids, _, _, (start, end), (n0, n1)) in enumerate(samples):
        tokens[b, : len(ids)] = torch.tensor(ids)
        valid[b, : len(ids) - 1] = 1.0
        context[b, start:end] = True
        needle[b, n0:n1] = True
    last = torch.tensor([s[1] for s in samples])
    digits = torch.tensor([s[2] for s in samples])
    return tokens, valid, last, digits, context, needle


# ----------------------------------------------------------------------------------------------- model


def model_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=192,  # narrow: the task needs attention, not MLP capacity
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=TRAINED_CONTEXT,
    )


def digit_mask(tokens: torch.Tensor, context: torch.Tensor, digit_ids: torch.Tensor) -> torch.Tensor:
    """[B, n] bool: the context's digit tokens, i.e. the passkey's two copies (the filler has no digits)."""
    return context & (tokens[..., None] == digit_ids).any(-1)


def last_query_logits(model: Llama, layer: int, h: torch.Tensor, k: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[B, n]: max over heads of the last prompt token's scaled pre-softmax logits against every key (RoPE
    applied), the quantity HOMER ranks tokens by (uncalibrated; `homer_ref.reduction.significance`).

    h [B, n, D] is the layer's input and k [B, Hkv, n, Dh] the keys `Llama.attend` computed from it; only the
    query of the last prompt token (not the sequence's last token: the answer follows) is computed here."""
    cfg, blk = model.cfg, model.layers[layer]
    B, T, _ = h.shape
    Hq, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = blk.input_layernorm(h[torch.arange(B), last])  # [B, D]
    q = blk.self_attn.q_proj(x).view(B, Hq, 1, Dh)  # [B, Hq, 1, Dh]
    cos, sin = rope_cos_sin(cfg, last, q.dtype)  # [B, Dh]
    q = apply_rope(q, cos[:, None, None], sin[:, None, None])
    k = k.repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, n, Dh]
    return ((k @ q.transpose(-1, -2)).squeeze(-1) / math.sqrt(Dh)).amax(dim=1)  # [B, n]


def forward_with_taps(model: Llama, tokens: torch.Tensor, last: torch.Tensor):
    """Final normed hidden states [B, n, D]; per layer what attention added at the last prompt token [B, D] and
    that token's head-max attention logits [B, n]."""
    positions = torch.arange(tokens.shape[1])
    rows = torch.arange(tokens.shape[0])
    h = model.embed_tokens(tokens)
    taps, scores = [], []
    for layer in range(model.cfg.num_hidden_layers):
        after, k, _, _ = model.attend(layer, h, positions)
        scores.append(last_query_logits(model, layer, h, k, last))
        taps.append((after - h)[rows, last])  # this layer's attention output at the last prompt token
        h = model.feed_forward(layer, after)
    return model.norm(h), taps, scores


def losses(
    model: Llama, aux: torch.nn.ModuleList, batch, digit_ids: torch.Tensor, select_target: str = "digits"
) -> dict[str, torch.Tensor]:
    tokens, valid, last, digits, context, needle = batch
    B = tokens.shape[0]
    hn, taps, scores = forward_with_taps(model, tokens, last)  # [B, n, D], L x [B, D], L x [B, n]
    logits = model.lm_head(hn[:, :-1])  # [B, n-1, V]
    nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")  # [B, n-1]
    lm = (nll * valid).sum() / valid.sum()
    # The answer: "▁" then 5 digits, predicted from positions last+1 .. last+5.
    rows = torch.arange(B)[:, None]
    answer_pos = last[:, None] + 1 + torch.arange(passkey.PASSKEY_DIGITS)[None]  # [B, 5]
    answer = nll[rows, answer_pos].mean()
    # Training-only auxiliary heads (thrown away): the 5 digits from the last prompt token's final hidden state and
    # from what each layer's attention brought to that token, so the token gathers the passkey at every layer.
    target = (digits[:, :, None] == digit_ids[None, None]).float().argmax(-1)  # [B, 5] digit values 0..9
    features = [hn[torch.arange(B), last]] + taps
    aux_loss = sum(
        F.cross_entropy(head(x).view(B, passkey.PASSKEY_DIGITS, 10).transpose(1, 2), target)
        for head, x in zip(aux, features)
    ) / len(aux)  # zip: without --layer-heads only the final-state head
    # Selection: at every layer, the last prompt token's head-max logit (HOMER's significance) should rank the
    # target tokens first among the context tokens: cross-entropy of a softmax over the context, averaged over
    # the targets. Target "digits": the passkey's 10 digit tokens (both copies; shipped); "sentence": the whole
    # passkey sentence. It shapes the plain model's attention only; no HOMER state.
    wanted = needle if select_target == "sentence" else digit_mask(tokens, context, digit_ids)  # [B, n]
    select = 0.0
    for score in scores:
        logp = torch.log_softmax(score.masked_fill(~context, float("-inf")), dim=-1)  # [B, n]
        select = select - (logp.masked_fill(~wanted, 0.0).sum(-1) / wanted.sum(-1)).mean()
    select = select / len(scores)
    exact = (logits[rows, answer_pos].argmax(-1) == tokens[rows, answer_pos + 1]).all(-1).float().mean()
    return {"lm": lm, "answer": answer, "aux": aux_loss, "select": select, "exact": exact}


def digit_piece_ids(tok) -> list[int]:
    """Ids of the vocabulary pieces "0" .. "9" (the digits of a passkey)."""
    ids = {tok.piece(i): i for i in range(tok.vocab_size)}
    return [ids[str(d)] for d in range(10)]


def digit_ranks(model: Llama, tok, samples: int = 40, seed: int = 99) -> str:
    """Markdown table: per layer, where the passkey's digit tokens rank among the context tokens under the last
    prompt token's head-max logit (HOMER's uncalibrated significance), as a fraction of the context (0 = most
    significant); mean over digits and worst digit, over `samples` prompts filling the trained context."""
    rng = random.Random(seed)
    digit_ids = torch.tensor(digit_piece_ids(tok))
    mean, worst = [[] for _ in range(model.cfg.num_hidden_layers)], [0.0] * model.cfg.num_hidden_layers
    with torch.no_grad():
        for _ in range(samples):
            tokens, _, last, _, context, _ = make_batch(tok, rng, 1, TRAINED_CONTEXT - ANSWER_ROOM, tok.eos_id)
            _, _, scores = forward_with_taps(model, tokens, last)
            is_digit = digit_mask(tokens, context, digit_ids)[0]
            for layer, score in enumerate(scores):
                ctx = score[0].masked_fill(~context[0], float("-inf"))
                rank = torch.argsort(torch.argsort(ctx, descending=True))  # rank of every slot, 0 = highest
                frac = rank[is_digit].double() / int(context[0].sum())
                mean[layer] += frac.tolist()
                worst[layer] = max(worst[layer], float(frac.max()))
    layers = range(model.cfg.num_hidden_layers)
    return "\n".join(
        [
            "| layer | " + " | ".join(str(i) for i in layers) + " |",
            "|---|" + "---|" * len(layers),
            "| mean | " + " | ".join(f"{sum(m) / len(m):.3f}" for m in mean) + " |",
            "| worst | " + " | ".join(f"{w:.3f}" for w in worst) + " |",
        ]
    )


# ----------------------------------------------------------------------------------------------- saving


def save_model(model: Llama, out: Path, tokenizer_proto: bytes, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config_dict(model.cfg) | {"bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = model.state_dict()
    tensors = {
        hf: state[ours].detach().to(torch.float16).contiguous() for ours, hf in checkpoint_names(model.cfg).items()
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tokenizer.model").write_bytes(tokenizer_proto)
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def save_bias(out: Path, seed: int) -> None:
    model = load_model(out)  # the float16-rounded weights that ship, loaded as float32
    tok = load_tokenizer(out)
    bias = calibrate(model, passkey.filler_windows(tok, seed + 1, BIAS_WINDOWS, TRAINED_CONTEXT))
    meta = {"max_chunk_len": str(TRAINED_CONTEXT), "samples": str(BIAS_WINDOWS), "text": "passkey filler"}
    save_file({"bias": bias.contiguous()}, str(out / "homer_bias.safetensors"), metadata=meta)


# ----------------------------------------------------------------------------------------------- card


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def results_table(rows: list[dict]) -> str:
    """Markdown: one row per mode (HOMER rows per M), one column per length multiple; then HOMER's trace stats."""
    rows = [r for r in rows if r["task"] == "passkey"]
    if not rows:
        return "(not measured yet)\n"

    def label(r: dict) -> str:  # HOMER rows by M, and "W=0" where the warm-up was off (the default is never 0 here)
        if "max_chunk_len" not in r:
            return r["mode"]
        return f"{r['mode']} M={r['max_chunk_len']}" + (" W=0" if r.get("warmup_layers") == 0 else "")

    lengths = sorted({r["length"] for r in rows})
    labels = list(dict.fromkeys(label(r) for r in rows))
    cell = {(label(r), r["length"]): r for r in rows}
    head = "| mode | " + " | ".join(f"{n // TRAINED_CONTEXT}× ({n})" for n in lengths) + " |"
    rule = "|---|" + "---:|" * len(lengths)

    def table(key: str, modes: list[str]) -> list[str]:
        lines = [head, rule]
        for mode in modes:
            values = [cell.get((mode, n)) for n in lengths]
            text = ["—" if v is None else f"{100 * v[key]:.1f}%" for v in values]
            lines.append(f"| {mode} | " + " | ".join(text) + " |")
        return lines

    homer = [m for m in labels if m.startswith("homer")]
    samples = ", ".join(str(s) for s in sorted({r["samples"] for r in rows}))
    lines = table("accuracy", labels) + ["", f"Samples per cell: {samples}; seed {rows[0]['seed']}.", ""]
    if homer:
        lines += [
            "HOMER's trace: fraction of samples whose final cache still holds a complete copy of the passkey "
            "(either of the two), i.e. how often pruning left the answer readable:",
            "",
        ]
        lines += table("copy_kept", homer)
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> str:
    """The targets the model was trained for, checked against the measured rows (missing cells say so)."""
    default_m = TRAINED_CONTEXT - ANSWER_ROOM  # the targets are checked at eval's default M and W (others: extra rows)
    acc = {
        (r["mode"], r["length"] // TRAINED_CONTEXT): r["accuracy"]
        for r in rows
        if r["task"] == "passkey" and r.get("max_chunk_len", default_m) == default_m and r.get("warmup_layers") != 0
    }

    def get(mode: str, m: int) -> float | None:
        return acc.get((mode, m))

    def pct(v: float | None) -> str:
        return "not measured" if v is None else f"{100 * v:.1f}%"

    baselines = [get(m, 8) for m in ("linear", "dynamic", "yarn")]
    best = max((b for b in baselines if b is not None), default=None)
    checks = [
        ("in context (1×) ≥ 95%", get("plain", 1), lambda v: v >= 0.95),
        ("plain at 8× ≤ 25%", get("plain", 8), lambda v: v <= 0.25),
        ("HOMER at 4× ≥ 90%", get("homer", 4), lambda v: v >= 0.90),
        (
            f"HOMER at 4× ≥ plain at 4× + 25 points (plain {pct(get('plain', 4))})",
            get("homer", 4),
            lambda v: get("plain", 4) is not None and v >= get("plain", 4) + 0.25,
        ),
        ("HOMER at 8× ≥ 80%", get("homer", 8), lambda v: v >= 0.80),
        (
            f"HOMER at 8× ahead of every RoPE-scaling baseline (best {pct(best)})",
            get("homer", 8),
            lambda v: best is not None and v > best,
        ),
        ("stretch: HOMER at 8× ≥ 90%", get("homer", 8), lambda v: v >= 0.90),
        ("stretch: HOMER at 16× ≥ 60%", get("homer", 16), lambda v: v >= 0.60),
    ]
    lines = ["| target | measured | met |", "|---|---:|---|"]
    for name, value, ok in checks:
        lines.append(f"| {name} | {pct(value)} | {'—' if value is None else ('yes' if ok(value) else '**no**')} |")
    return "\n".join(lines) + "\n"


def write_card(out: Path, results: list[dict], commands: list[str]) -> None:
    meta = json.loads((out / "training.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    files = "\n".join(
        f"| `{name}` | {(out / name).stat().st_size:,} | `{sha256(out / name)}` |"
        for name in FILES + ("training.json",)
    )
    total = sum((out / name).stat().st_size for name in FILES + ("training.json",))
    heads = (
        f"{cfg['num_hidden_layers'] + 1} training-only linear heads predicting the 5 digits from the last prompt "
        "token, one reading its final hidden state and one per layer reading what that layer's attention added"
        if meta.get("layer_heads", True)
        else "a training-only linear head predicting the 5 digits from the last prompt token's final hidden state"
    )
    ranks = digit_ranks(load_model(out), load_tokenizer(out / "tokenizer.model"))
    cmds = "\n".join(commands) if commands else "python -m homer_ref.eval passkey --samples 200 --json"
    card = f"""# passkey_model — homer_ref's shipped demo model

A {meta["parameters"]:,}-parameter Llama ({cfg["num_hidden_layers"]} layers, hidden {cfg["hidden_size"]}, \
{cfg["num_attention_heads"]} heads of {cfg["head_dim"]}, MLP {cfg["intermediate_size"]}, vocabulary \
{cfg["vocab_size"]}) trained from scratch on homer_ref's own synthetic passkey task, with a **trained context of
{cfg["max_position_embeddings"]} tokens**. It exists so that HOMER can be demonstrated and tested end to end on a
CPU in seconds: plain inference loses the passkey beyond the trained context, HOMER keeps finding it (see the
measured table below). It knows nothing but this task.

## Data
`homer_ref/tasks/passkey.py`: filler sentences written for this project (8 sentences drawn at random), one passkey
sentence ("The pass key is 48219 . Do not forget 48219 .") at a uniformly random depth, then the question
"What is the pass key ? The pass key is"; with probability 1/2 a short instruction follows BOS. Prompt lengths
uniform in [{meta["min_len"]}, {meta["max_len"]}] tokens, passkeys uniform 5-digit numbers, all drawn from
`random.Random({meta["seed"]})`. Nothing is downloaded.

## Training
`{meta["command"]}` — {meta["steps"]} AdamW steps of {meta["batch"]} sequences, learning rate {meta["lr"]} \
(warm-up {meta["warmup"]}, cosine decay), seed {meta["seed"]}, float32, `torch.set_num_threads({meta["threads"]})`.
Wall time: **{meta["wall_minutes"]:.1f} min** on {meta["threads"]} CPU cores ({meta["machine"]}, shared with other
jobs). Loss: next-token cross-entropy on every token + the answer digits' cross-entropy + {heads} (discarded,
not shipped: inference is the plain LM) + a selection loss (weight {meta["select_weight"]}): at every layer, a
cross-entropy that makes the last prompt token's head-max pre-softmax attention logit, the score HOMER prunes
by, rank the passkey's digit tokens first among the context tokens. Both act on the plain model's own forward
pass over its training prompts; HOMER itself is never involved in training.
Final training losses (running means): \
{", ".join(f"{k} {v:.4f}" for k, v in meta["final"].items())}.
The data, tokenizer and initialisation are seeded (a test checks that the script rebuilds `tokenizer.model` byte
for byte); the training itself was not rerun to check bitwise equality, and another CPU or thread count may round
differently. On an idle machine the run takes about 15 min (0.4-0.5 s per step in the log's quiet stretches).

Weights are stored in float16 (loaded as float32 by `homer_ref.load_model`); every number below was measured on
these stored weights. `homer_bias.safetensors` holds HOMER's calibration table (`bias`, [L, {TRAINED_CONTEXT}],
float32): `homer_ref.homer.calibration.calibrate` on {BIAS_WINDOWS} windows of BOS + filler, {TRAINED_CONTEXT} tokens
each; it serves any max_chunk_len up to {TRAINED_CONTEXT}.

## Measured accuracy (passkey retrieval, greedy)
Lengths are whole prompts in multiples of the trained context. HOMER rows use eval's defaults: M = T = the trained
context less the answer's room unless a row names M, and the warm-up of the official scripts, W = round(12 L / 32)
= 3 of the {cfg["num_hidden_layers"]} layers (lowered to 2 at 16×, where the tree's six levels need six layers);
rows marked W=0 have no warm-up (`patch()`'s default in the official code). Commands:
```
{cmds}
```
{results_table(results)}
### Targets, checked against the table
{targets(results)}
{ranks_section(ranks)}{recorded_history(out / "README.md")}
## Files ({total:,} bytes in all)
| file | bytes | sha256 |
|---|---:|---|
{files}
"""
    (out / "README.md").write_text(card)


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("homer_ref/data/passkey_model"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-len", type=int, default=48)
    p.add_argument("--short-fraction", type=float, default=0.5, help="batches drawn from the shorter half of lengths")
    p.add_argument("--select-weight", type=float, default=0.5, help="weight of the digit-selection loss")
    p.add_argument("--select-target", choices=("digits", "sentence"), default="digits", help="what to rank first")
    p.add_argument(
        "--layer-heads",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also the per-layer auxiliary heads (on each layer's attention output at the last prompt token)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=10**9, help="also save snapshots to OUT/stepN (debugging)")
    p.add_argument("--card-from", type=Path, help="only rewrite README.md from eval --json lines in this file")
    p.add_argument("--ranks-of", type=Path, help="only print the digit-rank table of this model directory")
    p.add_argument("--card-command", action="append", default=[], help="an eval command to quote in the card")
    args = p.parse_args(argv)
    if args.ranks_of is not None:
        print(digit_ranks(load_model(args.ranks_of), load_tokenizer(args.ranks_of / "tokenizer.model")))
        return 0
    if args.card_from is not None:
        rows = [json.loads(line) for line in args.card_from.read_text().splitlines() if line.strip()]
        write_card(args.out, rows, args.card_command)
        log(f"wrote {args.out / 'README.md'} from {len(rows)} results")
        return 0

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    proto = train_tokenizer(args.seed)
    (args.out / "tokenizer.model").write_bytes(proto)
    tok = load_tokenizer(args.out / "tokenizer.model")
    digit_ids = torch.tensor(digit_piece_ids(tok))
    cfg = model_config()
    model = Llama(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                torch.nn.init.normal_(param, std=0.02)
            if name.endswith(("o_proj.weight", "down_proj.weight")):  # GPT-2 style residual scaling
                param.mul_(1 / math.sqrt(2 * cfg.num_hidden_layers))
    aux = torch.nn.ModuleList(
        torch.nn.Linear(cfg.hidden_size, passkey.PASSKEY_DIGITS * 10)
        for _ in range(1 + (cfg.num_hidden_layers if args.layer_heads else 0))
    )  # the final-state head, then (with --layer-heads) one per layer; `losses` zips them with the features
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters; aux heads {sum(p.numel() for p in aux.parameters()):,} (training only)")
    params = list(model.parameters()) + list(aux.parameters())
    decay = [p for p in params if p.dim() == 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    max_len = TRAINED_CONTEXT - ANSWER_ROOM

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    held_out = make_batch(tok, random.Random(args.seed + 12345), 32, max_len, tok.eos_id)
    running: dict[str, float] = {}
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        # Half the batches short (cheap, many retrievals per second of CPU), half over the whole trained context.
        top = args.min_len + (max_len - args.min_len) // 2 if rng.random() < args.short_fraction else max_len
        batch = make_batch(tok, rng, args.batch, rng.randint(args.min_len, top), tok.eos_id)
        parts = losses(model, aux, batch, digit_ids, args.select_target)
        loss = parts["lm"] + parts["answer"] + parts["aux"] + args.select_weight * parts["select"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, v in parts.items():
            running[k] = 0.9 * running.get(k, v.item()) + 0.1 * v.item()
        if (step + 1) % args.save_every == 0 and step < args.steps - 1:
            save_model(model, args.out / f"step{step + 1}", proto, {"step": step + 1})
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            with torch.no_grad():
                val = losses(model, aux, held_out, digit_ids, args.select_target)
            elapsed = time.perf_counter() - t0
            log(
                f"step {step + 1}/{args.steps}  lm {running['lm']:.3f}  answer {running['answer']:.3f}  "
                f"aux {running['aux']:.3f}  select {running['select']:.3f}  "
                f"held-out exact {float(val['exact']):.2f} aux {float(val['aux']):.3f} "
                f"select {float(val['select']):.3f}  "
                f"lr {lr_at(step):.2e}  {elapsed / 60:.1f} min"
            )
    wall = time.perf_counter() - t0
    meta = {
        "command": "python scripts/train_passkey_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "warmup": args.warmup,
        "min_len": args.min_len,
        "max_len": max_len,
        "threads": args.threads,
        "parameters": n_params,
        "wall_minutes": wall / 60,
        "machine": f"torch {torch.__version__}",
        "select_weight": args.select_weight,
        "select_target": args.select_target,
        "layer_heads": args.layer_heads,
        "final": {k: round(v, 4) for k, v in running.items()},
    }
    save_model(model, args.out, proto, meta)
    save_bias(args.out, args.seed)
    write_card(args.out, [], [])
    log(f"wrote {args.out} in {wall / 60:.1f} min of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
