# TVM's container image: `tvm serve` with QEMU, the guest kernel and runtime images.
#
# Build it with scripts/build-container.sh, which stages the build context under
# target/container/context (release binaries, kernel, images, a catalog of the shipped runtimes)
# and, where no base image can be pulled, makes BASE from a Debian root with mmdebstrap.
# By hand, after staging:  docker build -t tvm:0.1.0 .
#
# Run as the chart does (see deploy/helm/tvm and docs/kubernetes.md): root inside the container
# only so each QEMU gets a uid of its own; no other privilege but /dev/kvm.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# QEMU from Debian (its microvm machine and qboot firmware). A BASE made by build-container.sh
# has it already, so this step needs no network there.
RUN if ! command -v qemu-system-x86_64 >/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends qemu-system-x86 \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# The binary and the guest agent next to it (tvm finds the agent there).
COPY target/container/context/bin/ /usr/local/bin/
# Kernel, runtime images and the catalog of the shipped runtimes; read-only at run time. What
# tvm writes (initramfs of its agent, KVM probe result, locks, scratch) goes to the volumes below.
COPY target/container/context/cache/ /var/cache/tvm/
COPY target/container/context/etc/ /etc/tvm/
# A stand-in for the kernel source tarball: only its name and length count (the kernel's cache
# key); sparse and all zeros, never read.
COPY target/container/context/src/ /usr/src/
COPY target/container/context/examples/ /usr/share/doc/tvm/examples/

ENV TVM_CONFIG=/etc/tvm/config.toml \
    TVM_SERVE_CONFIG=/etc/tvm/serve.toml \
    TVM_LOG=info
VOLUME ["/run/tvm", "/var/cache/tvm/initrd", "/var/cache/tvm/probe", "/var/cache/tvm/locks", "/var/cache/tvm/tmp"]
EXPOSE 8080
USER 0:0
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tvm"]
CMD ["serve"]
