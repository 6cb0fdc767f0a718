#!/usr/bin/env python3
"""Dev-only cross-check of our scorers against NVIDIA kvpress (an independent implementation).

    python scripts/crosscheck_kvpress.py --kvpress-python /path/to/venv-with-kvpress/bin/python
    python scripts/crosscheck_kvpress.py --model gemma3-270m --kvpress-python ...

kvpress is never a dependency of l2kv-cpp: it needs torch and transformers. Make a separate venv
(`python -m venv kvp && kvp/bin/pip install torch kvpress gguf`) and pass its python. Two steps:
1. here (the project's venv, patched llama.cpp): decode an essay excerpt with eviction enabled
   and a budget it never reaches, read every budgeted layer's key norms (`read_layer`) and
   KeyDiff cosines (`read_key_cosines`), and save them with the token ids;
2. in the kvpress venv (this file re-run with --kvpress-side): load the same GGUF in transformers
   (`gguf_file=`, dequantized to float32), run the same token ids, and score the cached keys with
   kvpress's KnormPress and KeyDiffPress.
It prints, per layer, the Spearman rank correlation between our feature and kvpress's score over
all (token, KV head) entries. The two runtimes compute the keys differently (llama.cpp's quantized
matmuls and f16 cache vs. transformers on dequantized float32 weights), so agreement is a high
correlation, not equality; a sign or definition error (pre- vs. post-RoPE keys, the anchor) would
show as a low or negative one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

N_TOKENS = 512


def native_side(model: str, out: Path) -> Path:
    """Write the token ids and our features to `out`; returns the GGUF path."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import llama_cpp  # noqa: F401  (before numpy, see l2kv_cpp/_lib.py)
    import numpy as np

    from l2kv_cpp import cache
    from l2kv_cpp.config import L2KVConfig
    from l2kv_cpp.decode import decode
    from l2kv_cpp.eval import niah
    from l2kv_cpp.models import resolve_model

    path = resolve_model(model)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_batch=256, flash_attn=True, verbose=False)
    try:
        ids = llm.tokenize(niah.corpus_text()[:20000].encode(), add_bos=True)[:N_TOKENS]
        cache.enable(llm.ctx, L2KVConfig(kv_budget=1024, skip_layers=()))
        decode(llm, ids, 0)
        arrays = {"ids": np.array(ids, dtype=np.int64)}
        n_layer = int(llm.metadata[f"{llm.metadata['general.architecture']}.block_count"])
        for il in range(n_layer):
            try:
                norms, _ = cache.read_layer(llm.ctx, il)
            except Exception:  # a sliding-window layer: not in the budgeted cache
                continue
            arrays[f"norm_{il}"] = norms[: len(ids)]
            arrays[f"cos_{il}"] = cache.read_key_cosines(llm.ctx, il)[: len(ids)]
        np.savez(out, **arrays)
    finally:
        llm.close()
    return path


def kvpress_side(gguf: Path, data: Path) -> None:
    import numpy as np
    import torch
    from kvpress import KeyDiffPress, KnormPress
    from transformers import AutoModelForCausalLM

    arrays = np.load(data)
    ids = torch.tensor(arrays["ids"])[None]
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model(ids, use_cache=True)
    kv = out.past_key_values

    def spearman(a: np.ndarray, b: np.ndarray) -> float:
        ra = np.argsort(np.argsort(a)).astype(np.float64)
        rb = np.argsort(np.argsort(b)).astype(np.float64)
        return float(np.corrcoef(ra, rb)[0, 1])

    print(f"{'layer':>5}  {'norm vs KnormPress':>18}  {'cosine vs KeyDiffPress':>22}")
    worst = {"norm": 1.0, "cos": 1.0}
    for name in sorted((k for k in arrays.files if k.startswith("cos_")), key=lambda k: int(k[4:])):
        il = int(name[4:])
        keys = kv.layers[il].keys  # [1, n_head_kv, n_tokens, head_dim], post-RoPE as cached
        # kvpress keeps the highest score: KnormPress = -norm, KeyDiffPress = -cosine; ours keep the lowest
        knorm = -KnormPress().score(None, None, keys, None, None, {})[0].T.numpy()
        kdiff = -KeyDiffPress().score(None, None, keys, None, None, {})[0].T.numpy()
        ours_norm, ours_cos = arrays[f"norm_{il}"], arrays[name]
        n = min(len(ours_cos), kdiff.shape[0])
        r_norm = spearman(ours_norm[:n].ravel(), knorm[:n].ravel())
        r_cos = spearman(ours_cos[:n].ravel(), kdiff[:n].ravel())
        worst = {"norm": min(worst["norm"], r_norm), "cos": min(worst["cos"], r_cos)}
        print(f"{il:>5}  {r_norm:>18.4f}  {r_cos:>22.4f}")
    print(f"lowest over layers: norm {worst['norm']:.4f}, cosine {worst['cos']:.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--kvpress-python", help="python of a venv with torch, transformers, kvpress, gguf")
    ap.add_argument("--kvpress-side", nargs=2, metavar=("GGUF", "NPZ"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.kvpress_side:
        kvpress_side(Path(args.kvpress_side[0]), Path(args.kvpress_side[1]))
        return 0
    if not args.kvpress_python:
        ap.error("--kvpress-python is required (kvpress is not a dependency of this project)")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "native.npz"
        gguf = native_side(args.model, data)
        quiet = {
            **os.environ,
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "TQDM_DISABLE": "1",
        }
        return subprocess.call([args.kvpress_python, __file__, "--kvpress-side", str(gguf), str(data)], env=quiet)


if __name__ == "__main__":
    sys.exit(main())
