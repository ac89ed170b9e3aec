#!/bin/bash
# tvm-lima: provision
# Makes a Lima VM a TVM server. Lima runs it as root at every boot of an instance made by
# `tvm lima up` (provision mode "system"); every step is idempotent, so a reboot redoes only
# what is missing or changed. Output: /var/log/tvm-lima/provision.log; the current step, for
# `tvm lima up` and the readiness probe: /var/log/tvm-lima/progress.
#
# TVM_LIMA_SKIP_BUILD=1 stops after step 4 (no kernel or image build, no service start). It
# exists only for scripts/tests.d/50-lima.sh, which runs this script in a Debian chroot where
# neither a kernel build nor systemd fits; a real instance never sets it.
set -eu -o pipefail
export DEBIAN_FRONTEND=noninteractive
# The read-only mount of the host's staging directory (template.rs: GUEST_STAGING).
STAGING=${TVM_LIMA_STAGING:-/mnt/tvm-host}
LOG_DIR=/var/log/tvm-lima
STEPS=7
mkdir -p "$LOG_DIR"
exec > >(tee -a "$LOG_DIR/provision.log") 2>&1

step() {
  echo "[$1/$STEPS] $2" >"$LOG_DIR/progress"
  echo "==> [$1/$STEPS] $2 ($(date -u +%H:%M:%S))"
}

# 1. What TVM and `tvm doctor` need: QEMU, the guest kernel's source and build tools,
#    mmdebstrap + erofs-utils for images, npm for the Node.js builds the JavaScript images carry.
step 1 "Debian packages"
# QEMU for the VM's own architecture: guests run natively (KVM where nested virtualization works).
case "$(dpkg --print-architecture)" in
  arm64) QEMU_PKG=qemu-system-arm ;;   # provides qemu-system-aarch64
  *) QEMU_PKG=qemu-system-x86 ;;
esac
PKGS=("$QEMU_PKG" linux-source-6.1 mmdebstrap erofs-utils make gcc flex bison bc libelf-dev libssl-dev
  xz-utils npm ca-certificates curl)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  # unsafe-io: a VM being provisioned loses nothing on a crash (this reruns), and dpkg fsyncs ~600 packages.
  # apt's own output goes to a log: printed only when the install fails, with the disk space, because a
  # full disk also truncates the error messages that would have said so.
  apt_log=$(mktemp /tmp/tvm-provision-apt.XXXXXX)
  if ! apt-get install -y -qq --no-install-recommends -o DPkg::Options::=--force-unsafe-io "${missing[@]}" \
    >"$apt_log" 2>&1; then
    tail -n 40 "$apt_log"
    df -h / /tmp 2>/dev/null || true
    rm -f "$apt_log"
    echo "error: apt-get install failed (output above); if the disk is full, free space and rerun" >&2
    exit 1
  fi
  rm -f "$apt_log"
fi

# 2. Under WSL2 the distro can start Windows programs and sees the Windows drives: untrusted
#    code that escaped a microVM must find neither. Takes effect from the distro's next start.
step 2 "VM hardening"
if grep -qi microsoft /proc/sys/kernel/osrelease 2>/dev/null; then
  cat >/etc/wsl.conf <<'WSL'
[interop]
enabled=false
appendWindowsPath=false
[automount]
enabled=false
WSL
  echo "WSL2: interop and Windows drive mounts disabled in /etc/wsl.conf"
fi

# 3. tvm and its guest agent, as `tvm lima up` staged them on the host. The agent sits next to
#    tvm, where tvm looks for it first.
step 3 "TVM binaries"
changed=0
# Lima sets up the host mounts (reverse-sshfs, virtiofs) while boot scripts already run: give the
# staging mount up to 2 minutes to appear (less when a previous boot installed the binaries).
wait_s=120
[ -x /usr/local/bin/tvm ] && wait_s=20
for _ in $(seq 1 "$wait_s"); do
  [ -f "$STAGING/bin/tvm" ] && break
  sleep 1
done
for bin in tvm tvm-agent; do
  src="$STAGING/bin/$bin"
  dst="/usr/local/bin/$bin"
  if [ -f "$src" ] && ! cmp -s "$src" "$dst"; then
    install -m 0755 "$src" "$dst.new"
    mv -f "$dst.new" "$dst"
    changed=1
    echo "installed $dst"
  fi
  if [ ! -x "$dst" ]; then
    echo "tvm-lima: $bin is missing: expected $src (staged by \`tvm lima up\`)" >&2
    exit 1
  fi
done
# A tvm linked against a newer glibc than this Debian 12's (2.36), e.g. one cross-built in a trixie
# root, fails here with "GLIBC_2.xx not found": say so and how to build one that runs.
if ! version=$(/usr/local/bin/tvm --version 2>&1); then
  echo "$version" >&2
  echo "tvm-lima: the staged tvm does not run in this Debian 12 VM ($(uname -m), glibc $(ldd --version | head -n 1 | awk '{print $NF}')):" \
    "build it for $(uname -m) Linux against glibc <= 2.36 (docs/lima.md#tvms-linux-binaries) and run \`tvm lima up\` again" >&2
  exit 1
fi
echo "$version"

# 4. The service: the API on the VM's loopback only; Lima forwards that one port to the
#    host's 127.0.0.1 (template.rs: GUEST_PORT). Root, because TVM gives each VMM its own uid.
step 4 "tvm service unit"
unit=/etc/systemd/system/tvm-lima.service
cat >"$unit.new" <<'UNIT'
[Unit]
Description=TVM API (tvm serve), forwarded to the host by Lima
After=network-online.target

[Service]
ExecStart=/usr/local/bin/tvm serve --listen 127.0.0.1:8080
Environment=TVM_LOG=info
Restart=on-failure
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=60

[Install]
WantedBy=multi-user.target
UNIT
if cmp -s "$unit.new" "$unit"; then rm -f "$unit.new"; else mv -f "$unit.new" "$unit" && changed=1; fi

if [ "${TVM_LIMA_SKIP_BUILD:-0}" = 1 ]; then
  echo "TVM_LIMA_SKIP_BUILD=1: kernel, images and service start skipped (test use only)"
  echo "skipped build (test)" >"$LOG_DIR/progress"
  exit 0
fi

# 5-6. Cached by content: after the first boot these take seconds.
step 5 "guest kernel (first boot: ~5 min)"
/usr/local/bin/tvm kernel build
step 6 "default runtime images (first boot: ~1 min each)"
/usr/local/bin/tvm image build --defaults

step 7 "starting tvm serve"
systemctl daemon-reload
systemctl enable tvm-lima.service
if [ "$changed" = 1 ]; then systemctl restart tvm-lima.service; else systemctl start tvm-lima.service; fi
echo "ready: TVM serves on 127.0.0.1:8080 in the VM" >"$LOG_DIR/progress"
