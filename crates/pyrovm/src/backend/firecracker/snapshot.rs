//! Firecracker snapshots, the template capability of the Firecracker
//! backend: typed bodies of `PATCH /vm`, `PUT /snapshot/create` and
//! `PUT /snapshot/load` as Firecracker's API spec (v1.16.1) defines them
//! (`Vm`, `SnapshotCreateParams`, `SnapshotLoadParams`, `MemoryBackend`,
//! `VsockOverride`), and the request sequences TVM sends.
//!
//! A template VM is paused (`PATCH /vm {"state": "Paused"}`) and saved as a
//! full snapshot: the microVM state file and the guest memory file. A VM is
//! restored in a fresh Firecracker process that has configured nothing but
//! its logger and metrics (`/snapshot/load` is pre-boot only), loading the
//! state, mapping the memory file copy-on-write (`mem_backend` `File`),
//! resuming at once (`resume_vm`) and binding the vsock device's host socket
//! at this VM's own path (`vsock_override`). Firecracker resets every vsock
//! connection on restore (the guest gets `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`),
//! so the host connects afresh with `CONNECT 1024` and the agent, still
//! listening, accepts it (see the agent's `transport.rs`).
//!
//! Everything else a snapshot names is opened again by path on load; the
//! root drive's `path_on_host` is one, so a template VM and its clones see
//! the image at the same path: `/proc/self/fd/`[`ROOTFS_PIN`] (the
//! descriptor is pinned to that number in the VMM), or `/rootfs.erofs`
//! inside a jailer chroot.

use std::os::fd::RawFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ApiRequest, FcPaths, Logger, Metrics};

/// The descriptor number the root image has in a template VM's Firecracker
/// and in every VM restored from it (the snapshot names the drive as
/// `/proc/self/fd/1000`). Below the usual soft `RLIMIT_NOFILE` of 1024; if
/// another inherited descriptor holds it, that start fails and, being a
/// template start, falls back to a cold boot.
pub const ROOTFS_PIN: RawFd = 1000;

/// `PATCH /vm` (spec: `Vm`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The desired run state.
    pub state: RunState,
}

/// The run state of a microVM (spec: `Vm.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// vCPUs stopped: the state a snapshot is taken in.
    Paused,
    /// Running.
    Resumed,
}

/// `PUT /snapshot/create` (spec: `SnapshotCreateParams`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    /// `Full` (all guest memory) or `Diff` (pages dirtied since the last one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
    /// Where Firecracker writes the microVM state, as it sees the path.
    pub snapshot_path: String,
    /// Where Firecracker writes the guest memory, as it sees the path.
    pub mem_file_path: String,
}

/// Kind of snapshot (spec: `SnapshotCreateParams.snapshot_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// The whole guest memory: what a template is.
    Full,
    /// Only pages dirtied since the previous snapshot.
    Diff,
}

/// `mem_backend` of `PUT /snapshot/load` (spec: `MemoryBackend`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackend {
    /// `File`: guest memory is the file, mapped privately (copy-on-write).
    pub backend_type: MemoryBackendType,
    /// The memory file (or, for `Uffd`, the page-fault handler's socket).
    pub backend_path: String,
}

/// Spec: `MemoryBackend.backend_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// A memory file, mapped `MAP_PRIVATE`.
    File,
    /// A userfaultfd handler process.
    Uffd,
}

/// `vsock_override` of `PUT /snapshot/load` (spec: `VsockOverride`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockOverride {
    /// The host socket the restored vsock device listens on.
    pub uds_path: String,
}

/// `PUT /snapshot/load` (spec: `SnapshotLoadParams`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    /// The microVM state file.
    pub snapshot_path: String,
    /// Guest memory (the spec's replacement for the deprecated `mem_file_path`).
    pub mem_backend: MemoryBackend,
    /// Resume the guest as soon as it is loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    /// This VM's own vsock socket instead of the template VM's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

/// `PATCH /vm {"state": "Paused"}`.
pub fn pause_request() -> ApiRequest {
    ApiRequest::with_body("PATCH", "/vm", "Vm", &VmState { state: RunState::Paused })
}

/// `PUT /snapshot/create`: a full snapshot into `snapshot_path` and
/// `mem_file_path` (paths as the VMM sees them).
pub fn create_request(snapshot_path: &str, mem_file_path: &str) -> ApiRequest {
    let body = SnapshotCreateParams {
        snapshot_type: Some(SnapshotType::Full),
        snapshot_path: snapshot_path.into(),
        mem_file_path: mem_file_path.into(),
    };
    ApiRequest::with_body("PUT", "/snapshot/create", "SnapshotCreateParams", &body)
}

/// Where a restored VM's Firecracker finds its template, as it sees the paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePaths {
    /// The microVM state file.
    pub snapshot: String,
    /// The guest memory file.
    pub mem: String,
}

/// What a restore needs on the host: the template's files, and the
/// descriptors a plain (not jailed) restore hands them over as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreFrom {
    /// The template's microVM state file (hard-linked into a jailer chroot).
    pub snapshot: PathBuf,
    /// The template's guest memory file.
    pub mem: PathBuf,
    /// Inherited descriptors of the two files (plain launches), in that order.
    pub fds: Option<(RawFd, RawFd)>,
}

