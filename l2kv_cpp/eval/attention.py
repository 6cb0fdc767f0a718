"""Norm-attention analysis: how much attention mass norm-based eviction drops, per layer and KV head,
compared with the ideal attention-based eviction at the same compression.

For a query i and the keys j <= i, keeping k = ceil(keep * (i + 1)) of them:
- loss_norm(i)  = attention mass on the keys norm-based eviction drops (it keeps the k lowest norms),
- loss_ideal(i) = attention mass on the keys the ideal eviction drops (it keeps the k highest
  attention weights, the least any eviction of that size can lose),
- the attention-loss ratio ALr = mean_i (loss_norm(i) - loss_ideal(i)) over the analysed queries:
  0 means norm-based eviction is as good as the ideal one, larger is worse (at most 1). This is our
  reading of the paper's attention-loss comparison (Devoto et al. 2024, Sec. 4, Eqs. 5-7); a random
  eviction scores about (1 - keep) - loss_ideal.
Attention of the query heads that share a KV head is averaged, since eviction is per KV head.

The weights come from llama.cpp itself: a context with flash attention off and the l2kv probe as
its eval callback (`llama_l2kv_probe_cb`) captures `kq_soft_max-<il>` and `Kcur-<il>` per layer.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _lib
from .._ffi import native
from ..decode import decode
from ..errors import L2KVError


def attention_loss(attn: np.ndarray, key_norms: np.ndarray, keep: float, queries: np.ndarray) -> tuple[float, float]:
    """(mean loss_norm, mean loss_ideal) over `queries` for one head.

    attn: [n_query_positions, n_keys] causal attention (rows sum to 1 over keys j <= i);
    key_norms: [n_keys]; queries: indices of the query rows to analyse (row i attends keys 0..i).
    """
    ln, li = [], []
    for i in queries:
        a = attn[i, : i + 1].astype(np.float64)
        k = min(i + 1, max(1, math.ceil(keep * (i + 1))))
        keep_norm = np.argsort(key_norms[: i + 1], kind="stable")[:k]
        keep_ideal = np.argsort(-a, kind="stable")[:k]
        ln.append(1.0 - a[keep_norm].sum())
        li.append(1.0 - a[keep_ideal].sum())
    return float(np.mean(ln)), float(np.mean(li))


@dataclass(frozen=True)
class LayerHeadLoss:
    il: int
    head: int  # KV head
    loss_norm: float
    loss_ideal: float

    @property
    def alr(self) -> float:
        return self.loss_norm - self.loss_ideal


def capture(model_path: Path, tokens: list[int]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], int]:
    """Run one ubatch of `tokens` with the probe; returns ({il: attn [n_head, n_tok, n_kv]},
    {il: keys [n_tok, n_head_kv, d]}, n_head_kv)."""
    lc = _lib.llama_cpp()
    nat = native()
    n = len(tokens)
    mparams = lc.llama_model_default_params()
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):
        model = lc.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not model:
        raise L2KVError(f"llama.cpp could not load {model_path}")
    probe = nat.lib.llama_l2kv_probe_new()
    ctx = None
    try:
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n
        cparams.n_batch = cparams.n_ubatch = n
        cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cb_addr = int(nat.ffi.cast("uintptr_t", nat.ffi.addressof(nat.lib, "llama_l2kv_probe_cb")))
        cparams.cb_eval = ctypes.cast(cb_addr, lc.ggml_backend_sched_eval_callback)
        cparams.cb_eval_user_data = ctypes.c_void_p(int(nat.ffi.cast("uintptr_t", probe)))
        with suppress_stdout_stderr(disable=False):
            ctx = lc.llama_init_from_model(model, cparams)
        if not ctx:
            raise L2KVError("could not create the analysis context")

        class _Shim:  # decode() needs .ctx and .n_batch
            pass

        shim = _Shim()
        shim.ctx, shim.n_batch = ctx, n
        decode(shim, tokens, 0, logits="none")
        n_layer = lc.llama_model_n_layer(model)
        attn, keys = {}, {}
        ne = nat.ffi.new("int64_t[4]")
        for il in range(n_layer):
            out = []
            for what in (0, 1):
                count = nat.lib.llama_l2kv_probe_get(probe, il, what, ne, nat.ffi.NULL, 0)
                if count < 0:
                    raise L2KVError(nat.ffi.string(nat.lib.llama_l2kv_last_error()).decode())
                buf = np.empty(count, dtype=np.float32)
                nat.lib.llama_l2kv_probe_get(probe, il, what, ne, nat.ffi.from_buffer("float[]", buf), count)
                out.append(buf.reshape(int(ne[3]), int(ne[2]), int(ne[1]), int(ne[0])))
            attn[il] = out[0][0]  # [n_head, n_tok, n_kv]
            keys[il] = out[1][0]  # [n_tok, n_head_kv, d]
        n_head_kv = keys[0].shape[1]
        return attn, keys, n_head_kv
    finally:
        if ctx:
            lc.llama_free(ctx)
        nat.lib.llama_l2kv_probe_free(probe)
        lc.llama_model_free(model)


def analyse(
    model_path: Path, tokens: list[int], keep: float, n_queries: int = 64, captured: tuple | None = None
) -> list[LayerHeadLoss]:
    attn, keys, n_head_kv = captured if captured is not None else capture(model_path, tokens)
    n = len(tokens)
    queries = np.arange(max(0, n - n_queries), n)
    out = []
    for il in sorted(attn):
        a = attn[il][:, :, :n]  # drop n_kv padding
        group = a.shape[0] // n_head_kv
        norms = np.linalg.norm(keys[il].astype(np.float64), axis=-1)  # [n_tok, n_head_kv]
        for h in range(n_head_kv):
            a_h = a[h * group : (h + 1) * group].mean(axis=0)
            ln, li = attention_loss(a_h, norms[:, h], keep, queries)
            out.append(LayerHeadLoss(il, h, ln, li))
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)


def norm_attention_correlation(
    attn: dict[int, np.ndarray], keys: dict[int, np.ndarray], n_head_kv: int, n: int
) -> dict[int, float]:
    """Per layer, the Spearman correlation between a key's L2 norm and the attention it receives from
    later queries (keys of the first half, queries of the second half; mean over KV heads). The paper's
    premise is that it is negative: low-norm keys draw high attention."""
    half = n // 2
    out = {}
    for il in sorted(attn):
        a = attn[il][:, :, :n]
        group = a.shape[0] // n_head_kv
        norms = np.linalg.norm(keys[il].astype(np.float64), axis=-1)
        cs = []
        for h in range(n_head_kv):
            received = a[h * group : (h + 1) * group, half:, :half].mean(axis=(0, 1))
            cs.append(float(np.corrcoef(_ranks(norms[:half, h]), _ranks(received))[0, 1]))
        out[il] = float(np.mean(cs))
    return out


def recommend_skip_layers(losses: list[LayerHeadLoss], n: int = 2) -> list[int]:
    """The n layers where norm-based eviction loses the most attention relative to the ideal."""
    by_layer: dict[int, list[float]] = {}
    for x in losses:
        by_layer.setdefault(x.il, []).append(x.alr)
    ranked = sorted(by_layer, key=lambda il: -float(np.mean(by_layer[il])))
    return sorted(ranked[:n])


def plot_alr(losses: list[LayerHeadLoss], title: str, out: Path) -> Path:
    from .report import pyplot

    plt = pyplot()

    layers = sorted({x.il for x in losses})
    heads = sorted({x.head for x in losses})
    grid = np.zeros((len(heads), len(layers)))
    for x in losses:
        grid[heads.index(x.head), layers.index(x.il)] = x.alr
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(layers) + 2), 1.0 + 0.5 * len(heads)))
    im = ax.imshow(grid, cmap="magma_r", vmin=0, aspect="auto")
    ax.set_xticks(range(len(layers)), [str(i) for i in layers], fontsize=6)
    ax.set_yticks(range(len(heads)), [str(h) for h in heads], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("KV head")
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, label="ALr (attention lost vs. ideal)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
