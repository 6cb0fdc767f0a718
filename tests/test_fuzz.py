"""Short runs of every fuzz target (fuzz/: atheris, coverage-guided), and regressions for what they found.

The long runs are recorded in docs/results.md; here each target runs a bounded number of inputs in a child
process, which must end without a finding (a crash, an out-of-memory, a timeout or an uncaught exception).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FUZZ = REPO_ROOT / "fuzz"
RUNS = {"gguf": 3000, "params": 3000, "session": 1500, "state": 1500}


@pytest.mark.parametrize("target", sorted(RUNS))
def test_a_short_fuzz_run_finds_nothing(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"  # new inputs go here; the committed seeds are only read
    corpus.mkdir()
    seeds = FUZZ / "corpus" / target
    cmd = [sys.executable, str(FUZZ / f"fuzz_{target}.py"), str(corpus), *([str(seeds)] if seeds.is_dir() else [])]
    cmd += [f"-runs={RUNS[target]}", f"-artifact_prefix={tmp_path}/", "-rss_limit_mb=2048", "-timeout=30"]
    env = {**os.environ, "L2KV_FUZZ_DIR": str(tmp_path)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    findings = [p.name for p in tmp_path.iterdir() if p.name.split("-")[0] in ("crash", "oom", "timeout", "leak")]
    tail = "\n".join(res.stderr.splitlines()[-30:])
    assert res.returncode == 0 and not findings, f"{findings}\n{tail}"
    assert f"Done {RUNS[target]} runs" in res.stderr, tail


def _fuzz_model():
    sys.path.insert(0, str(FUZZ))
    try:
        from common import open_model
    finally:
        sys.path.remove(str(FUZZ))
    return open_model()


def test_a_state_whose_first_length_is_damaged_is_refused_not_allocated(tmp_path: Path) -> None:
    """Found by fuzz_state: llama.cpp sizes the architecture name's buffer from the state before checking
    the state holds it (4 damaged bytes asked for 4 GiB); the model checks the name first."""
    from l2kv_cpp.errors import InvalidParamsError

    with _fuzz_model() as m:
        good = m.state_data()
        bad = b"\xff\x0a\x2a\xff" + good[4:]
        with pytest.raises(InvalidParamsError, match="not a state of this llama model"):
            m.load_state_data(bad)
        m.save_state(tmp_path / "s.state")
        raw = bytearray((tmp_path / "s.state").read_bytes())
        raw[12:16] = b"\xff\xff\xff\x7f"
        (tmp_path / "s.state").write_bytes(bytes(raw))
        with pytest.raises(InvalidParamsError, match="not a state of this llama model"):
            m.load_state(tmp_path / "s.state")
        m.load_state_data(good)  # the context still works
        m.feed([5, 6, 7])


def test_an_archive_count_past_the_positions_seen_is_refused() -> None:
    """Found by fuzz_state: the archive's per-group count sized its buffers before they were read (a damaged
    count asked for any memory); it cannot exceed the positions restored."""
    from l2kv_cpp.errors import InvalidParamsError

    with _fuzz_model() as m:
        good = m.state_data()  # empty, archive on: the state ends with the last group's count (0)
        assert good[-4:] == bytes(4)
        with pytest.raises(InvalidParamsError, match="more than the 0 positions seen"):
            m.load_state_data(good[:-4] + (0x00FF0000).to_bytes(4, "little"))
        m.load_state_data(good)
        m.feed([5, 6, 7])
