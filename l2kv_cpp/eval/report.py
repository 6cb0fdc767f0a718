"""Tables (markdown) and plots (PNG) from evaluation records."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from .qa import CACHE_TYPE_BYTES, POLICIES

LABELS = {
    "keep-low-norm": "L2: keep lowest norm",
    "keep-high-norm": "keep highest norm",
    "random": "random",
    "window": "sink + recent window",
    "key-diff": "KeyDiff: keep distinctive keys",
    "hybrid": "hybrid: 1/4 norm + 3/4 KeyDiff",
    "full": "full cache",
}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (plots are written as PNG, never shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, out: Path) -> Path:
    """Write a figure as PNG (creating its folder) and free it."""
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _by(records: Iterable[dict[str, Any]], task: str, model: str) -> list[dict[str, Any]]:
    return [r for r in records if r["task"] == task and r["model"] == model]


Variant = tuple[str, str, bool, str, str]  # (policy, cache type, keep_system, recall, RoPE positions)
CACHE_TYPES = tuple(CACHE_TYPE_BYTES)  # the evaluation's cache types, most bytes first


def variant(config: dict[str, Any]) -> Variant:
    """What a record's row is: its policy, cache type and system-turn protection (records of protocol v1
    have neither: f16, and n_sink 4 without keep_system)."""
    return (
        config["policy"],
        config.get("cache_type", "f16"),
        bool(config.get("keep_system", False)),
        config.get("recall", "off"),
        config.get("positions", "original"),  # (records from before the mode existed: original positions)
    )


def variant_label(v: Variant, chat: bool = True) -> str:
    policy, cache_type, keep_system, recall, positions = v
    label = LABELS[policy]
    if recall != "off":
        label += f" + recall {recall}"
    if policy != "full" and positions != "original":
        label += f", {positions} positions"
    if cache_type != "f16":
        label += f", {cache_type} cache"
    if chat and policy != "full" and not keep_system:
        label += ", n_sink 4 (system turn evictable)"
    return label


def _variants(cells: Iterable[Variant]) -> list[Variant]:
    """Full cache rows first, then every policy; within each, by cache type, keep_system first."""
    order = {p: i for i, p in enumerate(("full", *POLICIES))}
    return sorted(set(cells), key=lambda v: (v[0] != "full", CACHE_TYPES.index(v[1]), order[v[0]], not v[2], *v[3:]))


def accuracy_table(records: Iterable[dict[str, Any]], task: str, model: str) -> str:
    """Mean score per variant (rows: full caches, then policy x cache type) and keep ratio (columns)."""
    recs = _by(records, task, model)
    chat = any(r["config"].get("chat") for r in recs)
    cells: dict[tuple[Variant, float], list[float]] = defaultdict(list)
    for r in recs:
        cells[(variant(r["config"]), r["config"]["keep"])].append(r["score"])
    keeps = sorted({k for (v, k) in cells if v[0] != "full"}, reverse=True)
    rows = []
    for v in _variants(v for v, _ in cells):
        if v[0] == "full":
            full = cells[(v, 1.0)]
            rows.append([variant_label(v, chat)] + [f"{np.mean(full):.2f}"] * len(keeps) + [len(full)])
        else:
            vals = [f"{np.mean(cells[(v, k)]):.2f}" if cells.get((v, k)) else "-" for k in keeps]
            rows.append([variant_label(v, chat)] + vals + [max(len(cells.get((v, k), [])) for k in keeps)])
    headers = ["policy"] + [f"keep {int(k * 100)}%" for k in keeps] + ["cases"]
    return tabulate(rows, headers=headers, tablefmt="github")


def memory_table(records: Iterable[dict[str, Any]], task: str, model: str) -> str:
    """Answers against KV memory: every (variant, keep) with its mean KV memory when the question arrives
    (% of a full f16 cache of the same tokens, key norms included) and its mean score, most memory first."""
    recs = [r for r in _by(records, task, model) if "kv_fraction" in r]
    chat = any(r["config"].get("chat") for r in recs)
    cells: dict[tuple[Variant, float], list[dict[str, Any]]] = defaultdict(list)
    for r in recs:
        cells[(variant(r["config"]), r["config"]["keep"])].append(r)
    rows = []
    for (v, keep), rs in cells.items():
        mem = 100 * float(np.mean([r["kv_fraction"] for r in rs]))
        score = float(np.mean([r["score"] for r in rs]))
        rows.append((mem, score, variant_label(v, chat), keep, len(rs)))
    rows.sort(key=lambda x: (-x[0], -x[1]))
    table = [[f"{m:.1f}%", label, "-" if v_keep == 1.0 else f"{int(v_keep * 100)}%", f"{sc:.2f}", n]
             for m, sc, label, v_keep, n in rows]  # fmt: skip
    return tabulate(table, headers=["KV memory", "cache", "entries kept", "score", "cases"], tablefmt="github")


def plot_accuracy(records: Iterable[dict[str, Any]], task: str, model: str, out: Path) -> Path:
    """Score against the fraction evicted, f16 caches (the policies' comparison)."""
    plt = pyplot()

    recs = [r for r in _by(records, task, model) if variant(r["config"])[1] == "f16"]
    chat = any(r["config"].get("chat") for r in recs)
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in _variants(variant(r["config"]) for r in recs):
        pts: dict[float, list[float]] = defaultdict(list)
        for r in recs:
            if variant(r["config"]) == v:
                pts[r["config"]["keep"]].append(r["score"])
        if v[0] == "full":
            ax.axhline(np.mean(pts[1.0]), color="black", ls="--", label=variant_label(v, chat))
            continue
        ks = sorted(pts)
        ls = "-" if v[2] or not chat else ":"
        ax.plot(
            [100 * (1 - k) for k in ks], [np.mean(pts[k]) for k in ks], marker="o", ls=ls, label=variant_label(v, chat)
        )
    ax.set_xlabel("KV entries evicted (%)")
    ax.set_ylabel("mean score")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{task}: {model}")
    ax.legend(fontsize=6)
    return _save(plt, fig, out)


def plot_accuracy_vs_memory(records: Iterable[dict[str, Any]], task: str, model: str, out: Path) -> Path:
    """Score against KV memory (% of a full f16 cache): one line per policy and cache type through its keep
    ratios, the full caches as black points; what a user compares with -ctk/-ctv q8_0|q4_0 in stock llama.cpp."""
    plt = pyplot()

    recs = [r for r in _by(records, task, model) if "kv_fraction" in r]
    chat = any(r["config"].get("chat") for r in recs)
    styles = {"f16": ("-", "o"), "q8_0": ("--", "s"), "q4_0": (":", "^")}
    colors = {p: f"C{i}" for i, p in enumerate(POLICIES)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in _variants(variant(r["config"]) for r in recs):
        if chat and v[0] != "full" and not v[2]:
            continue  # the system-turn A/B is in the tables
        rs = [r for r in recs if variant(r["config"]) == v]
        keeps = sorted({r["config"]["keep"] for r in rs})
        xs = [100 * np.mean([r["kv_fraction"] for r in rs if r["config"]["keep"] == k]) for k in keeps]
        ys = [np.mean([r["score"] for r in rs if r["config"]["keep"] == k]) for k in keeps]
        ls, marker = styles[v[1]]
        if v[0] == "full":
            ax.plot(xs, ys, marker=marker, color="black", ls="none", ms=8, label=variant_label(v, chat))
        else:
            ax.plot(xs, ys, marker=marker, ls=ls, color=colors[v[0]], ms=4, label=variant_label(v, chat))
    ax.set_xlabel("KV memory when the question arrives (% of a full f16 cache)")
    ax.set_ylabel("mean score")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(0, 105)
    ax.set_title(f"{task}: answers vs KV memory, {model}", fontsize=9)
    ax.legend(fontsize=5, ncol=2)
    return _save(plt, fig, out)


def plot_needle_heatmaps(records: Iterable[dict[str, Any]], model: str, keep: float, out: Path) -> Path:
    """One heatmap per policy (context length x needle depth), like the paper's needle figures."""
    plt = pyplot()

    def main_row(c: dict[str, Any]) -> bool:  # f16, with the product's system-turn protection
        return variant(c)[1] == "f16" and (variant(c)[2] or c["policy"] == "full" or not c.get("chat"))

    recs = [r for r in _by(records, "niah", model) if main_row(r["config"])]
    policies = ["full"] + [p for p in POLICIES if any(r["config"]["policy"] == p for r in recs)]
    lengths = sorted({r["config"]["n_tokens"] for r in recs})
    depths = sorted({r["config"]["depth"] for r in recs})
    fig, axes = plt.subplots(1, len(policies), figsize=(3.2 * len(policies), 3.2), squeeze=False)
    for ax, p in zip(axes[0], policies, strict=True):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for r in recs:
            c = r["config"]
            if c["policy"] == p and (p == "full" or abs(c["keep"] - keep) < 1e-9):
                grid[depths.index(c["depth"]), lengths.index(c["n_tokens"])] = r["score"]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{int(d * 100)}%" for d in depths], fontsize=7)
        ax.set_title(LABELS[p] if p == "full" else f"{LABELS[p]}\nkeep {int(keep * 100)}%", fontsize=8)
        ax.set_xlabel("tokens", fontsize=7)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("needle depth")
    fig.suptitle(f"needle in a haystack: {model}", fontsize=9)
    return _save(plt, fig, out)


def ppl_table(records: Iterable[dict[str, Any]], model: str) -> str:
    recs = _by(records, "ppl", model)
    keeps = sorted({r["config"]["keep"] for r in recs}, reverse=True)
    full = recs[0]["ppl_full"] if recs else float("nan")
    rows = [[LABELS["full"]] + [f"{full:.2f}" for _ in keeps]]
    for p in POLICIES:
        row = [LABELS[p]]
        for k in keeps:
            hit = [r for r in recs if r["config"]["policy"] == p and r["config"]["keep"] == k]
            row.append(f"{hit[0]['ppl']:.2f} (KLD {hit[0]['kld_mean']:.3f})" if hit else "-")
        if len(row) > 1 and any(v != "-" for v in row[1:]):
            rows.append(row)
    return tabulate(rows, headers=["policy"] + [f"keep {int(k * 100)}%" for k in keeps], tablefmt="github")


def plot_ppl_by_position(records: Iterable[dict[str, Any]], model: str, keep: float, out: Path) -> Path:
    plt = pyplot()

    recs = [r for r in _by(records, "ppl", model) if abs(r["config"]["keep"] - keep) < 1e-9]
    fig, ax = plt.subplots(figsize=(6, 4))
    if recs:
        w = recs[0]["position_window"]
        xs = [(i + 0.5) * w for i in range(len(recs[0]["ppl_full_by_position"]))]
        ax.plot(xs, recs[0]["ppl_full_by_position"], color="black", ls="--", label=LABELS["full"])
        budget = recs[0]["budget"]
        ax.axvline(budget, color="grey", lw=0.8)
        ax.text(budget, ax.get_ylim()[1], " budget", va="top", fontsize=7)
        for p in POLICIES:
            for r in recs:
                if r["config"]["policy"] == p:
                    ax.plot(xs, r["ppl_by_position"], label=LABELS[p])
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel(f"perplexity per {recs[0]['position_window'] if recs else ''}-token window")
    ax.set_title(f"perplexity vs. position, keep {int(keep * 100)}%: {model}", fontsize=9)
    ax.legend(fontsize=8)
    return _save(plt, fig, out)
