"""Eviction on a llama.cpp context: enable it, read statistics, norms and positions, force an eviction.

A thin layer over the C API (`llama_l2kv_*`, see native/include/llama-l2kv.h); `ctx` is the
`llama_context_p` of llama-cpp-python (e.g. `Llama.ctx`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._ffi import native
from .config import L2KVConfig
from .errors import InvalidParamsError, NativeCallError, UnsupportedModelError


@dataclass(frozen=True)
class L2KVStats:
    """Python view of `struct llama_l2kv_stats`."""

    enabled: bool
    kv_budget: int
    kv_size: int
    n_cells_used: int
    n_cells_compacted: int
    n_layers: int
    pos_max: int
    n_evictions: int
    n_dropped: int
    n_moved_rows: int
    t_evict_ms: float  # all eviction work, of which:
    t_feature_ms: float  # key norms read back, key cosines computed
    t_rank_ms: float  # scores and selection on the host
    t_move_ms: float  # the compaction graph
    kv_bytes: int
    norm_bytes: int
    positions: int  # enum llama_l2kv_positions in effect (config.Positions)
    rope_pos_max: int  # the largest RoPE position in the cache (the next token gets one more)
    n_rotated_rows: int
    t_rotate_ms: float  # of t_evict_ms: the re-rotation graph (positions in the cache)


# C status -> exception class (llama_l2kv_status)
_ERRORS = {-1: InvalidParamsError, -2: UnsupportedModelError, -3: UnsupportedModelError, -4: InvalidParamsError}


def _check(status: int, where: str) -> int:
    if status < 0:
        nat = native()
        cls = _ERRORS.get(status, NativeCallError)
        detail = nat.ffi.string(nat.lib.llama_l2kv_last_error()).decode(errors="replace")
        raise cls(f"{detail or where} ({nat.status_str(status)})")
    return status


def default_config() -> L2KVConfig:
    """The C library's defaults (llama_l2kv_default_params) as an L2KVConfig."""
    p = native().lib.llama_l2kv_default_params()
    skip = None if p.n_skip_layers == -1 else ()
    return L2KVConfig(
        kv_budget=p.kv_budget,
        n_slack=p.n_slack,
        n_sink=p.n_sink,
        n_recent=p.n_recent,
        policy=p.policy,
        per_head=bool(p.per_head),
        seed=p.seed,
        skip_layers=skip,
        positions=p.positions,
    )


def enable(ctx: Any, config: L2KVConfig) -> None:
    nat = native()
    params, _keep = config.to_c(nat.ffi)
    _check(nat.lib.llama_l2kv_enable(nat.ctx_ptr(ctx), params), "llama_l2kv_enable")


def disable(ctx: Any) -> None:
    nat = native()
    _check(nat.lib.llama_l2kv_disable(nat.ctx_ptr(ctx)), "llama_l2kv_disable")


def stats(ctx: Any) -> L2KVStats:
    nat = native()
    out = nat.ffi.new("struct llama_l2kv_stats *")
    _check(nat.lib.llama_l2kv_get_stats(nat.ctx_ptr(ctx), out), "llama_l2kv_get_stats")
    return L2KVStats(**{f: getattr(out, f) for f in L2KVStats.__dataclass_fields__})


def evict_now(ctx: Any) -> None:
    nat = native()
    _check(nat.lib.llama_l2kv_evict_now(nat.ctx_ptr(ctx)), "llama_l2kv_evict_now")


def set_n_sink(ctx: Any, n_sink: int) -> None:
    """Protect the first n_sink positions from the next eviction on (n_sink + n_recent < kv_budget)."""
    if n_sink < 0:
        raise InvalidParamsError(f"n_sink must be >= 0 (got {n_sink})")
    nat = native()
    _check(nat.lib.llama_l2kv_set_n_sink(nat.ctx_ptr(ctx), n_sink), "llama_l2kv_set_n_sink")


