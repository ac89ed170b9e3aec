//! The warm pool: per runtime, VMs booted ahead of time and parked at agent-ready.
//!
//! A pooled VM still serves exactly one execution and is destroyed after it;
//! the pool only moves the boot off the request's critical path. Pool VMs
//! hold admission permits like any VM, so they can never overcommit the
//! server, and they are opportunistic: refills only take capacity nobody is
//! waiting for, and a request that finds no capacity evicts idle pool VMs
//! (oldest first) before it queues. VMs idle past the maximum age are
//! destroyed and replaced, so a pool VM's guest clock and page cache never
//! get stale.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyrovm::{Pyrovm, Vm};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, info_span, warn, Instrument};
use tvm_config::Runtime;

use crate::admission::{Admission, VmPermit};
use crate::images::Images;
use crate::metrics::Metrics;

/// After a request had to wait or evict, refills pause this long so the
/// pool does not take back the capacity requests are using.
const PRESSURE_BACKOFF: Duration = Duration::from_secs(3);
/// How often the refill loop looks around even without a wake-up.
const TICK: Duration = Duration::from_secs(1);

/// Anything with an age (a VM, or a stand-in in tests).
pub trait Aged {
    /// Time since it was created.
    fn age(&self) -> Duration;
}

/// A booted VM with its capacity.
#[derive(Debug)]
pub struct PooledVm {
    /// The VM, at agent-ready.
    pub vm: Vm,
    /// Its admission permit: released when this value is dropped, after the VM.
    pub permit: VmPermit,
}

impl Aged for PooledVm {
    fn age(&self) -> Duration {
        self.vm.age()
    }
}

/// Idle items, oldest first.
#[derive(Debug)]
pub struct IdleSet<T> {
    items: VecDeque<T>,
}

impl<T> Default for IdleSet<T> {
    fn default() -> Self {
        Self { items: VecDeque::new() }
    }
}

impl<T: Aged> IdleSet<T> {
    /// Parks an item (the newest).
    pub fn push(&mut self, item: T) {
        self.items.push_back(item);
    }

    /// Takes the oldest item that is not past `max_age`; older ones are
    /// returned too, to be dropped by the caller outside any lock.
    pub fn take(&mut self, max_age: Duration) -> (Option<T>, Vec<T>) {
        let expired = self.expire(max_age);
        (self.items.pop_front(), expired)
    }

    /// Removes items past `max_age`.
    pub fn expire(&mut self, max_age: Duration) -> Vec<T> {
        let mut expired = Vec::new();
        // Oldest first: stop at the first young one.
        while self.items.front().is_some_and(|i| i.age() > max_age) {
            expired.extend(self.items.pop_front());
        }
        expired
    }

    /// Removes the oldest item.
    pub fn pop_oldest(&mut self) -> Option<T> {
        self.items.pop_front()
    }

    /// Age of the oldest item.
    pub fn oldest_age(&self) -> Option<Duration> {
        self.items.front().map(Aged::age)
    }

    /// Items parked.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is parked.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Removes everything.
    pub fn drain(&mut self) -> Vec<T> {
        self.items.drain(..).collect()
    }
}

/// How many more VMs a refill should start.
pub fn deficit(target: usize, idle: usize, booting: usize) -> usize {
    target.saturating_sub(idle + booting)
}

/// Shrinks pool targets until they fit in `max_vms` while leaving room for
/// `reserve` on-demand VMs: a pool that eats all capacity turns every miss
/// into an eviction. Round-robin so every runtime keeps some warmth.
pub fn fit_targets(targets: &BTreeMap<String, usize>, max_vms: usize, reserve: usize) -> BTreeMap<String, usize> {
    let room = max_vms.saturating_sub(reserve);
    let mut out: BTreeMap<String, usize> = targets.keys().map(|k| (k.clone(), 0)).collect();
    let mut given = 0;
    loop {
        let mut progressed = false;
        for (k, want) in targets {
            if given < room && out[k] < *want {
                *out.get_mut(k).expect("key present") += 1;
                given += 1;
                progressed = true;
            }
        }
        if !progressed {
            return out;
        }
    }
}

/// One runtime's pool.
#[derive(Debug)]
pub struct RuntimePool {
    runtime: Runtime,
    memory_mib: u64,
    target: usize,
    idle: Mutex<IdleSet<PooledVm>>,
    booting: AtomicUsize,
    wake: Notify,
}

impl RuntimePool {
    fn lock(&self) -> std::sync::MutexGuard<'_, IdleSet<PooledVm>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runtime id.
    pub fn id(&self) -> &str {
        &self.runtime.id
    }

