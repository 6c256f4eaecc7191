"""Errors from the commands: every bad input gives one line `error: ...` on stderr, never a traceback, and the exit
code says whose fault it is: 2 invalid input (arguments, files, configurations), 1 a run-time failure (memory, an
unexpected exception), 130 interrupted. An interrupted run leaves no output file, complete or partial.

One table per command (generate, trace, calibrate, compare, bench), run in process through `cli.run_main` exactly
as `python -m homer_ref.<command>` runs them, then a few real subprocesses to show the whole path has no
traceback. argparse's own usage errors (exit 2) print the usage and one `prog: error: ...` line.

Not repeated here: test_generate_cli.py (bad checkpoints, kv heads, rope type, missing tokenizer, vocabulary
mismatch with stories260K), test_trace_cli.py (every HOMER_SPEC N.2.6 configuration, bias layers / length / NaN,
ids outside the vocabulary), test_compare.py (a missing trace, negative --atol).
"""

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import ROOT, STORIES_DIR
from safetensors.torch import load_file, save_file
from test_errors_api import MHA, train_tokenizer

from homer_ref import atomic, budget, loading
from homer_ref.benchmark import measure
from homer_ref.cli import bench, calibrate, compare, generate, trace
from homer_ref.cli.common import run_main

FOUR_LEAVES = ROOT / "fixtures" / "cases" / "four_leaves" / "trace.safetensors"
GOOD_INPUT = dict(prefix_ids=[1], context_ids=list(range(2, 26)), suffix_ids=[3], max_chunk_len=8, target_len=8,
                  warmup_layers=0, reduction="uncalibrated")  # fmt: skip


@dataclass
class Result:
    code: int
    out: str
    err: str


