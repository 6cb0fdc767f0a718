"""The archive of evicted entries and recall, on a llama.cpp context (`llama_l2kv_archive_*`, `llama_l2kv_recall`).

With the archive on, what an eviction drops is kept in host memory (K, V and key-norm rows, byte for
byte, with their true positions) per layer and KV head; `recall` puts the entries of some position
spans back into the cache before new text is processed. Which spans to recall is decided in
`l2kv_cpp.recall`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._ffi import native
from .cache import _check


@dataclass(frozen=True)
class ArchiveStats:
    """Python view of `struct llama_l2kv_archive_stats`."""

    enabled: bool
    on_disk: bool  # the rows are in temporary files
    n_entries: int  # (layer, KV head) rows held
    n_bytes: int  # what they take (in RAM unless on_disk)
    n_disk_bytes: int  # size of the temporary files
    n_recalls: int  # recalls that brought entries back
    n_recalled: int  # rows brought back, summed over recalls
    t_recall_ms: float  # wall time of every recall, its eviction included
    max_bytes: int  # the limit on n_bytes (0: none); the oldest entries are forgotten past it
    bytes_per_position: int  # what one position evicted from every (layer, group) adds
    n_forgotten: int  # (layer, group) entries dropped for max_bytes, oldest first


@dataclass(frozen=True)
class ArchivedRows:
    """The archived entries of one (layer, group), ascending position: rows are K | V | key-norm bytes."""

    pos: np.ndarray  # int32 [n]
    k: np.ndarray  # uint8 [n, k bytes]
    v: np.ndarray  # uint8 [n, v bytes]
    norm: np.ndarray  # uint8 [n, norm bytes] (float32 squared norms)


def enable(ctx: Any, on: bool = True, on_disk: bool = False, max_bytes: int = 0) -> None:
    """Start keeping evicted entries (on; their rows in RAM, or in temporary files with on_disk; at most
    max_bytes of them, the oldest forgotten first, 0 for no limit) or stop and drop the archive (off)."""
    nat = native()
    params = nat.ffi.NULL
    if on:
        params = nat.ffi.new("struct llama_l2kv_archive_params *", nat.lib.llama_l2kv_archive_default_params())
        params.on_disk = on_disk
        params.max_bytes = max_bytes
    _check(nat.lib.llama_l2kv_archive_enable(nat.ctx_ptr(ctx), params), "llama_l2kv_archive_enable")


def stats(ctx: Any) -> ArchiveStats:
    nat = native()
    out = nat.ffi.new("struct llama_l2kv_archive_stats *")
    _check(nat.lib.llama_l2kv_archive_get_stats(nat.ctx_ptr(ctx), out), "llama_l2kv_archive_get_stats")
    return ArchiveStats(**{f: getattr(out, f) for f in ArchiveStats.__dataclass_fields__})


def coverage(ctx: Any, n_pos: int) -> tuple[np.ndarray, int]:
    """(counts, n_groups): counts[p] = (layer, group) rows of position p in the archive, for p < n_pos;
    n_groups is the count of a position no group kept."""
    nat = native()
    counts = np.zeros(max(n_pos, 1), dtype=np.int32)
    n_groups = _check(
        nat.lib.llama_l2kv_archive_coverage(nat.ctx_ptr(ctx), nat.ffi.from_buffer("int32_t[]", counts), n_pos),
        "llama_l2kv_archive_coverage",
    )
    return counts[:n_pos].copy(), n_groups


def read(ctx: Any, il: int, group: int) -> ArchivedRows:
    """The archived entries of model layer il, group (KV head, or 0 per layer), ascending position."""
    nat = native()
    c = nat.ctx_ptr(ctx)
    row_bytes = nat.ffi.new("int64_t[3]")
    n = _check(
        nat.lib.llama_l2kv_archive_read(c, il, group, nat.ffi.NULL, nat.ffi.NULL, 0, row_bytes),
        f"llama_l2kv_archive_read(layer {il}, group {group})",
    )
    kb, vb, nb = (int(row_bytes[i]) for i in range(3))
    pos = np.zeros(max(n, 1), dtype=np.int32)
    rows = np.zeros((max(n, 1), kb + vb + nb), dtype=np.uint8)
    _check(
        nat.lib.llama_l2kv_archive_read(
            c, il, group, nat.ffi.from_buffer("int32_t[]", pos), nat.ffi.from_buffer(rows), n, row_bytes
        ),
        f"llama_l2kv_archive_read(layer {il}, group {group})",
    )
    rows = rows[:n]
    k, v, norm = rows[:, :kb], rows[:, kb : kb + vb], rows[:, kb + vb :]
    return ArchivedRows(pos=pos[:n].copy(), k=k.copy(), v=v.copy(), norm=norm.copy())


def recall(ctx: Any, spans: Sequence[tuple[int, int]]) -> int:
    """Bring back the archived entries of the position spans [first, end); returns the cells the recall used
    (the most entries any (layer, head) got back, 0 when the archive held none of them)."""
    nat = native()
    first = np.array([s[0] for s in spans] or [0], dtype=np.int32)
    end = np.array([s[1] for s in spans] or [0], dtype=np.int32)
    return _check(
        nat.lib.llama_l2kv_recall(
            nat.ctx_ptr(ctx), nat.ffi.from_buffer("int32_t[]", first), nat.ffi.from_buffer("int32_t[]", end), len(spans)
        ),
        "llama_l2kv_recall",
    )


def dequantize_rows(rows: np.ndarray, cache_type: str, n_embd_head: int) -> np.ndarray:
    """float32 [n, heads, n_embd_head] from raw cache rows (uint8 [n, bytes]) of a cache type."""
    import gguf

    qtype = gguf.GGMLQuantizationType[cache_type.upper()]
    if len(rows) == 0:
        return np.zeros((0, 1, n_embd_head), dtype=np.float32)
    x = gguf.quants.dequantize(np.ascontiguousarray(rows), qtype).astype(np.float32, copy=False)
    return x.reshape(len(rows), -1, n_embd_head)


def read_keys(ctx: Any, il: int, group: int, cache_type: str, n_embd_head: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions [n], keys float32 [n, heads of the group, n_embd_head]) of the archived entries of (il, group);
    the keys as the cache stores them (after RoPE, rotated like the queries for quantized types)."""
    rows = read(ctx, il, group)
    return rows.pos, dequantize_rows(rows.k, cache_type, n_embd_head)


def capture_queries(ctx: Any, n_tokens_max: int) -> None:
    """Keep the queries of every decoded ubatch of up to n_tokens_max tokens (0: stop)."""
    nat = native()
    _check(nat.lib.llama_l2kv_capture_queries(nat.ctx_ptr(ctx), n_tokens_max), "llama_l2kv_capture_queries")


def read_queries(ctx: Any, il: int, n_tokens: int, n_embd_head: int) -> np.ndarray:
    """The captured queries of model layer il for the first n_tokens of the last ubatch: [token, head, n_embd_head]."""
    nat = native()
    c = nat.ctx_ptr(ctx)
    per = _check(nat.lib.llama_l2kv_read_queries(c, il, 0, nat.ffi.NULL), f"llama_l2kv_read_queries(layer {il})")
    out = np.zeros((max(n_tokens, 1), per), dtype=np.float32)
    _check(
        nat.lib.llama_l2kv_read_queries(c, il, n_tokens, nat.ffi.from_buffer("float[]", out)),
        f"llama_l2kv_read_queries(layer {il})",
    )
    return out[:n_tokens].reshape(n_tokens, -1, n_embd_head)
