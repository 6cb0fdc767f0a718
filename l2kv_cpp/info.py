"""`l2kv-cpp info MODEL`: the attention layout that matters for eviction, and KV memory per cache type.

The layout comes from llama.cpp itself (`llama_l2kv_model_layer_info` on the loaded model, which
knows e.g. Gemma 3's sliding-window pattern that the GGUF does not spell out); the model is
memory-mapped without creating a context.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from . import _lib
from ._ffi import native
from .config import Positions
from .errors import ModelError
from .gguf_file import check_gguf

INFO_CACHE_TYPES = ("f16", "q8_0", "q4_0")


@dataclass(frozen=True)
class LayerLayout:
    il: int
    has_kv: bool
    is_swa: bool
    n_head_kv: int
    n_embd_head_k: int
    n_embd_head_v: int


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    architecture: str
    name: str
    n_layer: int
    n_head: int
    n_ctx_train: int
    n_swa: int  # sliding window in tokens, 0 = none
    layers: list[LayerLayout]
    has_chat_template: bool

    @property
    def full_layers(self) -> list[LayerLayout]:
        return [lay for lay in self.layers if lay.has_kv and not lay.is_swa]

    @property
    def swa_layers(self) -> list[LayerLayout]:
        return [lay for lay in self.layers if lay.has_kv and lay.is_swa]

    def kv_bytes_per_token(self, cache_type: str, layers: list[LayerLayout] | None = None) -> float:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[cache_type.upper()]]
        per_elem = size / block
        layers = self.full_layers if layers is None else layers
        return sum((lay.n_embd_head_k + lay.n_embd_head_v) * lay.n_head_kv * per_elem for lay in layers)

    def archive_bytes_per_token(self, cache_type: str) -> float:
        """Host memory the archive (--recall) takes per evicted token: K and V rows of every budgeted
        (layer, KV head) in the cache type, plus its squared key norm, true position and RoPE position (4 bytes
        each)."""
        return self.kv_bytes_per_token(cache_type) + 12 * sum(lay.n_head_kv for lay in self.full_layers)

    def kv_bytes(self, cache_type: str, n_cells_full: int, n_cells_swa: int) -> float:
        """K/V bytes with n_cells_full cells in the full-attention layers and n_cells_swa in the window layers."""
        return (
            self.kv_bytes_per_token(cache_type) * n_cells_full
            + self.kv_bytes_per_token(cache_type, self.swa_layers) * n_cells_swa
        )


def read_model_info(path: str | Path) -> ModelInfo:
    gg = check_gguf(path)
    lc = _lib.llama_cpp()
    nat = native()
    params = lc.llama_model_default_params()
    params.n_gpu_layers = 0
    from llama_cpp._utils import suppress_stdout_stderr  # llama.cpp logs every tensor while loading

    with suppress_stdout_stderr(disable=False):
        model = lc.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelError(f"llama.cpp could not load {path} (unsupported architecture or corrupt file)")
    try:
        mptr = nat.ffi.cast("struct llama_model *", ctypes.cast(model, ctypes.c_void_p).value)
        n_layer = lc.llama_model_n_layer(model)
        out = nat.ffi.new("struct llama_l2kv_layer_info *")
        layers = []
        for il in range(n_layer):
            if nat.lib.llama_l2kv_model_layer_info(mptr, il, out) != 0:
                raise ModelError(f"cannot read the layout of layer {il} of {path}")
            layers.append(
                LayerLayout(il, bool(out.has_kv), bool(out.is_swa), out.n_head_kv, out.n_embd_head_k, out.n_embd_head_v)
            )
        return ModelInfo(
            path=Path(path),
            architecture=gg.architecture,
            name=str(gg.metadata.get("general.name", "")),
            n_layer=n_layer,
            n_head=lc.llama_model_n_head(model),
            n_ctx_train=lc.llama_model_n_ctx_train(model),
            n_swa=int(nat.lib.llama_l2kv_model_n_swa(mptr)),
            layers=layers,
            has_chat_template=bool(gg.metadata.get("tokenizer.chat_template")),
        )
    finally:
        lc.llama_model_free(model)


def memory_rows(info: ModelInfo, budget_cells: int, n_ubatch: int) -> list[list[str]]:
    """Per cache type: KV bytes per token, and KV MiB with eviction (budget_cells = kv_budget + slack cells)
    vs. a full training context."""
    n_swa_cells = min(info.n_swa + n_ubatch, info.n_ctx_train) if info.swa_layers else 0
    rows = []
    for t in INFO_CACHE_TYPES:
        per_tok = info.kv_bytes_per_token(t)  # full-attention layers: the part that grows with length
        at_budget = info.kv_bytes(t, budget_cells, n_swa_cells or 0)
        full = info.kv_bytes(t, info.n_ctx_train, min(n_swa_cells, info.n_ctx_train) if info.swa_layers else 0)
        rows.append(
            [
                t,
                f"{per_tok / 1024:.1f} KiB",
                f"{at_budget / 2**20:.1f} MiB",
                f"{full / 2**20:.1f} MiB",
                f"{full / at_budget:.1f}x",
                f"{info.archive_bytes_per_token(t) / 1024:.1f} KiB",
            ]
        )
    return rows


def rope_positions_line(positions: Positions, n_ctx_train: int, max_cells: int) -> str:
    """What `info` says about RoPE distances with eviction: bounded by the cache, or growing with the text."""
    if positions == Positions.CACHE:
        # (llama-l2kv-positions.cpp, rope_limit_for: renumbering seldom was measured closer to a full cache)
        limit = max(max_cells, min(4 * max_cells, n_ctx_train * 3 // 4)) if n_ctx_train > 0 else max_cells
        ok = "inside" if limit <= n_ctx_train else "PAST"
        return (
            f"cache: kept keys renumbered inside the cache when positions would pass {limit}, so positions < "
            f"{limit} at any length ({ok} the {n_ctx_train}-token training context)"
        )
    return (
        f"original: keys keep their positions in the text, so past {n_ctx_train} tokens the model sees "
        "distances it was never trained on"
    )