def run(capsys, command, argv: list) -> Result:
    """`python -m homer_ref.<command> argv`, in process (argparse's errors arrive as SystemExit)."""
    try:
        code = run_main(command.main, [str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def check(result: Result, code: int, names, prog: str) -> None:
    """The exit code, one error line naming the problem, no traceback, nothing on stdout."""
    report = f"exit {result.code}, stderr:\n{result.err}"
    assert result.code == code, report
    assert "Traceback" not in result.err, report
    assert result.out == "", report
    lines = [line for line in result.err.splitlines() if line.strip()]
    if lines and lines[0].startswith("usage:"):  # argparse: usage, then exactly one "prog: error: ..." line
        assert [i for i, line in enumerate(lines) if "error: " in line] == [len(lines) - 1], report
        assert re.match(rf"python -m homer_ref\.{prog}( [a-z]+)?: error: ", lines[-1]), report  # eval: subcommand
    else:
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0] == lines[-1], report
    for fragment in names:
        assert fragment in lines[-1], f"{fragment!r} not named; {report}"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """Every file the tables refer to, made once: tokenizers, corrupt models, prompts, inputs, bias tables."""
    r = tmp_path_factory.mktemp("errors-cli")
    files = {"root": r, "model": MHA, "tok": train_tokenizer(r / "tok64.model", 64)}
    files["tok72"] = train_tokenizer(r / "tok72.model", 72)
    files["garbage"] = r / "garbage.bin"
    files["garbage"].write_bytes(b"\x8f\x01" * 50)
    files["garbage_model"] = r / "garbage.model"
    files["garbage_model"].write_bytes(b"\x8f\x01" * 50)
    files["nan_model"] = Path(shutil.copytree(MHA, r / "nan_model"))
    tensors = load_file(MHA / "model.safetensors")
    tensors["model.layers.3.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, files["nan_model"] / "model.safetensors")
    files["cut_model"] = Path(shutil.copytree(MHA, r / "cut_model"))
    (files["cut_model"] / "model.safetensors").write_bytes((MHA / "model.safetensors").read_bytes()[:50_000])
    files["pickle"] = r / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, files["pickle"])
    for name, data in {"latin1.txt": "caf\xe9 au lait".encode("latin-1"), "empty.txt": b"",
                       "text.txt": b"the cat sat on the mat and the dog ran to the park " * 8}.items():  # fmt: skip
        (r / name).write_bytes(data)
        files[name] = r / name
    inputs = {
        "good.json": json.dumps(GOOD_INPUT),
        "truncated.json": json.dumps(GOOD_INPUT)[:40],
        "deep.json": "[" * 100_000,
        "list.json": "[1, 2, 3]",
        "lacking.json": json.dumps({k: v for k, v in GOOD_INPUT.items() if k != "target_len"}),
        "unknown_key.json": json.dumps({**GOOD_INPUT, "chunk_size": 8}),
        "float_ids.json": json.dumps({**GOOD_INPUT, "context_ids": [2.0, 3.0]}),
        "float_M.json": json.dumps({**GOOD_INPUT, "max_chunk_len": 8.5}),
        "reduction.json": json.dumps({**GOOD_INPUT, "reduction": "topk"}),
    }
    for name, text in inputs.items():
        (r / name).write_text(text)
        files[name] = r / name
    files["not_utf8.json"] = files["latin1.txt"]
    save_file({"bias": torch.zeros(5, 32)}, str(r / "bias5.safetensors"))
    save_file({"bias": torch.zeros(32)}, str(r / "bias1d.safetensors"))
    save_file({"table": torch.zeros(6, 32)}, str(r / "nobias.safetensors"))
    files.update({k: r / f"{k}.safetensors" for k in ("bias5", "bias1d", "nobias")})
    return files


# ----------------------------------------------------------------------------------------------- generate

# name: (argv with {placeholders} from ctx, exit code, fragments of the error line)
GENERATE = {
    "model path that does not exist": (["--model", "{root}/absent", "--prompt", "a"], 2,
                                       ("absent", "no such file", "an HF model directory, a .gguf file")),
    "model with a NaN weight": (["--model", "{nan_model}"], 2, ("model.layers.3.mlp.up_proj.weight", "NaN/Inf")),
    "truncated safetensors": (["--model", "{cut_model}"], 2, ("model.safetensors", "not a readable safetensors")),
    "pickled checkpoint": (["--model", "{pickle}"], 2, ("pickled PyTorch checkpoint",)),
    "tokenizer of random bytes": (["--tokenizer", "{garbage_model}"], 2,
                                  ("garbage.model", "not a sentencepiece model")),
    "tokenizer of another vocabulary": (["--tokenizer", "{tok72}"], 2, ("72 pieces", "vocabulary is 64")),
    "prompt file not UTF-8": (["--prompt-file", "{latin1.txt}"], 2, ("latin1.txt is not UTF-8", "re-save")),
    "prompt file that does not exist": (["--prompt-file", "{root}/absent.txt"], 2, ("No such file",)),
    "prompt file a directory": (["--prompt-file", "{root}"], 2, ("Is a directory",)),
    "prompt and prompt file": (["--prompt", "a", "--prompt-file", "{text.txt}"], 2, ("not allowed with",)),
    "empty prompt in HOMER mode": (["--prompt", "", "--mode", "homer"], 2, ("the prompt is empty", "--prompt")),
    "empty prompt file in HOMER mode": (["--prompt-file", "{empty.txt}", "--mode", "homer"], 2, ("prompt is empty",)),
    "empty suffix in HOMER mode": (["--prompt", "the cat sat", "--suffix", "", "--mode", "homer"], 2,
                                   ("suffix is empty (S = 0)",)),
    "--max-chunk-len 0": (["--max-chunk-len", "0"], 2, ("--max-chunk-len must be >= 1, got 0",)),
    "--target-len 0": (["--target-len", "0"], 2, ("--target-len must be >= 1",)),
    "--temperature nan": (["--temperature", "nan"], 2, ("--temperature must be a finite number",)),
    "--top-p 0": (["--top-p", "0"], 2, ("--top-p must be in (0, 1]",)),
    "--max-new-tokens not a number": (["--max-new-tokens", "ten"], 2, ("invalid int value: 'ten'",)),
    "unknown --dtype": (["--dtype", "float8"], 2, ("invalid choice: 'float8'",)),
    "bias file that does not exist": (["--mode", "homer", "--bias", "{root}/absent.safetensors"], 2,
                                      ("absent.safetensors", "not a readable safetensors file")),
    "bias of another layer count": (["--mode", "homer", "--bias", "{bias5}"], 2, ("5 layers but the model has 6",)),
    "bias 1-D": (["--mode", "homer", "--bias", "{bias1d}"], 2, ("float32 [32]", "[num_layers, width]")),
    "warm-up layers >= L in HOMER mode": (["--mode", "homer", "--warmup-layers", "6"], 2, ("warmup_layers W=6",)),
    "plain request too large for memory": (["--max-new-tokens", str(10**12)], 1, ("MemoryError", "plain inference")),
    "HOMER request too large for memory": (["--mode", "homer", "--max-new-tokens", str(10**12)], 1,
                                           ("MemoryError", "generating 1000000000000 tokens")),
}  # fmt: skip
GENERATE_BASE = ["--model", "{model}", "--tokenizer", "{tok}", "--prompt", "the cat sat on the mat\nthe dog",
                 "--max-new-tokens", "2"]  # fmt: skip


def expand(argv: list[str], ctx: dict) -> list[str]:
    """Replace every {name} by the path ctx[name] (names may hold dots: {good.json})."""
    return [re.sub(r"\{([^}]+)\}", lambda m: str(ctx[m.group(1)]), str(a)) for a in argv]


def with_base(base: list[str], argv: list[str]) -> list[str]:
    """base, with options repeated in argv taken from argv (argparse keeps the last; a prompt file drops --prompt)."""
    given = {a for a in argv if a.startswith("--")}
    out, skip = [], False
    for a in base:
        if skip:
            skip = False
            continue
        if a in given or (a == "--prompt" and "--prompt-file" in given and "--prompt" not in given):
            skip = True
            continue
        out.append(a)
    return out + argv


@pytest.mark.parametrize("name", sorted(GENERATE))
def test_generate_refuses(ctx, capsys, name):
    argv, code, names = GENERATE[name]
    check(run(capsys, generate, expand(with_base(GENERATE_BASE, argv), ctx)), code, names, "generate")


@pytest.mark.parametrize("mode", ["plain", "homer"])
def test_generate_base_arguments_work(ctx, capsys, mode):
    """The arguments the table breaks run fine, so each case fails for its one defect."""
    result = run(capsys, generate, expand(GENERATE_BASE + ["--mode", mode], ctx))
    assert result.code == 0 and result.out, result.err


# ----------------------------------------------------------------------------------------------- trace

TRACE = {
    "input that does not exist": (["--input", "{root}/absent.json"], 2, ("--input", "No such file")),
    "input not UTF-8": (["--input", "{not_utf8.json}"], 2, ("not valid UTF-8 JSON",)),
    "input truncated": (["--input", "{truncated.json}"], 2, ("not valid UTF-8 JSON",)),
    "input nested too deep": (["--input", "{deep.json}"], 2, ("not valid UTF-8 JSON",)),
    "input not an object": (["--input", "{list.json}"], 2, ("must be a JSON object",)),
    "input lacking a key": (["--input", "{lacking.json}"], 2, ("lacks target_len",)),
    "input with an unknown key": (["--input", "{unknown_key.json}"], 2, ("unknown key(s) chunk_size",)),
    "ids that are not integers": (["--input", "{float_ids.json}"], 2, ("'context_ids' must be a list of integers",)),
    "max_chunk_len not an integer": (["--input", "{float_M.json}"], 2, ("'max_chunk_len' must be an integer",)),
    "unknown reduction": (["--input", "{reduction.json}"], 2, ("'reduction' must be one of", "'topk'")),
    "out a directory": (["--out", "{root}"], 2, ("is a directory", "give a file name")),
    "out in a missing directory": (["--out", "{root}/no/t.safetensors"], 2, ("does not exist",)),
    "bias 1-D": (["--bias", "{bias1d}"], 2, ("float32 [32]",)),
    "bias file without 'bias'": (["--bias", "{nobias}"], 2, ("no tensor named 'bias'", "table")),
    "bias file of random bytes": (["--bias", "{garbage}"], 2, ("not a readable safetensors file",)),
    "model with a NaN weight": (["--model", "{nan_model}"], 2, ("NaN/Inf",)),
    "model a pickled checkpoint": (["--model", "{pickle}"], 2, ("pickled PyTorch checkpoint",)),
    "unknown --dtype": (["--dtype", "bfloat16"], 2, ("invalid choice: 'bfloat16'",)),
}  # fmt: skip
TRACE_BASE = ["--model", "{model}", "--input", "{good.json}", "--out", "{root}/t.safetensors"]


@pytest.mark.parametrize("name", sorted(TRACE))
def test_trace_refuses(ctx, capsys, name):
    argv, code, names = TRACE[name]
    (ctx["root"] / "t.safetensors").unlink(missing_ok=True)
    check(run(capsys, trace, expand(with_base(TRACE_BASE, argv), ctx)), code, names, "trace")
    assert not (ctx["root"] / "t.safetensors").exists()


# ----------------------------------------------------------------------------------------------- calibrate

CALIBRATE = {
    "text not UTF-8": (["--text", "{latin1.txt}"], 2, ("--text", "is not UTF-8")),
    "text that does not exist": (["--text", "{root}/absent.txt"], 2, ("No such file",)),
    "empty text": (["--text", "{empty.txt}"], 2, ("calibration text has 0 tokens",)),
    "--max-chunk-len 0": (["--max-chunk-len", "0"], 2, ("must be >= 1",)),
    "--samples 0": (["--samples", "0"], 2, ("must be >= 1",)),
    "tokenizer of another vocabulary": (["--tokenizer", "{tok72}"], 2, ("72 pieces", "vocabulary is 64")),
    "out a directory": (["--out", "{root}"], 2, ("is a directory",)),
    "out in a missing directory": (["--out", "{root}/no/b.safetensors"], 2, ("does not exist",)),
    "model with a NaN weight": (["--model", "{nan_model}"], 2, ("NaN/Inf",)),
}  # fmt: skip
CALIBRATE_BASE = ["--model", "{model}", "--tokenizer", "{tok}", "--text", "{text.txt}", "--max-chunk-len", "8",
                  "--samples", "2", "--out", "{root}/b.safetensors"]  # fmt: skip


@pytest.mark.parametrize("name", sorted(CALIBRATE))
def test_calibrate_refuses(ctx, capsys, name):
    argv, code, names = CALIBRATE[name]
    check(run(capsys, calibrate, expand(with_base(CALIBRATE_BASE, argv), ctx)), code, names, "calibrate")
    assert not (ctx["root"] / "b.safetensors").exists()


def test_trace_and_calibrate_base_arguments_work(ctx, capsys):
    for command, base, out in ((trace, TRACE_BASE, "t"), (calibrate, CALIBRATE_BASE, "b")):
        result = run(capsys, command, expand(base, ctx))
        assert result.code == 0, result.err
        assert (ctx["root"] / f"{out}.safetensors").is_file()
        (ctx["root"] / f"{out}.safetensors").unlink()


# ----------------------------------------------------------------------------------------------- compare

COMPARE = {
    "actual is an input JSON, not a trace": (["{good.json}"], 2, ("not a readable safetensors file", "TRACE_FORMAT")),
    "actual is a directory": (["{root}"], 2, ("is a directory",)),
    "actual is a bias table": (["{bias5}"], 2, ("not a valid HOMER trace", "found bias")),
    "actual missing from the command line": ([], 2, ("give EXPECTED and ACTUAL traces (or --validate FILE)",)),
    "--rtol nan": (["{expected}", "--rtol", "nan"], 2, ("--rtol must be >= 0",)),
    "--max-lines -1": (["{expected}", "--max-lines", "-1"], 2, ("--max-lines must be >= 0",)),
}


@pytest.mark.parametrize("name", sorted(COMPARE))
def test_compare_refuses(ctx, capsys, name):
    argv, code, names = COMPARE[name]
    check(run(capsys, compare, expand([str(FOUR_LEAVES)] + argv, {**ctx, "expected": FOUR_LEAVES})), code, names,
          "compare")  # fmt: skip


# ----------------------------------------------------------------------------------------------- bench

BENCH = {
    "unknown option": (["--fast"], 2, ("unrecognized arguments: --fast",)),
    "--one with a length that is not a number": (["--one", "bench", "plain", "many", "48"], 2, ("'many'",)),
    "--one with an unknown model": (["--one", "llama", "plain", "64", "48"], 2, ("unknown model 'llama'",)),
    "--one with an unknown mode": (["--one", "bench", "homer", "64", "48"], 2, ("mode 'homer'",)),
}


@pytest.fixture
def keep_one_thread(monkeypatch):
    """bench.main sets torch's thread count to the machine's; in this process it must stay 1 (see conftest)."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)


@pytest.mark.parametrize("name", sorted(BENCH))
def test_bench_refuses(capsys, keep_one_thread, name):
    argv, code, names = BENCH[name]
    check(run(capsys, bench, argv), code, names, "bench")


def test_bench_refuses_a_run_that_cannot_fit_in_memory(capsys, monkeypatch, keep_one_thread):
    model = loading.load_model(MHA)
    monkeypatch.setattr(budget, "available_bytes", lambda device="cpu": 1024)
    with pytest.raises(MemoryError, match="the plain prefill of 40 tokens"):
        measure.plain_prefill(model, list(range(40)))
    check(run(capsys, bench, ["--one", "bench", "plain", "64", "48"]), 1, ("MemoryError", "HOMER on 64 tokens"), "")


# ----------------------------------------------------------------------------------------------- eval

EVAL = {  # the eval command is still being written: only cases that hold for any version of it
    "no task": ([], 2, ("required: task",)),
    "perplexity without a model": (["perplexity"], 2, ("required: --model",)),
    "perplexity on a model that does not exist": (["perplexity", "--model", "{root}/absent"], 2, ("absent",)),
    "perplexity on a model with a NaN weight": (["perplexity", "--model", "{nan_model}", "--tokenizer", "{tok}"], 2,
                                                ("NaN/Inf",)),
    "perplexity sampling on a model without BOS": (["perplexity", "--model", "{model}"], 2,
                                                   ("BOS", "bos_token_id", "--tokenizer")),
    "perplexity of a text that is not UTF-8": (["perplexity", "--model", "{model}", "--tokenizer", "{tok}",
                                                "--text", "{latin1.txt}", "--length", "1"], 2, ("UTF-8",)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EVAL))
def test_eval_refuses(ctx, capsys, name):
    from homer_ref.cli import eval as eval_command

    argv, code, names = EVAL[name]
    check(run(capsys, eval_command, expand(argv, ctx)), code, names, "eval")


# ----------------------------------------------------------------------------------------------- memory, Ctrl-C


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_files(ctx, capsys, tmp_path):
    """Files that exist but cannot be read (chmod 000): a prompt file, a model directory."""
    prompt = tmp_path / "secret.txt"
    prompt.write_text("the cat")
    prompt.chmod(0)
    model = Path(shutil.copytree(MHA, tmp_path / "model"))
    (model / "model.safetensors").chmod(0)
    try:
        result = run(capsys, generate, expand(with_base(GENERATE_BASE, ["--prompt-file", str(prompt)]), ctx))
        check(result, 2, ("Permission denied",), "generate")
        result = run(capsys, generate, expand(with_base(GENERATE_BASE, ["--model", str(model)]), ctx))
        check(result, 2, ("model.safetensors", "Permission denied"), "generate")
    finally:
        prompt.chmod(0o644)
        (model / "model.safetensors").chmod(0o644)


def test_trace_refuses_a_request_that_cannot_fit_in_memory(ctx, capsys, monkeypatch):
    monkeypatch.setattr(loading.weights, "check_fits", lambda *a, **k: None)  # the model itself loads
    monkeypatch.setattr(budget, "available_bytes", lambda device="cpu": 1024)
    check(run(capsys, trace, expand(TRACE_BASE, ctx)), 1, ("MemoryError", "HOMER on 26 tokens", "1 KiB"), "")
    assert not (ctx["root"] / "t.safetensors").exists()


def interrupted_save(tensors, filename, metadata=None):
    """safetensors' save_file, Ctrl-C'd halfway: part of the file is written, then KeyboardInterrupt."""
    Path(filename).write_bytes(b"\0" * 100)
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["trace", "calibrate"])
@pytest.mark.parametrize("existing", [False, True])
def test_ctrl_c_while_writing_leaves_no_partial_file(ctx, capsys, monkeypatch, command, existing):
    """Exit 130, no output file and no temporary file; an older output file is left as it was."""
    out_dir = ctx["root"] / f"ctrl-c-{command}-{existing}"
    out_dir.mkdir()
    out = out_dir / "out.safetensors"
    if existing:
        out.write_bytes(b"the previous run's output")
    monkeypatch.setattr(atomic, "save_file", interrupted_save)  # both write through homer_ref.atomic.save_atomic
    base = TRACE_BASE if command == "trace" else CALIBRATE_BASE
    argv = with_base(expand(base, ctx), ["--out", str(out)])
    result = run(capsys, trace if command == "trace" else calibrate, argv)
    assert (result.code, result.err.splitlines()[-1]) == (130, "error: interrupted"), result.err
    assert [p.name for p in out_dir.iterdir()] == (["out.safetensors"] if existing else [])
    if existing:
        assert out.read_bytes() == b"the previous run's output"


def test_ctrl_c_while_computing(ctx, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trace, "homer_prefill", interrupt)
    result = run(capsys, trace, expand(TRACE_BASE, ctx))
    assert (result.code, result.err) == (130, "error: interrupted\n")
    assert not (ctx["root"] / "t.safetensors").exists()


# ----------------------------------------------------------------------------------------------- run_main


def raising(error: BaseException):
    def main(argv):
        raise error

    return main


@pytest.mark.parametrize(
    "error, code, line",
    [
        (KeyError("weight_map"), 1, "error: unexpected KeyError: 'weight_map' (a bug in homer_ref: please report"),
        (RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB\nsee docs"), 1,
         "error: RuntimeError: CUDA out of memory. [... 2 more lines]"),
        (BrokenPipeError(32, "Broken pipe"), 1, "error: BrokenPipeError: [Errno 32] Broken pipe"),
        (MemoryError(), 1, "error: MemoryError: (no message)"),
        (ValueError("bad\ninput"), 2, "error: bad [... 1 more lines]"),
    ],
    ids=["unexpected", "multi-line", "os", "bare-memory", "value"],
)  # fmt: skip
def test_run_main_always_prints_one_line(capsys, monkeypatch, error, code, line):
    monkeypatch.delenv("HOMER_REF_TRACEBACK", raising=False)
    assert run_main(raising(error), []) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line), err


def test_the_traceback_of_a_bug_on_request(monkeypatch):
    monkeypatch.setenv("HOMER_REF_TRACEBACK", "1")
    with pytest.raises(KeyError):
        run_main(raising(KeyError("x")), [])


# ----------------------------------------------------------------------------------------------- real processes


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-runs imported modules
def test_every_command_module_exits_through_run_main(ctx, capsys, monkeypatch, keep_one_thread):
    """`python -m homer_ref.<command>` runs the module as __main__: its last line must route through run_main."""
    bad = {
        "generate": ["--model", ctx["nan_model"], "--tokenizer", ctx["tok"], "--prompt", "a"],
        "trace": ["--model", ctx["pickle"], "--input", ctx["good.json"], "--out", ctx["root"] / "p.safetensors"],
        "calibrate": expand(with_base(CALIBRATE_BASE, ["--tokenizer", "{tok72}"]), ctx),
        "compare": [FOUR_LEAVES, ctx["good.json"]],
        "bench": ["--one", "nomodel", "plain", "64", "48"],
    }
    for name, argv in bad.items():
        monkeypatch.setattr(sys, "argv", [name, *map(str, argv)])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module(f"homer_ref.{name}", run_name="__main__")
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), f"{name}: {err}"


def test_a_command_as_a_process_prints_no_traceback(ctx):
    """The whole path once for real: the interpreter, `-m`, the exit status and stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = ["--model", ctx["nan_model"], "--tokenizer", ctx["tok"], "--prompt", "a"]
    proc = subprocess.run([sys.executable, "-m", "homer_ref.generate", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "NaN/Inf" in proc.stderr


def test_eval_refuses_a_tokenizer_of_another_vocabulary(stories_dir, capsys):
    """eval checks the tokenizer against the model like generate and calibrate (exit 2, one line)."""
    from homer_ref.cli.common import run_main
    from homer_ref.cli.eval import main
    from homer_ref.tasks.passkey import SHIPPED_MODEL as DEFAULT_MODEL

    code = run_main(
        main, ["passkey", "--lengths", "1", "--samples", "1", "--tokenizer", str(stories_dir / "tok512.model")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "vocabulary" in err[0], err
    assert DEFAULT_MODEL.is_dir()


# ----------------------------------------------------------------------------------------------- GGUF and ids


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """Malformed GGUF files (from test_errors_api's table) and id files, made once."""
    pytest.importorskip("gguf", reason="needs the models extra: pip install 'homer_ref[models]'")
    from helpers import make_hf_llama
    from test_errors_api import LOAD_GGUF

    r = tmp_path_factory.mktemp("cli-gguf")
    hf = make_hf_llama(r / "hf", vocab_size=64, hidden_size=32, intermediate_size=64, head_dim=8)
    files = {name: LOAD_GGUF[name][0](r, hf) for name in ("another architecture", "truncated in the tensors")}
    files["ids"] = r / "ids.json"
    files["ids"].write_text("[1, 2, 3]")
    files["bad_ids"] = r / "bad.json"
    files["bad_ids"].write_text('{"prefix_ids": [1], "context_ids": [2.5], "suffix_ids": [3]}')
    return files


STORIES_BIN = STORIES_DIR / "stories260K.bin"
GGUF_CLI = {
    "GGUF of another architecture": (["--model", "{another architecture}", "--prompt-ids", "{ids}", "--print-ids"],
                                     2, ("'qwen2' is not supported",)),
    "truncated GGUF": (["--model", "{truncated in the tensors}", "--prompt-ids", "{ids}", "--print-ids"], 2,
                       ("truncated or corrupt",)),
    "ids that are not integers": (["--model", str(MHA), "--prompt-ids", "{bad_ids}", "--print-ids"], 2,
                                  ("'context_ids' must be a JSON list of integer token ids",)),
    "--prefix-ids without --prompt-ids": (["--model", str(MHA), "--prefix-ids", "{ids}", "--prompt", "a"], 2,
                                          ("--prefix-ids/--suffix-ids need --prompt-ids",)),
    "--chat with ids": (["--model", str(MHA), "--prompt-ids", "{ids}", "--chat"], 2, ("apply to text",)),
    "--chat without a template": (["--model", str(STORIES_BIN), "--chat", "--prompt", "a"], 2,
                                  ("has no chat template",)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(GGUF_CLI))
def test_generate_refuses_gguf_and_ids(capsys, gguf_files, name):
    argv, code, names = GGUF_CLI[name]
    argv = [a.format(**{k: v for k, v in gguf_files.items()}) if "{" in a else a for a in argv]
    check(run(capsys, generate, argv), code, names, "generate")
