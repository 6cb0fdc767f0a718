#!/usr/bin/env python3
"""Fuzz target: session files (`run --session`): the fixed header, the checksum, the JSON and the state.
Half of the inputs get their checksum recomputed, so the fuzzer reaches the JSON and the state behind it.

    python fuzz/fuzz_session.py fuzz/corpus/session -max_total_time=60
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402,F401

with atheris.instrument_imports():
    from l2kv_cpp import session_file  # noqa: E402
    from l2kv_cpp.chat import Conversation  # noqa: E402
    from l2kv_cpp.errors import L2KVError  # noqa: E402

from common import open_model  # noqa: E402

STATE: dict = {}


def seeds() -> dict[str, bytes]:
    from l2kv_cpp.sampling import SamplingSettings

    out = {}
    with open_model() as m, tempfile.TemporaryDirectory() as tmp:
        conv = Conversation(m, chat=False)
        path = Path(tmp) / "s.session"
        session_file.save_session(conv, path)
        out["empty"] = path.read_bytes()
        for _ in conv.ask("abc def " * 6, SamplingSettings(temperature=0), 6):
            pass
        session_file.save_session(conv, path)
        out["evicted"] = path.read_bytes()
    return out


def test_one_input(data: bytes) -> None:
    if not STATE:
        STATE["model"] = open_model()
        STATE["dir"] = tempfile.mkdtemp(prefix="l2kv-fuzz-session-")
    m = STATE["model"]
    if data[:1] and data[0] & 1 and len(data) >= 48:  # a valid checksum over whatever follows it
        data = data[:16] + hashlib.sha256(data[48:]).digest() + data[48:]
    path = Path(STATE["dir"]) / "f.session"
    path.write_bytes(data)
    conv = Conversation(m, chat=False)
    try:
        session_file.load_session(conv, path)
    except L2KVError:
        pass
    m.reset()


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