    /// Guest RAM of this pool's VMs.
    pub fn memory_mib(&self) -> u64 {
        self.memory_mib
    }

    /// Configured size.
    pub fn target(&self) -> usize {
        self.target
    }

    /// Idle VMs now.
    pub fn idle(&self) -> usize {
        self.lock().len()
    }
}

/// All pools.
#[derive(Debug)]
pub struct Pool {
    pools: Vec<Arc<RuntimePool>>,
    max_idle: Duration,
    /// Signalled when a VM is parked, so queued requests can look.
    parked: Notify,
    pressure: Mutex<Option<Instant>>,
    warm: WarmLatch,
    /// Run each new VM's runtime warm-up before parking it ([`Pool::warm_up_vms`]).
    warm_up: bool,
}

/// Readiness's view of the pools: cold until every pool has reached its
/// target once, warm for good after that. A pool that traffic empties means
/// a busy server, not a broken one; a readiness probe that failed under load
/// would take the busiest servers out of their load balancer.
#[derive(Debug, Default)]
pub struct WarmLatch(AtomicBool);

impl WarmLatch {
    /// `cold` (pools below target now) until it is first empty; empty ever after.
    pub fn filter(&self, cold: Vec<String>) -> Vec<String> {
        if self.0.load(Ordering::Acquire) {
            return Vec::new();
        }
        if cold.is_empty() {
            self.0.store(true, Ordering::Release);
        }
        cold
    }
}

/// Guest RAM a runtime's requests need with default limits (what `plan` computes).
pub fn default_memory_mib(vmm: &Pyrovm, runtime: &Runtime) -> Option<u64> {
    let req = pyrovm::ExecutionRequest {
        runtime: runtime.id.clone(),
        files: vec![pyrovm::SourceFile { name: runtime.entry.clone(), content: Vec::new() }],
        ..Default::default()
    };
    pyrovm::plan(vmm.catalog(), &req, vmm.settings().vm_overhead_mib).ok().map(|p| p.vm_memory_mib)
}

impl Pool {
    /// Pools for the runtimes in `targets` (id → size). Pool VMs get the RAM
    /// a default-limits request needs; requests asking for more boot on demand.
    pub fn new(vmm: &Pyrovm, targets: &BTreeMap<String, usize>, max_idle: Duration) -> Self {
        let pools = targets
            .iter()
            .filter_map(|(id, target)| {
                let runtime = vmm.catalog().get(id)?.clone();
                let memory_mib = default_memory_mib(vmm, &runtime)?;
                Some(Arc::new(RuntimePool {
                    runtime,
                    memory_mib,
                    target: *target,
                    idle: Mutex::default(),
                    booting: AtomicUsize::new(0),
                    wake: Notify::new(),
                }))
            })
            .collect();
        Self {
            pools,
            max_idle,
            parked: Notify::new(),
            pressure: Mutex::new(None),
            warm: WarmLatch::default(),
            warm_up: false,
        }
    }

    /// Whether a new VM runs its runtime's warm-up before it is parked
    /// (`pool_warm_up`; see [`pyrovm::Pyrovm::warm_up`] for why).
    pub fn warm_up_vms(mut self, on: bool) -> Self {
        self.warm_up = on;
        self
    }

    /// Every runtime's pool.
    pub fn pools(&self) -> &[Arc<RuntimePool>] {
        &self.pools
    }

    fn get(&self, runtime_id: &str) -> Option<&Arc<RuntimePool>> {
        self.pools.iter().find(|p| p.runtime.id == runtime_id)
    }

    /// A warm VM for `runtime_id` with at least `need_mib` of RAM, if one is parked.
    pub fn take(&self, runtime_id: &str, need_mib: u64) -> Option<PooledVm> {
        let p = self.get(runtime_id)?;
        if p.memory_mib < need_mib {
            return None;
        }
        let (vm, expired) = p.lock().take(self.max_idle);
        // Dropping VMs kills QEMU and waits for it: never under the lock.
        drop(expired);
        if vm.is_some() {
            p.wake.notify_one();
        }
        vm
    }

    /// Destroys the oldest idle VM of any runtime to free its capacity.
    pub fn evict_one(&self) -> bool {
        self.note_pressure();
        let victim = self
            .pools
            .iter()
            .filter_map(|p| p.lock().oldest_age().map(|age| (age, p)))
            .max_by_key(|(age, _)| *age)
            .and_then(|(_, p)| p.lock().pop_oldest());
        match victim {
            Some(v) => {
                debug!(vm = v.vm.id(), "evicting idle pool VM for a request");
                drop(v);
                true
            }
            None => false,
        }
    }

