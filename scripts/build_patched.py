#!/usr/bin/env python3
"""Build and install the patched llama-cpp-python that l2kv-cpp runs on.

    python scripts/build_patched.py            # CPU build (flash attention included)
    python scripts/build_patched.py --cuda --cuda-arch 90
    python scripts/build_patched.py --no-install --print-wheel
    python scripts/build_patched.py --no-rpc   # without the RPC backend (on by default: --rpc HOST:PORT)

Steps: download the pinned sdist from PyPI (l2kv_cpp/upstream.toml) and check its sha256, apply
patches/ and copy native/ into it (scripts/apply_patches.py), build a wheel with only the
libraries the Python package loads (no mtmd/llava, tools, examples, tests or server; llama.cpp's
rpc-server as l2kv-rpc-server beside them, for `l2kv-cpp rpc-server`), and
install it into the running Python with pip. On macOS llama-cpp-python enables Metal itself.

Caching, under $L2KV_CACHE_DIR (default ~/.cache/l2kv-cpp):
  sdist/   the verified sdist
  wheels/  built wheels keyed by (sdist sha256, hash of patches/ + native/, build flags, machine):
           a rebuild with nothing changed reinstalls the cached wheel in seconds; only the 4 most
           recently used are kept
  src/, build/  a source tree that is only rewritten where bytes changed, and a persistent CMake
           build folder, so after a patch change only the touched files recompile
  logs/    the full compiler output of every build

Standard library only, so it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apply_patches import PatchError, apply_series  # noqa: E402

from l2kv_cpp.upstream import UpstreamPin, cache_dir, read_upstream, sha256_file, source_hash  # noqa: E402  (path set by apply_patches)

MIN_CMAKE = (3, 21)


class BuildError(RuntimeError):
    """A build step failed; the message is one line saying what to do."""


@dataclass(frozen=True)
class BuildOptions:
    cuda: bool = False  # GGML_CUDA=on
    cuda_arch: str = "native"  # CMAKE_CUDA_ARCHITECTURES, e.g. "90" for H100
    extra_cmake_args: tuple[str, ...] = ()  # appended verbatim, e.g. -DGGML_NATIVE=OFF
    jobs: int = field(default_factory=lambda: os.cpu_count() or 2)
    rpc: bool = True  # GGML_RPC: the RPC backend (--rpc HOST:PORT) and l2kv-rpc-server (+3% compile, +0.4 MB)
    sanitize: bool = False  # AddressSanitizer + UndefinedBehaviorSanitizer (scripts/sanitize_tests.sh)


def log(msg: str) -> None:
    print(f"[l2kv-build] {msg}", file=sys.stderr, flush=True)


def check_tools(opts: BuildOptions) -> None:
    """Fail early, in one line, when a tool the build needs is missing."""
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if not cxx or not shutil.which(cxx) or not cc or not shutil.which(cc):
        raise BuildError("no C/C++ compiler found: install one (e.g. apt-get install build-essential) or set CC/CXX")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise BuildError(
            f"cmake not found: install CMake >= {'.'.join(map(str, MIN_CMAKE))} "
            "(apt-get install cmake, or pip install cmake)"
        )
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"(\d+)\.(\d+)", out)
    if not m or (int(m[1]), int(m[2])) < MIN_CMAKE:
        raise BuildError(
            f"cmake is too old ({out.splitlines()[0] if out else '?'}): need >= {'.'.join(map(str, MIN_CMAKE))}"
        )
    if shutil.which("patch") is None:
        raise BuildError("the `patch` program is missing: install it (e.g. apt-get install patch)")
    if opts.cuda and shutil.which("nvcc") is None and not os.environ.get("CUDACXX"):
        raise BuildError("--cuda needs nvcc on PATH (or CUDACXX set): install the CUDA toolkit")


def fetch_sdist(pin: UpstreamPin) -> Path:
    """The pinned sdist, downloaded once with pip and verified against the pin's sha256."""
    dest = cache_dir() / "sdist" / pin.sdist_filename
    if dest.is_file() and sha256_file(dest) == pin.sdist_sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading llama-cpp-python=={pin.llama_cpp_python_version} sdist from PyPI")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--quiet",
            "-d",
            tmp,
            f"llama-cpp-python=={pin.llama_cpp_python_version}",
        ]
        if subprocess.run(cmd).returncode != 0:
            raise BuildError("pip could not download the llama-cpp-python sdist: check the network / PyPI access")
        got = Path(tmp) / pin.sdist_filename
        if not got.is_file():
            raise BuildError(f"pip did not produce {pin.sdist_filename}")
        digest = sha256_file(got)
        if digest != pin.sdist_sha256:
            raise BuildError(f"sdist sha256 mismatch: got {digest}, pinned {pin.sdist_sha256}")
        shutil.move(str(got), dest)
    return dest


