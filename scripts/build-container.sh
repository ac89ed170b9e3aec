#!/usr/bin/env bash
# Builds TVM's container image from this repository (Dockerfile at the root) and checks that it
# serves an execution.
#
#   scripts/build-container.sh [--runtimes "ID ..."] [--oci] [--no-test]
#
#   --runtimes  runtimes whose images the container carries (default: the default version of each
#               language, what `tvm image build --defaults` builds); its catalog lists only these
#   --oci       also write an OCI image archive (target/container/tvm-VERSION.oci.tar, via skopeo)
#   --no-test   skip the check run
#
# Steps: release binaries and the agent; the guest kernel and the chosen images (cached in
# ~/.cache/tvm); the build context staged under target/container/context; a Debian bookworm root
# with QEMU made by mmdebstrap and imported as the Dockerfile's BASE (no base image can be pulled
# here); `docker build`; then the image runs as the Helm chart runs it (read-only root, all
# capabilities dropped but the few it needs, /dev/kvm passed when KVM is usable, else TCG) and
# must answer `tvm run --server` with the program's output, and drain on SIGTERM.
#
# Needs root, mmdebstrap and Docker. Without a reachable Docker daemon, one is started for the
# build with its own data root under target/container/docker and no network setup of its own
# (no bridge, no iptables), and stopped afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/target/container
RUNTIMES=""
OCI=0
TEST=1
while [ $# -gt 0 ]; do
  case "$1" in
    --runtimes) RUNTIMES=$2; shift 2 ;;
    --oci) OCI=1; shift ;;
    --no-test) TEST=0; shift ;;
    *) echo "usage: $0 [--runtimes \"ID ...\"] [--oci] [--no-test]" >&2; exit 2 ;;
  esac
done
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' crates/tvm/Cargo.toml | head -1)
[ -n "$VERSION" ] || VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
TAG=tvm:$VERSION
mkdir -p "$OUT"
log() { echo "build-container: $*" >&2; }
# Debian's tools for the steps below (idempotent).
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v docker >/dev/null && docker info >/dev/null 2>&1 || command -v dockerd >/dev/null || need+=(docker.io)
if [ "$OCI" = 1 ]; then command -v skopeo >/dev/null || need+=(skopeo); fi
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# 1. Binaries.
if [ ! -x target/release/tvm ] || [ ! -x target/release/tvm-agent ]; then
  log "building release tvm and the agent"
  scripts/build-agent.sh
  cargo build --quiet --release -p tvm
  cp target/agent/x86_64-unknown-linux-gnu/release/tvm-agent target/release/tvm-agent
fi
TVM=$ROOT/target/release/tvm

# 2. Kernel and images (cached by content).
SUBSET=$OUT/runtimes.toml
if [ -n "$RUNTIMES" ]; then
  # shellcheck disable=SC2086
  python3 deploy/container/catalog-subset.py catalog/runtimes.toml $RUNTIMES >"$SUBSET" 2>"$OUT/runtimes.txt"
else
  python3 deploy/container/catalog-subset.py catalog/runtimes.toml --defaults >"$SUBSET" 2>"$OUT/runtimes.txt"
fi
read -r -a IDS <"$OUT/runtimes.txt"
log "runtimes: ${IDS[*]}"
"$TVM" kernel build
"$TVM" image build "${IDS[@]}"

# 3. The build context.
CTX=$OUT/context
rm -rf "$CTX"
mkdir -p "$CTX/bin" "$CTX/cache/images" "$CTX/cache/kernel" "$CTX/etc" "$CTX/examples"
cp target/release/tvm target/release/tvm-agent "$CTX/bin/"
cp examples/hello.py "$CTX/examples/"
python3 - "$TVM" "$CTX" "${IDS[@]}" <<'EOF'
import json, os, shutil, subprocess, sys
tvm, ctx, ids = sys.argv[1], sys.argv[2], sys.argv[3:]
def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
doctor = json.loads(subprocess.run([tvm, "doctor", "--json"], capture_output=True, text=True).stdout)
# "KEY (/path/to/kernel/KEY/bzImage)"
kernel = next(c["detail"] for c in doctor["checks"] if c["name"] == "guest kernel")
kdir = os.path.dirname(kernel.split("(", 1)[1].rstrip(")"))
dst = os.path.join(ctx, "cache", "kernel", os.path.basename(kdir))
os.makedirs(dst)
for f in os.listdir(kdir):
    link_or_copy(os.path.join(kdir, f), os.path.join(dst, f))
cache = os.path.dirname(os.path.dirname(kdir))
images = os.path.join(cache, "images")
listing = subprocess.run([tvm, "image", "list"], capture_output=True, text=True, check=True).stdout.splitlines()[1:]
wanted = set(ids)
for line in listing:
    cols = line.split()
    key, runtimes = cols[0], set(" ".join(cols[4:]).replace(",", " ").split())
    if runtimes & wanted:
        for f in os.listdir(images):
            if f.startswith(key):
                link_or_copy(os.path.join(images, f), os.path.join(ctx, "cache", "images", f))
        wanted -= runtimes
if wanted:
    sys.exit(f"no built image found for {sorted(wanted)}")
