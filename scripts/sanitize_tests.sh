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
# Subprocesses the tests start (the CLI, fuzz targets, servers) inherit the preload: they run sanitized too.
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
# A report halts the process with exit status 86. Reports go to stderr: pytest captures only Python's
# sys.stderr (--capture=sys), so a report written by C reaches the log even when it ends the process
# (the sanitizers' log_path was not honoured with both runtimes preloaded).
log=$(mktemp)
export LD_PRELOAD="$asan $ubsan"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=86"
export LLAMA_L2KV_SANITIZED=1  # (tests may read it; the library does not)

if [ "$#" -eq 0 ]; then
    set -- tests/test_native_api.py tests/test_eviction.py tests/test_state.py tests/test_positions.py \
        tests/test_archive.py tests/test_recall.py tests/test_generate.py tests/test_whole_prompt.py \
        tests/test_threads.py tests/test_fuzz.py tests/test_cli.py tests/test_serve.py -m "not slow and not gpu"
fi
set +e
"$venv/bin/python" -m pytest -p no:cacheprovider --capture=sys -q "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -eq 86 ] || grep -qE "runtime error:|ERROR: AddressSanitizer|ERROR: LeakSanitizer" "$log"; then
    echo "[sanitize] a sanitizer report (above; whole log: $log), pytest exit code $rc" >&2
    exit 1
fi
rm -f "$log"
echo "[sanitize] pytest exit code $rc, no sanitizer report"
exit "$rc"
