#!/usr/bin/env bash
# Install everything vhostpy's demo and test suite need on a fresh Debian or Ubuntu machine:
# system packages (QEMU, a guest kernel, busybox, e2fsprogs, python venv) and a virtual
# environment at .venv with vhostpy installed in editable mode plus the test tools.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

bash ci/qemu/install-deps.sh
bash ci/dpdk/install-deps.sh
bash ci/bench/install-deps.sh
bash ci/nbd/install-deps.sh

need_pkgs=()
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)        # network namespaces (tap test)
python3 -m venv --help >/dev/null 2>&1 || need_pkgs+=(python3-venv)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"; then
        $SUDO apt-get update -q
        $SUDO apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.vhostpy-installed
# Reinstall when the packaging or any source of the compiled fast path changed since the
# last install (the editable install builds vhostpy/_native*.so once, from these files):
# every C file and header of the package by glob, so a new one is covered without an edit
# here, plus the cffi builder.
stale=0
shopt -s nullglob
for f in pyproject.toml setup.py vhostpy/_native_build.py vhostpy/_*.c vhostpy/_*.h; do
    if [ -f "$f" ] && [ "$f" -nt "$stamp" ]; then stale=1; fi
done
shopt -u nullglob
if [ ! -f "$stamp" ] || [ "$stale" = 1 ]; then
    log=.venv/pip-install.log
    if ! { .venv/bin/python -m pip install -q --upgrade pip &&
           .venv/bin/python -m pip install -q -e '.[test]'; } > "$log" 2>&1; then
        cat "$log" >&2
        echo "ci/install.sh: pip install failed" >&2
        exit 1
    fi
    touch "$stamp"
fi
echo "ci/install.sh: ready (.venv/bin/python, $(.venv/bin/python --version))"
