#!/usr/bin/env python3
"""Run the evaluation grid on a model and write tables and plots.

    python scripts/eval_sweep.py --model smollm2                 # the documented grid (about 20 min here)
    python scripts/eval_sweep.py --model gemma3-270m --tasks passkey,ppl
    python scripts/eval_sweep.py --model smollm2 --grid smoke    # a minute: one case per task
    python scripts/eval_sweep.py --model tiny --tasks ppl         # the 8-layer random-weight test model
    python scripts/eval_sweep.py --model smollm2 --grid long --tasks niah   # 4096 tokens in 1024 entries

Records go to results/<task>.jsonl (a run whose record exists is skipped, so an interrupted sweep
resumes); tables and plots go to docs/results/. See docs/results.md for the protocol and findings.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402,F401  (load libllama before numpy-heavy modules, see l2kv_cpp/_lib.py)

from l2kv_cpp.eval import niah, passkey, report  # noqa: E402
from l2kv_cpp.eval.qa import POLICIES, protocol  # noqa: E402
from l2kv_cpp.eval.results import ResultStore  # noqa: E402
from l2kv_cpp.eval.tasks import compressions, run_niah, run_passkey, run_ppl, uses_chat  # noqa: E402
from l2kv_cpp.models import resolve_model  # noqa: E402
from l2kv_cpp.tiny_model import TinyModelConfig, write_tiny_model  # noqa: E402
from l2kv_cpp.upstream import cache_dir  # noqa: E402

# `--model tiny`: a random-weight llama (its answers mean nothing; its KL divergence to the full
# cache still measures how much each policy changes the outputs)
TINY = TinyModelConfig(n_layer=8, head_dim=64, n_ff=512)


def tiny_model_path() -> Path:
    path = cache_dir() / "models" / "tiny-8L-hd64.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tiny_model(path, TINY)
    return path


GRIDS = {
    "smoke": {
        "passkey": [passkey.PasskeyCase(n_junk=24, depth=0.5, seed=0)],
        "passkey_keeps": (0.5,),
        "niah": [niah.NiahCase(n_tokens=600, depth=0.5)],
        "niah_keeps": (0.5,),
        "ppl_tokens": 512,
        "ppl_keeps": (0.5,),
    },
    "default": {
        "passkey": [
            passkey.PasskeyCase(n_junk=n, depth=d, seed=s) for n in (32, 64) for d in (0.1, 0.5, 0.9) for s in (0, 1)
        ],
        "passkey_keeps": (0.9, 0.7, 0.5, 0.3, 0.1),
        "niah": [niah.NiahCase(n_tokens=n, depth=d) for n in (1000, 2000) for d in (0.1, 0.5, 0.9)],
        "niah_keeps": (0.75, 0.5, 0.25),
        "ppl_tokens": 2048,
        "ppl_keeps": (0.9, 0.7, 0.5, 0.3, 0.1),
    },
    # a 4096-token needle kept in a quarter of the cache (the README's "4k in 1k"), needle task only
    "long": {
        "niah": [niah.NiahCase(n_tokens=4096, depth=d) for d in (0.1, 0.5, 0.9)],
        "niah_keeps": (0.25,),
    },
    # the product's promise, a 32k-token document in the KV memory of 4k tokens (keep 1/8), on Gemma 3
    # (32k training context); about 1.5 minutes per run on 2 cores
    "32k": {
        "niah": [niah.NiahCase(n_tokens=32768, depth=d) for d in (0.1, 0.5, 0.9)],
        "niah_keeps": (0.125,),
    },
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default="passkey,niah,ppl")
    ap.add_argument("--grid", default="default", choices=sorted(GRIDS))
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--docs", type=Path, default=Path("docs/results"))
    ap.add_argument("--cache-types", default="f16,q8_0,q4_0", help="K/V cache types, each with every policy")
    ap.add_argument(
        "--keep-system",
        default="on",
        choices=("on", "off", "both"),
        help="chat models: protect the rendered system turn (the default) or not (n_sink 4), or run both",
    )
    ap.add_argument("--policies", default=",".join(POLICIES), help="policies to run (default: all)")
    ap.add_argument("--recall", default="off", help="recall settings to run, comma-separated (off, lexical, lexical:N)")
    ap.add_argument(
        "--positions", default="cache", help="RoPE positions modes to run, comma-separated (cache, original)"
    )
    args = ap.parse_args()

    if args.model == "tiny":
        args.model = str(tiny_model_path())
    grid = GRIDS[args.grid]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model_name = resolve_model(args.model).name
    variants = {
        "policies": tuple(p.strip() for p in args.policies.split(",") if p.strip()),
        "cache_types": tuple(t.strip() for t in args.cache_types.split(",") if t.strip()),
        "recalls": tuple(r.strip() for r in args.recall.split(",") if r.strip()),
        "positions": tuple(p.strip() for p in args.positions.split(",") if p.strip()),
        # no template, no system turn: only the default runs
        "keep_system": {"on": (True,), "off": (False,), "both": (True, False)}[args.keep_system]
        if uses_chat(resolve_model(args.model))
        else (True,),
    }
    t0 = time.time()
    for task in tasks:
        store = ResultStore(args.results / f"{task}.jsonl")
        if task == "passkey":
            comps = compressions(grid["passkey_keeps"], **variants)
            run_passkey(args.model, grid["passkey"], comps, store)
        elif task == "niah":
            run_niah(args.model, grid["niah"], compressions(grid["niah_keeps"], **variants), store)
        elif task == "ppl":
            run_ppl(args.model, grid["ppl_tokens"], compressions(grid["ppl_keeps"]), store)
        else:
            ap.error(f"unknown task {task!r}")
        keeps = set(grid["ppl_keeps" if task == "ppl" else f"{task}_keeps"]) | {1.0}
        cases = [asdict(c) for c in grid.get(task, [])]
        # the store may hold runs of other grids: tables and plots show this grid's cases and ratios
        records = [
            r
            for r in store.records()
            if r["config"]["keep"] in keeps
            and (not cases or any(c.items() <= r["config"].items() for c in cases))
            and (task == "ppl" or r["config"]["protocol"] == protocol(r["config"]["policy"]))  # v1 records are void
        ]
        stem = f"{Path(model_name).stem}-{task}" + ("" if args.grid == "default" else f"-{args.grid}")
        if task == "ppl":
            table = report.ppl_table(records, model_name)
            keep = 0.5 if 0.5 in grid["ppl_keeps"] else grid["ppl_keeps"][0]
            report.plot_ppl_by_position(records, model_name, keep, args.docs / f"{stem}-by-position.png")
        else:
            table = report.accuracy_table(records, task, model_name)
            report.plot_accuracy(records, task, model_name, args.docs / f"{stem}.png")
            report.plot_accuracy_vs_memory(records, task, model_name, args.docs / f"{stem}-memory.png")
            table += "\n\nAnswers against KV memory:\n\n" + report.memory_table(records, task, model_name)
            if task == "niah":
                keep = 0.5 if 0.5 in grid["niah_keeps"] else grid["niah_keeps"][0]
                report.plot_needle_heatmaps(records, model_name, keep, args.docs / f"{stem}-heatmap.png")
        (args.docs / f"{stem}.md").write_text(table + "\n")
        print(f"\n{task} on {model_name}:\n{table}\n", flush=True)
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