def _layer_buffers(ctx: Any, il: int, dtypes: tuple[type, ...]) -> tuple[Any, list[np.ndarray]]:
    """The context pointer and zeroed [kv_size, n_head_kv] arrays for a per-(cell, head) read of layer il."""
    nat = native()
    c = nat.ctx_ptr(ctx)
    n_head = _check(nat.lib.llama_l2kv_n_head_kv(c, il), f"llama_l2kv_n_head_kv(layer {il})")
    n_max = stats(ctx).kv_size
    return c, [np.zeros((n_max, n_head), dtype=t) for t in dtypes]


def read_layer(ctx: Any, il: int) -> tuple[np.ndarray, np.ndarray]:
    """(norms, positions) of model layer il, both shaped [cell, kv head]; empty cells have position -1."""
    nat = native()
    c, (norms, pos) = _layer_buffers(ctx, il, (np.float32, np.int32))
    n_max = norms.shape[0]
    n = _check(
        nat.lib.llama_l2kv_read_layer(
            c, il, nat.ffi.from_buffer("float[]", norms), nat.ffi.from_buffer("int32_t[]", pos), n_max
        ),
        f"llama_l2kv_read_layer(layer {il})",
    )
    return norms[:n].copy(), pos[:n].copy()


def _read_layer_array(ctx: Any, il: int, function: str, dtype: type) -> np.ndarray:
    """One [cell, kv head] array of model layer il from a C reader `function(ctx, il, out, n_cells_max)`."""
    nat = native()
    c, (out,) = _layer_buffers(ctx, il, (dtype,))
    c_type = "int32_t[]" if dtype == np.int32 else "float[]"
    n = _check(
        getattr(nat.lib, function)(c, il, nat.ffi.from_buffer(c_type, out), out.shape[0]), f"{function}(layer {il})"
    )
    return out[:n].copy()


def read_rope_positions(ctx: Any, il: int) -> np.ndarray:
    """The RoPE position each K row of model layer il is rotated to, [cell, kv head]; empty cells read -1."""
    return _read_layer_array(ctx, il, "llama_l2kv_read_rope_positions", np.int32)


def read_key_cosines(ctx: Any, il: int) -> np.ndarray:
    """KeyDiff's feature of model layer il, [cell, kv head]: the cosine of every cached key with its head's
    normalised sum of unit keys, as the eviction computes it; empty cells read 0."""
    return _read_layer_array(ctx, il, "llama_l2kv_read_key_cosines", np.float32)


def read_kv(ctx: Any, il: int, kind: str, cell0: int, n_cells: int) -> np.ndarray:
    """Raw K ("k") or V ("v") bytes of model layer il for cells [cell0, cell0 + n_cells): uint8 [cell, row bytes]."""
    nat = native()
    c = nat.ctx_ptr(ctx)
    k = {"k": 0, "v": 1}[kind]
    probe = np.zeros(1, dtype=np.uint8)
    row = nat.lib.llama_l2kv_read_kv(c, il, k, 0, 0, nat.ffi.from_buffer(probe), probe.nbytes)
    _check(int(row), f"llama_l2kv_read_kv(layer {il})")
    out = np.zeros((n_cells, row), dtype=np.uint8)
    _check(
        int(nat.lib.llama_l2kv_read_kv(c, il, k, cell0, n_cells, nat.ffi.from_buffer(out), out.nbytes)),
        f"llama_l2kv_read_kv(layer {il})",
    )
    return out


def native_select(
    pos: np.ndarray, score: np.ndarray, n_keep: int, n_sink: int, n_recent: int, pos_last: int
) -> np.ndarray:
    """The native selection rule (llama_l2kv_select) on given data: indices kept, best first."""
    nat = native()
    pos = np.ascontiguousarray(pos, dtype=np.int32)
    score = np.ascontiguousarray(score, dtype=np.float32)
    out = np.zeros(max(len(pos), 1), dtype=np.int32)
    n = _check(
        nat.lib.llama_l2kv_select(
            nat.ffi.from_buffer("int32_t[]", pos),
            nat.ffi.from_buffer("float[]", score),
            len(pos),
            n_keep,
            n_sink,
            n_recent,
            pos_last,
            nat.ffi.from_buffer("int32_t[]", out),
        ),
        "llama_l2kv_select",
    )
    return out[:n].copy()
