#!/usr/bin/env bash
# The whole test suite, from a fresh machine: install what is missing, then run pytest once
# per implementation of the hot loops: the compiled (cffi) fast path, forced so that a failed
# build fails here instead of quietly falling back, then the pure-Python fallback.
# Extra arguments go to both pytest runs (e.g. `ci/test.sh -k blk -x`);
# VHOSTPY_TEST_IMPLEMENTATIONS="python" runs only the listed ones. Each run ends with its 15
# slowest tests (--durations), so the log shows where the 30-minute budget goes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
status=0
for impl in ${VHOSTPY_TEST_IMPLEMENTATIONS:-cffi python}; do
    echo "ci/test.sh: === VHOSTPY_IMPLEMENTATION=$impl ==="
    VHOSTPY_IMPLEMENTATION=$impl .venv/bin/python -m pytest -ra --durations=15 "$@" || status=$?
    if [ "$status" -ne 0 ]; then
        echo "ci/test.sh: the suite failed under VHOSTPY_IMPLEMENTATION=$impl" >&2
        exit "$status"
    fi
done
echo "ci/test.sh: the suite passed under: ${VHOSTPY_TEST_IMPLEMENTATIONS:-cffi python}"
