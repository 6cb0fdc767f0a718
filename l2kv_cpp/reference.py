"""Numpy reference of the eviction rule: the specification the native selection is tested against.

Per (layer, KV head) group, an eviction keeps `n_keep` entries: the protected ones first (the
`n_sink` first positions and the `n_recent` newest), then by ascending score, ties to the newer
position. The score is the key's L2 norm (keep-low-norm), its negation (keep-high-norm), a
seeded hash of (seed, layer, head, position) (random), or minus the position (window, and the
skipped layers). In per-layer mode the norm score is the sum of the heads' norms.
"""

from __future__ import annotations

import numpy as np

from .config import L2KVConfig, Policy

_MASK = (1 << 64) - 1


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


def group_scores(config: L2KVConfig, il: int, group: int, norms: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Scores of one (layer, group) from the layer's norms [n, n_head] and the group's positions [n]."""
    if il in config.effective_skip_layers or config.policy == Policy.WINDOW:
        return -pos.astype(np.float32)
    if config.policy == Policy.RANDOM:
        return np.array([random_score(config.seed, il, group, int(p)) for p in pos], dtype=np.float32)
    if config.per_head:
        s = norms[:, group].astype(np.float32)
    else:  # summed head by head in float32, in the native order
        s = np.zeros(len(pos), dtype=np.float32)
        for h in range(norms.shape[1]):
            s = s + norms[:, h].astype(np.float32)
    return -s if config.policy == Policy.KEEP_HIGH_NORM else s


def kept_positions(config: L2KVConfig, il: int, norms: np.ndarray, pos: np.ndarray, pos_last: int) -> list[set[int]]:
    """For each KV head of layer il: the set of true positions an eviction keeps.

    norms, pos: [n_cells, n_head] as read before the eviction (only used cells, pos >= 0).
    """
    used = pos[:, 0] >= 0
    norms, pos = norms[used], pos[used]
    n_head = pos.shape[1]
    out = []
    for h in range(n_head):
        g = h if config.per_head else 0
        p = pos[:, g]
        keep = select(
            p, group_scores(config, il, g, norms, p), config.kv_budget, config.n_sink, config.n_recent, pos_last
        )
        out.append({int(x) for x in pos[keep, h]})
    return out
