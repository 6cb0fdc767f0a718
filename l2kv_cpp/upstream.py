"""The pinned upstream (upstream.toml beside this file), the hash of our native sources, the cache folder.

Standard library only and free of other package imports: scripts/build_patched.py and
scripts/apply_patches.py import it before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

PIN_FILE = Path(__file__).resolve().parent / "upstream.toml"
REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("patches", "native")  # everything of ours that is compiled into libllama


@dataclass(frozen=True)
class UpstreamPin:
    llama_cpp_python_version: str
    sdist_filename: str
    sdist_sha256: str
    llama_cpp_commit: str


def read_upstream(path: Path = PIN_FILE) -> UpstreamPin:
    """Parse the flat `key = "value"` pin file (no tomllib, so Python 3.10 works)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip('"')
    return UpstreamPin(**values)


def source_hash(root: Path = REPO_ROOT) -> str | None:
    """sha256 over patches/ and native/ of a source checkout; None outside one.

    The build script compiles its first 12 hex digits into the library (llama_l2kv_build_info),
    so `l2kv-cpp doctor` can tell a library built from other sources.
    """
    dirs = [root / d for d in SOURCE_DIRS]
    if not all(d.is_dir() for d in dirs):
        return None
    h = hashlib.sha256()
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.suffix != ".md":  # docs do not change the build
                h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def cache_dir() -> Path:
    """Root of everything l2kv-cpp caches: $L2KV_CACHE_DIR, default ~/.cache/l2kv-cpp."""
    return Path(os.environ.get("L2KV_CACHE_DIR", Path.home() / ".cache" / "l2kv-cpp"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