EOF
# The kernel's cache key includes the name and length of the kernel source tarball it was built
# from (pyrovm kernel_key), so tvm looks the tarball up even to find a built kernel. A sparse file
# of the same name and length stands in for it: the container never builds a kernel.
SRC=/usr/src/linux-source-6.1.tar.xz
mkdir -p "$CTX/src"
truncate -s "$(stat -c %s "$SRC")" "$CTX/src/$(basename "$SRC")"
cp "$SUBSET" "$CTX/etc/runtimes.toml"
cat >"$CTX/etc/config.toml" <<'EOF'
cache_dir = "/var/cache/tvm"
runtime_dir = "/run/tvm"
catalog = "/etc/tvm/runtimes.toml"
EOF
cat >"$CTX/etc/serve.toml" <<'EOF'
listen = "0.0.0.0:8080"
build_images = false
json_logs = true
EOF
log "context: $(du -sh "$CTX" | cut -f1)"

# 4. A Docker daemon.
DOCKERD_PID=""
stop_dockerd() {
  if [ -n "$DOCKERD_PID" ]; then
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
  fi
}
if ! docker info >/dev/null 2>&1; then
  D=$OUT/docker
  mkdir -p "$D"
  export DOCKER_HOST=unix://$D/docker.sock
  log "starting a private dockerd ($D)"
  dockerd --data-root "$D/root" --exec-root "$D/exec" --host "$DOCKER_HOST" --pidfile "$D/docker.pid" \
    --bridge=none --iptables=false --ip6tables=false --ip-masq=false >"$D/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  trap stop_dockerd EXIT
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$D/dockerd.log" >&2; log "dockerd did not start"; exit 1; }
fi

# 5. BASE: Debian bookworm with QEMU, by mmdebstrap (cached by its package list).
PACKAGES="qemu-system-x86"
BASE_KEY=$(echo "bookworm essential $PACKAGES" | sha256sum | cut -c1-12)
BASE=tvm-base:bookworm-$BASE_KEY
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  BASE_TAR=$OUT/base-$BASE_KEY.tar
  if [ ! -s "$BASE_TAR" ]; then
    log "mmdebstrap bookworm + $PACKAGES"
    mmdebstrap --variant=essential --include="${PACKAGES// /,}" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      bookworm "$BASE_TAR.part" && mv "$BASE_TAR.part" "$BASE_TAR"
  fi
  docker import "$BASE_TAR" "$BASE" >/dev/null
fi

# 6. The image (the classic builder: Debian's docker.io has no buildx plugin).
log "docker build $TAG (BASE=$BASE)"
DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE=$BASE" -t "$TAG" -f Dockerfile . >/dev/null
docker image ls "$TAG"
if [ "$OCI" = 1 ]; then
  rm -f "$OUT/tvm-$VERSION.oci.tar"
  skopeo copy --quiet ${DOCKER_HOST:+--src-daemon-host "$DOCKER_HOST"} "docker-daemon:$TAG" "oci-archive:$OUT/tvm-$VERSION.oci.tar:$TAG"
  log "OCI archive: $OUT/tvm-$VERSION.oci.tar ($(du -h "$OUT/tvm-$VERSION.oci.tar" | cut -f1))"
fi

# 7. Run it as the chart does and serve one execution.
if [ "$TEST" = 1 ]; then
  NAME=tvm-container-check-$$
  DEV=()
  # /dev/kvm only where this host can open it; tvm's probe boot then decides KVM or TCG.
  if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then DEV=(--device /dev/kvm); fi
  cleanup() { docker rm -f "$NAME" >/dev/null 2>&1 || true; stop_dockerd; }
  trap cleanup EXIT
  docker run -d --name "$NAME" --network none --read-only \
    --cap-drop ALL --cap-add SETUID --cap-add SETGID --cap-add KILL --cap-add CHOWN \
    --cap-add DAC_OVERRIDE --cap-add FOWNER --security-opt no-new-privileges \
    --tmpfs /run/tvm --tmpfs /tmp --tmpfs /var/cache/tvm/initrd --tmpfs /var/cache/tvm/probe \
    --tmpfs /var/cache/tvm/locks --tmpfs /var/cache/tvm/tmp "${DEV[@]}" "$TAG" serve >/dev/null
  ok=0
  for _ in $(seq 1 90); do
    if out=$(docker exec "$NAME" tvm run --server http://127.0.0.1:8080 /usr/share/doc/tvm/examples/hello.py 2>&1); then
      ok=1; break
    fi
    docker inspect -f '{{.State.Running}}' "$NAME" | grep -q true || break
    sleep 2
  done
  docker exec "$NAME" tvm doctor 2>&1 | sed 's/^/  doctor: /' || true
  if [ "$ok" != 1 ]; then
    docker logs "$NAME" 2>&1 | tail -30 >&2
    log "FAILED: the container served no execution (last output: ${out:-none})"
    exit 1
  fi
  echo "$out" | sed 's/^/  hello.py: /'
  docker stop -t 30 "$NAME" >/dev/null
  code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
  [ "$code" = 0 ] || { docker logs "$NAME" 2>&1 | tail -20 >&2; log "FAILED: exit $code after SIGTERM"; exit 1; }
  log "container served an execution and drained on SIGTERM (exit 0)"
fi
echo "build-container: $TAG built"
