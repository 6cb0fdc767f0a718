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


def test_run_on_tiny_model_json(tiny_model):
    res = invoke("run", str(tiny_model), "-p", "abc", "-n", "5", "-c", "256", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n_generated_tokens"] == 5
    assert out["chat_template"] is False
    assert out["model"] == str(tiny_model)


def test_options_read_environment_variables(tiny_model):
    res = invoke("run", str(tiny_model), "--json", "-c", "256", env={"L2KV_RUN_N_PREDICT": "3"})
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_generated_tokens"] == 3


@pytest.mark.parametrize("args", [["-n", "0"], ["-c", "4"], ["--temp", "-1"]])
def test_out_of_range_flags_are_usage_errors(tiny_model, args):
    res = invoke("run", str(tiny_model), *args)
    assert res.exit_code == 2
    assert "Invalid value" in res.stderr


def test_help_shows_defaults():
    res = invoke("run", "--help")
    assert res.exit_code == 0
    assert "[default: 64;" in res.stdout and "--n-predict" in res.stdout


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
