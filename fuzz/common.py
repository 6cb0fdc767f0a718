"""What the fuzz targets share: a small evicting model and valid inputs to start from (the seed corpus)."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"
BUDGET = 16


@functools.cache
def tiny_path() -> Path:
    """A 2-layer random model (small states: a seed corpus of a few KiB)."""
    from l2kv_cpp.tiny_model import TinyModelConfig, write_tiny_model

    directory = Path(os.environ.get("L2KV_FUZZ_DIR") or tempfile.mkdtemp(prefix="l2kv-fuzz-"))
    path = directory / "fuzz-tiny.gguf"
    if not path.is_file():
        write_tiny_model(path, TinyModelConfig(n_layer=2, n_head=2, n_head_kv=1, head_dim=32, n_ff=64, seed=3))
    return path


def open_model():
    from l2kv_cpp.config import L2KVConfig
    from l2kv_cpp.session import L2KVModel, ModelSettings

    return L2KVModel(tiny_path(), ModelSettings(n_batch=8, n_ubatch=8), L2KVConfig(kv_budget=BUDGET, n_recent=4))
