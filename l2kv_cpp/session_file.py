"""A conversation saved to one file and resumed later (`l2kv-cpp run --session FILE`).

The file holds a small JSON header (which model, the conversation: its messages, the tokens the
cache holds and the tokens sampled for each answer) followed by the context's llama.cpp state,
which with eviction carries the evicted cache, its key norms and true positions (see
docs/design.md). A SHA-256 of everything after the fixed header is checked before anything is
loaded, so a damaged file is refused instead of resuming a damaged cache; writes are atomic
(checked_file).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

from . import checked_file
from .chat import Conversation
from .errors import InvalidParamsError

MAGIC = b"L2KVSESS"
# 3: a checksum of the payload; 2: the conversation as tokens (version 1 held text, whose
# re-tokenization differs)
VERSION = 3
_HEADER = struct.Struct("<8sII")  # magic, version, JSON length

log = logging.getLogger(__name__)


def _model_identity(conv: Conversation) -> dict[str, object]:
    path = conv.model.path
    return {"name": path.name, "size": path.stat().st_size}


def save_session(conv: Conversation, path: str | os.PathLike[str]) -> int:
    """Write the conversation and its KV cache to `path`; returns the bytes written."""
    model = conv.model
    state = model.state_data()
    header = json.dumps(
        {
            "model": _model_identity(conv),
            "n_past": model.n_past,
            # how the saved keys are rotated (the state records it too; any mode loads into any context)
            "positions": model.l2kv.positions.cli_name if model.l2kv is not None else None,
            "conversation": {
                "chat": conv.chat,
                "messages": conv.messages,
                "answers": conv.answers,
                "tokens": conv.tokens,
                "document": conv.document,
            },
        }
    ).encode()
    return checked_file.write_checked(path, _HEADER.pack(MAGIC, VERSION, len(header)), [header, state], "--session")


def load_session(conv: Conversation, path: str | os.PathLike[str]) -> None:
    """Restore a conversation saved by save_session into `conv` (a fresh one on the same model)."""
    source = Path(path)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise InvalidParamsError(f"--session: cannot read {source}: {exc.strerror}") from None
    if len(data) < _HEADER.size:
        raise InvalidParamsError(f"--session: {source} is not an l2kv-cpp session file")
    magic, version, n_json = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise InvalidParamsError(f"--session: {source} is not an l2kv-cpp session file")
    if version == 1:
        raise InvalidParamsError(
            f"--session: {source} was saved by an older l2kv-cpp (session version 1, the conversation as text, "
            "which this version no longer trusts); start a new session under another name"
        )
    if version not in (2, VERSION):
        raise InvalidParamsError(f"--session: {source} has version {version}; this l2kv-cpp reads version {VERSION}")
    start = _HEADER.size
    if version == VERSION:
        start += checked_file.DIGEST_SIZE
        if checked_file.checked_payload(data, _HEADER.size) is None:
            raise InvalidParamsError(
                f"--session: {source} is damaged (its checksum does not match: truncated or changed); nothing was "
                "loaded and the file is kept"
            )
    else:
        log.warning("%s was saved without a checksum (session version 2): it is loaded unchecked", source)
    try:
        header = json.loads(data[start : start + n_json])
        saved_model = dict(header["model"])
        n_past = int(header["n_past"])
        saved = header["conversation"]
        saved_chat = bool(saved["chat"])
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in saved["messages"]]
        answers = [[int(t) for t in a] for a in saved["answers"]]
        tokens = [int(t) for t in saved["tokens"]]
        document = None if saved["document"] is None else str(saved["document"])
        if sum(m["role"] == "assistant" for m in messages) != len(answers):
            raise ValueError("answers do not match the messages")
    except (ValueError, KeyError, TypeError):
        raise InvalidParamsError(f"--session: {source} is damaged (unreadable header)") from None
    if saved_model != _model_identity(conv):
        raise InvalidParamsError(
            f"--session: {source} was saved with model {saved_model.get('name')}, not {conv.model.path.name}"
        )
    if saved_chat != bool(conv.chat):
        how = "with" if saved_chat else "without"
        raise InvalidParamsError(f"--session: {source} was saved {how} the chat template (--chat/--no-chat)")

    model = conv.model
    try:
        model.load_state_data(data[start + n_json :])
    except InvalidParamsError as exc:
        model.reset()
        raise InvalidParamsError(
            f"--session: {source} does not fit this context (saved with other settings such as the cache type, "
            f"or damaged): {exc}"
        ) from None
    if model.n_past != n_past or len(tokens) != n_past:
        model.reset()
        raise InvalidParamsError(f"--session: {source} is damaged (positions do not match its header)")
    conv.messages = messages
    conv.answers = answers
    conv.tokens = tokens
    conv.document = document
