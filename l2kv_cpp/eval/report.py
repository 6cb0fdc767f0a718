"""Tables (markdown) and plots (PNG) from evaluation records."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from .qa import POLICIES

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


def _by(records: Iterable[dict[str, Any]], task: str, model: str) -> list[dict[str, Any]]:
    return [r for r in records if r["task"] == task and r["model"] == model]


def accuracy_table(records: Iterable[dict[str, Any]], task: str, model: str) -> str:
    """Mean score per policy (rows) and keep ratio (columns); the full cache as its own row."""
    recs = _by(records, task, model)
    cells: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in recs:
        c = r["config"]
        cells[(c["policy"], c["keep"])].append(r["score"])
    keeps = sorted({k for (p, k) in cells if p != "full"}, reverse=True)
    rows = []
    if any(p == "full" for p, _ in cells):
        full = np.mean(cells[("full", 1.0)])
        rows.append([LABELS["full"]] + [f"{full:.2f}"] * len(keeps) + [len(cells[("full", 1.0)])])
    for p in POLICIES:
        if any(pp == p for pp, _ in cells):
            vals = [f"{np.mean(cells[(p, k)]):.2f}" if cells.get((p, k)) else "-" for k in keeps]
            rows.append([LABELS[p]] + vals + [len(cells.get((p, keeps[0]), []))])
    headers = ["policy"] + [f"keep {int(k * 100)}%" for k in keeps] + ["cases"]
    return tabulate(rows, headers=headers, tablefmt="github")


def plot_accuracy(records: Iterable[dict[str, Any]], task: str, model: str, out: Path) -> Path:
    plt = pyplot()

    recs = _by(records, task, model)
    fig, ax = plt.subplots(figsize=(6, 4))
    full = [r["score"] for r in recs if r["config"]["policy"] == "full"]
    if full:
        ax.axhline(np.mean(full), color="black", ls="--", label=LABELS["full"])
    for p in POLICIES:
        pts: dict[float, list[float]] = defaultdict(list)
        for r in recs:
            if r["config"]["policy"] == p:
                pts[r["config"]["keep"]].append(r["score"])
        if pts:
            ks = sorted(pts)
            ax.plot([100 * (1 - k) for k in ks], [np.mean(pts[k]) for k in ks], marker="o", label=LABELS[p])
    ax.set_xlabel("KV entries evicted (%)")
    ax.set_ylabel("mean score")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{task}: {model}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_needle_heatmaps(records: Iterable[dict[str, Any]], model: str, keep: float, out: Path) -> Path:
    """One heatmap per policy (context length x needle depth), like the paper's needle figures."""
    plt = pyplot()

    recs = _by(records, "niah", model)
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
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


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
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