def cmake_args(opts: BuildOptions, pin: UpstreamPin, src_hash: str) -> list[str]:
    args = [
        "-DLLAVA_BUILD=OFF",  # no libmtmd: l2kv-cpp is text-only
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_TOOLS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        f"-DLLAMA_BUILD_COMMIT={pin.llama_cpp_commit[:8]}",
        f"-DLLAMA_L2KV_SOURCE_HASH={src_hash[:12]}",
    ]
    if opts.cuda:
        args += ["-DGGML_CUDA=on", f"-DCMAKE_CUDA_ARCHITECTURES={opts.cuda_arch}"]
    # always explicit: CMake keeps a cached value, and the switch recompiles everything (GGML_USE_RPC is public)
    args += [f"-DGGML_RPC={'ON' if opts.rpc else 'OFF'}"]
    if opts.sanitize:  # llama.cpp's own switches: -fsanitize=... for libllama and ggml
        args += ["-DLLAMA_SANITIZE_ADDRESS=ON", "-DLLAMA_SANITIZE_UNDEFINED=ON", "-DCMAKE_BUILD_TYPE=RelWithDebInfo"]
    return args + list(opts.extra_cmake_args)


def flags_key(opts: BuildOptions) -> str:
    """Identifies a build configuration (not the sources): names the incremental build folder."""
    cpu = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # GGML_NATIVE builds for this CPU: never reuse a build on another one
        cpu = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")), "")
    parts = [platform.system(), platform.machine(), cpu, str(opts.cuda), opts.cuda_arch, *opts.extra_cmake_args]
    if opts.sanitize:
        parts.append("sanitize")  # its own build folder and wheel (a plain build is never replaced by it)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def sync_tree(src: Path, dst: Path) -> int:
    """Make dst a copy of src, rewriting only files whose bytes differ; returns files written."""
    written = 0
    src_files = {p.relative_to(src) for p in src.rglob("*") if p.is_file() or p.is_symlink()}
    if dst.exists():
        for p in sorted(dst.rglob("*"), reverse=True):
            rel = p.relative_to(dst)
            if (p.is_file() or p.is_symlink()) and rel not in src_files:
                p.unlink()
            elif p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                p.rmdir()
    for rel in sorted(src_files):
        s, d = src / rel, dst / rel
        if s.is_symlink():
            if d.is_symlink() and os.readlink(d) == os.readlink(s):
                continue
            d.parent.mkdir(parents=True, exist_ok=True)
            if d.exists() or d.is_symlink():
                d.unlink()
            os.symlink(os.readlink(s), d)
            written += 1
            continue
        if (
            d.is_file()
            and not d.is_symlink()
            and d.stat().st_size == s.stat().st_size
            and d.read_bytes() == s.read_bytes()
        ):
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        if d.is_symlink():
            d.unlink()
        shutil.copy2(s, d)
        os.utime(d)  # a changed file must look newer than its objects
        written += 1
    return written


