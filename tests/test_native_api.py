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
