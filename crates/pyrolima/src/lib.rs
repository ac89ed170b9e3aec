//! `pyrolima`: brings TVM to macOS and Windows hosts.
//!
//! Those hosts cannot run Linux microVMs directly, so TVM runs inside a Lima
//! Linux VM (nested virtualization where the host allows it, TCG otherwise)
//! and the host's `tvm` forwards requests to the `tvm serve` inside it. This
//! crate will own the Lima template, the instance lifecycle and the port
//! forward. On Linux hosts it is not used: TVM runs natively.
