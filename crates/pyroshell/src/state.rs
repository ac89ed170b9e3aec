//! Shared server state and the drain lifecycle.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use pyrovm::Pyrovm;
use tokio::sync::{watch, Notify};

use crate::admission::Admission;
use crate::config::ServeConfig;
use crate::error::ApiError;
use crate::images::Images;
use crate::metrics::{Gauges, Metrics};
use crate::pool::Pool;

/// Everything handlers share.
#[derive(Debug)]
pub(crate) struct AppState {
    pub vmm: Arc<Pyrovm>,
    pub config: ServeConfig,
    pub admission: Arc<Admission>,
    pub pool: Arc<Pool>,
    pub images: Arc<Images>,
    pub metrics: Arc<Metrics>,
    pub life: Arc<Lifecycle>,
    /// Open connections and their caps.
    pub conns: Arc<crate::conn::ConnLimits>,
    /// Request bodies being read and parsed (bounded before admission).
    pub parses: Arc<tokio::sync::Semaphore>,
    /// This server's OpenAPI document (its maximum limits included).
    pub openapi: serde_json::Value,
}

impl AppState {
    pub fn gauges(&self) -> Gauges {
        Gauges {
            queue_depth: self.admission.waiting(),
            vms: self.admission.vms(),
            max_vms: self.admission.max_vms(),
            memory_in_use_mib: self.admission.memory_in_use_mib(),
            memory_budget_mib: self.admission.budget_mib(),
            in_flight: self.life.in_flight(),
            draining: self.life.draining(),
            connections: self.conns.open(),
            max_connections: self.conns.max(),
            pools: self.pool.pools().iter().map(|p| (p.id().to_string(), p.idle(), p.target())).collect(),
            templates: self.vmm.templates().counts(),
        }
    }
}

/// Accepting → draining (no new executions, in-flight ones finish) → hard stop.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
    hard_stop: watch::Sender<bool>,
}

/// An execution in progress; the drain waits for these.
#[derive(Debug)]
pub(crate) struct InFlight {
    life: Arc<Lifecycle>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.life.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.life.idle.notify_waiters();
        }
    }
}

impl Lifecycle {
    pub fn new() -> Self {
        Self {
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            hard_stop: watch::channel(false).0,
        }
    }

    /// Registers a new execution, unless draining.
    pub fn begin(self: &Arc<Self>) -> Result<InFlight, ApiError> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight { life: self.clone() };
        // Checked after counting so a drain that starts in between still waits for us or refuses us.
        if self.draining() {
            return Err(ApiError::Draining);
        }
        Ok(guard)
    }

    /// Counts a VM being destroyed off the response path as in flight (the
    /// drain waits for it like for an execution; never refused).
    pub fn teardown(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight { life: self.clone() }
    }

    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Resolves when no execution is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Register before checking, so a notification in between is not lost.
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Aborts every execution still running (their VMs are destroyed).
    pub fn hard_stop(&self) {
        self.hard_stop.send_replace(true);
    }

    /// Resolves once [`Lifecycle::hard_stop`] was called.
    pub async fn hard_stopped(&self) {
        let mut rx = self.hard_stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn drain_refuses_new_work_and_waits_for_old() {
        let life = Arc::new(Lifecycle::new());
        let a = life.begin().unwrap();
        life.start_drain();
        assert!(matches!(life.begin(), Err(ApiError::Draining)));
        assert_eq!(life.in_flight(), 1, "the refused request is not counted");
        let l2 = life.clone();
        let waiter = tokio::spawn(async move { l2.wait_idle().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn hard_stop_reaches_late_subscribers() {
        let life = Lifecycle::new();
        life.hard_stop();
        tokio::time::timeout(Duration::from_secs(1), life.hard_stopped()).await.unwrap();
    }
}