def prepare_source(sdist: Path, fkey: str) -> Path:
    """Unpack + patch into a staging folder, then sync it into the stable source folder."""
    stable = cache_dir() / "src" / fkey
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        with tarfile.open(sdist) as tar:
            kwargs = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
            tar.extractall(tmp, **kwargs)
        (root,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        try:
            apply_series(root, log=lambda m: log(f"patch {m}"))
        except PatchError as exc:
            raise BuildError(str(exc)) from None
        n = sync_tree(root, stable)
    log(f"source tree ready at {stable} ({n} files changed since the last build)")
    return stable


_PROGRESS = re.compile(r"\[(\d+)/(\d+)\]")


def run_with_progress(cmd: list[str], env: dict[str, str], log_path: Path) -> int:
    """Run the build, keep the full output in log_path and show ninja's [n/N] progress."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tty = sys.stderr.isatty()
    start = time.monotonic()
    last_pct = -10
    with (
        log_path.open("w") as logf,
        subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            m = _PROGRESS.search(line)
            if not m:
                continue
            done, total = int(m[1]), int(m[2])
            pct = 100 * done // max(total, 1)
            elapsed = time.monotonic() - start
            if tty:
                print(
                    f"\r[l2kv-build] compiling {done}/{total} ({pct}%) {elapsed:5.0f}s",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
            elif pct >= last_pct + 10:
                last_pct = pct
                log(f"compiling {done}/{total} ({pct}%) {elapsed:.0f}s")
        ret = proc.wait()
    if tty:
        print(file=sys.stderr)
    return ret


def build_wheel(source: Path, opts: BuildOptions, args: list[str], fkey: str, out_dir: Path, log_path: Path) -> Path:
    env = dict(os.environ)
    env["CMAKE_ARGS"] = " ".join(args)
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(opts.jobs)
    build_dir = cache_dir() / "build" / fkey
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-v",
            "-w",
            tmp,
            f"--config-settings=build-dir={build_dir}",
            str(source),
        ]
        log(f"building with CMAKE_ARGS={env['CMAKE_ARGS']} (log: {log_path})")
        t0 = time.monotonic()
        if run_with_progress(cmd, env, log_path) != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-25:]
            print("\n".join(tail), file=sys.stderr)
            raise BuildError(f"the build failed; full log: {log_path}")
        wheels = list(Path(tmp).glob("llama_cpp_python-*.whl"))
        if len(wheels) != 1:
            raise BuildError(f"expected one wheel from the build, got {wheels}")
        out_dir.mkdir(parents=True, exist_ok=True)
        dest = out_dir / wheels[0].name
        shutil.move(str(wheels[0]), dest)
    log(f"built {dest.name} in {time.monotonic() - t0:.0f}s")
    return dest


def install_wheel(wheel: Path) -> None:
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if subprocess.run([*pip, "--force-reinstall", "--no-deps", str(wheel)]).returncode != 0:
        raise BuildError(f"pip could not install {wheel}")
    if subprocess.run([*pip, str(wheel)]).returncode != 0:  # its own dependencies (numpy, jinja2, ...)
        raise BuildError(f"pip could not install the dependencies of {wheel.name}")
    log(f"installed {wheel.name} into {sys.prefix}")


KEEP_WHEELS = 4  # wheel cache entries kept: the newest by use (each wheel is about 20 MB)


def prune_wheels(wheels_root: Path, keep: int = KEEP_WHEELS) -> list[Path]:
    """Delete all but the `keep` most recently used entries of the wheel cache; returns the deleted ones.
    Every edit of native/ or patches/ makes a new key, so without this the cache grows per build."""
    entries = sorted((d for d in wheels_root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return entries[keep:]


def build(opts: BuildOptions, rebuild: bool = False, install: bool = True) -> Path:
    """The whole pipeline; returns the wheel path."""
    t0 = time.monotonic()
    check_tools(opts)
    pin = read_upstream()
    cache_dir().mkdir(parents=True, exist_ok=True)
    src_hash = source_hash()
    assert src_hash is not None  # the script lives in the checkout
    fkey = flags_key(opts)
    args = cmake_args(opts, pin, src_hash)
    key = hashlib.sha256("\0".join([pin.sdist_sha256, src_hash, fkey, *args]).encode()).hexdigest()[:16]
    wheel_dir = cache_dir() / "wheels" / key
    cached = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    if cached and not rebuild:
        wheel = cached[0]
        log(f"using cached wheel {wheel} (key {key})")
    else:
        sdist = fetch_sdist(pin)
        source = prepare_source(sdist, fkey)
        wheel = build_wheel(source, opts, args, fkey, wheel_dir, cache_dir() / "logs" / f"build-{key}.log")
    os.utime(wheel_dir)  # marks the entry as used, for prune_wheels
    pruned = prune_wheels(wheel_dir.parent)
    if pruned:
        log(f"pruned {len(pruned)} older cached wheel(s)")
    if install:
        install_wheel(wheel)
    log(f"done in {time.monotonic() - t0:.0f}s")
    return wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="build the CUDA backend (GGML_CUDA=on)")
    parser.add_argument("--cuda-arch", default="native", help="CMAKE_CUDA_ARCHITECTURES (default: native; e.g. 90)")
    parser.add_argument("--cmake-arg", action="append", default=[], help="extra CMake argument (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    parser.add_argument("--rebuild", action="store_true", help="ignore the cached wheel")
    parser.add_argument("--no-install", action="store_true", help="build (or find) the wheel only")
    parser.add_argument("--print-wheel", action="store_true", help="print the wheel path on stdout")
    parser.add_argument(
        "--rpc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the RPC backend (--rpc HOST:PORT) and l2kv-rpc-server (GGML_RPC; on by default)",
    )
    parser.add_argument(
        "--sanitize",
        action="store_true",
        help="AddressSanitizer + UBSan build (its own cache key), for its own venv: scripts/sanitize_tests.sh",
    )
    args = parser.parse_args(argv)
    opts = BuildOptions(
        cuda=args.cuda,
        cuda_arch=args.cuda_arch,
        extra_cmake_args=tuple(args.cmake_arg),
        jobs=args.jobs,
        rpc=args.rpc,
        sanitize=args.sanitize,
    )
    try:
        wheel = build(opts, rebuild=args.rebuild, install=not args.no_install)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if args.print_wheel:
        print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