    /// Records that a request had to wait or evict.
    pub fn note_pressure(&self) {
        *self.pressure.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    fn under_pressure(&self) -> bool {
        self.pressure.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|t| t.elapsed() < PRESSURE_BACKOFF)
    }

    /// Resolves when a VM is parked (or soon after; callers re-check on a timer too).
    pub async fn parked(&self) {
        self.parked.notified().await;
    }

    /// Destroys every idle VM.
    pub fn clear(&self) {
        for p in &self.pools {
            let vms = p.lock().drain();
            drop(vms);
            p.wake.notify_one();
        }
    }

    /// Pools still filling for the first time (see [`WarmLatch`]), as `RUNTIME IDLE/TARGET`.
    pub fn not_warm_yet(&self) -> Vec<String> {
        self.warm.filter(self.not_warm())
    }

    /// [`not_warm_yet`](Self::not_warm_yet) leaving out the pools of runtimes
    /// `never` says can never fill here (an OCI runtime whose registry does
    /// not answer), so they do not hold readiness.
    pub fn not_warm_yet_except(&self, never: impl Fn(&str) -> bool) -> Vec<String> {
        let cold = self
            .pools
            .iter()
            .filter(|p| p.idle() < p.target && !never(&p.runtime.id))
            .map(|p| format!("{} {}/{}", p.runtime.id, p.idle(), p.target))
            .collect();
        self.warm.filter(cold)
    }

    /// Pools below their target now, as `RUNTIME IDLE/TARGET`.
    pub fn not_warm(&self) -> Vec<String> {
        self.pools
            .iter()
            .filter(|p| p.idle() < p.target)
            .map(|p| format!("{} {}/{}", p.runtime.id, p.idle(), p.target))
            .collect()
    }
}

/// What a refill loop needs.
#[derive(Debug, Clone)]
pub struct RefillCtx {
    /// The VM manager.
    pub vmm: Arc<Pyrovm>,
    /// Capacity.
    pub admission: Arc<Admission>,
    /// Image states.
    pub images: Arc<Images>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// All pools.
    pub pool: Arc<Pool>,
}

/// After a pool VM failed to boot or to warm up (`what`, `error`): counts
/// it, says so, and waits 2^failures s (at most 64 s) before the next try.
/// `true` when the server stops meanwhile.
async fn back_off(
    ctx: &RefillCtx,
    failures: &mut u32,
    stop: &mut watch::Receiver<bool>,
    what: &str,
    error: String,
) -> bool {
    *failures = failures.saturating_add(1);
    ctx.metrics.pool_boot_failed();
    let backoff = Duration::from_secs(1u64 << (*failures).min(6));
    warn!(%error, retry_in_s = backoff.as_secs(), "{what}");
    tokio::select! {
        _ = tokio::time::sleep(backoff) => false,
        _ = stop.wait_for(|s| *s) => true,
    }
}

