"""scripts/build_patched.py: its cache keys, incremental source sync and one-line tool errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from build_patched import BuildOptions, cmake_args, flags_key, prune_wheels, sync_tree

from l2kv_cpp.upstream import read_upstream

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build_patched.py"


def test_cmake_args_skip_unneeded_targets_and_select_cuda():
    pin = read_upstream()
    cpu = cmake_args(BuildOptions(), pin, "a" * 64)
    assert "-DLLAVA_BUILD=OFF" in cpu and "-DLLAMA_BUILD_TESTS=OFF" in cpu
    assert f"-DLLAMA_BUILD_COMMIT={pin.llama_cpp_commit[:8]}" in cpu
    assert "-DLLAMA_L2KV_SOURCE_HASH=aaaaaaaaaaaa" in cpu
    assert not any("CUDA" in a for a in cpu)
    cuda = cmake_args(BuildOptions(cuda=True, cuda_arch="90"), pin, "a" * 64)
    assert "-DGGML_CUDA=on" in cuda and "-DCMAKE_CUDA_ARCHITECTURES=90" in cuda


def test_flags_key_separates_configurations():
    assert flags_key(BuildOptions()) == flags_key(BuildOptions())
    assert flags_key(BuildOptions()) != flags_key(BuildOptions(cuda=True))
    assert flags_key(BuildOptions()) != flags_key(BuildOptions(extra_cmake_args=("-DGGML_NATIVE=OFF",)))


def test_prune_wheels_keeps_the_most_recently_used(tmp_path):
    now = time.time()
    for i in range(6):
        d = tmp_path / f"key{i}"
        d.mkdir()
        (d / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").write_bytes(b"wheel")
        os.utime(d, (now - 100 + i, now - 100 + i))  # key5 is the newest
    os.utime(tmp_path / "key0", (now, now))  # key0 was just used again
    pruned = prune_wheels(tmp_path, keep=3)
    assert sorted(p.name for p in pruned) == ["key1", "key2", "key3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key0", "key4", "key5"]


def test_sync_tree_rewrites_only_changed_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for root in (src, dst):
        (root / "d").mkdir(parents=True)
        (root / "same.c").write_text("same")
        (root / "d" / "changed.c").write_text("old")
    (dst / "stale.c").write_text("gone soon")
    (src / "d" / "changed.c").write_text("new!")
    (src / "added.c").write_text("added")
    old = time.time() - 3600
    for p in (dst / "same.c", dst / "d" / "changed.c"):
        os.utime(p, (old, old))

    assert sync_tree(src, dst) == 2
    assert (dst / "d" / "changed.c").read_text() == "new!" and (dst / "added.c").read_text() == "added"
    assert not (dst / "stale.c").exists()
    assert (dst / "same.c").stat().st_mtime == old  # untouched: the build will not recompile it
    assert (dst / "d" / "changed.c").stat().st_mtime > old
    assert sync_tree(src, dst) == 0


def _run_with_path(path_dirs: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": os.pathsep.join(map(str, path_dirs))}
    env.pop("CC", None)
    env.pop("CXX", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--no-install"], env=env, capture_output=True, text=True, timeout=60
    )


def _bin_with(tmp_path: Path, names: list[str]) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in names:
        real = shutil.which(name)
        assert real, f"{name} is needed on this machine for the test"
        (bindir / name).symlink_to(real)
    return bindir


def test_missing_compiler_is_one_line(tmp_path):
    res = _run_with_path([_bin_with(tmp_path, ["cmake", "patch"])])
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "error: no C/C++ compiler found: install one (e.g. apt-get install build-essential) or set CC/CXX"
    ]


def test_missing_cmake_is_one_line(tmp_path):
    res = _run_with_path([_bin_with(tmp_path, ["cc", "c++", "patch"])])
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cmake not found: install CMake >= 3.21")
