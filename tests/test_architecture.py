"""The package tree is the architecture: the library, the answer key and the commands in their own places.

- The library (everything outside `homer_ref/cli/` and the `python -m` entry modules) never imports a command:
  checked on the source of every module, and on what `import homer_ref` actually loads. Neither do the
  tutorials: what they show is library code (the picture, the prompt split, a node's step), reachable without
  a command.
- `homer_ref/llama.py` stays one file of about 300 lines that imports only torch (and the standard library).
- Every command runs as `python -m homer_ref.<name>` and is declared as a `homer-<name>` console script.
- The top-level API is what the README shows.
"""

import ast
import subprocess
import sys

import pytest
from helpers import ROOT

PACKAGE = ROOT / "homer_ref"
COMMANDS = sorted(p.stem for p in (PACKAGE / "cli").glob("*.py") if p.stem not in ("__init__", "common"))


def imported_modules(path) -> set[str]:
    """Every module a source file imports (absolute names; `from homer_ref.cli import x` gives homer_ref.cli.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def library_files():
    entry_modules = {PACKAGE / f"{name}.py" for name in COMMANDS}
    return [p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts and p not in entry_modules]


def test_the_library_never_imports_a_command():
    command_modules = {f"homer_ref.{name}" for name in COMMANDS}
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in imported_modules(path) if m.startswith("homer_ref.cli") or m in command_modules
        )
        for path in library_files()
    }
    assert not {k: v for k, v in offenders.items() if v}, offenders
    assert len(library_files()) > 20  # the walk found the library


def test_tutorials_import_no_command():
    tutorials = sorted((ROOT / "tutorials").glob("*.py"))
    offenders = {p.name: sorted(m for m in imported_modules(p) if m.startswith("homer_ref.cli")) for p in tutorials}
    assert not {k: v for k, v in offenders.items() if v}, offenders
    assert len(tutorials) > 8


def test_importing_the_library_loads_no_command():
    code = "import sys, homer_ref, homer_ref.testing, homer_ref.tasks.passkey; print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "homer_ref.cli" not in loaded and "'homer_ref.homer.prefill'" in loaded


def test_llama_is_one_small_file_importing_only_torch():
    path = PACKAGE / "llama.py"
    lines = path.read_text().count("\n")
    assert lines <= 400, f"llama.py has {lines} lines: something that is not the forward pass crept in"
    third_party = {m.split(".")[0] for m in imported_modules(path)} - set(sys.stdlib_module_names)
    assert third_party == {"torch"}, third_party


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_an_entry_module_and_a_console_script(name):
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    assert f'homer-{name} = "homer_ref.cli.{name}:entry"' in scripts.splitlines()
    out = subprocess.run(
        [sys.executable, "-m", f"homer_ref.{name}", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr


def test_the_top_level_api():
    import homer_ref

    for name in ("load_model", "load_tokenizer", "HomerConfig", "plan", "homer_prefill", "homer_generate",
                 "continuation_logits"):  # fmt: skip
        assert callable(getattr(homer_ref, name)), name
