//! `pyrolima`: brings TVM to macOS and Windows hosts through Lima.
//!
//! Those hosts cannot run Linux microVMs directly, so TVM runs inside a Lima
//! Linux VM (nested virtualization where the host allows it, TCG otherwise)
//! and the host reaches the `tvm serve` inside through a port Lima forwards
//! to the host's 127.0.0.1. This crate owns:
//!
//! - [`limayaml`]: typed mirror of Lima's template keys (`LimaYAML`);
//! - [`template`]: the template that runs TVM (image, driver, sizes,
//!   provision script, readiness probe, port forward, no home mount);
//! - [`limactl`]: driving Lima's CLI with bounded, killable child processes;
//! - [`lifecycle`]: the `tvm lima up/status/down/delete` verbs;
//! - [`host`]: what the host is (OS, arch, macOS version, Apple chip).
//!
//! On Linux hosts it is not needed: TVM runs natively.

pub mod host;
pub mod lifecycle;
pub mod limactl;
pub mod limayaml;
pub mod template;

pub use host::{HostFactsError, HostOs, HostOverrides, HostPlatform};
pub use lifecycle::{
    default_bin_dir, delete, down, status, up, Accelerator, InstanceError, InstancePaths, Readiness, Status, UpError,
    UpOptions, UpReport,
};
pub use limactl::{Instance, Limactl, LimactlError, LocateError};
pub use template::{TemplateError, TemplateOptions};
