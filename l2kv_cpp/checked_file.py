"""Files the project writes that must survive a crash and refuse damage: session and state files.

Writes go to `NAME.part`, are fsynced, then renamed over the target (and the directory fsynced), so an
interrupted or failed write (Ctrl-C, SIGTERM, a full disk) leaves the previous file as it was. The
payload's SHA-256 sits right after the fixed header and is checked before anything is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .errors import InvalidParamsError

DIGEST_SIZE = 32  # SHA-256


def write_checked(target: str | os.PathLike[str], header: bytes, payload: Sequence[bytes], what: str) -> int:
    """Write `header`, the SHA-256 of the payload, then the payload's parts, atomically (write_atomic)."""
    h = hashlib.sha256()
    for part in payload:
        h.update(part)
    return write_atomic(target, [header, h.digest(), *payload], what)


def checked_payload(data: bytes, header_size: int) -> bytes | None:
    """The payload of a file write_checked wrote (its header `header_size` bytes), or None when the file is
    truncated or its checksum does not match."""
    start = header_size + DIGEST_SIZE
    if len(data) < start or hashlib.sha256(data[start:]).digest() != data[header_size:start]:
        return None
    return data[start:]


def write_atomic(target: str | os.PathLike[str], chunks: Iterable[bytes], what: str) -> int:
    """Write `chunks` to `target` atomically; returns the bytes written. On failure raise InvalidParamsError
    naming `what` and the reason; the previous file is unchanged and no .part file is left behind."""
    target = Path(target)
    tmp = target.with_name(target.name + ".part")
    done = False
    n = 0
    try:
        with _sigterm_unwinds(), open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
                n += len(c)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the previous file
        os.replace(tmp, target)
        done = True
        _fsync_dir(target.parent)
    except OSError as exc:
        raise InvalidParamsError(
            f"{what}: cannot write {target} ({exc.strerror or exc}); the previous file is unchanged"
        ) from None
    finally:
        if not done:  # an error, Ctrl-C or SIGTERM while writing: drop the partial file
            with contextlib.suppress(OSError):  # (not ours if it is a directory)
                tmp.unlink(missing_ok=True)
    return n


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While a file is written, SIGTERM raises SystemExit (exit status 143) instead of killing the process on
    the spot, so the partial file is removed like on Ctrl-C. Only where SIGTERM has its default action (a
    server's own handler is left alone) and on the main thread (the only one that may set handlers)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def unwind(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
