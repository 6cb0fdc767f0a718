"""The l2kv C API compiled into the installed libllama, called through the cffi layer."""

from __future__ import annotations

import ctypes

import pytest

from l2kv_cpp import _lib
from l2kv_cpp._ffi import SUPPORTED_ABI_VERSION, cdef_from_header, header_abi_version
from l2kv_cpp.session import L2KVModel, ModelSettings
from l2kv_cpp.upstream import read_upstream, source_hash


def _declared_functions(native) -> list[str]:
    import re

    return re.findall(r"\b(llama_l2kv_\w+)\s*\(", cdef_from_header(native.header_path.read_text()))


def test_every_declared_function_is_exported(native):
    names = _declared_functions(native)
    assert {"llama_l2kv_abi_version", "llama_l2kv_build_info", "llama_l2kv_get_flash_attn"} <= set(names)
    stock_view = ctypes.CDLL(str(_lib.library_path()))  # plain dlsym, independent of cffi
    for name in names:
        assert hasattr(stock_view, name), f"{name} is declared in the header but not exported"


def test_the_binding_opens_the_image_llama_cpp_loaded(native):
    """Same file and same loaded image: the function address seen by cffi equals the one ctypes sees."""
    ctypes_lib = _lib.llama_cpp().llama_cpp._lib
    assert str(native.library_path) == ctypes_lib._name
    via_ctypes = ctypes.cast(ctypes_lib.llama_l2kv_abi_version, ctypes.c_void_p).value
    via_cffi = int(native.ffi.cast("uintptr_t", native.ffi.addressof(native.lib, "llama_l2kv_abi_version")))
    assert via_ctypes == via_cffi


def test_abi_version_matches_header_and_package(native):
    assert native.lib.llama_l2kv_abi_version() == SUPPORTED_ABI_VERSION
    assert header_abi_version(native.header_path.read_text()) == SUPPORTED_ABI_VERSION


def test_build_info_names_pinned_commit_and_sources(native):
    info = native.build_info()
    assert f"abi {SUPPORTED_ABI_VERSION}" in info
    assert f"llama.cpp {read_upstream().llama_cpp_commit[:8]}" in info
    here = source_hash()
    assert here is not None and f"source {here[:12]}" in info, "the installed library was built from other sources"


def test_status_strings(native):
    assert native.status_str(0) == "ok"
    assert native.status_str(-1) == "invalid argument"
    assert native.status_str(-2) == "unsupported memory"
    assert native.status_str(12345) == "unknown status"


def test_null_arguments_return_a_status_instead_of_crashing(native):
    out = native.ffi.new("bool *")
    assert native.lib.llama_l2kv_get_flash_attn(native.ffi.NULL, out) == -1
    assert native.lib.llama_l2kv_get_flash_attn(native.ffi.NULL, native.ffi.NULL) == -1


@pytest.mark.parametrize("requested", [True, False])
def test_flash_attn_reports_what_the_context_was_created_with(native, tiny_model, requested):
    settings = ModelSettings(n_ctx=256, n_batch=64, n_ubatch=64, flash_attn=requested)
    with L2KVModel(tiny_model, settings, l2kv=None) as m:
        out = native.ffi.new("bool *")
        assert native.lib.llama_l2kv_get_flash_attn(native.ctx_ptr(m.llm.ctx), out) == 0
        assert bool(out[0]) is requested  # the CPU backend supports flash attention for every type


def test_quiet_log_keeps_warnings_and_drops_the_rest_in_c(native, tiny_model, capfd):
    """set_log(False) (what L2KVModel and the benches use without -v) filters in C: llama.cpp's warnings
    still reach stderr, its debug lines and the l2kv error line do not (the error comes back through
    llama_l2kv_last_error); set_log(True) routes the log back to llama-cpp-python's callback, which with
    its logger at DEBUG prints those same lines (the control)."""
    from conftest import make_llm, random_tokens
    from llama_cpp import _logger

    from l2kv_cpp import cache
    from l2kv_cpp.config import L2KVConfig
    from l2kv_cpp.decode import decode
    from l2kv_cpp.errors import InvalidParamsError

    def evict_and_fail(evicting, plain, pos: int) -> str:
        capfd.readouterr()
        with pytest.raises(InvalidParamsError, match="n_slack \\(16\\) must be 0"):
            cache.enable(plain.ctx, L2KVConfig(kv_budget=64, n_slack=16))
        decode(evicting, random_tokens(100, seed=pos), pos)  # evictions: graph re-reservations log debug lines
        return capfd.readouterr().err

    evicting = make_llm(tiny_model, n_ctx=256, n_batch=64)
    plain = make_llm(tiny_model, n_ctx=256, n_batch=64)
    try:
        cache.enable(evicting.ctx, L2KVConfig(kv_budget=64))
        _logger.set_verbose(True)  # llama-cpp-python's callback prints every line from here on
        native.set_log(verbose=False)
        quiet = evict_and_fail(evicting, plain, 0)
        native.set_log(verbose=True)
        loud = evict_and_fail(evicting, plain, 100)
    finally:
        _logger.set_verbose(False)
        native.set_log(verbose=True)
        evicting.close()
        plain.close()
    assert "n_slack" in loud and "graph_reserve" in loud
    assert "n_slack" not in quiet and "graph_reserve" not in quiet

    native.set_log(verbose=False)
    try:
        capfd.readouterr()
        make_llm(tiny_model, n_ctx=8192, n_batch=64).close()  # past the model's 4096-token training context
        assert "n_ctx_seq (8192) > n_ctx_train (4096)" in capfd.readouterr().err  # a warning gets through
    finally:
        native.set_log(verbose=True)