/// Keeps one runtime's pool at its target until `stop` turns true: recycles
/// old VMs, boots replacements one at a time when capacity is free and no
/// request waits, backs off after boot failures.
pub async fn refill_loop(ctx: RefillCtx, rp: Arc<RuntimePool>, mut stop: watch::Receiver<bool>) {
    let span = info_span!("pool", runtime = %rp.runtime.id);
    async move {
        let mut failures: u32 = 0;
        loop {
            if *stop.borrow() {
                break;
            }
            let expired = rp.lock().expire(ctx.pool.max_idle);
            if !expired.is_empty() {
                debug!(count = expired.len(), "recycling idle VMs past max age");
                drop(expired);
            }
            let want = deficit(rp.target, rp.idle(), rp.booting.load(Ordering::Acquire));
            let may = want > 0
                && ctx.admission.waiting() == 0
                && !ctx.pool.under_pressure()
                && ctx.images.is_ready(&rp.runtime.id);
            let permit = if may { ctx.admission.try_acquire(rp.memory_mib).ok().flatten() } else { None };
            if let Some(permit) = permit {
                rp.booting.fetch_add(1, Ordering::AcqRel);
                let boot = ctx.vmm.start_vm(&rp.runtime, rp.memory_mib);
                let outcome = tokio::select! {
                    r = boot => Some(r),
                    // Dropping the boot future kills the half-started VM.
                    _ = stop.wait_for(|s| *s) => None,
                };
                rp.booting.fetch_sub(1, Ordering::AcqRel);
                match outcome {
                    None => break,
                    Some(Ok(pyrovm::StartedVm { mut vm, note })) => {
                        if ctx.pool.warm_up {
                            let warmed = tokio::select! {
                                r = ctx.vmm.warm_up(&mut vm, &rp.runtime) => Some(r),
                                _ = stop.wait_for(|s| *s) => None,
                            };
                            match warmed {
                                // Dropping the VM destroys it.
                                None => break,
                                Some(Ok(ms)) => {
                                    if ms.is_some() {
                                        ctx.metrics.pool_warm_up(true);
                                    }
                                    debug!(vm = vm.id(), warmup_ms = ms, "pool VM warmed up");
                                }
                                Some(Err(e)) => {
                                    ctx.metrics.pool_warm_up(false);
                                    // A VM whose warm-up failed is in no known state: never park it.
                                    let what = format!("pool VM warm-up failed; VM destroyed (vm {})", vm.id());
                                    drop(vm);
                                    drop(permit);
                                    if back_off(&ctx, &mut failures, &mut stop, &what, pyrovm::error_chain(&e)).await {
                                        break;
                                    }
                                    continue;
                                }
                            }
                        }
                        failures = 0;
                        if let Some(note) = note {
                            ctx.metrics.template_fallback();
                            info!(vm = vm.id(), %note, "pool VM cold booted instead of restoring its template");
                        }
                        ctx.metrics.boot(vm.boot_time());
                        ctx.metrics.pool_vm_started(vm.start_kind());
                        debug!(
                            vm = vm.id(),
                            boot_ms = vm.boot_time().as_millis() as u64,
                            start = vm.start_kind().as_str(),
                            "pool VM ready"
                        );
                        rp.lock().push(PooledVm { vm, permit });
                        ctx.pool.parked.notify_waiters();
                        continue;
                    }
                    Some(Err(e)) => {
                        drop(permit);
                        if back_off(&ctx, &mut failures, &mut stop, "pool VM failed to boot", pyrovm::error_chain(&e))
                            .await
                        {
                            break;
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = rp.wake.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        let left = rp.lock().drain();
        if !left.is_empty() {
            info!(count = left.len(), "destroying pool VMs");
        }
        drop(left);
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Fake(u64);
    impl Aged for Fake {
        fn age(&self) -> Duration {
            Duration::from_secs(self.0)
        }
    }

    #[test]
    fn warm_latch_stays_warm_once_every_pool_was_full() {
        let latch = WarmLatch::default();
        assert_eq!(latch.filter(vec!["python-3.13 0/1".into()]), vec!["python-3.13 0/1".to_string()]);
        assert!(latch.filter(Vec::new()).is_empty());
        assert!(latch.filter(vec!["python-3.13 0/1".into()]).is_empty(), "a pool emptied by traffic is busy, not cold");
    }

    #[test]
    fn take_skips_and_returns_expired_oldest_first() {
        let mut s = IdleSet::default();
        for age in [100, 50, 10, 5] {
            s.push(Fake(age));
        }
        let (got, expired) = s.take(Duration::from_secs(60));
        assert_eq!(expired, vec![Fake(100)]);
        assert_eq!(got, Some(Fake(50)), "oldest usable first, so none ages out");
        assert_eq!(s.len(), 2);
        assert_eq!(s.oldest_age(), Some(Duration::from_secs(10)));
        assert_eq!(s.expire(Duration::from_secs(7)), vec![Fake(10)]);
        assert_eq!(s.drain(), vec![Fake(5)]);
        assert!(s.is_empty());
        assert_eq!(s.take(Duration::from_secs(1)), (None, vec![]));
    }

    #[test]
    fn deficit_counts_booting_vms() {
        assert_eq!(deficit(2, 0, 0), 2);
        assert_eq!(deficit(2, 1, 1), 0);
        assert_eq!(deficit(2, 3, 0), 0);
    }

    #[test]
    fn targets_fit_capacity_round_robin_with_reserve() {
        let t: BTreeMap<String, usize> = [("a".into(), 2), ("b".into(), 2), ("c".into(), 0)].into();
        let f = fit_targets(&t, 4, 1);
        assert_eq!(f.values().sum::<usize>(), 3);
        assert_eq!((f["a"], f["b"], f["c"]), (2, 1, 0));
        assert_eq!(fit_targets(&t, 10, 1), t, "fits as configured");
        assert_eq!(fit_targets(&t, 1, 1).values().sum::<usize>(), 0, "a one-VM server keeps no pool");
    }
}
