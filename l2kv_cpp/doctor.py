"""`l2kv-cpp doctor`: checks the installation and says how to fix what is wrong.

Each check is a `Check` with a status (ok / warn / fail), a one-line detail and, when not ok,
the fix. The CLI prints them and exits non-zero when any check failed.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import __version__, _lib
from .errors import BUILD_HINT, L2KVError
from .models import DEFAULT_MODEL, KNOWN_MODELS, model_status
from .upstream import read_upstream, source_hash

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    detail: str
    fix: str = ""


def backend_names(system_info: str) -> list[str]:
    """Backend names from llama_print_system_info(), e.g. "CPU : SSE3 = 1 | CUDA : ARCHS = 900 |"."""
    names = re.findall(r"(?:^|\|)\s*([A-Za-z][\w-]*)\s*:", system_info)
    return list(dict.fromkeys(names))


def _library_checks() -> Iterator[Check]:
    pin = read_upstream()
    try:
        llama_cpp = _lib.llama_cpp()
    except L2KVError as exc:
        yield Check("llama-cpp-python", FAIL, str(exc), BUILD_HINT)
        return
    version = getattr(llama_cpp, "__version__", "?")
    if version == pin.llama_cpp_python_version:
        yield Check("llama-cpp-python", OK, f"{version} (pinned {pin.llama_cpp_python_version})")
    else:
        yield Check(
            "llama-cpp-python",
            FAIL,
            f"{version} installed, l2kv-cpp is pinned to {pin.llama_cpp_python_version}",
            BUILD_HINT,
        )
    path = _lib.library_path()
    try:
        from ._ffi import native

        nat = native()
    except L2KVError as exc:
        yield Check("libllama", FAIL, str(exc), BUILD_HINT)
        return
    info = nat.build_info()
    yield Check("libllama", OK, f"{path} (patched: {info})")
    built_from = re.search(r"source (\w+)", info)
    repo_hash = source_hash()
    if repo_hash and built_from and not repo_hash.startswith(built_from.group(1)):
        yield Check(
            "patch level",
            WARN,
            f"library built from sources {built_from.group(1)}, this checkout has {repo_hash[:12]}",
            f"rebuild: {BUILD_HINT}",
        )
    sysinfo = llama_cpp.llama_print_system_info().decode(errors="replace")
    backends = backend_names(sysinfo)
    from .rpc import local_gpu_names

    gpus = local_gpu_names()
    yield Check("backends", OK, f"{', '.join(backends) or '?'} (local GPUs for -ngl: {', '.join(gpus) or 'none'})")
    yield _rpc_check()
    yield _flash_attn_check(nat)


def _rpc_check() -> Check:
    """--rpc needs the RPC backend in libllama and the rpc-server built beside it."""
    from . import rpc

    if not rpc.supported():
        return Check("RPC", WARN, "not built (--rpc unavailable)", f"for --rpc: {BUILD_HINT} (without --no-rpc)")
    try:
        program = rpc.server_program()
    except rpc.RpcError as exc:
        return Check("RPC", WARN, f"backend built, {exc}", f"{BUILD_HINT} (without --no-rpc)")
    return Check("RPC", OK, f"backend built (--rpc HOST:PORT); server: l2kv-cpp rpc-server ({program.name})")


def _flash_attn_check(nat) -> Check:
    """Create a context on a tiny generated model with flash attention requested; read what llama.cpp chose."""
    from .session import L2KVModel, ModelSettings
    from .tiny_model import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_model(Path(tmp) / "tiny.gguf")
        try:
            model = L2KVModel(path, ModelSettings(n_ctx=256, n_batch=64, n_ubatch=64), l2kv=None)
        except L2KVError as exc:
            return Check("flash attention", FAIL, f"could not create a test context: {exc}", BUILD_HINT)
        with model:
            out = nat.ffi.new("bool *")
            status = nat.lib.llama_l2kv_get_flash_attn(nat.ctx_ptr(model.llm.ctx), out)
            if status != 0:
                return Check(
                    "flash attention", FAIL, f"llama_l2kv_get_flash_attn: {nat.status_str(status)}", BUILD_HINT
                )
            if out[0]:
                return Check("flash attention", OK, "enabled on a test context (required by l2kv eviction)")
            return Check(
                "flash attention",
                FAIL,
                "llama.cpp disabled flash attention on this backend",
                "eviction needs flash attention; use a backend that supports GGML_OP_FLASH_ATTN_EXT",
            )


def _model_checks() -> Iterator[Check]:
    for name, model in KNOWN_MODELS.items():
        st = model_status(model)
        role = "default model" if name == DEFAULT_MODEL else "model"
        label = f"{role} {name}"
        if st.ok:
            yield Check(label, OK, f"{model.path} ({st.size:,} bytes, sha256 ok)")
        elif not st.present and name != DEFAULT_MODEL:
            yield Check(label, WARN, f"not downloaded ({model.path})", model.fetch_hint())
        else:
            yield Check(label, FAIL, st.problem() or "unusable", model.fetch_hint(force=st.present))


def run_checks(on_check: Callable[[Check], None] | None = None) -> list[Check]:
    pin = read_upstream()
    checks = [
        Check("l2kv-cpp", OK, f"{__version__}"),
        Check(
            "upstream pin",
            OK,
            f"llama-cpp-python {pin.llama_cpp_python_version}, llama.cpp {pin.llama_cpp_commit[:12]}",
        ),
    ]
    for c in checks:
        if on_check:
            on_check(c)
    for gen in (_library_checks(), _model_checks()):
        for c in gen:
            checks.append(c)
            if on_check:
                on_check(c)
    return checks
