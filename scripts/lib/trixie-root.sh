# Sourced by the scripts that build with Debian trixie's Rust toolchain
# (rustc/cargo 1.85): scripts/build-agent-aarch64.sh, scripts/build-host-aarch64.sh,
# scripts/check-portable.sh. rustup cannot download other targets' std here;
# Debian ships std for arm64 as a multiarch package and the std source as rust-src.
#
# trixie_root PACKAGES  ->  sets $TRIXIE_ROOT to a cached amd64+arm64 trixie root
# holding PACKAGES (comma-separated), made by mmdebstrap once and reused:
# ~/.cache/tvm/buildroot/<key>/root, key = sha256(recipe version, suite, packages).
# The crates cargo downloads are cached in ~/.cache/tvm/buildroot/cargo-home.
# trixie_chroot ROOT WS CMD  ->  runs CMD (sh -c) in ROOT with the worktree WS at
# /src and the cargo home at /cargo-home, in a private mount namespace (every
# mount vanishes with it). Extra environment: TRIXIE_ENV (array of NAME=VALUE).
# Both need root (mmdebstrap --mode=root, bind mounts).

trixie_suite=trixie
trixie_recipe_version=2
trixie_cache=${TVM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tvm}
trixie_cargo_home="$trixie_cache/buildroot/cargo-home"

trixie_root() {
  local packages=$1 key broot tmp who=${0##*/}
  key=$(printf '%s\n' "$trixie_recipe_version" "$trixie_suite" "$packages" | sha256sum | cut -c1-24)
  broot="$trixie_cache/buildroot/$key"
  mkdir -p "$trixie_cache/buildroot" "$trixie_cargo_home" "$trixie_cache/locks"
  if [ "$(id -u)" != 0 ]; then
    echo "$who: needs root (mmdebstrap --mode=root and bind mounts)" >&2
    return 1
  fi
  command -v mmdebstrap >/dev/null || { echo "$who: apt-get install mmdebstrap" >&2; return 1; }
  # One builder of a root at a time; others wait and reuse it.
  (
    flock 9
    if [ ! -x "$broot/root/usr/bin/cargo" ]; then
      tmp="$trixie_cache/buildroot/.tmp-$key-$$"
      rm -rf "$tmp"
      mkdir -p "$tmp"
      trap 'rm -rf "$tmp"' EXIT
      echo "$who: creating the $trixie_suite build root $key ($packages)" >&2
      # No fsync per unpacked file (the root is made in a temporary directory
      # and moved into place only when complete) and no documentation, manuals
      # or translations to unpack (recipe version 2).
      mmdebstrap --mode=root --variant=minbase --architectures=amd64,arm64 --include="$packages" \
        --dpkgopt=force-unsafe-io --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        "$trixie_suite" "$tmp/root" http://deb.debian.org/debian >"$tmp/log" 2>&1 || { tail -20 "$tmp/log" >&2; exit 1; }
      rm -rf "$tmp/root/var/cache/apt/archives"/*.deb "$tmp/root/var/lib/apt/lists"/*_Packages
      mkdir -p "$broot"
      mv "$tmp/root" "$broot/root"
    fi
  ) 9>"$trixie_cache/locks/buildroot-$key" || return 1
  TRIXIE_ROOT="$broot/root"
}

trixie_chroot() {
  local root=$1 ws=$2 cmd=$3
  unshare --mount --propagation private -- bash -euo pipefail -c '
    root=$1 ws=$2 cargo_home=$3 cmd=$4; shift 4
    mkdir -p "$root/src" "$root/cargo-home"
    mount --bind "$ws" "$root/src"
    mount --bind "$cargo_home" "$root/cargo-home"
    mount -t proc proc "$root/proc"
    mount --bind /dev "$root/dev"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    # crates.io through the host'"'"'s trust store (it may hold a proxy'"'"'s CA).
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/host-ca.crt"
    exec chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root CARGO_HOME=/cargo-home \
      CARGO_HTTP_CAINFO=/etc/ssl/host-ca.crt "$@" sh -c "cd /src && $cmd"
  ' trixie-chroot "$root" "$ws" "$trixie_cargo_home" "$cmd" "${TRIXIE_ENV[@]}"
}
