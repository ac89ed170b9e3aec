//! Configuration of TVM: operator [`Settings`] and the runtime [`Catalog`].
//!
//! The catalog is data (`catalog/runtimes.toml`, compiled in and overridable
//! by a file, extended and changed by overlay files in `runtimes_dir`): which languages and versions exist, how their images are built,
//! how a submission is compiled and run, and the default and maximum limits.
//! Nothing here touches VMs; `pyrovm` consumes these types.

mod catalog;
pub mod matrix;
mod settings;
mod units;

pub use catalog::{
    Assembly, Catalog, CatalogError, ImageRecipe, LimitOverrides, Runtime, BASE_PACKAGES, BUILTIN_ORIGIN,
};
pub use settings::{Accel, GuestArch, Settings, SettingsError, VmmChoice, MAX_VMM_UID_BASE};
pub use units::{format_bytes, parse_duration_ms, parse_size_bytes};
