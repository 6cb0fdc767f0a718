#!/usr/bin/env bash
# The tests that reach our C/C++ under AddressSanitizer + UndefinedBehaviorSanitizer (issue 21).
#
#   scripts/sanitize_tests.sh                  # every non-slow test file that calls into libllama
#   scripts/sanitize_tests.sh tests/test_state.py -k resume
#
# libllama (llama.cpp and native/) is built with -fsanitize=address,undefined into its own cache key
# and installed into its own virtual environment (.venv-asan), so the normal build is never touched.
# Python itself is not instrumented: the ASan runtime is preloaded, leak checking is off (the
# interpreter's own allocations would drown the report), and any report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-asan
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -e '.[dev]'
"$venv/bin/python" scripts/build_patched.py --sanitize

asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
[ -f "$asan" ] && [ -f "$ubsan" ] || { echo "error: gcc's libasan/libubsan not found" >&2; exit 1; }
log_dir=$(mktemp -d)
export LD_PRELOAD="$asan $ubsan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:log_path=$log_dir/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$log_dir/ubsan"
export LLAMA_L2KV_SANITIZED=1  # (tests may read it; the library does not)

if [ "$#" -eq 0 ]; then
    set -- tests/test_native_api.py tests/test_eviction.py tests/test_state.py tests/test_positions.py \
        tests/test_archive.py tests/test_recall.py tests/test_generate.py tests/test_whole_prompt.py \
        tests/test_cli.py tests/test_serve.py -m "not slow and not gpu"
fi
rc=0
"$venv/bin/python" -m pytest -p no:cacheprovider -q "$@" || rc=$?
reports=$(ls "$log_dir" 2>/dev/null | wc -l)
if [ "$reports" -ne 0 ]; then
    echo "sanitizer reports ($log_dir):" >&2
    cat "$log_dir"/* >&2
    exit 1
fi
echo "[sanitize] pytest exit code $rc, no sanitizer report"
exit "$rc"
