"""Evaluation records as JSON lines, each with its full config and provenance; finished runs are skipped.

A record carries: the task, its config (a flat dict), the model file's sha256, the package
version, the hash of the patch sources the library was built from, the device, and the outcome.
`ResultStore.done(config)` tells whether a record with the same task, model hash and config
exists, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import functools
import json
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..upstream import sha256_file


@functools.cache
def model_sha256(path: str) -> str:
    return sha256_file(Path(path))


@functools.cache
def provenance() -> dict[str, str]:
    """Package version, patch hash (from the loaded library) and device."""
    from .._ffi import native

    info = native().build_info()
    patch = info.rsplit("source ", 1)[-1] if "source " in info else "unknown"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")), cpu
        )
    import llama_cpp

    gpu = "gpu offload available" if llama_cpp.llama_supports_gpu_offload() else "cpu only"
    return {"package_version": __version__, "patch_hash": patch, "device": f"{cpu} ({gpu})"}


def config_key(task: str, model_hash: str, config: dict[str, Any]) -> str:
    return json.dumps({"task": task, "model_sha256": model_hash, **config}, sort_keys=True)


@dataclass
class ResultStore:
    path: Path
    _keys: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        for rec in self.records():
            self._keys.add(config_key(rec["task"], rec["model_sha256"], rec["config"]))

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.path.is_file():
            return
        with self.path.open() as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def done(self, task: str, model_path: str, config: dict[str, Any]) -> bool:
        return config_key(task, model_sha256(str(model_path)), config) in self._keys

    def add(self, task: str, model_path: str, config: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
        rec = {
            "task": task,
            "model": Path(model_path).name,
            "model_sha256": model_sha256(str(model_path)),
            **provenance(),
            "config": config,
            **outcome,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        self._keys.add(config_key(task, rec["model_sha256"], config))
        return rec
