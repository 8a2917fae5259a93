#!/bin/bash
# System packages gemfs needs (Debian/Ubuntu, as root). Idempotent: installs only what is missing.
# Core: FUSE 3 and its headers (pyfuse3 builds against them), a compiler, Python venv, fio
# (the outside tool the tests run against the mount), attr (getfattr for people at a shell).
# Guest: QEMU, a distribution kernel and a static busybox for `gemfs calibrate`.
set -euo pipefail
CORE=(fuse3 libfuse3-dev pkg-config gcc libc6-dev python3-venv python3-dev fio attr)
GUEST=(qemu-system-x86 busybox-static)

missing() {
    local out=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || out+=("$p")
    done
    echo "${out[@]:-}"
}

need_core=$(missing "${CORE[@]}")
need_guest=$(missing "${GUEST[@]}")
have_kernel=$(ls /boot/vmlinuz-* 2>/dev/null | head -1 || true)
if [ -z "$need_core" ] && [ -z "$need_guest" ] && [ -n "$have_kernel" ]; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if [ -n "$need_core" ]; then
    echo "installing: $need_core"
    # shellcheck disable=SC2086
    apt-get install -y -qq $need_core
fi
# The guest pieces are best effort: without them `gemfs calibrate` says so and its test skips.
kernel=""
if [ -z "$have_kernel" ]; then
    for k in linux-image-amd64 linux-image-generic; do
        if apt-cache show "$k" >/dev/null 2>&1; then kernel=$k; break; fi
    done
fi
extra="$need_guest $kernel"
if [ -n "${extra// /}" ]; then
    echo "installing (for gemfs calibrate): $extra"
    # shellcheck disable=SC2086
    apt-get install -y -qq $extra || echo "warning: could not install $extra; calibrate will be skipped"
fi
