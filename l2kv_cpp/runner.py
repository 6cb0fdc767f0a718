"""What `l2kv-cpp run` does: one-shot answers and the interactive chat, over the library API.

The CLI only parses flags; this module turns them into settings, drives a `Conversation` and
prints. Output: answers on stdout; progress, statistics and llama.cpp's log (with -v) on stderr.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import archive
from .chat import Conversation
from .config import L2KVConfig, Positions
from .errors import InvalidParamsError, L2KVError
from .generate import GenerationResponse
from .models import resolve_model
from .prompt_tokens import common_prefix_len
from .recall import RecallSettings
from .rpc import parse_endpoints
from .sampling import SamplingSettings
from .session import L2KVModel, ModelSettings, ProgressFn
from .session_file import load_session, save_session

LLAMA_DEFAULT_SEED = 0xFFFFFFFF
HELP = "commands: /stats (KV memory and evictions), /reset (forget the conversation), /exit; Ctrl-C stops an answer"


def settings_from_options(opts: dict[str, Any]) -> dict[str, Any]:
    """ModelSettings, L2KVConfig and SamplingSettings from the CLI options (each validated)."""
    if opts["kv_budget"] < 1:
        raise InvalidParamsError(f"--kv-budget must be >= 1 (got {opts['kv_budget']})")
    if opts["flash_attn"] != "on":
        if opts["cache_type_v"] not in ("f16", "bf16", "f32"):
            raise InvalidParamsError(
                f"-ctv {opts['cache_type_v']} (a quantized V cache) needs flash attention: drop -fa off"
            )
        raise InvalidParamsError("eviction needs flash attention: drop -fa off (the V cache must not be transposed)")
    skip = opts["skip_layers"].strip().lower()
    try:
        if skip == "default":
            skip_layers = None
        else:
            skip_layers = () if skip in ("", "none") else tuple(int(x) for x in skip.split(","))
    except ValueError:
        raise InvalidParamsError(
            f"--skip-layers must be comma-separated layer ids or 'none' or 'default' (got {skip!r})"
        ) from None
    l2kv = L2KVConfig(
        kv_budget=opts["kv_budget"],
        n_slack=opts["kv_slack"],
        n_sink=opts["n_sink"],
        n_recent=opts["n_recent"],
        keep_system=opts["keep_system"],
        recall=RecallSettings.parse(opts["recall"]),
        policy=opts["policy"],
        per_head=opts["per_head"],
        skip_layers=skip_layers,
        positions=opts["positions"],
    )
    rpc = parse_endpoints(opts["rpc"])
    model = ModelSettings(
        n_ctx=opts["ctx_size"],
        n_batch=opts["batch_size"],
        n_ubatch=min(opts["ubatch_size"], opts["batch_size"]),
        n_gpu_layers=(-1 if rpc else 0) if opts["n_gpu_layers"] is None else opts["n_gpu_layers"],
        rpc=rpc,
        flash_attn=True,
        cache_type_k=opts["cache_type_k"],
        cache_type_v=opts["cache_type_v"],
        n_threads=opts["threads"],
        verbose=opts["verbose"],
    )
    sampling = SamplingSettings(
        temperature=opts["temp"],
        top_k=opts["top_k"],
        top_p=opts["top_p"],
        min_p=opts["min_p"],
        repeat_penalty=opts["repeat_penalty"],
        seed=LLAMA_DEFAULT_SEED if opts["seed"] < 0 else opts["seed"],
        ignore_eos=opts["ignore_eos"],
    )
    return {"model_settings": model, "l2kv": l2kv, "sampling": sampling}


@contextmanager
def ctrl_c_deferred() -> Iterator[Callable[[], None]]:
    """Ctrl-C as a flag, acted on where the caller calls the yielded check (between batches and tokens).

    Python's default handler raises KeyboardInterrupt wherever the interpreter runs next. While llama.cpp
    decodes, that can be llama-cpp-python's log callback (a ctypes callback, called ~180 times by the
    graph re-reservation after every eviction even when nothing is printed), and ctypes swallows an
    exception raised there: such a Ctrl-C would be lost. A Ctrl-C after the last check is dropped.
    """
    hit = threading.Event()

    def check() -> None:
        if hit.is_set():
            hit.clear()
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield check  # only the main thread handles signals; an ignored Ctrl-C (nohup, &) stays ignored
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: hit.set())
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def progress_bar(model: L2KVModel, desc: str, check: Callable[[], None] | None = None) -> Iterator[ProgressFn]:
    """A tqdm bar on stderr for long inputs: tokens done, tokens/s and KV cells in use; calls `check`
    after every batch."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if check is not None:
            check()
        if bar is None:
            if total <= model.settings.n_batch:
                return  # short inputs need no bar
            bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)
        bar.set_postfix_str(f"KV cells {model.stats().n_cells_used}", refresh=False)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


