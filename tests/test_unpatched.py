"""A stock (unpatched) or missing libllama gives one clear error with the build command.

A stock build cannot be installed beside the patched one, so these tests run the CLI in a child
process whose `llama_cpp` is a stand-in: it exposes, as llama-cpp-python does, the ctypes handle
of a real shared library (libggml-base from the installed build) that has no l2kv symbols.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from l2kv_cpp import _lib

REPO_ROOT = Path(__file__).resolve().parent.parent


def _fake_llama_cpp(root: Path, init_body: str, lib_path: Path | None = None) -> Path:
    pkg = root / "llama_cpp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(init_body))
    if lib_path is not None:
        (pkg / "llama_cpp.py").write_text(f"import ctypes\n_lib = ctypes.CDLL({str(lib_path)!r})\n")
    return root


def _cli(pythonpath: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{pythonpath}{os.pathsep}{REPO_ROOT}"}
    return subprocess.run(
        [sys.executable, "-m", "l2kv_cpp.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def stock_lib() -> Path:
    lib = _lib.library_path().parent / "libggml-base.so"
    assert lib.is_file(), f"expected {lib} beside the installed libllama"
    return lib


def test_stock_library_is_detected_by_doctor_and_run(tmp_path, stock_lib, tiny_model):
    fake = _fake_llama_cpp(
        tmp_path,
        """
        from . import llama_cpp
        __version__ = "0.3.36"
        def llama_print_system_info(): return b"CPU : SSE3 = 1 | "
        def llama_supports_gpu_offload(): return False
        """,
        stock_lib,
    )
    doctor = _cli(fake, "doctor")
    assert doctor.returncode == 1
    assert "stock build without the l2kv-cpp patch" in doctor.stdout
    assert "scripts/build_patched.py" in doctor.stdout
    assert "Traceback" not in doctor.stdout + doctor.stderr

    run = _cli(fake, "run", str(tiny_model), "-n", "2")
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: libllama at ") and "build_patched.py" in lines[0]


def test_library_that_fails_to_load_is_one_line(tmp_path, tiny_model):
    fake = _fake_llama_cpp(
        tmp_path,
        """
        raise OSError("libllama.so: cannot open shared object file: No such file or directory")
        """,
    )
    run = _cli(fake, "run", str(tiny_model), "-n", "2")
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "libllama could not be loaded" in lines[0], run.stderr


def test_import_has_no_side_effects():
    """`import l2kv_cpp` (and its CLI module) must not load libllama."""
    code = "import sys, l2kv_cpp, l2kv_cpp.cli, l2kv_cpp.models; print('llama_cpp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert out.stdout.strip() == "False"
