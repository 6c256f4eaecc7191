"""`python -m homer_ref.trace` (homer_ref/trace.py): the answer-key file other implementations test against.

- A random HF model directory, float64 run with a bias file: every tensor of the trace equals the NumPy oracle
  (reference/homer_np.py) on the same input — positions, node records, K/V and logits within
  TOL["oracle_float64"] — and the file has the documented names, dtypes and shapes.
- stories260K (llama2.c .bin), default float32 run: the documented float32/int64 layout, and the same decisions
  as the oracle run on an independent HF conversion of the checkpoint (tests/helpers.py), values within
  TOL["stories_oracle_float32"].
- Every invalid configuration of HOMER_SPEC.md N.2.6 becomes a one-line `error: ...` on stderr, exit code 2,
  no traceback.

Symbols: L layers, K final cache slots, V vocabulary, Hkv KV heads, Dh head dim; P C S M T W as in the spec.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, TOL, assert_close, llama2c_to_hf_dir, make_hf_llama
from safetensors import safe_open
from safetensors.torch import save_file

from homer_ref.cli.common import run_main
from homer_ref.cli.trace import main as trace_main
from homer_ref.testing import compare_traces
from reference import homer_np, llama_np

L, V, HKV, DH = 6, 48, 2, 6  # the random HF model of this module (Hq = 4, D = 24)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf")
    make_hf_llama(
        out,
        seed=11,
        vocab_size=V,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=HKV,
        head_dim=DH,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0},
    )
    return out


def write_input(path: Path, prefix, context, suffix, M, T, W, **extra) -> Path:
    data = dict(prefix_ids=prefix, context_ids=context, suffix_ids=suffix, max_chunk_len=M, target_len=T)
    path.write_text(json.dumps({**data, "warmup_layers": W, **extra}))
    return path


def write_bias(path: Path, bias: np.ndarray) -> Path:
    save_file({"bias": torch.from_numpy(np.ascontiguousarray(bias))}, str(path))
    return path


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "homer_ref.trace", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def read_trace(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def check_layout(trace: dict, ref: dict, num_layers: int, float_dtype: torch.dtype, checkpoints=False) -> None:
    """The names, dtypes and shapes of docs/TRACE_FORMAT.md ("Tensors"): the slot sources always, the node
    checkpoints (hidden [kept, D], keys/values.l [Hkv, kept, Dh] per layer run) when asked for."""
    K, vocab = len(ref["positions"]), ref["logits"].shape[1]
    Hkv, _, Dh = ref["keys"][0].shape
    expected = {"positions", "sources", "logits", "last_position_id", "node_order"}
    expected |= {f"{kind}.{layer}" for kind in ("keys", "values") for layer in range(num_layers)}
    for n in ref["nodes"]:
        name = f"node.{n['level']}.{n['index']}"
        fields = ("layers", "target", "input_positions", "input_sources", "kept", "removed")
        expected |= {f"{name}.{field}" for field in fields}
        if n["scores"] is not None:
            expected.add(f"{name}.scores")
        if checkpoints:
            expected |= {f"{name}.hidden"} | {f"{name}.{kind}.{layer}" for layer in range(*n["layers"])
                                              for kind in ("keys", "values")}  # fmt: skip
            kept = len(n["kept"])
            assert tuple(trace[f"{name}.hidden"].shape) == (kept, n["hidden"].shape[1])
            for layer in range(*n["layers"]):
                assert tuple(trace[f"{name}.keys.{layer}"].shape) == (Hkv, kept, Dh)
                assert trace[f"{name}.values.{layer}"].dtype == float_dtype
    assert set(trace) == expected, f"missing {expected - set(trace)}, unexpected {set(trace) - expected}"
    assert trace["positions"].dtype == torch.int64 and tuple(trace["positions"].shape) == (K,)
    assert trace["last_position_id"].dtype == torch.int64 and tuple(trace["last_position_id"].shape) == (1,)
    assert trace["logits"].dtype == float_dtype and tuple(trace["logits"].shape) == (K, vocab)
    for layer in range(num_layers):
        for kind in ("keys", "values"):
            t = trace[f"{kind}.{layer}"]
            assert t.dtype == float_dtype and tuple(t.shape) == (Hkv, K, Dh), f"{kind}.{layer}"


def check_against_oracle(trace: dict, ref: dict, num_layers: int, tol: str) -> None:
    assert trace["positions"].tolist() == ref["positions"].tolist()
    assert trace["last_position_id"].tolist() == [ref["last_position"]]
    assert trace["node_order"].tolist() == [[n["level"], n["index"]] for n in ref["nodes"]]
    for n in ref["nodes"]:
        name = f"node.{n['level']}.{n['index']}"
        assert trace[f"{name}.layers"].tolist() == list(n["layers"]), name
        assert trace[f"{name}.target"].tolist() == [n["target"]], name
        for field in ("input_positions", "kept", "removed"):
            assert trace[f"{name}.{field}"].tolist() == n[field].tolist(), f"{name}.{field}"
        if n["scores"] is not None:
            assert trace[f"{name}.scores"].dtype == torch.float32
            np.testing.assert_allclose(trace[f"{name}.scores"].numpy(), n["scores"], rtol=1e-5, atol=1e-5)
    for layer in range(num_layers):
        assert_close(trace[f"keys.{layer}"], ref["keys"][layer], tol, f"keys.{layer}")
        assert_close(trace[f"values.{layer}"], ref["values"][layer], tol, f"values.{layer}")
    assert_close(trace["logits"], ref["logits"], tol, "logits")


def test_trace_of_an_hf_model_equals_the_oracle(hf_dir, tmp_path):
    """In process, through the same `run_main` wrapper as `python -m homer_ref.trace` (the stories260K and error
    tests below run the actual command)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, 2 + 30 + 2).tolist()
    P, C, S, M, T, W = 2, 30, 2, 10, 9, 1  # E = 6: 8 leaves, H = 3, T < M: the root prunes too
    bias = rng.normal(scale=0.5, size=(L, M + 2)).astype(np.float32)
    prefix, context, suffix = ids[:P], ids[P : P + C], ids[P + C : P + C + S]
    inp = write_input(tmp_path / "in.json", prefix, context, suffix, M, T, W, reduction="calibrated")
    out = tmp_path / "trace.safetensors"
    bias_file = write_bias(tmp_path / "b.safetensors", bias)
    argv = ["--model", hf_dir, "--input", inp, "--bias", bias_file, "--out", out, "--dtype", "float64"]
    assert run_main(trace_main, list(map(str, argv))) == 0
    config, weights = llama_np.load_hf(str(hf_dir))
    ref = homer_np.homer_prefill(config, weights, prefix, context, suffix, M, T, W, bias=bias)
    trace = read_trace(out)
    check_layout(trace, ref, L, torch.float64)
    check_against_oracle(trace, ref, L, "oracle_float64")
    assert sum(len(n["removed"]) for n in ref["nodes"]) > 0 and len(ref["nodes"]) == 15
    # --checkpoints: every node's state at its end, equal to the oracle's (compared by the kit)
    out_cp = tmp_path / "checkpoints.safetensors"
    assert (
        run_main(trace_main, list(map(str, [*argv[:-2], "--out", out_cp, "--checkpoints", "--dtype", "float64"]))) == 0
    )
    check_layout(read_trace(out_cp), ref, L, torch.float64, checkpoints=True)
    report = compare_traces(out_cp, ref, atol=TOL["oracle_float64"].atol, rtol=0)
    assert report.ok and "15 nodes with checkpoints" in report.summary, str(report)
    # The default dtype: float32 tensors, the same decisions, values within float32 rounding.
    out32 = tmp_path / "trace32.safetensors"
    argv32 = ["--model", hf_dir, "--input", inp, "--bias", bias_file, "--out", out32]
    assert run_main(trace_main, list(map(str, argv32))) == 0
    trace32 = read_trace(out32)
    check_layout(trace32, ref, L, torch.float32)
    check_against_oracle(trace32, ref, L, "oracle_float32")