_past_training_noted: weakref.WeakSet[L2KVModel] = weakref.WeakSet()


def note_past_training_context(model: L2KVModel) -> None:
    """One stderr line when a conversation first runs past the model's training context while RoPE distances
    can grow past it (no eviction, or original positions): quality degrades from there (docs/results.md)."""
    n_train = model.info.n_ctx_train
    if not n_train or model.n_past <= n_train or model in _past_training_noted:
        return
    cfg = model.l2kv
    if cfg is not None and cfg.positions == Positions.CACHE and cfg.max_cells(model.settings.n_batch) <= n_train:
        return  # RoPE positions stay inside the cache, hence inside the training context
    _past_training_noted.add(model)
    why = "there is no eviction" if cfg is None else "kept keys keep their original positions (--positions original)"
    print(
        f"[note: {model.n_past} tokens, past the model's {n_train}-token training context and {why}, so quality "
        "degrades from here (README: Limit)]",
        file=sys.stderr,
    )


def read_document(file: str) -> str:
    path = Path(file)
    if not path.is_file():
        raise InvalidParamsError(f"-f/--file: {path} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidParamsError(f"-f/--file: {path} is not UTF-8 text") from None
    except OSError as exc:
        raise InvalidParamsError(f"-f/--file: cannot read {path}: {exc.strerror}") from None


def stats_text(model: L2KVModel, last: GenerationResponse | None, prompt_tps: float, n_sink: int = 0) -> str:
    st = model.stats()
    mem = model.memory_report()
    slack = model.l2kv.slack(model.settings.n_batch) if model.l2kv else 0
    lines = [
        f"cells in use   {st.n_cells_used} (budget {st.kv_budget} + slack {slack}; buffer {st.kv_size} cells)",
        f"never evicted  the first {n_sink} tokens and the newest {model.l2kv.n_recent if model.l2kv else 0}",
        f"KV memory      {mem['kv_mib']:.1f} MiB now vs {mem['full_cache_mib']:.1f} MiB for a full cache of "
        f"{int(mem['tokens_seen'])} tokens",
        f"evictions      {st.n_evictions} ({st.n_dropped} entries dropped per layer and head, "
        f"{st.n_moved_rows} rows moved, {st.t_evict_ms:.0f} ms)",
    ]
    if st.enabled:
        mode = Positions(st.positions).cli_name
        lines.append(
            f"RoPE positions {mode}: the next token at {st.rope_pos_max + 1} (text position {st.pos_max + 1}); "
            f"{st.n_rotated_rows} key rows re-rotated ({st.t_rotate_ms:.0f} ms)"
        )
    if model.l2kv is not None and model.l2kv.recall.enabled:
        ar = archive.stats(model.llm.ctx)
        lines.append(
            f"archive        {ar.n_entries} evicted entries ({ar.n_bytes / 2**20:.1f} MiB"
            f"{f', in a {ar.n_disk_bytes / 2**20:.1f} MiB temporary file' if ar.on_disk else ' in RAM'}); "
            f"{ar.n_recalls} recalls brought {ar.n_recalled} back ({ar.t_recall_ms:.0f} ms)"
        )
    if last is not None:
        lines.append(
            f"last answer    {last.n_generated_tokens} tokens at {last.tokens_per_second:.1f} tokens/s "
            f"(prompt {prompt_tps:.0f} tokens/s)"
        )
    return "\n".join(lines)


def summary_line(model: L2KVModel, last: GenerationResponse | None) -> str:
    st = model.stats()
    mem = model.memory_report()
    n = last.n_generated_tokens if last else 0
    tps = last.tokens_per_second if last else 0.0
    # the buffer is sized for budget + slack up front: until the chat outgrows it, say so rather than
    # print a "vs" that reads like eviction costing memory
    if mem["full_cache_mib"] >= mem["kv_mib"]:
        memory = f"{mem['kv_mib']:.1f} MiB vs {mem['full_cache_mib']:.1f} MiB full"
    else:
        memory = f"{mem['kv_mib']:.1f} MiB fixed buffer (full cache so far: {mem['full_cache_mib']:.1f} MiB)"
    return f"[{n} tokens, {tps:.1f} t/s | KV {st.n_cells_used} cells, {st.n_evictions} evictions, {memory}]"


def _answer(
    conv: Conversation, text: str, sampling: SamplingSettings, n_predict: int, echo: bool
) -> tuple[str, GenerationResponse | None, bool]:
    """Stream one answer; returns (text, last response, interrupted)."""
    pieces: list[str] = []
    last = None
    with ctrl_c_deferred() as check, progress_bar(conv.model, "prompt", check) as progress:
        gen = conv.ask(text, sampling, n_predict, progress)
        try:
            for last in gen:
                pieces.append(last.text)
                if echo:
                    sys.stdout.write(last.text)
                    sys.stdout.flush()
                check()
        except KeyboardInterrupt:
            return "".join(pieces), last, True
        finally:
            gen.close()
            note_past_training_context(conv.model)
    return "".join(pieces), last, False


def run(
    model: str | None,
    prompt: str | None,
    file: str | None,
    n_predict: int,
    system: str | None,
    chat: bool | None,
    as_json: bool,
    model_settings: ModelSettings,
    l2kv: L2KVConfig,
    sampling: SamplingSettings,
    session: str | None = None,
) -> None:
    path = resolve_model(model)
    document = read_document(file) if file else None
    if session is not None:
        # fail before the chat rather than when saving it at the end
        where = Path(session).resolve().parent
        if Path(session).is_dir():
            raise InvalidParamsError(f"--session: {session} is a directory")
        if not where.is_dir() or not os.access(where, os.W_OK):
            raise InvalidParamsError(f"--session: cannot write into {where}")
    with L2KVModel(path, model_settings, l2kv) as m:
        conv = Conversation(m, chat=chat, system=system)
        if session is not None and Path(session).exists():
            load_session(conv, session)  # raises before anything could overwrite the file
            n_turns = sum(msg["role"] == "user" for msg in conv.messages)
            print(f"[resumed {session}: {m.n_past} tokens, {n_turns} turns]", file=sys.stderr)
        try:
            if document is not None and prompt is not None:
                # one shot: the document is read with the question as one prompt, in the batches stock
                # llama.cpp uses (so that the answers are the same when nothing is evicted)
                conv.add_document(document)
                tokens, n = conv.document_split(prompt)
                n -= common_prefix_len(conv.tokens, tokens[:n])  # a resumed session may hold a part
                print(f"[read {file} with the question: {n} tokens]", file=sys.stderr)
            elif document is not None:
                with ctrl_c_deferred() as check, progress_bar(m, "document", check) as progress:
                    n = conv.load_document(document, progress)
                print(f"[loaded {file}: {n} tokens; {m.stats().n_cells_used} KV cells in use]", file=sys.stderr)
                note_past_training_context(m)
            if prompt is not None:
                one_shot(conv, prompt, sampling, n_predict, as_json)
            else:
                interactive(conv, sampling, n_predict)
        finally:
            if session is not None:
                n_bytes = save_session(conv, session)
                print(f"[saved {session}: {m.n_past} tokens, {n_bytes / 2**20:.1f} MiB]", file=sys.stderr)


def one_shot(conv: Conversation, prompt: str, sampling: SamplingSettings, n_predict: int, as_json: bool) -> None:
    text, last, interrupted = _answer(conv, prompt, sampling, n_predict, echo=not as_json)
    m = conv.model
    if as_json:
        st = m.stats()
        print(
            json.dumps(
                {
                    "model": str(m.path),
                    "prompt": prompt,
                    "text": text,
                    "chat_template": bool(conv.chat),
                    "n_prompt_tokens": m.n_past - (last.n_generated_tokens if last else 0),
                    "n_generated_tokens": last.n_generated_tokens if last else 0,
                    "prompt_tokens_per_second": round(conv.last_prompt_tokens_per_second, 2),
                    "tokens_per_second": round(last.tokens_per_second, 2) if last else 0.0,
                    "finish_reason": "interrupted" if interrupted else (last.finish_reason if last else None),
                    "kv": asdict(st),
                    "archive": asdict(archive.stats(m.llm.ctx)) if m.l2kv is not None else None,
                    "recalled_spans": conv.last_recall,
                    "memory_mib": {k: round(v, 3) for k, v in m.memory_report().items()},
                }
            )
        )
        return
    print()
    print(summary_line(m, last), file=sys.stderr)
    if interrupted:
        raise KeyboardInterrupt


def interactive(conv: Conversation, sampling: SamplingSettings, n_predict: int) -> None:
    m = conv.model
    tty = sys.stdin.isatty()
    if tty:
        print(
            f"l2kv-cpp chat with {m.path.name} (KV budget {m.l2kv.kv_budget if m.l2kv else 'off'}). {HELP}",
            file=sys.stderr,
        )
    last: GenerationResponse | None = None
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/stats":
            print(stats_text(m, last, conv.last_prompt_tokens_per_second, conv.n_sink))
            continue
        if cmd == "/reset":
            conv.reset()
            print("(conversation reset)")
            continue
        if cmd == "/help" or cmd.startswith("/"):
            print(HELP)
            continue
        try:
            _, resp, interrupted = _answer(conv, cmd, sampling, n_predict, echo=True)
        except KeyboardInterrupt:  # during the prompt: the conversation rolled back to the previous turn
            print("\n(interrupted)")
            continue
        except L2KVError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            continue
        last = resp or last
        print("\n(stopped)" if interrupted else "")
        print(summary_line(m, resp), file=sys.stderr)
