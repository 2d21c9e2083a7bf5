#!/usr/bin/env bash
# Install what vhostpy's DPDK tests need: dpdk-testpmd and the vhost-user PMDs it loads as plugins.
#   - dpdk-dev            ships /usr/bin/dpdk-testpmd (the "dpdk" package does NOT: it only has
#                         init scripts and dpdk-devbind.py). Its dependency libdpdk-dev pulls in
#                         librte-meta-all, i.e. every PMD; there is no smaller apt route to testpmd.
#   - librte-net-virtio23 net_virtio_user (vhost-user FRONT-END)   } listed explicitly so the
#   - librte-net-vhost23  net_vhost (DPDK's C vhost-user BACK-END)  } intent survives packaging
#   - librte-mempool-ring23 the default mempool driver ("ring_mp_mc")  } changes
# Idempotent: does nothing (no apt-get update) when everything is installed.
# Runs as root or through sudo; non-interactive. Prints the testpmd path and DPDK version at the end.
#   ci/dpdk/install-deps.sh
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

for arg in "$@"; do
    case "$arg" in
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "install-deps.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -eq 0 ]; then
    as_root() { "$@"; }
else
    as_root() { sudo env DEBIAN_FRONTEND=noninteractive "$@"; }
fi

# The runtime packages carry the DPDK ABI in their names: Debian 12 (DPDK 22.11) -> 23,
# Ubuntu 24.04 (23.11) -> 24, Ubuntu 22.04 (21.11) -> 22. Take the newest the archive offers.
abi=""
for cand in 26 25 24 23 22; do
    if apt-cache show "librte-net-virtio${cand}" >/dev/null 2>&1; then abi="$cand"; break; fi
done
abi_pkgs=()
if [ -n "$abi" ]; then
    abi_pkgs=("librte-net-virtio${abi}" "librte-net-vhost${abi}" "librte-mempool-ring${abi}")
fi

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

pkgs=(dpdk-dev "${abi_pkgs[@]}")
missing=()
for p in "${pkgs[@]}"; do
    installed "$p" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ] || [ -z "$abi" ]; then
    echo "install-deps.sh: installing ${missing[*]:-dpdk-dev and its vhost-user PMDs}"
    as_root apt-get update
    if [ -z "$abi" ]; then
        # Package lists were stale or empty: look the ABI suffix up again.
        for cand in 26 25 24 23 22; do
            if apt-cache show "librte-net-virtio${cand}" >/dev/null 2>&1; then abi="$cand"; break; fi
        done
        [ -n "$abi" ] || { echo "install-deps.sh: no librte-net-virtio* package in apt" >&2; exit 1; }
        missing=(dpdk-dev "librte-net-virtio${abi}" "librte-net-vhost${abi}" "librte-mempool-ring${abi}")
    fi
    as_root apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "install-deps.sh: all present (${pkgs[*]})"
fi

testpmd="$(command -v dpdk-testpmd || true)"
if [ -z "$testpmd" ]; then
    echo "install-deps.sh: dpdk-testpmd not on PATH after install" >&2
    exit 1
fi
version="$(dpkg-query -W -f='${Version}' dpdk-dev 2>/dev/null || echo unknown)"
echo "install-deps.sh: $testpmd (dpdk-dev $version)"
