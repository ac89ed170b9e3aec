//! Admission control: how many VMs may exist and how much guest RAM they get.
//!
//! One FIFO semaphore whose units are MiB of the memory budget. A VM costs
//! its RAM, but never less than a floor chosen so that `max_vms + 1` VMs can
//! never fit: one counter enforces both the VM count and the memory budget,
//! and a request never holds half of what it needs while waiting for the rest.
//! Pool VMs hold permits like any other VM. Waiting is bounded twice: by the
//! number of waiters (the queue) and by a deadline; both overflow as 429.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    /// Every queue slot is taken.
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    /// Waited in the queue past the deadline.
    #[error("no capacity within {0} ms")]
    Timeout(u64),
    /// Needs more RAM than the whole budget.
    #[error("needs {need_mib} MiB of guest RAM; the server's whole budget is {budget_mib} MiB")]
    TooLarge {
        /// What the VM needs.
        need_mib: u64,
        /// The budget.
        budget_mib: u64,
    },
}

/// The server's VM capacity.
#[derive(Debug)]
pub struct Admission {
    sem: Arc<Semaphore>,
    budget_mib: u64,
    max_vms: usize,
    floor: u64,
    queue_capacity: usize,
    queue_timeout: Duration,
    waiting: AtomicUsize,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    vms: AtomicUsize,
    mib: AtomicU64,
}

/// The right to run one VM of a given size; released on drop.
#[derive(Debug)]
pub struct VmPermit {
    _permit: OwnedSemaphorePermit,
    memory_mib: u64,
    counters: Arc<Counters>,
}

impl VmPermit {
    /// Guest RAM this permit covers.
    pub fn memory_mib(&self) -> u64 {
        self.memory_mib
    }
}

impl Drop for VmPermit {
    fn drop(&mut self) {
        self.counters.vms.fetch_sub(1, Ordering::Relaxed);
        self.counters.mib.fetch_sub(self.memory_mib, Ordering::Relaxed);
    }
}

