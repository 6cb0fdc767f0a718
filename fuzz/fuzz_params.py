#!/usr/bin/env python3
"""Fuzz target: every field of llama_l2kv_params given to llama_l2kv_enable (then a few decodes). Bad values
must come back as an error status with a reason in llama_l2kv_last_error, never a crash.

    python fuzz/fuzz_params.py -max_total_time=60
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402,F401

with atheris.instrument_imports():
    from l2kv_cpp import cache  # noqa: E402,F401
    from l2kv_cpp._ffi import native  # noqa: E402

from common import open_model  # noqa: E402

STATE: dict = {}


def seeds() -> dict[str, bytes]:
    return {"zeros": bytes(64), "small": bytes([16, 0, 0, 0, 8, 0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0, 4] + [0] * 47)}


def test_one_input(data: bytes) -> None:
    if not STATE:
        STATE["model"] = open_model()
    m = STATE["model"]
    nat = native()
    fdp = atheris.FuzzedDataProvider(data)
    p = nat.ffi.new("struct llama_l2kv_params *")
    p.kv_budget = fdp.ConsumeIntInRange(0, 2**32 - 1) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 64)
    p.n_slack = fdp.ConsumeIntInRange(0, 2**32 - 1) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 64)
    p.n_sink = fdp.ConsumeIntInRange(0, 2**32 - 1) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 32)
    p.n_recent = fdp.ConsumeIntInRange(0, 2**32 - 1) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 32)
    p.policy = fdp.ConsumeIntInRange(-(2**31), 2**31 - 1) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(-1, 7)
    p.per_head = fdp.ConsumeBool()
    p.seed = fdp.ConsumeIntInRange(0, 2**64 - 1)
    n_skip = fdp.ConsumeIntInRange(-3, 4)
    skip = nat.ffi.new("int32_t[]", [fdp.ConsumeIntInRange(-5, 5) for _ in range(max(n_skip, 0))] or [0])
    p.n_skip_layers = n_skip
    p.skip_layers = skip if n_skip > 0 or fdp.ConsumeBool() else nat.ffi.NULL
    p.positions = fdp.ConsumeIntInRange(-(2**31), 2**31 - 1) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(-1, 3)
    ctx = nat.ctx_ptr(m.llm.ctx)
    status = nat.lib.llama_l2kv_enable(ctx, p)
    if status < 0:
        assert nat.ffi.string(nat.lib.llama_l2kv_last_error()), "an error status without a reason"
    else:
        m.reset()
        m.feed(list(range(3, 3 + fdp.ConsumeIntInRange(1, 40))))
    m.reset()


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
