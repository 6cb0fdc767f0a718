#!/usr/bin/env python3
"""Apply the l2kv-cpp patch series to an unpacked llama-cpp-python sdist.

Idempotent: a patch that is already applied is skipped, so running it twice is a no-op. Our own
sources (native/) are copied to <llama.cpp>/l2kv/, where patch 0001 picks them up.

    python scripts/apply_patches.py path/to/llama_cpp_python-0.3.36

Uses `patch`, not `git apply`: the sdist's vendor/llama.cpp/.git points outside the sdist.
Standard library only, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # l2kv_cpp.upstream is standard-library only
from l2kv_cpp.upstream import read_upstream  # noqa: E402

PATCHES_DIR = REPO_ROOT / "patches"
NATIVE_DIR = REPO_ROOT / "native"


class PatchError(RuntimeError):
    """A patch does not apply: the message says which one and how to refresh it."""


def patch_files(patches_dir: Path = PATCHES_DIR) -> list[Path]:
    return sorted(patches_dir.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def vendored_commit(sdist_root: Path) -> str | None:
    """The llama.cpp submodule commit recorded in the sdist's own .git folder, if it shipped one."""
    head = sdist_root / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    return head.read_text().strip() if head.is_file() else None


def _patch(llama_dir: Path, patch: Path, *flags: str) -> bool:
    # --fuzz=0: a hunk applies exactly where it was made or not at all
    cmd = ["patch", "-p1", "--batch", "--silent", "--fuzz=0", "-d", str(llama_dir), "-i", str(patch), *flags]
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def apply_patch(llama_dir: Path, patch: Path) -> str:
    """Apply one patch; return "applied" or "already applied"; raise PatchError otherwise."""
    # --force keeps patch from "helpfully" ignoring --reverse on an unpatched tree
    if _patch(llama_dir, patch, "--reverse", "--force", "--dry-run"):
        return "already applied"
    if not _patch(llama_dir, patch, "--forward", "--dry-run"):
        raise PatchError(
            f"{patch.name} does not apply to {llama_dir}: the vendored llama.cpp differs from the "
            f"pinned one; refresh the patch against the commit in l2kv_cpp/upstream.toml "
            f"(see patches/README.md)"
        )
    if not _patch(llama_dir, patch, "--forward", "--no-backup-if-mismatch"):
        raise PatchError(f"{patch.name}: patch failed after a clean dry run in {llama_dir}")
    return "applied"


def copy_native(llama_dir: Path, native_dir: Path = NATIVE_DIR) -> None:
    """Mirror native/ into <llama.cpp>/l2kv/, rewriting only files whose bytes changed.

    Unchanged files keep their timestamps, so an incremental build recompiles only what changed.
    """
    dest = llama_dir / "l2kv"
    wanted = {p.relative_to(native_dir) for p in native_dir.rglob("*") if p.is_file()}
    if dest.exists():
        for p in sorted(dest.rglob("*"), reverse=True):
            rel = p.relative_to(dest)
            if p.is_file() and rel not in wanted:
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    for rel in sorted(wanted):
        src, dst = native_dir / rel, dest / rel
        if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def apply_series(sdist_root: Path, log=print) -> None:
    """Check the vendored commit, copy native/ and apply every patch in order."""
    llama_dir = sdist_root / "vendor" / "llama.cpp"
    if not (llama_dir / "src" / "llama.cpp").is_file():
        raise PatchError(f"{sdist_root} is not an unpacked llama-cpp-python sdist (no vendor/llama.cpp/src)")
    want = read_upstream().llama_cpp_commit
    have = vendored_commit(sdist_root)
    if have is not None and have != want:
        raise PatchError(
            f"vendored llama.cpp is at {have[:12]}, the patches are for {want[:12]} (l2kv_cpp/upstream.toml)"
        )
    if shutil.which("patch") is None:
        raise PatchError("the `patch` program is missing: install it (e.g. apt-get install patch)")
    copy_native(llama_dir)
    for patch in patch_files():
        log(f"{patch.name}: {apply_patch(llama_dir, patch)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist_root", type=Path, help="unpacked llama_cpp_python-<version> folder")
    args = parser.parse_args(argv)
    try:
        apply_series(args.sdist_root)
    except PatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
