"""`L2KVModel`: a model and one context with L2 eviction enabled, fed by our own decode loop.

llama-cpp-python's `Llama` loads the model, tokenizes and renders chat templates; generation past
its `n_ctx` token slots runs through `decode()` here. The context is sized as `kv_budget +
n_slack` cells (n_slack is n_batch by default; plus what a sliding-window cache needs), flash
attention is on by default, and eviction is enabled right after the context is created. `close()`
(or the context manager) frees everything.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _lib, archive, cache, checked_file
from ._ffi import native
from .config import L2KVConfig
from .decode import decode, logits_ith
from .errors import InvalidParamsError, ModelError
from .gguf_file import check_gguf

# cache types accepted by -ctk/-ctv (ggml type names, as llama.cpp's --cache-type-k)
CACHE_TYPES = ("f16", "bf16", "f32", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")


def ggml_type_id(name: str) -> int:
    import gguf

    try:
        return int(gguf.GGMLQuantizationType[name.upper()])
    except KeyError:
        raise InvalidParamsError(f"unknown cache type {name!r}; one of: {', '.join(CACHE_TYPES)}") from None


@dataclass(frozen=True)
class ModelSettings:
    n_ctx: int = 0  # context cells; 0 = kv_budget + n_batch (eviction) or the model's training context
    n_batch: int = 512  # tokens per llama_decode call (also the eviction slack)
    n_ubatch: int = 512  # physical batch; <= n_batch
    n_gpu_layers: int = 0  # -1 = all
    flash_attn: bool = True  # eviction needs it (V not transposed)
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    n_threads: int | None = None  # None = llama-cpp-python's default
    rpc: tuple[str, ...] = ()  # rpc-servers ("host:port") for the last n_gpu_layers layers (l2kv_cpp.rpc)
    repack: bool = True  # CPU weights repacked for the fast kernels (llama.cpp's extra buffer types); off runs
    # the kernels an rpc-server runs, so a local run and a split one compute the same bits
    verbose: bool = False  # llama.cpp's log on stderr

    def __post_init__(self) -> None:
        if self.n_ctx < 0:
            raise InvalidParamsError(f"n_ctx must be >= 0 (got {self.n_ctx})")
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise InvalidParamsError(f"n_batch and n_ubatch must be >= 1 (got {self.n_batch}, {self.n_ubatch})")
        if self.n_ubatch > self.n_batch:
            raise InvalidParamsError(f"n_ubatch ({self.n_ubatch}) must be <= n_batch ({self.n_batch})")
        if self.rpc:
            from .rpc import parse_endpoints

            object.__setattr__(self, "rpc", parse_endpoints(self.rpc))
        for name in (self.cache_type_k, self.cache_type_v):
            if name not in CACHE_TYPES:
                raise InvalidParamsError(f"unknown cache type {name!r}; one of: {', '.join(CACHE_TYPES)}")
        if self.cache_type_v not in ("f16", "bf16", "f32") and not self.flash_attn:
            raise InvalidParamsError(
                f"a quantized V cache ({self.cache_type_v}) needs flash attention; drop -fa off or use -ctv f16"
            )


ProgressFn = Callable[[int, int], None]  # (tokens done, tokens total)

DEFAULT_MODEL_SETTINGS = ModelSettings()
RPC_FATAL_HINT = (
    "an rpc-server of --rpc stopped or lost its connection, and the layers it held with it; restart it and run again"
)
DEFAULT_L2KV = L2KVConfig()


class L2KVModel:
    """A loaded model with one single-sequence context; eviction on unless `l2kv` is None."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        settings: ModelSettings = DEFAULT_MODEL_SETTINGS,
        l2kv: L2KVConfig | None = DEFAULT_L2KV,
        share_weights_with: L2KVModel | None = None,
    ):
        """share_weights_with: another L2KVModel of the same file and settings whose loaded weights this
        one's context uses (a server's conversation slots load the model once); close this one first."""
        path = Path(model_path)
        self.info = check_gguf(path)
        native().set_log(settings.verbose)  # refuses a stock libllama before loading anything
        self.path, self.settings, self.l2kv = path, settings, l2kv
        n_ctx = settings.n_ctx or self._auto_n_ctx()
        if l2kv is not None and n_ctx < l2kv.max_cells(settings.n_batch):
            slack = f"n_slack {l2kv.n_slack}" if l2kv.n_slack else f"n_batch {settings.n_batch}"
            raise InvalidParamsError(
                f"-c/--ctx-size {n_ctx} is too small for kv_budget {l2kv.kv_budget} + {slack}; "
                f"use -c {l2kv.max_cells(settings.n_batch)} or 0 (auto)"
            )
        if share_weights_with is not None:
            base = share_weights_with
            if base.llm is None or base.path != path or base.settings != settings:
                raise InvalidParamsError("share_weights_with needs an open model of the same file and settings")
            self.llm = _SecondContext(base.llm, n_ctx)
        else:
            if settings.rpc:  # ggml's RPC client aborts on a dead server: one line and exit status 1 instead
                native().lib.llama_l2kv_exit_on_fatal_error(1, RPC_FATAL_HINT.encode())
            self.llm = self._load_model(path, n_ctx)
        self.n_past = 0  # the next position
        self.n_decoded = 0  # tokens decoded by feed() over the context's life (prompt work done, generation)
        self._vocab = self.llm._model.vocab
        self._eog: list[int] | None = None
        if l2kv is not None:
            try:
                cache.enable(self.llm.ctx, l2kv)
                if l2kv.recall.enabled:  # evicted entries kept for recall
                    archive.enable(self.llm.ctx, on_disk=l2kv.recall.on_disk, max_bytes=l2kv.recall.max_bytes)
            except Exception:
                self.llm.close()
                raise

    def _load_model(self, path: Path, n_ctx: int) -> Any:
        settings, lc = self.settings, _lib.llama_cpp()
        try:
            with _LOAD_LOCK, _model_params(settings):
                return lc.Llama(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_batch=settings.n_batch,
                    n_ubatch=settings.n_ubatch,
                    n_gpu_layers=settings.n_gpu_layers,
                    flash_attn=settings.flash_attn,
                    type_k=ggml_type_id(settings.cache_type_k),
                    type_v=ggml_type_id(settings.cache_type_v),
                    n_threads=settings.n_threads,
                    n_threads_batch=settings.n_threads,
                    verbose=settings.verbose,
                )
        except ValueError as exc:
            raise ModelError(f"llama.cpp could not load {path} ({exc}); run with -v for its log") from None

    def _auto_n_ctx(self) -> int:
        s, info = self.settings, self.info
        if self.l2kv is None:
            return int(info.arch_value("context_length", 4096))
        n = self.l2kv.max_cells(s.n_batch)
        n_swa = int(info.arch_value("attention.sliding_window", 0) or 0)
        return max(n, n_swa + s.n_ubatch) if n_swa else n

    # lifetime

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self) -> L2KVModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # tokens

    @property
    def has_chat_template(self) -> bool:
        return bool(self.llm.metadata.get("tokenizer.chat_template"))

    def tokenize(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return self.llm.detokenize(list(tokens))

    def token_text(self, token: int) -> bytes:
        return self.llm.detokenize([token], special=True)

    def token_pieces(self, tokens: Sequence[int]) -> list[bytes]:
        """Every token's bytes as the vocabulary spells it (llama_token_to_piece: special tokens as their
        text, no space stripped): concatenated, the text a tokenizer without added spaces was given."""
        lc = _lib.llama_cpp()
        buf = ctypes.create_string_buffer(256)
        out = []
        for t in tokens:
            n = lc.llama_token_to_piece(self._vocab, int(t), buf, len(buf), 0, True)
            if n < 0:  # longer than the buffer: -n is the size it needs
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self._vocab, int(t), buf, len(buf), 0, True)
            out.append(buf.raw[:n])
        return out

    @property
    def n_vocab(self) -> int:
        return int(_lib.llama_cpp().llama_vocab_n_tokens(self._vocab))

    def eog_tokens(self) -> list[int]:
        """Every end-of-generation token of the vocabulary."""
        if self._eog is None:
            lc = _lib.llama_cpp()
            self._eog = [t for t in range(self.n_vocab) if lc.llama_vocab_is_eog(self._vocab, t)]
        return self._eog

    def is_eog(self, token: int) -> bool:
        return bool(_lib.llama_cpp().llama_vocab_is_eog(self._vocab, token))

    @property
    def add_bos(self) -> bool:
        return bool(_lib.llama_cpp().llama_vocab_get_add_bos(self._vocab))

    # cache

    def feed(self, tokens: Sequence[int], progress: ProgressFn | None = None) -> None:
        """Decode tokens at the next positions, n_batch at a time (evicting as needed)."""
        n_batch = self.settings.n_batch
        for start in range(0, len(tokens), n_batch):
            chunk = tokens[start : start + n_batch]
            decode(self.llm, chunk, self.n_past)
            self.n_past += len(chunk)
            self.n_decoded += len(chunk)
            if progress:
                progress(start + len(chunk), len(tokens))

    def logits(self) -> np.ndarray:
        return logits_ith(self.llm)

    def stats(self) -> cache.L2KVStats:
        return cache.stats(self.llm.ctx)

    def rewind(self, n_past: int) -> bool:
        """Drop positions >= n_past; False when an eviction already compacted them (nothing changes then)."""
        lc = _lib.llama_cpp()
        if not lc.llama_memory_seq_rm(lc.llama_get_memory(self.llm.ctx), 0, n_past, -1):
            return False
        self.n_past = n_past
        return True

    def reset(self) -> None:
        """Forget everything: empty cache, position 0."""
        lc = _lib.llama_cpp()
        lc.llama_memory_clear(lc.llama_get_memory(self.llm.ctx), True)
        self.n_past = 0

    # state

    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Write the context to a file: the KV cache and, with eviction, its key norms and true positions.
        The file carries a SHA-256 of the state, checked by load_state; the write is atomic (an interrupted or
        failed save leaves the previous file as it was)."""
        header = _STATE_HEADER.pack(_STATE_MAGIC, _STATE_VERSION)
        checked_file.write_checked(path, header, [self.state_data()], "save_state")

    def load_state(self, path: str | os.PathLike[str]) -> None:
        """Restore a state written by save_state (same model; eviction enabled when it was saved with it), or
        one llama.cpp's llama_state_save_file wrote (unchecked). A damaged file is refused before anything is
        loaded; on any other failure the error names the reason and an evicting cache is left empty."""
        p = Path(path)
        if not p.is_file():
            raise InvalidParamsError(f"state file {p} does not exist or is not a file")
        with open(p, "rb") as f:
            head = f.read(12 + 4 + 64)  # ours, or llama.cpp's file header (magic, version, token count), then the state
        if head.startswith(_STATE_MAGIC):
            self.load_state_data(_read_checked_state(p))
            return
        if int.from_bytes(head[8:12], "little") == 0:  # (with tokens llama.cpp refuses it: capacity 0)
            self._check_state_start(head[12:], f"the state {p}")
        lc = _lib.llama_cpp()
        n_tokens = ctypes.c_size_t(0)
        self._load(
            lambda: lc.llama_state_load_file(self.llm.ctx, os.fsencode(p), None, 0, ctypes.byref(n_tokens)),
            f"the state {p}",
        )

    def state_data(self) -> bytes:
        """The context's whole state in memory (what save_state writes, without llama.cpp's file header)."""
        lc = _lib.llama_cpp()
        size = lc.llama_state_get_size(self.llm.ctx)
        if size == 0:
            raise InvalidParamsError("the context state cannot be saved (run with -v for llama.cpp's log)")
        buf = (ctypes.c_uint8 * size)()
        if lc.llama_state_get_data(self.llm.ctx, buf, size) != size:
            raise InvalidParamsError("the context state changed size while it was saved")
        return bytes(buf)

    def load_state_data(self, data: bytes) -> None:
        """Restore a state returned by state_data; errors as load_state."""
        self._check_state_start(data, "the state")
        lc = _lib.llama_cpp()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        self._load(lambda: lc.llama_state_set_data(self.llm.ctx, buf, len(data)) == len(data), "the state")

    def _check_state_start(self, data: bytes, what: str) -> None:
        """A state starts with the model's architecture name (u32 length, bytes). llama.cpp allocates that
        length before it checks the data holds it, so a damaged length asks for up to 4 GiB (found by
        fuzz/fuzz_state.py): check it here first."""
        arch = self.info.architecture.encode()
        if int.from_bytes(data[:4], "little") != len(arch) or data[4 : 4 + len(arch)] != arch:
            raise InvalidParamsError(f"cannot load {what}: not a state of this {arch.decode()} model (damaged?)")

    def _load(self, load: Callable[[], bool], what: str) -> None:
        """Run a state restore; n_past follows the restored cache; on failure raise with the library's reason."""
        nat = native()
        error_before = nat.ffi.string(nat.lib.llama_l2kv_last_error())
        ok = load()
        error = nat.ffi.string(nat.lib.llama_l2kv_last_error())  # before any other API call clears it
        self.n_past = self.stats().pos_max + 1
        if not ok:
            reason = error.decode(errors="replace") if error and error != error_before else "see llama.cpp's log (-v)"
            raise InvalidParamsError(f"cannot load {what}: {reason}")

    def memory_report(self) -> dict[str, float]:
        """KV memory now vs. a full cache holding every token seen so far (MiB), from the live stats."""
        st = self.stats()
        per_token = st.kv_bytes / st.kv_size if st.kv_size else 0.0
        return {
            "kv_mib": (st.kv_bytes + st.norm_bytes) / 2**20,
            "full_cache_mib": per_token * self.n_past / 2**20,
            "tokens_seen": float(self.n_past),
        }


