#!/usr/bin/env bash
# One command from a fresh Debian/Ubuntu machine to a program running in a microVM:
# installs system packages, builds tvm and its guest agent, the guest kernel and
# the default runtime image of every language (all cached; a second run takes
# seconds), then runs examples/hello.py inside a VM. Pass --no-run to stop
# after building. Other versions: `tvm image build --all` (or on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
run_sample=1
[ "${1:-}" = "--no-run" ] && run_sample=0

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PKGS=(qemu-system-x86 linux-source-6.1 mmdebstrap erofs-utils make gcc flex bison bc libelf-dev libssl-dev xz-utils)
# The OCI registry (the CNCF Distribution registry) tests/oci_registry.rs pulls images from, on 127.0.0.1.
PKGS+=(docker-registry)
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
# npm fetches the official Node.js builds that the javascript images carry. Any
# npm will do (a Node.js install from elsewhere brings its own); Debian's otherwise.
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi

echo "==> building tvm and the guest agent"
scripts/build-agent.sh
cargo build --quiet --release -p tvm
# Next to the binary is where `tvm` looks for its guest agent first.
cp target/agent/x86_64-unknown-linux-gnu/release/tvm-agent target/release/tvm-agent
TVM=target/release/tvm

# The Firecracker stand-in (tests and `tvm bench --vmm firecracker` on hosts
# without KVM) serves its vsock device with rust-vmm's vhost-device-vsock.
# Pinned; compiles in ~4 min on 2 cores, once (then found in /usr/local/bin).
VHOST_VSOCK_VERSION=0.3.0
if ! /usr/local/bin/vhost-device-vsock --version 2>/dev/null | grep -q "$VHOST_VSOCK_VERSION"; then
  echo "==> vhost-device-vsock $VHOST_VSOCK_VERSION (for the Firecracker stand-in; ~4 min to compile)"
  cargo install --quiet --locked vhost-device-vsock --version "$VHOST_VSOCK_VERSION" --root target/tools
  $SUDO install -m 0755 target/tools/bin/vhost-device-vsock /usr/local/bin/vhost-device-vsock
fi

echo "==> guest kernel (cached after the first build, ~5 min on 2 cores)"
$SUDO "$TVM" kernel build
echo "==> runtime images: the default version of each language (cached by recipe)"
$SUDO "$TVM" image build --defaults --jobs 2
$SUDO "$TVM" doctor || true

if [ $run_sample -eq 1 ]; then
  echo "==> tvm run examples/hello.py"
  $SUDO "$TVM" run examples/hello.py </dev/null   # tvm forwards a non-terminal stdin to the program
fi
