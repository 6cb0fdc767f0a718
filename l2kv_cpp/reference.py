"""Numpy reference of the eviction rule: the specification the native selection is tested against.

Per (layer, KV head) group, an eviction keeps `n_keep` entries: the protected ones first (the
`n_sink` first positions and the `n_recent` newest), then by ascending score, ties to the newer
position. The score is the key's L2 norm (keep-low-norm), its negation (keep-high-norm), a
seeded hash of (seed, layer, head, position) (random), minus the position (window, and the
skipped layers), the cosine of the key with its head's mean unit key (key-diff), or
min(rank by norm / 0.25, rank by cosine / 0.75) (hybrid: a quarter of the kept entries by norm,
three quarters by cosine). In per-layer mode the norm and cosine scores
are summed over the heads.
"""

from __future__ import annotations

import numpy as np

from .config import L2KVConfig, Policy

_MASK = (1 << 64) - 1
HYBRID_NORM_SHARE = 0.25  # llama_l2kv_scorer_hybrid::norm_share


def select(pos: np.ndarray, score: np.ndarray, n_keep: int, n_sink: int, n_recent: int, pos_last: int) -> np.ndarray:
    """Indices of the entries to keep, best first."""
    pos = np.asarray(pos, dtype=np.int64)
    score = np.asarray(score, dtype=np.float32)
    protected = (pos < n_sink) | (pos > pos_last - n_recent)
    key = np.where(np.isnan(score), np.float32(np.inf), score)
    order = np.lexsort((-pos, key, ~protected))  # last key is the primary one
    return order[:n_keep]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def random_score(seed: int, il: int, head: int, pos: int) -> float:
    """Score of Policy.RANDOM: 24 bits of a splitmix64 chain over (seed, layer, head, position)."""
    h = _splitmix64(seed & _MASK)
    for v in (il, head, pos):
        h = _splitmix64(h ^ (v & 0xFFFFFFFF))
    return float(np.float32((h >> 40) / 16777216.0))


def key_cosines(keys: np.ndarray, n_head: int) -> np.ndarray:
    """KeyDiff's feature: [n, n_head] cosine of every key with the normalised sum of its head's unit keys.

    keys: [n, n_head * head_dim] the cached keys (dequantized), one row per entry.
    """
    n = keys.shape[0]
    k = keys.reshape(n, n_head, -1).astype(np.float64)
    u = k / np.maximum(np.linalg.norm(k, axis=2, keepdims=True), 1e-12)
    m = u.sum(axis=0)
    m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    return np.einsum("nhd,hd->nh", u, m)


def ranks(score: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Rank 0 .. n-1 of every entry by ascending score (NaN last), ties to the newer position."""
    key = np.where(np.isnan(score), np.float32(np.inf), score)
    order = np.lexsort((np.arange(len(pos)), -np.asarray(pos, dtype=np.int64), key))
    out = np.empty(len(pos), dtype=np.float32)
    out[order] = np.arange(len(pos), dtype=np.float32)
    return out


def _per_group(config: L2KVConfig, group: int, feature: np.ndarray) -> np.ndarray:
    """The group's column of a [n, n_head] feature, or its float32 sum over the heads (native order)."""
    if config.per_head:
        return feature[:, group].astype(np.float32)
    s = np.zeros(feature.shape[0], dtype=np.float32)
    for h in range(feature.shape[1]):
        s = s + feature[:, h].astype(np.float32)
    return s


def group_scores(
    config: L2KVConfig, il: int, group: int, norms: np.ndarray, pos: np.ndarray, kcos: np.ndarray | None = None
) -> np.ndarray:
    """Scores of one (layer, group) from the layer's norms [n, n_head], key cosines [n, n_head] (key-diff
    and hybrid) and the group's positions [n]."""
    if il in config.effective_skip_layers or config.policy == Policy.WINDOW:
        return -pos.astype(np.float32)
    if config.policy == Policy.RANDOM:
        return np.array([random_score(config.seed, il, group, int(p)) for p in pos], dtype=np.float32)
    if config.policy in (Policy.KEY_DIFF, Policy.HYBRID) and kcos is None:
        raise ValueError(f"{config.policy.cli_name} needs the key cosines")
    if config.policy == Policy.KEY_DIFF:
        return _per_group(config, group, kcos)
    s = _per_group(config, group, norms)
    if config.policy == Policy.HYBRID:  # merge: a quarter by norm, three quarters by cosine
        share = np.float32(HYBRID_NORM_SHARE)
        by_norm = ranks(s, pos) / share
        by_cos = ranks(_per_group(config, group, kcos), pos) / (np.float32(1.0) - share)
        return np.minimum(by_norm, by_cos).astype(np.float32)
    return -s if config.policy == Policy.KEEP_HIGH_NORM else s


def kept_positions(
    config: L2KVConfig, il: int, norms: np.ndarray, pos: np.ndarray, pos_last: int, kcos: np.ndarray | None = None
) -> list[set[int]]:
    """For each KV head of layer il: the set of true positions an eviction keeps.

    norms, pos, kcos: [n_cells, n_head] as read before the eviction (only used cells, pos >= 0).
    """
    used = pos[:, 0] >= 0
    norms, pos = norms[used], pos[used]
    kcos = None if kcos is None else kcos[used]
    n_head = pos.shape[1]
    out = []
    for h in range(n_head):
        g = h if config.per_head else 0
        p = pos[:, g]
        keep = select(
            p, group_scores(config, il, g, norms, p, kcos), config.kv_budget, config.n_sink, config.n_recent, pos_last
        )
        out.append({int(x) for x in pos[keep, h]})
    return out


def rope(
    x: np.ndarray, delta: np.ndarray, freq_base: float, neox: bool = False, n_rot: int | None = None
) -> np.ndarray:
    """RoPE of rows x [n, d] by delta[n] positions (float64): what re-rotating a cached key to a new position
    does, since rotations compose (rope(rope(k, p), q - p) == rope(k, q)). Pairs (2i, 2i+1) as llama.cpp's
    LLAMA_ROPE_TYPE_NORM, or (i, i + n_rot/2) as NEOX; dimensions past n_rot are left alone."""
    x = np.asarray(x, dtype=np.float64)
    n_rot = x.shape[-1] if n_rot is None else n_rot
    half = n_rot // 2
    theta = np.asarray(delta, dtype=np.float64)[:, None] * freq_base ** (-2.0 * np.arange(half) / n_rot)[None, :]
    cos, sin = np.cos(theta), np.sin(theta)
    out = x.copy()
    if neox:
        a, b = x[:, :half], x[:, half:n_rot]
        out[:, :half], out[:, half:n_rot] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = x[:, 0:n_rot:2], x[:, 1:n_rot:2]
        out[:, 0:n_rot:2], out[:, 1:n_rot:2] = a * cos - b * sin, a * sin + b * cos
    return out


def cache_positions(true_pos: np.ndarray) -> np.ndarray:
    """The RoPE positions LLAMA_L2KV_POSITIONS_CACHE gives the kept entries of one (layer, head) right after an
    eviction: their ranks by true position."""
    ranks = np.empty(len(true_pos), dtype=np.int64)
    ranks[np.argsort(true_pos, kind="stable")] = np.arange(len(true_pos))
    return ranks
