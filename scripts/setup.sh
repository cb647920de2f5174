#!/usr/bin/env bash
# Installs what ublk-mirror needs on Debian/Ubuntu (run as root): build tools and the real
# clients the tests and benchmarks use (qemu-io, qemu-img, qemu-nbd, fio, e2fsprogs, xfsprogs for
# reflink snapshots on XFS), and qemu to
# boot a ublk-capable kernel where the host's lacks it.
set -euo pipefail
# qemu-system-x86, busybox-static, cpio, xz-utils: the VM harness (ublk/vm/run) for hosts whose
# kernel lacks ublk. Recommends are skipped: qemu-system-x86 would pull in a desktop's worth.
# prometheus: its promtool checks contrib/prometheus's alert rules and the dashboard's queries
# (tests/contrib.rs). The package also enables a prometheus.service; where systemd runs, its
# postinst starts it (a Prometheus server on :9090 scraping itself), which nothing here uses:
# `systemctl disable --now prometheus` stops it.
# libnbd-bin: nbdinfo and nbdcopy, the libnbd clients of NBD over TLS (tests/nbd_tls.rs).
packages=(build-essential pkg-config libclang-dev busybox-static cpio xz-utils fio e2fsprogs xfsprogs util-linux procps python3 systemd prometheus libnbd-bin)
qemu_packages=(qemu-utils qemu-system-x86)
if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (it calls apt-get install)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt_options=()
qemu_release=()
codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
if [ "$codename" = bookworm ]; then
    # Debian 12 machines often carry qemu-utils from bookworm-backports (10.x), which breaks
    # bookworm's own qemu-system 7.2; take both from backports, through a private source list
    # (the system's sources plus backports) so the machine's apt configuration is untouched.
    sources=$(mktemp -d)
    trap 'rm -rf "$sources"' EXIT
    { cat /etc/apt/sources.list 2>/dev/null || true
      echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main"
    } > "$sources/sources.list"
    apt_options=(-o "Dir::Etc::SourceList=$sources/sources.list")
    qemu_release=(-t bookworm-backports)
fi
apt-get "${apt_options[@]}" update
apt-get "${apt_options[@]}" install -y --no-install-recommends "${packages[@]}"
apt-get "${apt_options[@]}" install -y --no-install-recommends "${qemu_release[@]}" "${qemu_packages[@]}"
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup.sh: cargo not found: install a Rust toolchain >= 1.89 (https://rustup.rs), then rerun" >&2
    exit 1
fi
# The locked dependencies need rustc 1.89 (Cargo.toml's rust-version); say so before a long
# build fails with a less direct message.
rustc_version=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n1.89.0\n' "$rustc_version" | sort -V | head -1)" != 1.89.0 ]; then
    echo "setup.sh: rustc $rustc_version is too old: ublk-mirror needs >= 1.89 (rustup update stable), then rerun" >&2
    exit 1
fi
