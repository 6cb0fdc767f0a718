"""The `l2kv-cpp` command line: doctor, models and run, including their bad-input paths."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from l2kv_cpp.cli import main


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env)


@pytest.mark.slow
def test_doctor_succeeds_on_this_installation(smollm2_path, gemma_path):
    res = invoke("doctor")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert all(line.startswith(("ok", " ")) for line in lines), res.stdout
    for name in ("libllama", "flash attention", "default model smollm2", "model gemma3-270m", "backends"):
        assert any(name in line for line in lines), name
    assert "CPU" in res.stdout


def test_doctor_with_a_model_loads_it(tiny_model):
    res = invoke("doctor", str(tiny_model))
    assert str(tiny_model) in res.stdout and "loads" in res.stdout


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda tmp: tmp / "missing.gguf", "model file not found"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: (tmp / "notes.gguf", (tmp / "notes.gguf").write_text("hello"))[0], "not a GGUF model file"),
    ],
)
@pytest.mark.parametrize("command", ["doctor", "run"])
def test_bad_model_paths_give_one_line_and_exit_1(tmp_path, make_bad, message, command):
    res = invoke(command, str(make_bad(tmp_path)))
    assert res.exit_code == 1
    errors = res.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("Error: ") and message in errors[0], res.stderr
    assert "Traceback" not in res.output


def test_missing_default_model_points_at_fetch(tmp_path):
    res = invoke("run", "-n", "1", env={"L2KV_MODELS_DIR": str(tmp_path)})
    assert res.exit_code == 1
    assert "l2kv-cpp models --fetch smollm2" in res.stderr


TINY_RUN = ["--kv-budget", "64", "-b", "32", "-ub", "32", "--temp", "0"]


def test_run_on_tiny_model_json(tiny_model):
    res = invoke("run", str(tiny_model), "-p", "abc", "-n", "5", "--json", *TINY_RUN)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n_generated_tokens"] <= 5 and out["text"]
    assert out["chat_template"] is False
    assert out["model"] == str(tiny_model)
    assert out["kv"]["enabled"] and out["kv"]["kv_budget"] == 64


def test_run_ignore_eos_answers_exactly_n_tokens(tiny_model):
    # seed 2 at this temperature samples the end token after 166 tokens on the tiny model
    args = ["run", str(tiny_model), "-p", "abc", "-n", "300", "--json", "--kv-budget", "64", "-b", "32"]
    args += ["--temp", "1.5", "--top-k", "0", "--min-p", "0", "--seed", "2"]
    free = json.loads(invoke(*args).stdout)
    assert free["finish_reason"] == "stop" and free["n_generated_tokens"] < 300
    forced = json.loads(invoke(*args, "--ignore-eos").stdout)
    assert forced["finish_reason"] == "length" and forced["n_generated_tokens"] == 300


def test_run_with_recall_reports_its_archive(tiny_model, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("the sky is blue. " * 60 + "the pass key is 123. " + "the grass is green. " * 60)
    res = invoke("run", str(tiny_model), "-f", str(doc), "-p", "pass key?", "-n", "3", "--json", "--recall", "lexical",
                 *TINY_RUN)  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["kv"]["n_evictions"] > 0
    ar = out["archive"]
    assert ar["enabled"] and ar["n_entries"] > 0 and ar["n_bytes"] > 0 and ar["n_recalls"] == 1
    assert out["recalled_spans"] and all(a < b for a, b in out["recalled_spans"])
    off = json.loads(invoke("run", str(tiny_model), "-f", str(doc), "-p", "pass key?", "-n", "3", "--json",
                            "--recall", "off", *TINY_RUN).stdout)  # fmt: skip
    assert not off["archive"]["enabled"] and off["archive"]["n_entries"] == 0 and off["recalled_spans"] == []


def test_run_far_past_the_buffer_keeps_memory_bounded(tiny_model):
    res = invoke("run", str(tiny_model), "-p", "hello", "-n", "800", "--json", "--ignore-eos", *TINY_RUN)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["finish_reason"] == "length"
    kv = json.loads(res.stdout)["kv"]
    assert kv["pos_max"] >= 8 * (64 + 32)  # far past budget + batch = 96 cells
    assert kv["n_cells_used"] <= 64 + 32 and kv["n_evictions"] >= 20


def test_run_says_once_when_the_conversation_passes_the_training_context(tmp_path):
    """With original positions eviction bounds memory, not RoPE distances (docs/results.md): the run notes,
    once, where the model leaves its training context (here a tiny model trained for 256 tokens); with the
    positions inside the cache (the default) there is nothing to note."""
    from l2kv_cpp.tiny_model import TinyModelConfig, write_tiny_model

    model = write_tiny_model(tmp_path / "short.gguf", TinyModelConfig(seed=1, n_ctx_train=256))
    doc = tmp_path / "doc.txt"
    doc.write_text("abc " * 150)
    args = ("run", str(model), "-f", str(doc), "-p", "x", "-n", "200", *TINY_RUN)
    res = invoke(*args, "--positions", "original")
    assert res.exit_code == 0, res.output
    assert res.stderr.count("past the model's 256-token training context") == 1
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    # renumbered before positions pass max(budget + slack, min(4 (budget + slack), 3/4 x 256)) = 192
    assert json.loads(invoke(*args, "--json").stdout)["kv"]["rope_pos_max"] < 192
    assert "training context" not in res.stderr
    doc.write_text("abc " * 20)
    res = invoke("run", str(model), "-f", str(doc), "-p", "x", "-n", "20", *TINY_RUN)
    assert res.exit_code == 0, res.output
    assert "training context" not in res.stderr


def test_options_read_environment_variables(tiny_model):
    res = invoke("run", str(tiny_model), "--json", "-p", "x", *TINY_RUN, env={"L2KV_RUN_N_PREDICT": "3"})
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_generated_tokens"] <= 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kv-budget", "0"], "--kv-budget must be >= 1 (got 0)"),
        (["--kv-budget", "8", "--n-sink", "4", "--n-recent", "4"], "n_sink + n_recent must be < kv_budget"),
        (["--skip-layers", "9"], "skip layer 9 is out of range [0, 4)"),
        (["--skip-layers", "a,b"], "--skip-layers must be comma-separated"),
        (["-fa", "off"], "eviction needs flash attention"),
        (["-fa", "off", "-ctv", "q8_0"], "-ctv q8_0 (a quantized V cache) needs flash attention"),
        (["-c", "64"], "-c/--ctx-size 64 is too small for kv_budget 64 + n_batch 32"),
        (["--kv-slack", "16"], "n_slack (16) must be 0 (n_batch) or >= n_batch (32): a batch is stored whole"),
        (["--kv-slack", "128", "-c", "160"], "-c/--ctx-size 160 is too small for kv_budget 64 + n_slack 128"),
        (["-f", "/nonexistent/doc.txt"], "-f/--file: /nonexistent/doc.txt does not exist"),
        (["--recall", "semantic"], "recall 'semantic': expected MODE[:N_TOKENS][:exchange][:disk]"),
        (["--recall", "lexical:0"], "recall 'lexical:0'"),
    ],
)
def test_bad_run_input_is_one_line(tiny_model, args, message):
    base = ["--kv-budget", "64", "-b", "32", "-ub", "32"]
    res = invoke("run", str(tiny_model), "-p", "x", "-n", "2", *base, *args)
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.output


@pytest.mark.parametrize("args", [["-n", "-2"], ["--policy", "best"], ["--temp", "-1"], ["-fa", "maybe"]])
def test_out_of_range_flags_are_usage_errors(tiny_model, args):
    res = invoke("run", str(tiny_model), *args)
    assert res.exit_code == 2
    assert "Invalid value" in res.stderr


def test_json_needs_a_prompt(tiny_model):
    res = invoke("run", str(tiny_model), "--json")
    assert res.exit_code == 2 and "--json needs -p/--prompt" in res.stderr


def test_help_shows_defaults():
    res = invoke("run", "--help")
    assert res.exit_code == 0
    for text in ("--kv-budget", "[default: 4096]", "--policy", "keep-low-norm", "-ctk", "-ngl", "--top-p"):
        assert text in res.stdout, text


def test_info_on_tiny_model(tiny_model):
    res = invoke("info", str(tiny_model), "--kv-budget", "1024")
    assert res.exit_code == 0, res.output
    assert "4 full attention (budgeted), 0 sliding window" in res.stdout
    # 4 layers x 2 KV heads x (32 + 32) x 2 bytes = 1024 bytes per token in f16
    assert "| f16          | 1.0 KiB" in res.stdout
    # the buffer with eviction holds kv_budget + slack cells: (1024 + 512) KiB, (1024 + 2048) KiB
    assert "| 1.5 MiB " in res.stdout and "+ batch 512 cells" in res.stdout
    # the archive per evicted token: 1024 bytes of K/V + 8 KV heads x (norm + true and RoPE position) = 1120 bytes
    f16 = next(line for line in res.stdout.splitlines() if line.startswith("| f16"))
    assert f16.rstrip("| ").endswith("1.1 KiB")
    assert (
        "RoPE positions cache: kept keys renumbered" in res.stdout and "positions < 3072 at any length" in res.stdout
    )  # min(4 x 1536, 3/4 x 4096)
    res_orig = invoke("info", str(tiny_model), "--positions", "original")
    assert res_orig.exit_code == 0 and "RoPE positions original: keys keep their positions" in res_orig.stdout
    res = invoke("info", str(tiny_model), "--kv-budget", "1024", "--kv-slack", "2048")
    assert res.exit_code == 0, res.output
    assert "| 3.0 MiB " in res.stdout and "+ slack 2048 cells" in res.stdout


@pytest.mark.slow
def test_info_on_gemma3_shows_the_sliding_window(gemma_path):
    res = invoke("info", "gemma3-270m")
    assert res.exit_code == 0, res.output
    assert "18: 3 full attention (budgeted), 15 sliding window" in res.stdout
    assert "sliding window 512" in res.stdout


@pytest.mark.slow
def test_models_lists_both_with_hash_status(smollm2_path, gemma_path):
    res = invoke("models", "--json")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in map(json.loads, res.stdout.splitlines())}
    assert rows["smollm2"]["default"] and rows["smollm2"]["architecture"] == "llama"
    assert rows["gemma3-270m"]["architecture"] == "gemma3"
    assert all(r["sha256_ok"] for r in rows.values())


def test_fetch_of_unknown_model_is_refused():
    res = invoke("models", "--fetch", "llama-70b")
    assert res.exit_code == 1
    assert "unknown model 'llama-70b'" in res.stderr


def test_summary_line_says_when_the_buffer_is_larger_than_the_chat():
    from types import SimpleNamespace

    from l2kv_cpp.runner import summary_line

    def model(kv_mib: float, full_mib: float):
        stats = SimpleNamespace(n_cells_used=70, n_evictions=0)
        report = {"kv_mib": kv_mib, "full_cache_mib": full_mib, "tokens_seen": 70.0}
        return SimpleNamespace(stats=lambda: stats, memory_report=lambda: report)

    short = summary_line(model(102.8, 1.3), None)
    assert "102.8 MiB fixed buffer (full cache so far: 1.3 MiB)" in short and " vs " not in short
    long = summary_line(model(28.1, 230.6), None)
    assert "28.1 MiB vs 230.6 MiB full" in long


def test_session_resumes_a_conversation_bit_for_bit(tiny_model, tmp_path):
    """Two one-shot runs through one session file answer the second prompt exactly like one process
    that ran both (which, with greedy sampling, compares the restored cache with the original)."""
    from l2kv_cpp.chat import Conversation
    from l2kv_cpp.sampling import SamplingSettings
    from l2kv_cpp.session import L2KVModel, ModelSettings

    session = tmp_path / "chat.session"
    one_shot = ("run", str(tiny_model), "--json", "--session", str(session), *TINY_RUN)
    first = invoke(*one_shot, "-p", "abc " * 30, "-n", "40")
    assert first.exit_code == 0, first.output
    assert session.is_file() and "[saved" in first.stderr
    second = invoke(*one_shot, "-p", "xyz", "-n", "20")
    assert second.exit_code == 0, second.output
    assert "[resumed" in second.stderr
    resumed = json.loads(second.stdout)
    assert resumed["kv"]["pos_max"] > json.loads(first.stdout)["kv"]["pos_max"]  # the cache grew on top of the first

    settings = ModelSettings(n_batch=32, n_ubatch=32)
    greedy = SamplingSettings(temperature=0)
    with L2KVModel(tiny_model, settings, L2KVConfigForCli()) as m:
        conv = Conversation(m)
        for _ in conv.ask("abc " * 30, greedy, 40):
            pass
        assert m.stats().n_evictions >= 1  # the saved cache had been evicted
        text = "".join(r.text for r in conv.ask("xyz", greedy, 20))
    assert resumed["text"] == text


def L2KVConfigForCli():  # the eviction settings TINY_RUN gives the CLI
    from l2kv_cpp.config import L2KVConfig

    return L2KVConfig(kv_budget=64)


def test_session_errors_are_one_line_and_keep_the_file(tiny_model, tmp_path):
    res = invoke("run", str(tiny_model), "-p", "abc", "--session", str(tmp_path / "no" / "such" / "dir.session"))
    assert res.exit_code == 1 and "cannot write into" in res.output
    res = invoke("run", str(tiny_model), "-p", "abc", "--session", str(tmp_path))
    assert res.exit_code == 1 and "is a directory" in res.output
    bad = tmp_path / "bad.session"
    bad.write_bytes(b"not a session")
    res = invoke("run", str(tiny_model), "-p", "abc", "--session", str(bad), *TINY_RUN)
    assert res.exit_code == 1 and "not an l2kv-cpp session file" in res.output
    assert bad.read_bytes() == b"not a session"  # never overwritten
    # a session of another model is refused
    other = tmp_path / "other.gguf"
    other.write_bytes(tiny_model.read_bytes())
    session = tmp_path / "s.session"
    assert invoke("run", str(other), "-p", "abc", "-n", "2", "--session", str(session), *TINY_RUN).exit_code == 0
    res = invoke("run", str(tiny_model), "-p", "abc", "--session", str(session), *TINY_RUN)
    assert res.exit_code == 1 and "was saved with model other.gguf" in res.output
    # another cache type does not fit (llama.cpp checks the K/V types of the state)
    res = invoke("run", str(other), "-p", "abc", "--session", str(session), "-ctk", "bf16", *TINY_RUN)
    assert res.exit_code == 1 and "does not fit this context" in res.output
    assert invoke("run", str(other), "-p", "abc", "-n", "2", "--session", str(session), *TINY_RUN).exit_code == 0
    # damaged files: a truncated state, an unreadable header
    good = session.read_bytes()
    for damaged, message in [(good[:-100], "checksum does not match"), (good[:16] + b"{" * 40, "damaged")]:
        session.write_bytes(damaged)
        res = invoke("run", str(other), "-p", "abc", "--session", str(session), *TINY_RUN)
        assert res.exit_code == 1 and message in res.output and len(res.output.strip().splitlines()) == 1
        assert session.read_bytes() == damaged
    # a version 1 file (the conversation as text) is refused by name and kept
    import struct

    v1 = b"L2KVSESS" + struct.pack("<II", 1, 2) + b"{}"
    session.write_bytes(v1)
    res = invoke("run", str(other), "-p", "abc", "--session", str(session), *TINY_RUN)
    assert res.exit_code == 1 and "saved by an older l2kv-cpp" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert session.read_bytes() == v1


def _saved_session(tiny_model, tmp_path):
    session = tmp_path / "s.session"
    res = invoke("run", str(tiny_model), "-p", "abc " * 30, "-n", "20", "--session", str(session), *TINY_RUN)
    assert res.exit_code == 0, res.output
    return session


def test_every_damaged_session_is_refused_in_one_line_and_kept(tiny_model, tmp_path):
    """Truncations, bit flips in the fixed header, the checksum, the JSON and the state, and runs of zero
    bytes inside the saved K/V (which version 2 loaded without a word): each is refused before anything is
    loaded, and the file is left as it was."""
    import random

    good = _saved_session(tiny_model, tmp_path).read_bytes()
    n_json = int.from_bytes(good[12:16], "little")
    body = 16 + 32 + n_json  # where the llama.cpp state starts
    rng = random.Random(0)
    damaged = [good[:n] for n in (10, 16, 40, body - 1, body + 10, len(good) - 1)]
    for lo, hi in [(0, 16), (16, 48), (48, body), (body, len(good))]:  # header, checksum, JSON, state
        for _ in range(5):
            i = rng.randrange(lo, hi)
            damaged.append(good[:i] + bytes([good[i] ^ (1 << rng.randrange(8))]) + good[i + 1 :])
    for _ in range(4):
        i = rng.randrange(body, len(good) - 64)
        damaged.append(good[:i] + bytes(64) + good[i + 64 :])
    session = tmp_path / "d.session"
    for i, data in enumerate(damaged):
        if data == good:
            continue  # a zero run over zero bytes changes nothing
        session.write_bytes(data)
        res = invoke("run", str(tiny_model), "-p", "xyz", "-n", "4", "--session", str(session), *TINY_RUN)
        assert res.exit_code == 1, (i, res.output)
        assert len(res.output.strip().splitlines()) == 1, (i, res.output)
        assert session.read_bytes() == data, i


def test_a_failed_session_save_keeps_the_previous_file(tiny_model, tmp_path, monkeypatch):
    """A full disk (a file size limit in a child process), a Ctrl-C and a SIGTERM in the middle of the write:
    the previous file stays as it was, no partial file is left, and the error says why."""
    import subprocess
    import sys

    session = _saved_session(tiny_model, tmp_path)
    before = session.read_bytes()

    def run_child(setup: str, prompt: str, n: str):
        """`run --session` in a child process, after `setup` (Python source)."""
        argv = ["l2kv-cpp", "run", str(tiny_model), "-p", prompt, "-n", n, "--session", str(session), *TINY_RUN]
        child = f"import sys\n{setup}from l2kv_cpp.cli import main\nsys.argv = {argv!r}\nmain()\n"
        return subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)

    res = run_child(
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) // 2}, {len(before) // 2}))\n",
        "more " * 40,
        "20",
    )
    assert res.returncode == 1, res.stderr
    assert "cannot write" in res.stderr and "previous file is unchanged" in res.stderr
    assert session.read_bytes() == before
    assert not list(tmp_path.glob("*.part"))

    from l2kv_cpp import checked_file

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(checked_file.os, "fsync", interrupted)
    res = invoke("run", str(tiny_model), "-p", "more", "-n", "4", "--session", str(session), *TINY_RUN)
    assert res.exit_code != 0
    assert session.read_bytes() == before
    assert not list(tmp_path.glob("*.part"))

    # SIGTERM in the middle of the write (a service manager stopping the run): the same, exit status 143
    res = run_child(
        "import os, signal\n"
        "from l2kv_cpp import checked_file\n"
        "real_fsync = os.fsync\n"
        "def terminated(fd):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    real_fsync(fd)\n"
        "checked_file.os.fsync = terminated\n",
        "more",
        "4",
    )
    assert res.returncode == 143, res.stderr
    assert session.read_bytes() == before
    assert not list(tmp_path.glob("*.part"))


def test_ctrl_c_inside_a_ctypes_callback_is_not_lost():
    """llama-cpp-python routes llama.cpp's log through a ctypes callback (~180 calls per eviction); with
    Python's default SIGINT handler a Ctrl-C landing there raised KeyboardInterrupt inside the callback,
    where ctypes swallows it. The run loop takes Ctrl-C as a flag and acts on it between steps."""
    import ctypes
    import os
    import signal

    from l2kv_cpp.runner import ctrl_c_deferred

    def log_like_callback() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(1000))  # Python runs on inside the callback after the signal

    callback = ctypes.CFUNCTYPE(None)(log_like_callback)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # SIG_IGN when run in the background
    try:
        with ctrl_c_deferred() as check:
            callback()
            with pytest.raises(KeyboardInterrupt):
                check()
            check()  # acted on once
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with ctrl_c_deferred():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # an ignored Ctrl-C stays ignored
    finally:
        signal.signal(signal.SIGINT, outer)


def test_eval_cache_types_are_checked(tiny_model, tmp_path):
    res = invoke("eval", "passkey", str(tiny_model), "--cache-types", "q3_k", "--out", str(tmp_path))
    assert res.exit_code == 2 and "--cache-types must be among f16, q8_0, q4_0" in res.output
    res = invoke("eval", "ppl", str(tiny_model), "--cache-types", "q8_0", "--out", str(tmp_path))
    assert res.exit_code == 2 and "applies to passkey and niah" in res.output
    assert not (tmp_path / "passkey.jsonl").exists() and not (tmp_path / "ppl.jsonl").exists()