/// The restore sequence: logger and metrics (the only resources allowed
/// before a load), then `PUT /snapshot/load` resuming the guest with this
/// VM's vsock socket.
pub fn restore_requests(debug: bool, paths: &FcPaths, from: &RestorePaths) -> Vec<ApiRequest> {
    let load = SnapshotLoadParams {
        snapshot_path: from.snapshot.clone(),
        mem_backend: MemoryBackend { backend_type: MemoryBackendType::File, backend_path: from.mem.clone() },
        resume_vm: Some(true),
        vsock_override: Some(VsockOverride { uds_path: paths.vsock.clone() }),
    };
    vec![
        ApiRequest::put(
            "/logger",
            "Logger",
            &Logger {
                log_path: paths.log.clone(),
                level: if debug { "Debug" } else { "Warning" }.into(),
                show_level: true,
                show_log_origin: false,
            },
        ),
        ApiRequest::put("/metrics", "Metrics", &Metrics { metrics_path: paths.metrics.clone() }),
        ApiRequest::put("/snapshot/load", "SnapshotLoadParams", &load),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use firecracker_standin::{ApiSpec, ContractError};
    use serde_json::json;

    fn paths() -> FcPaths {
        FcPaths {
            kernel: "/proc/self/fd/5".into(),
            initrd: None,
            rootfs: Some(format!("/proc/self/fd/{ROOTFS_PIN}")),
            vsock: "/proc/self/fd/9/vsock.sock".into(),
            log: "/proc/self/fd/9/log.fifo".into(),
            metrics: "/proc/self/fd/9/metrics.fifo".into(),
        }
    }

    fn check(api: &ApiSpec, r: &ApiRequest) {
        let def = api.route(r.method, &r.path).unwrap_or_else(|e| panic!("{} {}: {e}", r.method, r.path));
        assert_eq!(def, Some(r.definition), "{} {} takes {def:?}", r.method, r.path);
        api.validate(r.definition, &r.body).unwrap_or_else(|e| panic!("{} {}: {e}", r.path, r.body));
        api.check(r.method, &r.path, &serde_json::to_vec(&r.body).unwrap()).unwrap();
    }

    #[test]
    fn pause_and_create_match_the_spec() {
        let api = ApiSpec::load().unwrap();
        let pause = pause_request();
        check(&api, &pause);
        assert_eq!((pause.method, pause.path.as_str()), ("PATCH", "/vm"));
        assert_eq!(pause.body, json!({"state": "Paused"}));
        let create = create_request("/proc/self/fd/9/vmstate", "/proc/self/fd/9/mem");
        check(&api, &create);
        assert_eq!(
            create.body,
            json!({"snapshot_type": "Full", "snapshot_path": "/proc/self/fd/9/vmstate", "mem_file_path": "/proc/self/fd/9/mem"})
        );
    }

    #[test]
    fn the_restore_sequence_matches_the_spec() {
        let api = ApiSpec::load().unwrap();
        let from = RestorePaths { snapshot: "/proc/self/fd/11".into(), mem: "/proc/self/fd/12".into() };
        let reqs = restore_requests(false, &paths(), &from);
        let order: Vec<&str> = reqs.iter().map(|r| r.path.as_str()).collect();
        // Logger and metrics are the only resources Firecracker accepts before a load.
        assert_eq!(order, ["/logger", "/metrics", "/snapshot/load"]);
        for r in &reqs {
            check(&api, r);
        }
        assert_eq!(
            reqs[2].body,
            json!({
                "snapshot_path": "/proc/self/fd/11",
                "mem_backend": {"backend_type": "File", "backend_path": "/proc/self/fd/12"},
                "resume_vm": true,
                "vsock_override": {"uds_path": "/proc/self/fd/9/vsock.sock"}
            })
        );
    }

    #[test]
    fn the_spec_refuses_malformed_snapshot_bodies() {
        let api = ApiSpec::load().unwrap();
        let e = api.validate("Vm", &json!({"state": "Running"})).unwrap_err();
        assert!(matches!(&e, ContractError::Schema { errors, .. } if errors.contains("state")), "{e}");
        assert!(api.validate("Vm", &json!({})).is_err(), "state is required");
        assert!(api.validate("SnapshotCreateParams", &json!({"snapshot_path": "/s"})).is_err(), "mem_file_path");
        assert!(api
            .validate(
                "SnapshotCreateParams",
                &json!({"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Half"})
            )
            .is_err());
        assert!(
            api.validate("SnapshotLoadParams", &json!({"mem_backend": {"backend_type": "File", "backend_path": "/m"}}))
                .is_err(),
            "snapshot_path is required"
        );
        assert!(api
            .validate(
                "SnapshotLoadParams",
                &json!({"snapshot_path": "/s", "mem_backend": {"backend_type": "Disk", "backend_path": "/m"}})
            )
            .is_err());
        assert!(api.validate("SnapshotLoadParams", &json!({"snapshot_path": "/s", "vsock_override": {}})).is_err());
        // The load is a PUT; a PATCH has no route.
        assert!(matches!(api.route("PATCH", "/snapshot/load"), Err(ContractError::NoRoute { .. })));
    }
}
