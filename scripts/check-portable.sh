#!/usr/bin/env bash
# Proves that the host `tvm` binary compiles for macOS and Windows: what a Mac or
# Windows user builds (`tvm lima`, `tvm run --server`, `tvm runtimes --server`),
# with every Linux-only crate and command gated off by cfg(target_os = "linux").
#
# rustup cannot fetch other targets' std here and Debian ships no Windows or
# Apple std, so std itself is compiled from Debian's `rust-src` (cargo
# -Zbuild-std, unlocked with RUSTC_BOOTSTRAP for this check only) with trixie's
# rustc/cargo 1.85, in the cached build root of scripts/lib/trixie-root.sh.
# The dependencies are resolved for Rust 1.85 in a scratch copy of the workspace
# (scripts/lib/msrv-workspace.sh; the repository's Cargo.lock is not used or
# changed). `cargo check` needs no linker; std for windows-gnu needs MinGW's
# dlltool (raw-dylib imports).
#
#   scripts/check-portable.sh [TARGET...]
#   default: x86_64-pc-windows-gnu x86_64-apple-darwin aarch64-apple-darwin
#
# Needs root (mmdebstrap, chroot, bind mounts) and the Debian mirror and
# crates.io. Not part of CI: see docs/lima.md for its measured cost.
set -euo pipefail
cd "$(dirname "$0")/.."
ws=$PWD
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-pc-windows-gnu x86_64-apple-darwin aarch64-apple-darwin)
source scripts/lib/trixie-root.sh
source scripts/lib/msrv-workspace.sh

started=$SECONDS
trixie_root "rustc,cargo,rust-src,libstd-rust-dev:arm64,gcc-aarch64-linux-gnu,libc6-dev-arm64-cross,binutils-mingw-w64-x86-64,ca-certificates"
root=$TRIXIE_ROOT
echo "check-portable: build root ready ($((SECONDS - started)) s)"
msrv_workspace "$root" "$ws"
echo "check-portable: dependencies resolved for rustc 1.85 ($((SECONDS - started)) s)"

status=0
for t in "${targets[@]}"; do
  start=$SECONDS
  TRIXIE_ENV=(RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=/src/target/portable/xtarget)
  if trixie_chroot "$root" "$ws" \
    "cd target/portable/ws && cargo check --quiet --locked -Zbuild-std=std,panic_abort --target $t -p tvm --bins"; then
    echo "ok: tvm checks for $t with rustc 1.85 ($((SECONDS - start)) s)"
  else
    echo "FAIL: tvm does not check for $t"
    status=1
  fi
done
exit $status