class _SecondContext:
    """Another llama_context on the weights a `llama_cpp.Llama` loaded: the parts of Llama that L2KVModel and
    the decode helpers use, with this context's `ctx`. close() frees the context only."""

    def __init__(self, base: Any, n_ctx: int):
        from llama_cpp._internals import LlamaContext

        params = type(base.context_params).from_buffer_copy(base.context_params)
        params.n_ctx = n_ctx
        self._base = base
        self._model = base._model
        self.n_batch = base.n_batch
        try:
            self._ctx = LlamaContext(model=base._model, params=params, verbose=base.verbose)
        except ValueError as exc:
            raise ModelError(f"llama.cpp could not create another context on {base.model_path} ({exc})") from None

    @property
    def ctx(self) -> Any:
        return self._ctx.ctx

    @property
    def metadata(self) -> dict[str, str]:
        return self._base.metadata

    def tokenize(self, *args: Any, **kwargs: Any) -> list[int]:
        return self._base.tokenize(*args, **kwargs)

    def detokenize(self, *args: Any, **kwargs: Any) -> bytes:
        return self._base.detokenize(*args, **kwargs)

    def token_bos(self) -> int:
        return self._base.token_bos()

    def token_eos(self) -> int:
        return self._base.token_eos()

    def close(self) -> None:
        self._ctx.close()


