"""Short runs of every fuzz target (fuzz/: atheris, coverage-guided), and regressions for what they found.

Every input a run found is kept in fuzz/corpus/<target>/ and replayed by each run.

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
RUNS = {"gguf": 3000, "params": 3000, "session": 4000, "state": 4000}


@pytest.mark.parametrize("target", sorted(RUNS))
def test_a_short_fuzz_run_finds_nothing(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"  # new inputs go here; the committed seeds are only read
    corpus.mkdir()
    seeds = FUZZ / "corpus" / target
    cmd = [sys.executable, str(FUZZ / f"fuzz_{target}.py"), str(corpus), *([str(seeds)] if seeds.is_dir() else [])]
    # a fixed seed: CI replays the same inputs (the long, exploring runs are recorded in docs/results.md)
    cmd += [f"-runs={RUNS[target]}", "-seed=1", f"-artifact_prefix={tmp_path}/", "-rss_limit_mb=2048", "-timeout=30"]
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
        import llama_cpp

        assert llama_cpp.llama_state_save_file(m.llm.ctx, str(tmp_path / "s.state").encode(), None, 0)
        raw = bytearray((tmp_path / "s.state").read_bytes())  # llama.cpp's own state file
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


L2KV_MAGIC = b"L2KV"


def _l2kv_block(state: bytes) -> int:
    """Offset of the l2kv block (magic, version, n_layer, n_comp, p_comp_max, n_used, pos_delta, then per layer
    n_head_kv, true positions, RoPE positions, norms)."""
    at = state.find(L2KV_MAGIC)
    assert at > 0 and state.find(L2KV_MAGIC, at + 1) < 0
    return at


def _put_i32(state: bytes, at: int, value: int) -> bytes:
    return state[:at] + value.to_bytes(4, "little", signed=True) + state[at + 4 :]


def _get_i32(state: bytes, at: int) -> int:
    return int.from_bytes(state[at : at + 4], "little", signed=True)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("true_pos", -1, "a compacted entry has position -1"),  # found by fuzz_state: aborted the next eviction
        ("true_pos", 10**6, "a compacted entry has position 1000000"),
        ("rope_pos", -5, "RoPE position -5"),
        ("p_comp_max", 10**6, "last compacted position 1000000"),
        ("pos_delta", -1, "RoPE offset -1"),
    ],
)
def test_a_state_with_positions_an_eviction_cannot_have_is_refused(field: str, value: int, message: str) -> None:
    """A restored state's positions are checked before the next eviction reads them: a compacted entry's
    true position in [0, p_comp_max], its RoPE position in [0, true position], the compacted cells'
    positions ending at p_comp_max, a RoPE offset no later cell passes."""
    from l2kv_cpp.errors import InvalidParamsError

    with _fuzz_model() as m:
        m.feed(list(range(3, 60)))
        assert m.stats().n_evictions > 0
        good = m.state_data()
        at = _l2kv_block(good)
        n_comp = _get_i32(good, at + 12)
        assert n_comp > 0
        offset = {"p_comp_max": 16, "pos_delta": 24, "true_pos": 32, "rope_pos": 32 + 4 * n_comp}[field]
        with pytest.raises(InvalidParamsError, match=message):
            m.load_state_data(_put_i32(good, at + offset, value))
        assert m.stats().n_cells_used == 0  # cleared, not half restored
        m.load_state_data(good)  # the same context still loads and decodes
        m.feed([5, 6, 7])
        assert m.stats().n_evictions > 0


def test_an_archived_entry_past_the_positions_seen_is_refused() -> None:
    """An archived entry's position lies in [0, newest restored position]; its RoPE position in [0, position]."""
    from l2kv_cpp import archive
    from l2kv_cpp.errors import InvalidParamsError

    with _fuzz_model() as m:
        archive.enable(m.llm.ctx)
        m.feed(list(range(3, 60)))
        good = m.state_data()
        stats = m.stats()
        assert stats.n_evictions > 0
        # walk the block to the archive's first group (layer 0, group 0): its count, then its positions
        at = _l2kv_block(good)
        n_layer, n_comp, n_used = (_get_i32(good, at + o) for o in (8, 12, 20))
        at += 28
        for _ in range(n_layer):
            nh = _get_i32(good, at)
            at += 4 + 4 * nh * (2 * n_comp + n_used)
        assert good[at] == 1  # the archive is on
        at += 1
        at += 4 + 8 * _get_i32(good, at)  # the pinned spans
        at += 8  # the row size of layer 0
        assert _get_i32(good, at) > 0  # layer 0, group 0 archived something
        bad = _put_i32(good, at + 4, stats.pos_max + 5)
        with pytest.raises(InvalidParamsError, match="an archived entry has position"):
            m.load_state_data(bad)
        m.load_state_data(good)
        m.feed([5, 6, 7])
