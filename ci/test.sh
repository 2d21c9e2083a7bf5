#!/usr/bin/env bash
# The whole test suite, from a fresh machine: install what is missing, then run pytest.
# Extra arguments go to pytest (e.g. `ci/test.sh -k blk -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
exec .venv/bin/python -m pytest -ra "$@"
