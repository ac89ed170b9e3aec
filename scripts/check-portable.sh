#!/usr/bin/env bash
# Checks that the host `tvm` binary compiles for a non-Linux OS: what a Mac or
# Windows user builds (`tvm lima`, `tvm run --server`, `tvm runtimes --server`),
# with every Linux-only crate and command gated off by cfg(target_os = "linux").
#
# rustup cannot fetch other targets' std here and Debian ships no Windows or
# Apple std for a Rust new enough, so std itself is compiled from Debian's
# `rust-src` (cargo -Zbuild-std, unlocked with RUSTC_BOOTSTRAP for this check
# only) inside a Debian 13 root made by mmdebstrap: rustc/cargo 1.85 + rust-src.
# `cargo check` needs no linker; std for windows-gnu needs MinGW's dlltool (raw-dylib imports). The workspace's
# dependencies declare Rust 1.88/1.89 (uuid, zip, url's ICU crates); the check runs with
# --ignore-rust-version and, with 1.85, stops at those crates (icu_locale_core, uuid) for now.
#
#   scripts/check-portable.sh [TARGET...]   default: x86_64-pc-windows-gnu
#   e.g. scripts/check-portable.sh x86_64-pc-windows-gnu x86_64-apple-darwin aarch64-apple-darwin
#
# The root and its .debs are cached in target/portable/; needs root (mmdebstrap, chroot,
# bind mounts) and network access to the Debian mirror and crates.io. Not part of CI: a cold run
# (root ~7 min, std + dependencies ~5 min per target on 2 cores) costs more than CI can spare.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-pc-windows-gnu)
work=$PWD/target/portable
root=$work/root
mkdir -p "$work/debs"
if [ ! -x "$root/usr/bin/cargo" ] || [ ! -d "$root/usr/lib/rustlib/src/rust/library" ]; then
  rm -rf "$root"
  mmdebstrap --quiet --mode=root --variant=minbase --include=rustc,cargo,rust-src,gcc,libc6-dev,ca-certificates,binutils-mingw-w64-x86-64 \
    --skip=download/empty --skip=essential/unlink \
    --setup-hook='mkdir -p "$1/var/cache/apt/archives"' \
    --setup-hook="sync-in $work/debs /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives $work/debs" \
    trixie "$root" http://deb.debian.org/debian
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"
mkdir -p "$root/src" "$root/root/.cargo/registry" "${CARGO_HOME:-$HOME/.cargo}/registry"
mounts=()
cleanup() {
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount "${mounts[$i]}" || true; done
}
trap cleanup EXIT
bind() { mount --bind "$1" "$2" && mounts+=("$2"); }
bind "$PWD" "$root/src"
bind "${CARGO_HOME:-$HOME/.cargo}/registry" "$root/root/.cargo/registry"
bind /proc "$root/proc"
bind /dev "$root/dev"
status=0
for t in "${targets[@]}"; do
  start=$SECONDS
  if chroot "$root" env RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=/src/target/portable/xtarget \
    sh -c "cd /src && cargo check --quiet --ignore-rust-version -Zbuild-std=std,panic_abort --target $t -p tvm --bins"; then
    echo "ok: tvm checks for $t ($((SECONDS - start)) s)"
  else
    echo "FAIL: tvm does not check for $t"
    status=1
  fi
done
exit $status
