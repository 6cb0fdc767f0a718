#!/usr/bin/env python3
"""Fuzz target: GGUF headers through check_gguf (what every command runs before llama.cpp sees a file).
Anything but a ModelError, a hang or a crash is a finding.

    python fuzz/fuzz_gguf.py fuzz/corpus/gguf -max_total_time=60
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports():
    from l2kv_cpp.errors import ModelError  # noqa: E402
    from l2kv_cpp.gguf_file import check_gguf  # noqa: E402

from common import tiny_path  # noqa: E402

STATE: dict = {}


def seeds() -> dict[str, bytes]:
    data = tiny_path().read_bytes()
    header_end = 4096  # the metadata and tensor infos of the 2-layer model, without most of the weights
    return {"tiny-head": data[:header_end], "magic": b"GGUF\x03\x00\x00\x00" + bytes(16)}


def test_one_input(data: bytes) -> None:
    if not STATE:
        STATE["path"] = Path(tempfile.mkdtemp(prefix="l2kv-fuzz-gguf-")) / "f.gguf"
    path = STATE["path"]
    path.write_bytes(data)
    try:
        check_gguf(path)
    except ModelError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
