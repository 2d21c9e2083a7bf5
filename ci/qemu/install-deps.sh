#!/usr/bin/env bash
# Install what vhostpy's QEMU guest tests need: QEMU (+ qemu-storage-daemon from qemu-utils),
# a guest kernel with modules, static busybox, e2fsprogs, cpio, kmod (modinfo).
# Idempotent: does nothing (no apt-get update) when everything is installed.
# Runs as root or through sudo; non-interactive.
#   ci/qemu/install-deps.sh [--kvm]
#     --kvm   also make /dev/kvm usable by every user (udev rule; for GitHub runners).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

want_kvm=0
for arg in "$@"; do
    case "$arg" in
        --kvm) want_kvm=1 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "install-deps.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -eq 0 ]; then
    as_root() { "$@"; }
else
    as_root() { sudo env DEBIAN_FRONTEND=noninteractive "$@"; }
fi

os_id=debian
if [ -r /etc/os-release ]; then
    # shellcheck disable=SC1091
    os_id="$(. /etc/os-release && echo "${ID:-debian}")"
fi

pkgs=(qemu-system-x86 qemu-utils busybox-static e2fsprogs cpio kmod)
if [ "$os_id" = ubuntu ]; then
    # Ubuntu has no linux-image-amd64; the running kernel is usually installed already.
    # Its modules are .ko.zst, which the initramfs builder decompresses with zstd.
    pkgs+=(zstd)
    if [ ! -e "/boot/vmlinuz-$(uname -r)" ] || [ ! -d "/lib/modules/$(uname -r)" ]; then
        pkgs+=(linux-image-generic)
    fi
else
    pkgs+=(linux-image-amd64)
fi

missing=()
for p in "${pkgs[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps.sh: installing ${missing[*]}"
    as_root apt-get update
    as_root apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "install-deps.sh: all present (${pkgs[*]})"
fi

# Ubuntu installs /boot/vmlinuz-* mode 0600; QEMU (run as the test user) must read it.
for k in /boot/vmlinuz-*; do
    [ -e "$k" ] || continue
    perm="$(stat -c %A "$k")"   # e.g. -rw------- : index 7 is "others may read"
    if [ "${perm:7:1}" != r ]; then
        as_root chmod 0644 "$k"
    fi
done

if [ "$want_kvm" -eq 1 ] && [ -e /dev/kvm ]; then
    echo 'KERNEL=="kvm", GROUP="kvm", MODE="0666", OPTIONS+="static_node=kvm"' |
        as_root tee /etc/udev/rules.d/99-vhostpy-kvm.rules >/dev/null
    as_root udevadm control --reload-rules || true
    as_root udevadm trigger --name-match=kvm || true
    as_root chmod 0666 /dev/kvm || true
fi
