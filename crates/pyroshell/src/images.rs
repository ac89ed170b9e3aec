//! Which runtimes have their image, and building the missing ones.
//!
//! A request must never build an image inline (minutes of mmdebstrap while
//! the client waits and holds a VM slot), so executions for a runtime whose
//! image is not ready get 503 + Retry-After, and missing images are built in
//! the background, one at a time, at startup.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use pyrovm::image::RuntimeState;
use pyrovm::{BuildCancel, Progress, Pyrovm};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{ImageInfo, ImageStateName};

/// State of one runtime's image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageState {
    /// Built.
    Ready,
    /// Being built.
    Building,
    /// Not built.
    Missing,
    /// The last build failed.
    Failed(String),
    /// The catalog says this runtime cannot run here, or its OCI registry
    /// does not answer.
    Unavailable(String),
    /// Not built, and whether its OCI registry (named) answers is being
    /// probed in the background; shown as `missing` with that reason.
    Probing(String),
}

impl From<RuntimeState> for ImageState {
    /// The cache's view; `Building` and `Failed` are the server's own.
    fn from(s: RuntimeState) -> Self {
        match s {
            RuntimeState::Ready(_) => ImageState::Ready,
            RuntimeState::Buildable => ImageState::Missing,
            RuntimeState::Unavailable(why) => ImageState::Unavailable(why),
            RuntimeState::Probing(registry) => ImageState::Probing(registry),
        }
    }
}

impl ImageState {
    /// As the API shows it.
    pub fn info(&self) -> ImageInfo {
        let (state, reason) = match self {
            ImageState::Ready => (ImageStateName::Ready, None),
            ImageState::Building => (ImageStateName::Building, Some("the image is being built".to_string())),
            ImageState::Missing => (ImageStateName::Missing, Some("the image is not built".to_string())),
            ImageState::Failed(e) => (ImageStateName::Failed, Some(e.clone())),
            ImageState::Unavailable(e) => (ImageStateName::Unavailable, Some(e.clone())),
            ImageState::Probing(registry) => (
                ImageStateName::Missing,
                Some(format!("the image is not built; checking whether registry {registry} answers")),
            ),
        };
        ImageInfo { state, reason }
    }
}

/// Image states of every runtime in the catalog.
#[derive(Debug)]
pub struct Images {
    vmm: Arc<Pyrovm>,
    states: Mutex<BTreeMap<String, ImageState>>,
}

impl Images {
    /// Looks at the image cache once.
    pub fn scan(vmm: Arc<Pyrovm>) -> Self {
        let mut states = BTreeMap::new();
        for r in vmm.catalog().runtimes() {
            let s = ImageState::from(pyrovm::image::runtime_state(vmm.settings(), r));
            states.insert(r.id.clone(), s);
        }
        Self { vmm, states: Mutex::new(states) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ImageState>> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state of `runtime_id`. A missing or failed image is looked up
    /// again, so one built meanwhile by `tvm image build` is picked up; a
    /// probing one takes its registry's answer once the probe has it (never
    /// waiting for it).
    pub fn state(&self, runtime_id: &str) -> ImageState {
        let mut current = self.lock().get(runtime_id).cloned().unwrap_or(ImageState::Missing);
        if let ImageState::Probing(_) = current {
            if let Some(r) = self.vmm.catalog().get(runtime_id) {
                current = ImageState::from(pyrovm::image::runtime_state(self.vmm.settings(), r));
                if !matches!(current, ImageState::Probing(_)) {
                    self.set(runtime_id, current.clone());
                }
            }
        }
        if matches!(current, ImageState::Missing | ImageState::Failed(_)) && self.present(runtime_id) {
            self.set(runtime_id, ImageState::Ready);
            return ImageState::Ready;
        }
        current
    }

    /// Whether `runtime_id` can run now.
    pub fn is_ready(&self, runtime_id: &str) -> bool {
        self.state(runtime_id) == ImageState::Ready
    }

    fn present(&self, runtime_id: &str) -> bool {
        let runtime = self.vmm.catalog().get(runtime_id);
        runtime.is_some_and(|r| matches!(pyrovm::image::runtime_state(self.vmm.settings(), r), RuntimeState::Ready(_)))
    }

    fn set(&self, runtime_id: &str, s: ImageState) {
        self.lock().insert(runtime_id.to_string(), s);
    }

    /// Builds missing images one by one (in catalog order, so the preferred
    /// runtimes come first) until done or `stop` turns true. A build running
    /// when `stop` turns true is cancelled, and this returns only after its
    /// tools are dead and its scratch directory and mounts are gone, so a
    /// draining server exits clean.
    pub async fn build_missing(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let runtimes = self.vmm.catalog().runtimes().to_vec();
        // OCI images are built only where their registry answers: wait (a few
        // seconds at most, in the background) for the probes `scan` started.
        let registries = pyrovm::registry::registries_of(self.vmm.settings(), &runtimes);
        let _ = tokio::task::spawn_blocking(move || pyrovm::registry::probe_blocking(registries)).await;
        for r in runtimes {
            if *stop.borrow() {
                return;
            }
            // Re-check: runtimes sharing a recipe (C and C++) are built once.
            if self.state(&r.id) != ImageState::Missing {
                continue;
            }
            self.set(&r.id, ImageState::Building);
            info!(runtime = %r.id, "building missing image");
            let cancel = BuildCancel::new();
            let build = self.vmm.ensure_image_cancellable(&r, Progress::hidden(), cancel.clone());
            tokio::pin!(build);
            let finished = tokio::select! {
                res = &mut build => Some(res),
                _ = stop.wait_for(|s| *s) => None,
            };
            let Some(outcome) = finished else {
                info!(runtime = %r.id, "cancelling the image build: the server is stopping");
                cancel.cancel();
                if let Err(e) = build.await {
                    info!(runtime = %r.id, error = %pyrovm::error_chain(&e), "image build stopped");
                }
                self.set(&r.id, ImageState::Missing);
                return;
            };
            match outcome {
                Ok(_) => {
                    info!(runtime = %r.id, "image ready");
                    self.set(&r.id, ImageState::Ready);
                }
                Err(e) => {
                    let why = pyrovm::error_chain(&e);
                    warn!(runtime = %r.id, error = %why, "image build failed");
                    self.set(&r.id, ImageState::Failed(why));
                }
            }
        }
    }
}
