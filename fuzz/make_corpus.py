#!/usr/bin/env python3
"""Write the seed corpus of every fuzz target into fuzz/corpus/<target>/ (valid inputs to mutate from).

python fuzz/make_corpus.py
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402,F401
from common import CORPUS  # noqa: E402

TARGETS = ("state", "session", "params", "gguf")


def main() -> int:
    for name in TARGETS:
        module = importlib.import_module(f"fuzz_{name}")
        out = CORPUS / name
        out.mkdir(parents=True, exist_ok=True)
        for seed, data in module.seeds().items():
            (out / seed).write_bytes(data)
            print(f"{out / seed}: {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
