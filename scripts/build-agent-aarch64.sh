#!/usr/bin/env bash
# Cross-builds the guest agent statically for aarch64 guests into
# target/agent/aarch64-unknown-linux-gnu/release/tvm-agent (see docs/arm64.md).
#
# rustup cannot download the aarch64 standard library here, so the build runs
# in a Debian trixie build root: Debian's rustc/cargo 1.85 with the matching
# `libstd-rust-dev:arm64` (multiarch) and `gcc-aarch64-linux-gnu` as linker
# (static glibc from libc6-dev-arm64-cross). On an aarch64 host the native
# build (scripts/build-agent.sh with the host target) needs none of this.
#
# The build root is cached under TVM's cache dir, keyed by its inputs (suite,
# package list, this recipe's version): ~/.cache/tvm/buildroot/<key>/root, and
# the crates it downloads in ~/.cache/tvm/buildroot/cargo-home. Needs root
# (mmdebstrap --mode=root, bind mounts); every mount is undone on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ws=$(pwd)

suite=trixie
packages="rustc,cargo,libstd-rust-dev:arm64,gcc-aarch64-linux-gnu,libc6-dev-arm64-cross,ca-certificates"
recipe_version=1
cache=${TVM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tvm}
key=$(printf '%s\n' "$recipe_version" "$suite" "$packages" | sha256sum | cut -c1-24)
broot="$cache/buildroot/$key"
cargo_home="$cache/buildroot/cargo-home"
mkdir -p "$cache/buildroot" "$cargo_home" "$cache/locks"

if [ "$(id -u)" != 0 ]; then
  echo "build-agent-aarch64: needs root (mmdebstrap --mode=root and bind mounts)" >&2
  exit 1
fi
command -v mmdebstrap >/dev/null || { echo "build-agent-aarch64: apt-get install mmdebstrap" >&2; exit 1; }

# One builder of the root at a time; others wait and reuse it.
exec 9>"$cache/locks/buildroot-$key"
flock 9
if [ ! -x "$broot/root/usr/bin/cargo" ]; then
  tmp="$cache/buildroot/.tmp-$key-$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  echo "build-agent-aarch64: creating the $suite build root $key (rustc, libstd-rust-dev:arm64, gcc-aarch64-linux-gnu)"
  mmdebstrap --mode=root --variant=minbase --architectures=amd64,arm64 --include="$packages" \
    "$suite" "$tmp/root" http://deb.debian.org/debian >"$tmp/log" 2>&1 || { tail -20 "$tmp/log" >&2; exit 1; }
  rm -rf "$tmp/root/var/cache/apt/archives"/*.deb "$tmp/root/var/lib/apt/lists"/*_Packages
  mkdir -p "$broot"
  mv "$tmp/root" "$broot/root"
  rm -rf "$tmp"
  trap - EXIT
fi
flock -u 9

root="$broot/root"
# A private mount namespace: the bind mounts vanish with this process,
# whatever happens to it.
unshare --mount --propagation private -- bash -euo pipefail -c '
  root=$1 ws=$2 cargo_home=$3
  mkdir -p "$root/src" "$root/cargo-home"
  mount --bind "$ws" "$root/src"
  mount --bind "$cargo_home" "$root/cargo-home"
  mount -t proc proc "$root/proc"
  mount --bind /dev "$root/dev"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  # crates.io through the host'"'"'s trust store (it may hold a proxy'"'"'s CA).
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/host-ca.crt"
  chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root CARGO_HOME=/cargo-home CARGO_HTTP_CAINFO=/etc/ssl/host-ca.crt \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
    sh -c "cd /src && cargo build --quiet -p tvm-agent --release --target aarch64-unknown-linux-gnu --target-dir target/agent"
' build-agent-aarch64 "$root" "$ws" "$cargo_home"
file target/agent/aarch64-unknown-linux-gnu/release/tvm-agent 2>/dev/null | grep -q "ARM aarch64.*statically linked" ||
  { echo "build-agent-aarch64: the agent is not a static aarch64 executable" >&2; exit 1; }
echo "agent: target/agent/aarch64-unknown-linux-gnu/release/tvm-agent"
