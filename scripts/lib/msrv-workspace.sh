# Sourced by scripts/check-portable.sh and scripts/build-host-aarch64.sh (after
# scripts/lib/trixie-root.sh): a scratch copy of the workspace with a lockfile of
# dependency versions that Debian trixie's rustc 1.85 compiles. The repository's
# Cargo.lock follows the newest releases (some need Rust 1.86-1.89) and is never
# touched.
#
# msrv_workspace ROOT WS  ->  copies WS's sources (no target/, .git, sdk/) to
# WS/target/portable/ws (the workspace declares rust-version 1.85), drops the
# [dev-dependencies] tables (tests are not built; `zip` 9.8 needs Rust 1.89),
# and has trixie's cargo resolve it with the MSRV-aware resolver
# (`incompatible-rust-versions = "fallback"`, cargo >= 1.84): every crate at
# its newest release whose declared rust-version is <= 1.85. Crates that
# declare none but need newer Rust are pinned with `cargo update --precise`
# (msrv_pins). Prints the pins and the crates held back from the newest release.
# Inside the chroot the copy is /src/target/portable/ws.

msrv_pins=()   # "name@version" pins for crates whose rust-version metadata is missing

msrv_workspace() {
  local root=$1 ws=$2 scratch=$2/target/portable/ws f pins=""
  rm -rf "$scratch"
  mkdir -p "$scratch"
  tar -C "$ws" --exclude=./target --exclude=./.git --exclude=./sdk -cf - . | tar -C "$scratch" -xf -
  for f in "$scratch"/crates/*/Cargo.toml; do
    awk '/^\[/{skip = ($0 == "[dev-dependencies]")} !skip' "$f" >"$f.new" && mv "$f.new" "$f"
  done
  rm -f "$scratch/Cargo.lock"
  for p in "${msrv_pins[@]}"; do pins+=" && cargo update --quiet ${p%@*} --precise ${p#*@}"; done
  TRIXIE_ENV=(CARGO_RESOLVER_INCOMPATIBLE_RUST_VERSIONS=fallback)
  trixie_chroot "$root" "$ws" "cd target/portable/ws && cargo generate-lockfile 2>&1 | grep -E 'Locking|requires Rust' $pins"
}