/// A place in the queue; leaving (drop) frees it.
#[derive(Debug)]
pub struct QueueSlot<'a> {
    waiting: &'a AtomicUsize,
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// Capacity for `max_vms` VMs within `budget_mib` of guest RAM.
    pub fn new(max_vms: usize, budget_mib: u64, queue_capacity: usize, queue_timeout: Duration) -> Self {
        let max_vms = max_vms.max(1);
        // Semaphore permits are u32; a budget above 4 PiB is not a real machine.
        let budget_mib = budget_mib.clamp(1, u32::MAX as u64);
        // (max_vms + 1) × floor > budget, so at most max_vms VMs fit whatever their size.
        let floor = budget_mib / (max_vms as u64 + 1) + 1;
        Self {
            sem: Arc::new(Semaphore::new(budget_mib as usize)),
            budget_mib,
            max_vms,
            floor,
            queue_capacity,
            queue_timeout,
            waiting: AtomicUsize::new(0),
            counters: Arc::default(),
        }
    }

    /// Semaphore units a VM of `memory_mib` costs.
    pub fn cost(&self, memory_mib: u64) -> Result<u32, AdmitError> {
        if memory_mib > self.budget_mib {
            return Err(AdmitError::TooLarge { need_mib: memory_mib, budget_mib: self.budget_mib });
        }
        Ok(memory_mib.max(self.floor).min(self.budget_mib) as u32)
    }

    fn wrap(&self, permit: OwnedSemaphorePermit, memory_mib: u64) -> VmPermit {
        self.counters.vms.fetch_add(1, Ordering::Relaxed);
        self.counters.mib.fetch_add(memory_mib, Ordering::Relaxed);
        VmPermit { _permit: permit, memory_mib, counters: self.counters.clone() }
    }

    /// A permit now, or `None` without waiting. Does not jump the queue:
    /// tokio's semaphore refuses while others wait, which keeps pool refills
    /// behind requests.
    pub fn try_acquire(&self, memory_mib: u64) -> Result<Option<VmPermit>, AdmitError> {
        let cost = self.cost(memory_mib)?;
        match self.sem.clone().try_acquire_many_owned(cost) {
            Ok(p) => Ok(Some(self.wrap(p, memory_mib))),
            Err(TryAcquireError::NoPermits) => Ok(None),
            Err(TryAcquireError::Closed) => Ok(None),
        }
    }

    /// Takes a queue slot, or fails at once when the queue is full.
    pub fn enqueue(&self) -> Result<QueueSlot<'_>, AdmitError> {
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let slot = QueueSlot { waiting: &self.waiting };
        if before >= self.queue_capacity {
            return Err(AdmitError::QueueFull(before));
        }
        Ok(slot)
    }

    /// Waits (FIFO) for a permit; pair with [`Admission::enqueue`] and a deadline.
    /// Cancel-safe: dropping the future gives up the place in line.
    pub async fn acquire(&self, memory_mib: u64) -> Result<VmPermit, AdmitError> {
        let cost = self.cost(memory_mib)?;
        let p = self.sem.clone().acquire_many_owned(cost).await.map_err(|_| AdmitError::Timeout(0))?;
        Ok(self.wrap(p, memory_mib))
    }

    /// The queueing deadline.
    pub fn queue_timeout(&self) -> Duration {
        self.queue_timeout
    }

    /// Requests waiting for capacity now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// VMs holding a permit now (booting, pooled or running).
    pub fn vms(&self) -> usize {
        self.counters.vms.load(Ordering::Relaxed)
    }

    /// Guest RAM held by permits now, MiB.
    pub fn memory_in_use_mib(&self) -> u64 {
        self.counters.mib.load(Ordering::Relaxed)
    }

    /// Most VMs at once.
    pub fn max_vms(&self) -> usize {
        self.max_vms
    }

    /// The guest RAM budget, MiB.
    pub fn budget_mib(&self) -> u64 {
        self.budget_mib
    }

    /// Seconds a refused client should wait before retrying: the queue
    /// deadline is a fair estimate of when capacity frees up.
    pub fn retry_after_secs(&self) -> u64 {
        self.queue_timeout.as_secs().clamp(1, 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_bounds_the_vm_count_and_memory_bounds_the_rest() {
        let a = Admission::new(4, 23 << 10, 8, Duration::from_secs(1));
        let permits: Vec<_> = (0..4).map(|_| a.try_acquire(480).unwrap().expect("4 small VMs fit")).collect();
        assert!(a.try_acquire(480).unwrap().is_none(), "a fifth never fits");
        assert_eq!(a.vms(), 4);
        assert_eq!(a.memory_in_use_mib(), 4 * 480);
        drop(permits);
        assert_eq!(a.vms(), 0);
        // Big VMs are limited by memory: 3 × 8 GiB > 23 GiB.
        let big: Vec<_> = (0..2).map(|_| a.try_acquire(8 << 10).unwrap().unwrap()).collect();
        assert!(a.try_acquire(8 << 10).unwrap().is_none());
        drop(big);
        assert!(matches!(a.try_acquire(24 << 10), Err(AdmitError::TooLarge { .. })));
    }

    #[test]
    fn one_vm_server_admits_one() {
        let a = Admission::new(1, 4096, 1, Duration::from_secs(1));
        let p = a.try_acquire(100).unwrap().unwrap();
        assert!(a.try_acquire(100).unwrap().is_none());
        drop(p);
        assert!(a.try_acquire(4096).unwrap().is_some());
    }

    #[test]
    fn queue_is_bounded_and_slots_free_on_drop() {
        let a = Admission::new(1, 1024, 2, Duration::from_secs(1));
        let s1 = a.enqueue().unwrap();
        let _s2 = a.enqueue().unwrap();
        assert_eq!(a.enqueue().unwrap_err(), AdmitError::QueueFull(2));
        assert_eq!(a.waiting(), 2, "a refused request does not keep a slot");
        drop(s1);
        assert!(a.enqueue().is_ok());
    }

    #[tokio::test]
    async fn waiters_are_served_in_order_and_refills_do_not_jump_the_queue() {
        // floor = 1024 / 3 + 1 = 342: the held permit leaves 682 units free.
        let a = Arc::new(Admission::new(2, 1024, 4, Duration::from_secs(5)));
        let held = a.try_acquire(100).unwrap().unwrap();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move {
            let _slot = a2.enqueue().unwrap();
            a2.acquire(700).await.map(|p| p.memory_mib())
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(a.waiting(), 1);
        // 682 units are free, but they are promised to the waiter: a refill gets nothing.
        assert!(a.try_acquire(100).unwrap().is_none());
        drop(held);
        assert_eq!(waiter.await.unwrap(), Ok(700));
        assert_eq!(a.waiting(), 0);
        assert!(a.try_acquire(100).unwrap().is_some());
    }
}
