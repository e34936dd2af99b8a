#!/usr/bin/env bash
# Run the CPU-emulated kernel tests (tests/test_kernel.py) with deform_attn.cu built under AddressSanitizer and
# UndefinedBehaviorSanitizer: an out-of-bounds read or write on a tensor buffer, or undefined behaviour such as a
# signed index overflow, aborts the run with a report. Python is not instrumented, so the ASan runtime must be
# preloaded for the instrumented kernel library to load at all. Usage: kernels/sanitize.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

CXX=${CXX:-g++}
ASAN_LIB=$("$CXX" -print-file-name=libasan.so)
if [ ! -e "$ASAN_LIB" ]; then
    echo "sanitize.sh: $CXX has no libasan.so (install the compiler's sanitizer runtime)" >&2
    exit 2
fi

export MMI_KERNEL_SANITIZE=1  # mmfs_kernel.py adds -fsanitize=address,undefined to the g++ build
# leaks: the Python interpreter never frees everything; alloc_dealloc_mismatch: torch's own allocations.
export ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# --capture=sys: a sanitizer report is written to fd 2 just before the abort; pytest must not swallow it.
# The nvcc check compiles for the GPU and runs nothing: leave it to the plain run.
LD_PRELOAD="$ASAN_LIB" python -m pytest -q --capture=sys -p no:cacheprovider tests/test_kernel.py -k "not nvcc" "$@"
echo "sanitize.sh: no AddressSanitizer/UBSan findings in the emulated kernel"