def test_trace_of_stories260K(stories_dir, tmp_path):
    hf = tmp_path / "stories_hf"
    llama2c_to_hf_dir(stories_dir / "stories260K.bin", hf)  # independent of homer_ref's llama2.c loader
    config, weights = llama_np.load_hf(str(hf))
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 512, 3 + 150 + 3).tolist()
    P, C, S, M, T, W = 3, 150, 3, 48, 40, 1  # E = 42: 4 leaves; L = 5: lpc = 1, lo = 1
    bias = rng.normal(scale=0.5, size=(5, M)).astype(np.float32)
    prefix, context, suffix = ids[:P], ids[P : P + C], ids[P + C : P + C + S]
    inp = write_input(tmp_path / "in.json", prefix, context, suffix, M, T, W)
    out = tmp_path / "trace.safetensors"
    proc = run_cli("--model", stories_dir / "stories260K.bin", "--input", inp,
                   "--bias", write_bias(tmp_path / "b.safetensors", bias), "--out", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("\n") == 1 and "wrote" in proc.stderr  # one progress line, on stderr
    ref = homer_np.homer_prefill(config, weights, prefix, context, suffix, M, T, W, bias=bias)
    trace = read_trace(out)
    check_layout(trace, ref, 5, torch.float32)  # the default: float32
    check_against_oracle(trace, ref, 5, "stories_oracle_float32")
    assert len(ref["nodes"]) == 7 and sum(len(n["removed"]) for n in ref["nodes"]) > 0


# ----------------------------------------------------------------------------------------------- errors

GOOD = dict(prefix=[1], context=list(range(2, 26)), suffix=[3], M=8, T=8, W=0)  # section L, on L = 6 layers


def nan_bias() -> np.ndarray:
    b = np.zeros((L, 8), dtype=np.float32)
    b[2, 3] = np.nan
    return b


# name -> (changes to GOOD, extra input keys, bias array or None, a word the message must contain)
CLI_ERRORS = {
    "S = 0": (dict(suffix=[]), {}, None, "suffix"),
    "M <= P + S": (dict(M=2), {}, None, "max_chunk_len"),
    "T < P + S": (dict(T=1), {}, None, "target_len"),
    "W >= L": (dict(W=6), {}, None, "warmup_layers"),
    "too few layers": (dict(W=4), {}, None, "12"),  # L - W = 2 blocks for H = 2: reach 2^(L-W-1)*E = 12
    "negative last leaf": (dict(M=4, context=[2, 3, 4, 5, 6]), {}, None, "last"),  # B.5: M = 4, C = 5
    "bias layer count": ({}, {}, np.zeros((L - 1, 8), dtype=np.float32), "layers"),
    "bias shorter than M": ({}, {}, np.zeros((L, 7), dtype=np.float32), "max_chunk_len"),
    "bias with NaN": ({}, {}, nan_bias(), "NaN"),
    "id outside the vocabulary": (dict(context=[2, V, *range(4, 26)]), {}, None, "vocabulary"),
    "calibrated without a bias": ({}, {"reduction": "calibrated"}, None, "bias"),
    "unknown dtype": ({}, {"reduction": "uncalibrated", "dtype": "bfloat16"}, None, "'dtype' must be one of"),
}


def error_argv(hf_dir: Path, tmp_path: Path, name: str) -> list[str]:
    changes, extra, bias, _ = CLI_ERRORS[name]
    if bias is None and not extra:
        extra = {"reduction": "uncalibrated"}  # so that only the configuration is at fault
    c = {**GOOD, **changes}
    inp = write_input(tmp_path / "in.json", c["prefix"], c["context"], c["suffix"], c["M"], c["T"], c["W"], **extra)
    argv = ["--model", str(hf_dir), "--input", str(inp), "--out", str(tmp_path / "t.safetensors")]
    if bias is not None:
        argv += ["--bias", str(write_bias(tmp_path / "b.safetensors", bias))]
    return argv


@pytest.mark.parametrize("name", sorted(CLI_ERRORS))
def test_invalid_configuration_is_a_one_line_error(hf_dir, tmp_path, capsys, name):
    """In process, through the same `run_main` wrapper that `python -m homer_ref.trace` uses."""
    code = run_main(trace_main, error_argv(hf_dir, tmp_path, name))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert CLI_ERRORS[name][3] in err, err
    assert not (tmp_path / "t.safetensors").exists()


def test_invalid_configuration_from_the_command_line(hf_dir, tmp_path):
    proc = run_cli(*error_argv(hf_dir, tmp_path, "S = 0"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "t.safetensors").exists()


def test_the_error_cases_are_valid_once_fixed(hf_dir, tmp_path):
    """GOOD itself runs: each error case above fails because of its one change."""
    c = GOOD
    inp = write_input(tmp_path / "in.json", c["prefix"], c["context"], c["suffix"], c["M"], c["T"], c["W"])
    bias = write_bias(tmp_path / "b.safetensors", np.zeros((L, 8), dtype=np.float32))
    out = tmp_path / "t.safetensors"
    assert (
        run_main(trace_main, ["--model", str(hf_dir), "--input", str(inp), "--bias", str(bias), "--out", str(out)]) == 0
    )
    assert out.exists()


def test_the_input_dtype_and_an_empty_bias(hf_dir, tmp_path):
    """The input's `dtype` chooses the compute dtype unless --dtype says otherwise (the metadata records the one
    used); an empty --bias is no table (what the conformance kit's {bias} gives for uncalibrated cases)."""
    c = GOOD
    inp = write_input(tmp_path / "in.json", c["prefix"], c["context"], c["suffix"], c["M"], c["T"], c["W"],
                      reduction="uncalibrated", dtype="float64")  # fmt: skip
    out = tmp_path / "t.safetensors"
    assert run_main(trace_main, ["--model", str(hf_dir), "--input", str(inp), "--bias", "", "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("keys.0").dtype == torch.float64 and f.metadata()["dtype"] == "float64"
        assert f.metadata()["bias"] == ""
    argv = ["--model", str(hf_dir), "--input", str(inp), "--out", str(out), "--dtype", "float32"]
    assert run_main(trace_main, argv) == 0
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("keys.0").dtype == torch.float32 and f.metadata()["dtype"] == "float32"
