"""llama.cpp's RPC backend: a model's layers on rpc-servers (`--rpc HOST:PORT,...`, llama.cpp's flag).

The client registers each server's devices with ggml as llama.cpp's common/arg.cpp does
(ggml_backend_rpc_add_server + ggml_backend_register) and loads the model with an explicit device list, in
llama.cpp's default order (the servers asked for, then the local GPUs), so that a server registered for an
earlier model of the same process is never used, nor connected to, by a model that did not ask for it.
`-ngl N` puts the last N layers on those devices (llama.cpp's rule); the others stay on the local CPU.

Eviction needs nothing more: its graphs (compaction, key cosines, re-rotation) run through the context's
scheduler on the backend that holds each layer's K/V, so K and V never travel through the client; only
indices, positions and per-key scores do.

ggml's RPC client aborts the process when a server cannot be reached or stops answering. `check_reachable`
turns the first into a one-line error before anything connects; `exit_on_fatal_error` (the native abort
hook) turns the second into a one-line error and exit status 1 instead of a core dump.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _lib
from .errors import BUILD_HINT, InvalidParamsError, L2KVError

DEFAULT_PORT = 50052  # rpc-server's default
CONNECT_TIMEOUT_S = 5.0

# ggml_backend_dev_type (ggml-backend.h)
_DEV_CPU, _DEV_GPU, _DEV_IGPU, _DEV_ACCEL = 0, 1, 2, 3


class RpcError(L2KVError):
    """An rpc-server is unreachable, or this build has no RPC backend."""


def parse_endpoints(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """'host:port,host:port' (or a sequence of them) -> validated endpoints; empty for None or ''."""
    if spec is None:
        return ()
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in parts:
        ep = raw.strip()
        if not ep:
            continue
        host, sep, port = ep.rpartition(":")
        if not sep or not host or ":" in host:
            raise InvalidParamsError(f"--rpc: {ep!r} is not HOST:PORT (e.g. 192.168.1.2:{DEFAULT_PORT})")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise InvalidParamsError(f"--rpc: port {port!r} of {ep!r} is not a number in 1..65535")
        if ep not in out:
            out.append(ep)
    if isinstance(spec, str) and spec.strip() and not out:
        raise InvalidParamsError(f"--rpc: no server in {spec!r}")
    return tuple(out)


def supported() -> bool:
    """Whether the installed libllama was built with the RPC backend (GGML_RPC=ON)."""
    return bool(_lib.llama_cpp().llama_supports_rpc())


def check_reachable(endpoint: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to the server, or RpcError in one line (ggml itself would abort the process)."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RpcError(
            f"cannot reach the rpc-server at {endpoint} ({reason}): start it there with "
            f"`l2kv-cpp rpc-server --host ADDRESS --port {port}`"
        ) from None


class _Ggml:
    """The few ggml registry calls the client needs, through the library llama-cpp-python loaded."""

    def __init__(self) -> None:
        from llama_cpp import _ggml

        lib = _ggml.libggml
        vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        for name, res, args in (
            ("ggml_backend_reg_by_name", vp, [cp]),
            ("ggml_backend_reg_get_proc_address", vp, [vp, cp]),
            ("ggml_backend_register", None, [vp]),
            ("ggml_backend_reg_name", cp, [vp]),
            ("ggml_backend_reg_dev_count", sz, [vp]),
            ("ggml_backend_reg_dev_get", vp, [vp, sz]),
            ("ggml_backend_dev_count", sz, []),
            ("ggml_backend_dev_get", vp, [sz]),
            ("ggml_backend_dev_type", ctypes.c_int, [vp]),
            ("ggml_backend_dev_name", cp, [vp]),
            ("ggml_backend_dev_description", cp, [vp]),
            ("ggml_backend_dev_backend_reg", vp, [vp]),
            ("ggml_backend_dev_memory", None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.lib = lib

    def add_server(self, endpoint: str) -> int | None:
        """The RPC backend's registry for one server (ggml_backend_rpc_add_server, found at run time)."""
        reg = self.lib.ggml_backend_reg_by_name(b"RPC")
        add = self.lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server") if reg else None
        if not add:
            raise RpcError(f"this libllama has no RPC backend: {BUILD_HINT} (without --no-rpc)")
        return ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(add)(endpoint.encode())

    def is_rpc(self, dev: int) -> bool:
        return self.lib.ggml_backend_reg_name(self.lib.ggml_backend_dev_backend_reg(dev)) == b"RPC"

    def local_accelerators(self) -> list[int]:
        """llama.cpp's default devices without the RPC ones: the GPUs, or the integrated GPUs if none."""
        gpus, igpus = [], []
        for i in range(self.lib.ggml_backend_dev_count()):
            dev = self.lib.ggml_backend_dev_get(i)
            kind = self.lib.ggml_backend_dev_type(dev)
            if kind == _DEV_GPU and not self.is_rpc(dev):
                gpus.append(dev)
            elif kind == _DEV_IGPU:
                igpus.append(dev)
        return gpus or igpus[:1]


_LOCK = threading.Lock()
_GGML: _Ggml | None = None
_DEVICES: dict[str, list[int]] = {}  # endpoint -> its registered devices (ggml registers a server once)


def _ggml() -> _Ggml:
    global _GGML
    if _GGML is None:
        _GGML = _Ggml()
    return _GGML


def local_gpu_names() -> list[str]:
    """The local devices -ngl offloads to without --rpc (doctor: llama_supports_gpu_offload is also true
    for a build that merely has the RPC backend)."""
    g = _ggml()
    return [g.lib.ggml_backend_dev_description(dev).decode(errors="replace") for dev in g.local_accelerators()]


def server_devices(endpoint: str) -> list[int]:
    """The ggml devices of one server, registered on first use (after checking that it answers)."""
    with _LOCK:
        if endpoint not in _DEVICES:
            if not supported():
                raise RpcError(f"this libllama was built without RPC (GGML_RPC): {BUILD_HINT} (without --no-rpc)")
            g = _ggml()
            check_reachable(endpoint)
            reg = g.add_server(endpoint)
            if not reg:
                raise RpcError(f"the rpc-server at {endpoint} reports no devices")
            g.lib.ggml_backend_register(reg)
            n = g.lib.ggml_backend_reg_dev_count(reg)
            _DEVICES[endpoint] = [g.lib.ggml_backend_reg_dev_get(reg, i) for i in range(n)]
        return list(_DEVICES[endpoint])


def model_devices(endpoints: Sequence[str]) -> Any | None:
    """The NULL-terminated device array for llama_model_params.devices, or None for llama.cpp's default
    (no server asked for and none registered in this process)."""
    if not endpoints and not _DEVICES:
        return None
    rpc = [dev for ep in endpoints for dev in server_devices(ep)]
    devs = rpc + _ggml().local_accelerators()
    return (ctypes.c_void_p * (len(devs) + 1))(*devs, None)


SERVER_PROGRAM = "l2kv-rpc-server"  # native/l2kv.cmake installs it beside the wheel's libraries


def server_program() -> Path:
    """The rpc-server built with the installed libllama (the same ggml, so the same RPC protocol)."""
    path = _lib.library_path().parent / SERVER_PROGRAM
    if not path.is_file():
        raise RpcError(f"no {SERVER_PROGRAM} beside {_lib.library_path()}: {BUILD_HINT} (without --no-rpc)")
    return path


def exec_server_program(args: list[str]) -> None:
    """Replace this process with the rpc-server (signals and exit status are then the server's own)."""
    path = server_program()
    os.execv(path, [str(path), *args])
