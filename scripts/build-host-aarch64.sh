#!/usr/bin/env bash
# Cross-builds the host `tvm` for aarch64 Linux (arm64 servers, the arm64 Lima
# VM of an Apple silicon Mac) on x86_64 into
# target/cross/aarch64-unknown-linux-gnu/release/tvm, then (with --run) runs it
# under qemu-user to show that it starts: `tvm --version`,
# `tvm runtimes --matrix`, `tvm doctor`. See docs/arm64.md.
#
# rustup cannot download the aarch64 std here, so the build uses Debian trixie's
# rustc/cargo 1.85 with the matching `libstd-rust-dev:arm64` in the cached build
# root of scripts/lib/trixie-root.sh, linking with gcc-aarch64-linux-gnu against
# trixie's arm64 glibc (dynamically, as a normal host binary). The dependencies are
# resolved for Rust 1.85 in a scratch copy of the workspace
# (scripts/lib/msrv-workspace.sh); the repository's Cargo.lock is not changed.
# On an aarch64 host with rustup, `cargo build --release -p tvm` is all it takes.
#
#   scripts/build-host-aarch64.sh [--run]
#
# --run needs qemu-user-static with its binfmt_misc handler for aarch64 (the
# script registers Debian's if binfmt_misc has none) and runs the binary with
# QEMU_LD_PREFIX pointing at the build root's arm64 libraries. Needs root
# (mmdebstrap, chroot, bind mounts) and the Debian mirror and crates.io.
# Not part of CI: see docs/arm64.md for its measured cost.
set -euo pipefail
cd "$(dirname "$0")/.."
ws=$PWD
run=false
[ "${1:-}" = --run ] && run=true
source scripts/lib/trixie-root.sh
source scripts/lib/msrv-workspace.sh

started=$SECONDS
trixie_root "rustc,cargo,rust-src,libstd-rust-dev:arm64,gcc-aarch64-linux-gnu,libc6-dev-arm64-cross,binutils-mingw-w64-x86-64,ca-certificates"
root=$TRIXIE_ROOT
echo "build-host-aarch64: build root ready ($((SECONDS - started)) s)"
msrv_workspace "$root" "$ws"
echo "build-host-aarch64: dependencies resolved for rustc 1.85 ($((SECONDS - started)) s)"
# ring (rustls, for OCI registries) compiles C and assembly for the target.
TRIXIE_ENV=(CARGO_TARGET_DIR=/src/target/cross
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar)
trixie_chroot "$root" "$ws" \
  "cd target/portable/ws && cargo build --quiet --locked --release --target aarch64-unknown-linux-gnu -p tvm --bin tvm"
bin=target/cross/aarch64-unknown-linux-gnu/release/tvm
file "$bin" | grep -q "ARM aarch64" || { echo "build-host-aarch64: $bin is not an aarch64 executable" >&2; exit 1; }
glibc=$(readelf --dyn-syms -W "$bin" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1 || true)
echo "build-host-aarch64: $bin ($(du -h "$bin" | cut -f1), needs ${glibc:-?}) in $((SECONDS - started)) s"
$run || exit 0

if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  [ -x /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || [ -x /usr/bin/qemu-aarch64-static ] ||
    { echo "build-host-aarch64: apt-get install qemu-user-static (to run the aarch64 binary)" >&2; exit 1; }
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  cat /usr/lib/binfmt.d/qemu-aarch64.conf >/proc/sys/fs/binfmt_misc/register
fi
# qemu-user finds the arm64 dynamic loader and libc in the build root.
export QEMU_LD_PREFIX=$root
for args in "--version" "runtimes --matrix" "doctor"; do
  echo "\$ tvm $args   (aarch64 under qemu-user)"
  # shellcheck disable=SC2086 # the words of $args are the arguments
  "$bin" $args || echo "(exit $?)"
done
