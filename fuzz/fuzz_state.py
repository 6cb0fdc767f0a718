#!/usr/bin/env python3
"""Fuzz target: bytes into llama_state_set_data on an evicting context (the l2kv block: norms, true and RoPE
positions, the archive). Any input may be refused (InvalidParamsError); none may crash, hang or leave a
context that fails its next decode.

The parser is C++ built without coverage instrumentation (gcc), so raw mutations get no guidance and rarely
get past the first field. The input is therefore a recipe applied to a valid state (one of the seeds, made
at start): which seed, then edits (bit flips, bytes set, runs of zeros or 0xff, a truncation, bytes
inserted) at positions the input chooses; the recipe's branches are instrumented Python.

    python fuzz/fuzz_state.py -max_total_time=60
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402,F401  (libllama before numpy)

with atheris.instrument_imports():
    from l2kv_cpp.errors import L2KVError  # noqa: E402
    from l2kv_cpp.session import L2KVModel  # noqa: E402,F401

from common import open_model  # noqa: E402

MODEL = None
SEEDS: list[bytes] = []


def seeds() -> dict[str, bytes]:
    """Valid states: empty, before and after evictions, with the archive on."""
    from l2kv_cpp import archive

    out = {}
    with open_model() as m:
        out["empty"] = m.state_data()
        m.feed(list(range(3, 15)))
        out["short"] = m.state_data()
        m.feed(list(range(20, 60)))
        assert m.stats().n_evictions > 0
        out["evicted"] = m.state_data()
        archive.enable(m.llm.ctx)
        m.feed(list(range(60, 100)))
        out["archived"] = m.state_data()
    return out


@atheris.instrument_func
def damaged(data: bytes) -> bytes:
    """A valid state edited as the input says."""
    fdp = atheris.FuzzedDataProvider(data)
    out = bytearray(SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)])
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        if not out:
            break
        i = fdp.ConsumeIntInRange(0, len(out) - 1)
        op = fdp.ConsumeIntInRange(0, 5)
        if op == 0:
            out[i] ^= 1 << fdp.ConsumeIntInRange(0, 7)
        elif op == 1:
            out[i] = fdp.ConsumeIntInRange(0, 255)
        elif op == 2:
            n = fdp.ConsumeIntInRange(1, 64)
            out[i : i + n] = bytes(len(out[i : i + n]))
        elif op == 3:
            n = fdp.ConsumeIntInRange(1, 8)
            out[i : i + n] = b"\xff" * len(out[i : i + n])
        elif op == 4:
            del out[i:]
        else:
            out[i:i] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16))
    return bytes(out)


def test_one_input(data: bytes) -> None:
    global MODEL
    if MODEL is None:
        MODEL = open_model()
        SEEDS.extend(seeds().values())
    m = MODEL
    try:
        m.load_state_data(damaged(data))
    except L2KVError:
        m.reset()
        return
    m.feed([5, 6, 7])  # a restored state must decode
    m.reset()


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