def open_tokenizer(model_path: str | os.PathLike[str]) -> L2KVModel:
    """A minimal context on the model, for tokenizing and chat templates (no eviction)."""
    return L2KVModel(model_path, ModelSettings(n_ctx=64, n_batch=32, n_ubatch=32), l2kv=None)


# llama-cpp-python silences a model load by pointing fds 1 and 2 at /dev/null and back (suppress_stdout_stderr):
# two loads in two threads interleave those dup2s and can leave the process's stdout and stderr on /dev/null for
# good (found under ASan, whose timing made it happen every time). One load at a time.
_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _model_params(settings: ModelSettings) -> Iterator[None]:
    """Model parameters llama-cpp-python's Llama does not take (the device list, use_extra_bufts): while it
    loads, its default model params carry them. The devices (l2kv_cpp.rpc.model_devices: the rpc-servers asked
    for, then the local GPUs; None = llama.cpp's default) are copied by the load."""
    from . import rpc

    devices = rpc.model_devices(settings.rpc)
    if devices is None and settings.repack:
        yield
        return
    lcc = _lib.llama_cpp().llama_cpp
    default = lcc.llama_model_default_params

    def ours() -> Any:
        params = default()
        if devices is not None:
            params.devices = ctypes.cast(devices, ctypes.c_void_p)
        params.use_extra_bufts = settings.repack
        return params

    lcc.llama_model_default_params = ours
    try:
        yield
    finally:
        lcc.llama_model_default_params = default


# save_state's file: magic, version, then the SHA-256 of the state, then the state (llama_state_get_data's bytes)
_STATE_MAGIC = b"L2KVSTAT"
_STATE_VERSION = 1
_STATE_HEADER = struct.Struct("<8sI")


def _read_checked_state(path: Path) -> bytes:
    """The state in a save_state file, after its checksum is verified."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidParamsError(f"cannot read the state file {path}: {exc.strerror}") from None
    version = _STATE_HEADER.unpack_from(data)[1] if len(data) >= _STATE_HEADER.size else _STATE_VERSION
    if version != _STATE_VERSION:
        raise InvalidParamsError(f"the state file {path} has version {version}; this l2kv-cpp reads {_STATE_VERSION}")
    state = checked_file.checked_payload(data, _STATE_HEADER.size)
    if state is None:
        raise InvalidParamsError(
            f"the state file {path} is damaged (its checksum does not match: truncated or changed); nothing was loaded"
        )
    return state
