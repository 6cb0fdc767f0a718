#!/usr/bin/env python3
"""Eviction with layers on rpc-servers (llama.cpp's RPC backend) against the same run local. Prints a table.

    python scripts/bench_rpc.py                                 # SmolLM2 and the Llama-3.2-1B cache shape
    python scripts/bench_rpc.py --models smollm2 --budget 1024 --server-threads 2

Two l2kv-rpc-server processes on 127.0.0.1 hold the last 2/3 of the layers (split by their free memory), the
client's CPU the first third; every connection goes through a byte-counting relay (l2kv_cpp.rpc_testing). Per
model and recall setting, in one run:
  - per eviction (llama_l2kv_evict_now after a 128-token chunk, so the traffic is the eviction's alone): the
    library's ms, the bytes client -> servers and servers -> client, and the K/V bytes the compaction moved
    inside the servers' layers (what one trip through the client would cost, each way);
  - decode tokens/s, one token at a time past the budget (evictions included), local and split.
With recall on, the archive (host RAM of the client) receives the evicted rows, gathered on the servers: that
traffic is by design (its own column).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402, F401  (before numpy, see l2kv_cpp/_lib.py)
import numpy as np  # noqa: E402
from tabulate import tabulate  # noqa: E402

from l2kv_cpp import cache  # noqa: E402
from l2kv_cpp.config import L2KVConfig  # noqa: E402
from l2kv_cpp.gguf_file import GGUFFile, read_gguf  # noqa: E402
from l2kv_cpp.models import resolve_model  # noqa: E402
from l2kv_cpp.recall import RecallSettings  # noqa: E402
from l2kv_cpp.rpc_testing import LocalServers, TrafficCounter  # noqa: E402
from l2kv_cpp.session import L2KVModel, ModelSettings  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eviction import synthetic_model  # noqa: E402


def head_row_bytes(gg: GGUFFile) -> int:
    """K + V bytes of one (layer, cell, KV head) entry in an f16 cache: what n_moved_rows counts."""
    head = gg.arch_value("attention.key_length", 0) or gg.arch_value("embedding_length", 0) // gg.arch_value(
        "attention.head_count", 1
    )
    return 2 * 2 * int(head)


def n_head_kv(gg: GGUFFile) -> int:
    return int(gg.arch_value("attention.head_count_kv", 0) or gg.arch_value("attention.head_count", 1))


def run(path: Path, rpc: tuple[str, ...], relays: list[TrafficCounter], args, recall: str) -> dict[str, float]:
    gg = read_gguf(path)
    n_layer = gg.arch_value("block_count", 0)
    ngl = (2 * n_layer) // 3 if rpc else 0
    settings = ModelSettings(n_batch=args.batch, n_ubatch=args.batch, rpc=rpc, n_gpu_layers=ngl, n_threads=args.threads)
    config = L2KVConfig(kv_budget=args.budget, recall=RecallSettings.parse(recall))
    vocab = gg.n_vocab
    toks = np.random.default_rng(0).integers(10, min(vocab, 30000), size=args.budget + 8 * 128 + 512).tolist()
    with L2KVModel(path, settings, config) as m:
        m.feed(toks[: args.budget])
        pos = args.budget
        ms, sent, received, moved, archived = [], [], [], [], []
        row = head_row_bytes(gg)
        nh = n_head_kv(gg)
        for _ in range(args.events):
            m.feed(toks[pos : pos + 128])
            pos += 128
            st0 = m.stats()
            before = [r.snapshot() for r in relays]
            cache.evict_now(m.llm.ctx)
            st = m.stats()
            deltas = [r.since(b) for r, b in zip(relays, before, strict=True)]
            ms.append(st.t_evict_ms - st0.t_evict_ms)
            sent.append(sum(d[0] for d in deltas))
            received.append(sum(d[1] for d in deltas))
            # the moved (layer, cell, head) rows of the servers' layers (their share of the layers), K + V bytes
            moved.append((st.n_moved_rows - st0.n_moved_rows) * ngl / n_layer * row)
            # with recall: the dropped entries of the servers' layers, K + V + the key norm per head
            archived.append((st.n_dropped - st0.n_dropped) * ngl * nh * (row + 4) if recall != "off" else 0)
        t0 = time.perf_counter()
        ev0 = m.stats().n_evictions
        for i in range(args.decode):
            m.feed([toks[pos + i]])
        dt = time.perf_counter() - t0
        n_ev = m.stats().n_evictions - ev0
    return {
        "ms": float(np.median(ms)),
        "sent": float(np.median(sent)),
        "received": float(np.median(received)),
        "moved": float(np.median(moved)),
        "archived": float(np.median(archived)),
        "tps": args.decode / dt,
        "decode_evictions": n_ev,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,llama-3.2-1b", help="comma-separated: model names or synthetic shapes")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256, help="n_batch (the eviction slack)")
    ap.add_argument("--events", type=int, default=5, help="evictions measured per run (medians)")
    ap.add_argument("--decode", type=int, default=300, help="tokens decoded one at a time for the t/s column")
    ap.add_argument("--recall", default="off,lexical", help="comma-separated recall settings")
    ap.add_argument("--threads", type=int, default=None, help="client CPU threads")
    ap.add_argument("--server-threads", type=int, default=2)
    ap.add_argument(
        "--server-wait",
        choices=("passive", "active"),
        default="passive",
        help="the servers' OMP_WAIT_POLICY (active: OpenMP workers spin after each graph, its default)",
    )
    args = ap.parse_args()

    rows = []
    with LocalServers(2, threads=args.server_threads, omp_wait_policy=args.server_wait) as endpoints:
        relays = [TrafficCounter(ep) for ep in endpoints]
        try:
            for name in args.models.split(","):
                path = synthetic_model(name) if name == "llama-3.2-1b" else resolve_model(name)
                for recall in args.recall.split(","):
                    local = run(path, (), [], args, recall)
                    split = run(path, tuple(r.endpoint for r in relays), relays, args, recall)
                    for where, r in (("local", local), ("2 rpc-servers", split)):
                        rows.append(
                            [
                                name,
                                recall,
                                where,
                                f"{r['ms']:.1f}",
                                f"{r['sent'] / 1024:.0f}" if where != "local" else "",
                                f"{r['received'] / 1024:.0f}" if where != "local" else "",
                                f"{r['moved'] / 1024:.0f}" if where != "local" else "",
                                f"{r['archived'] / 1024:.0f}" if where != "local" else "",
                                f"{r['tps']:.1f}",
                                r["decode_evictions"],
                            ]
                        )
                    print(f"{name}, recall {recall}: decode split/local {split['tps'] / local['tps']:.2f}", flush=True)
        finally:
            for r in relays:
                r.close()
    headers = [
        "model",
        "recall",
        "layers",
        "ms / eviction",
        "KiB sent / eviction",
        "KiB received / eviction",
        "K/V KiB moved on the servers",
        "KiB archived from the servers",
        "decode t/s",
        "evictions in decode",
    ]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print(f"budget {args.budget}, n_batch {args.batch}, server threads {args.server_threads}, "
          f"servers' OMP_WAIT_POLICY {args.server_wait}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
