#!/usr/bin/env bash
# The Lima layer (crates/pyrolima), checked without Lima (no limactl can be installed here):
#  1. `tvm lima template` for each kind of host passes crates/pyrolima/schema/lima-template.schema.json
#     under Python's jsonschema (a second, independent validator beside the Rust test's), and the same
#     template with a wrong key fails it.
#  2. The provision script for real: a fresh Debian 12 root made by mmdebstrap (minbase), the script
#     run in it by chroot with TVM_LIMA_SKIP_BUILD=1 (the only user of that variable: a chroot can
#     neither build the guest kernel in bounded time nor run systemd), then `tvm doctor --json` in the
#     chroot must find everything it checks there: QEMU, mmdebstrap, mkfs.erofs, the kernel source,
#     the guest agent. A second run must install nothing (idempotent, as Lima reruns it every boot).
# Packages are cached in target/lima-debs between runs. Needs root (mmdebstrap, chroot).
set -euo pipefail
cd "$(dirname "$0")/../.."
TVM=${TVM_BIN:-target/release/tvm}
AGENT=${TVM_AGENT_BIN:-$(dirname "$TVM")/tvm-agent}
SCHEMA=crates/pyrolima/schema/lima-template.schema.json
passed=0
failed=0
ok() { echo "ok   $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }

[ -x "$TVM" ] || { echo "50-lima: $TVM not built (scripts/test.sh builds it)" >&2; exit 1; }
[ -f "$AGENT" ] || AGENT=target/agent/x86_64-unknown-linux-gnu/release/tvm-agent

# --- 1. template vs schema -------------------------------------------------------------------
venv=target/lima-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q jsonschema pyyaml
fi
work=$(mktemp -d /tmp/tvm-lima-test.XXXXXX)
root=""
cleanup() {
  rm -rf "$work"
  if [ -n "$root" ]; then rm -rf --one-file-system "$root"; fi
}
trap cleanup EXIT

validate() { # validate YAML-FILE [spoil]: exit 0 when valid
  "$venv/bin/python" - "$SCHEMA" "$1" "${2:-}" <<'PY'
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
doc = yaml.safe_load(open(sys.argv[2]))
if sys.argv[3] == "wrong-key":
    doc["portForward"] = doc.pop("portForwards")
errors = list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
for e in errors:
    print(f"  {e.json_path}: {e.message[:160]}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY
}

while read -r label flags; do
  # shellcheck disable=SC2086 # flags are words
  if "$TVM" lima template $flags >"$work/t.yaml" && validate "$work/t.yaml"; then
    ok "template $label validates"
  else
    fail "template $label validates"
  fi
done <<'EOF'
linux-x86_64 --host-os linux --host-arch x86_64
macos-m3-15 --host-os macos --host-arch aarch64 --macos-version 15 --apple-chip 3
macos-intel --host-os macos --host-arch x86_64 --macos-version 14
windows --host-os windows --host-arch x86_64
custom-sizes --host-os linux --host-arch x86_64 --cpus 8 --memory 16GiB --disk 120GiB --port 18080
EOF
"$TVM" lima template --host-os macos --host-arch aarch64 --macos-version 15 --apple-chip 3 >"$work/m3.yaml"
if grep -q "^vmType: vz" "$work/m3.yaml" && grep -q "^nestedVirtualization: true" "$work/m3.yaml"; then
  ok "template for M3/macOS 15 is vz with nested virtualization"
else
  fail "template for M3/macOS 15 is vz with nested virtualization"
fi
"$TVM" lima template --host-os linux --host-arch x86_64 >"$work/t.yaml"
# The same template, valid as it is, with portForwards misspelled.
if validate "$work/t.yaml" && ! validate "$work/t.yaml" wrong-key 2>/dev/null; then
  ok "a wrong key fails the schema"
else
  fail "a wrong key fails the schema"
fi

# --- 2. the provision script in a fresh Debian root -------------------------------------------
if ! command -v mmdebstrap >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
fi
cache=$PWD/target/lima-debs
mkdir -p "$cache"
root=$(mktemp -d /tmp/tvm-lima-root.XXXXXX)
rmdir "$root"
start=$SECONDS
if mmdebstrap --quiet --mode=root --variant=minbase --skip=essential/unlink --skip=download/empty \
  --setup-hook='mkdir -p "$1/var/cache/apt/archives"' \
  --setup-hook="sync-in $cache /var/cache/apt/archives/" \
  --customize-hook='mkdir -p "$1/mnt/tvm-host/bin"' \
  --customize-hook="copy-in $TVM $AGENT /mnt/tvm-host/bin/" \
  --customize-hook="copy-in crates/pyrolima/assets/provision.sh /root/" \
  --customize-hook='chroot "$1" env TVM_LIMA_SKIP_BUILD=1 bash /root/provision.sh >"$1/root/run1.log" 2>&1' \
  --customize-hook='chroot "$1" env TVM_LIMA_SKIP_BUILD=1 bash /root/provision.sh >"$1/root/run2.log" 2>&1' \
  --customize-hook='chroot "$1" /usr/local/bin/tvm doctor --json >"$1/root/doctor.json" || true' \
  --customize-hook="sync-out /var/cache/apt/archives $cache" \
  bookworm "$root" >"$work/mmdebstrap.log" 2>&1; then
  ok "provision script ran in a fresh Debian 12 root ($((SECONDS - start)) s)"
else
  fail "provision script ran in a fresh Debian 12 root"
  tail -n 30 "$work/mmdebstrap.log"
  [ -f "$root/root/run1.log" ] && tail -n 30 "$root/root/run1.log"
  df -h / /tmp   # a full disk truncates the logs above (CI was red once that way)
fi

if [ -f "$root/root/doctor.json" ] && "$venv/bin/python" - "$root/root/doctor.json" <<'PY'; then
import json, sys
checks = {c["name"]: c for c in json.load(open(sys.argv[1]))["checks"]}
want = ["qemu", "mmdebstrap", "mkfs.erofs", "kernel source", "guest agent"]
bad = [f"{n}: {checks.get(n, {}).get('detail', 'absent')}" for n in want if not checks.get(n, {}).get("ok")]
for b in bad:
    print("  " + b, file=sys.stderr)
sys.exit(1 if bad else 0)
PY
  ok "tvm doctor in the provisioned root finds qemu, mmdebstrap, mkfs.erofs, kernel source, guest agent"
else
  fail "tvm doctor in the provisioned root finds qemu, mmdebstrap, mkfs.erofs, kernel source, guest agent"
fi
if [ -x "$root/usr/local/bin/tvm" ] && [ -x "$root/usr/local/bin/tvm-agent" ] &&
  grep -q "ExecStart=/usr/local/bin/tvm serve --listen 127.0.0.1:8080" "$root/etc/systemd/system/tvm-lima.service"; then
  ok "binaries installed and the tvm-lima service unit written"
else
  fail "binaries installed and the tvm-lima service unit written"
fi
if [ -f "$root/root/run2.log" ] && ! grep -q "^installing:" "$root/root/run2.log" &&
  ! grep -q "^installed /usr/local/bin" "$root/root/run2.log"; then
  ok "a second run installs nothing"
else
  fail "a second run installs nothing"
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
