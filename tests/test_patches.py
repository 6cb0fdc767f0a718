"""The patch series against the pinned sdist: clean apply, idempotent re-apply, clear failures."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from pathlib import Path

import pytest
from apply_patches import NATIVE_DIR, PatchError, apply_series, patch_files, vendored_commit
from build_patched import fetch_sdist

from l2kv_cpp.upstream import read_upstream

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pinned sdist (downloaded and sha256-checked once), unpacked."""
    sdist = fetch_sdist(read_upstream())
    dest = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))
    (root,) = list(dest.iterdir())
    return root


@pytest.fixture
def sdist(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / pristine.name
    shutil.copytree(pristine, copy, symlinks=True)
    return copy


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_pristine_sdist_is_the_pinned_commit(pristine):
    assert vendored_commit(pristine) == read_upstream().llama_cpp_commit


def test_series_applies_cleanly_then_reapplying_is_a_noop(sdist):
    llama = sdist / "vendor" / "llama.cpp"
    before = tree_digest(llama)
    first: list[str] = []
    apply_series(sdist, log=first.append)
    assert first == [f"{p.name}: applied" for p in patch_files()]
    after_first = tree_digest(llama)
    assert after_first != before
    # our sources are copied verbatim
    for src in NATIVE_DIR.rglob("*"):
        if src.is_file():
            assert (llama / "l2kv" / src.relative_to(NATIVE_DIR)).read_bytes() == src.read_bytes()
    assert "l2kv/l2kv.cmake" in (llama / "src" / "CMakeLists.txt").read_text()

    second: list[str] = []
    apply_series(sdist, log=second.append)
    assert second == [f"{p.name}: already applied" for p in patch_files()]
    assert tree_digest(llama) == after_first


def test_patch_touches_only_what_its_header_describes():
    """Hooks only: every patch is small and edits upstream files, never adds our logic there."""
    for patch in patch_files():
        text = patch.read_text()
        assert text.startswith("From: l2kv-cpp\nSubject: [PATCH "), patch.name
        added = [ln for ln in text.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
        assert 0 < len(added) <= 40, f"{patch.name} adds {len(added)} lines: move logic to native/"


def test_conflicting_upstream_fails_with_instructions_and_changes_nothing(sdist):
    cmake = sdist / "vendor" / "llama.cpp" / "src" / "CMakeLists.txt"
    cmake.write_text(cmake.read_text().replace("LLAMA_SHARED)\nendif()", "LLAMA_SHARED)\n# drift\nendif()"))
    before = tree_digest(sdist / "vendor" / "llama.cpp" / "src")
    with pytest.raises(PatchError, match=r"0001-.*does not apply.*refresh the patch.*patches/README.md"):
        apply_series(sdist)
    assert tree_digest(sdist / "vendor" / "llama.cpp" / "src") == before


def test_other_vendored_commit_is_refused(sdist):
    head = sdist / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    head.write_text("0" * 40 + "\n")
    with pytest.raises(PatchError, match="vendored llama.cpp is at 000000000000"):
        apply_series(sdist)
