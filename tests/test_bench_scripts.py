"""The benchmark scripts run end to end (on the tiny model, CPU) and print their tables.

The GPU validation (scripts/gpu_validation.sh) runs them on a borrowed GPU for a short time: a script
that fails there costs the session, so their plumbing is checked here; the numbers are not.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _run(script: str, *args: str) -> str:
    res = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=600, check=False
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_bench_long_context_prints_stock_and_eviction_rows(tiny_model):
    out = _run(
        "bench_long_context.py", "--model", str(tiny_model), "--depths", "256,512", "--budget", "128",
        "--batch", "32", "--slack", "64", "--gen-tokens", "96", "--policy", "keep-low-norm",
    )  # fmt: skip
    assert "budget 128, n_batch 32, slack 64, policy keep-low-norm" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("|    ")]
    assert [int(r[1]) for r in rows] == [256, 512]
    # 256 + 96 tokens at a budget of 128 and a slack of 64: evictions at 192, 256, 320 (and so on)
    assert all(int(r[8]) >= 3 for r in rows)


def test_bench_eviction_prints_every_part(tiny_model):
    out = _run(
        "bench_eviction.py", "--model", str(tiny_model), "--budget", "128", "--batch", "32",
        "--gen-tokens", "64", "--repeats", "1", "--no-tiny", "--positions", "cache,original",
    )  # fmt: skip
    for measure in (
        "norms off / on",
        "eviction time per event",
        "decode t/s at depth",
        "eviction per event, key-diff, cache positions",
        "eviction per event, window, original positions",
    ):
        assert measure in out, measure


def test_long_ppl_prints_one_row_per_bucket(tiny_model):
    args = ("long_ppl.py", "--model", str(tiny_model), "--tokens", "600", "--budgets", "128", "--bucket", "200")
    out = _run(*args, "--ref-context", "200", "--positions", "cache,original")
    assert "window, budget 128, cache positions" in out and "key-diff, budget 128, original positions" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "-" in line.split("|")[1]]
    assert [r[0].strip() for r in rows] == ["0-200", "200-400", "400-599"]
    assert all(len(r) == 2 + 4 and all("%)" in c for c in r[2:]) for r in rows)  # reference + 4 runs, with ratios
    assert out.count("worst bucket") == 4
    # beside one full cache of the whole text: one table per run
    out = _run(*args, "--reference", "full", "--policies", "window")
    assert "policy window, budget 128, cache positions" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "-" in line.split("|")[1]]
    assert [r.split("|")[1].strip() for r in rows] == ["0-200", "200-400", "400-599"]


def test_bench_recall_prints_every_setting_and_turn(tiny_model):
    out = _run(
        "bench_recall.py", "--model", str(tiny_model), "--n-doc", "600", "--budget", "128", "--batch", "32",
        "--n-predict", "4",
    )  # fmt: skip
    rows = [
        line.split()
        for line in out.splitlines()
        if line.split()[:1] in (["off"], ["lexical"], ["lexical:128:exchange"])
    ]
    assert [(r[0], r[1]) for r in rows] == [
        (s, str(t)) for s in ("off", "lexical", "lexical:128:exchange") for t in (1, 2, 3)
    ]
    off, on = rows[:3], rows[3:]
    assert all(float(r[2]) == 0 and float(r[6]) == 0 for r in off)  # no recall, no archive
    assert all(float(r[6]) > 0 for r in on)  # the archive holds what the document lost


def test_bench_rpc_prints_local_and_split_rows(tiny_model):
    out = _run(
        "bench_rpc.py", "--models", str(tiny_model), "--budget", "64", "--batch", "32", "--events", "2",
        "--decode", "40", "--recall", "off,lexical", "--server-threads", "1",
    )  # fmt: skip
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")]
    rows = [r for r in rows if r[0] == str(tiny_model)]
    assert [(r[1], r[2]) for r in rows] == [
        ("off", "local"), ("off", "2 rpc-servers"), ("lexical", "local"), ("lexical", "2 rpc-servers"),
    ]  # fmt: skip
    split_off, split_recall = rows[1], rows[3]
    assert float(split_off[4]) > 0 and float(split_off[5]) > 0  # bytes counted both ways
    assert float(split_off[7]) == 0 < float(split_recall[7])  # archived only with recall
    assert all(int(r[-1]) >= 1 for r in rows)  # 40 decoded tokens past a budget of 64 + slack 32 evict
