//! One execution through the server: validate, get a VM (warm or by
//! admission), run, report.
//!
//! Split in two so the streaming endpoint can answer 4xx/429 as HTTP statuses
//! and only open the event stream once the request holds its capacity:
//! [`prepare`] may fail with an [`ApiError`]; [`run`] always yields an
//! [`ExecutionResult`] (TVM faults become verdict `internal_error`).

use std::time::{Duration, Instant};

use pyrovm::{Plan, RunJobError, SessionEvent, SessionInput, StartKind, StartedVm};
use tokio::sync::mpsc::Receiver;
use tracing::{info, warn};
use tvm_protocol::{Stage, Stream, Verdict};

use crate::admission::VmPermit;
use crate::api::{
    ExecutionBody, ExecutionResult, ExecutionTrace, StageBody, TestResultBody, TestSummary, TestVerdict,
    COMPARISON_RULE,
};
use crate::error::ApiError;
use crate::images::ImageState;
use crate::pool::PooledVm;
use crate::state::AppState;

/// How often a queued request re-checks the pool for a warm VM or one to evict.
const QUEUE_RECHECK: Duration = Duration::from_millis(250);

/// Capacity secured for one execution.
#[derive(Debug)]
pub(crate) enum Lease {
    /// A warm VM (with its permit); boxed, as a `Vm` is much larger than a permit.
    Pooled(Box<PooledVm>),
    /// The right to boot one.
    Fresh(VmPermit),
}

/// A validated request holding its capacity.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub id: String,
    plan: Plan,
    lease: Lease,
    queued: Duration,
    /// Per test of a compile-once-run-many request: its expected stdout.
    expected: Vec<Option<Vec<u8>>>,
}

impl Prepared {
    /// The runtime id the request resolved to.
    pub fn runtime(&self) -> &str {
        &self.plan.runtime.id
    }

    /// Whether the request has `tests` (compile once, run many).
    pub fn has_tests(&self) -> bool {
        !self.plan.job.tests.is_empty()
    }
}

/// Validates `body` and secures capacity: a warm VM, or a permit after at
/// most the queue deadline.
pub(crate) async fn prepare(st: &AppState, body: ExecutionBody) -> Result<Prepared, ApiError> {
    prepare_with(st, body, |_| Ok(())).await
}

/// [`prepare`], letting `adjust` change the validated plan before capacity is
/// sized for it (the compatibility APIs add compiler options this way).
pub(crate) async fn prepare_with(
    st: &AppState,
    mut body: ExecutionBody,
    adjust: impl FnOnce(&mut Plan) -> Result<(), ApiError>,
) -> Result<Prepared, ApiError> {
    let (tests, expected) = body.take_tests()?;
    let req = body.into_request(st.vmm.catalog(), st.config.allow_network)?;
    let mut plan = pyrovm::plan(st.vmm.catalog(), &req, st.vmm.settings().vm_overhead_mib)?;
    if !tests.is_empty() {
        pyrovm::add_tests(&mut plan, &req, &tests)?;
    }
    adjust(&mut plan)?;
    match st.images.state(&plan.runtime.id) {
        ImageState::Ready => {}
        // Nothing on this server will change these by waiting: no Retry-After.
        other @ (ImageState::Failed(_) | ImageState::Unavailable(_)) => {
            let reason = other.info().reason.unwrap_or_default();
            return Err(ApiError::RuntimeUnavailable { runtime: plan.runtime.id.clone(), reason });
        }
        other @ (ImageState::Building | ImageState::Missing | ImageState::Probing(_)) => {
            let reason = other.info().reason.unwrap_or_default();
            return Err(ApiError::NotReady { runtime: plan.runtime.id.clone(), reason });
        }
    }
    let started = Instant::now();
    // Each refusal is counted once, here; a pool miss only once a VM will really boot for it.
    let lease = obtain(st, &plan).await.inspect_err(|e| {
        if let ApiError::Overloaded { .. } = e {
            st.metrics.rejected(e.code());
        }
    })?;
    match &lease {
        Lease::Pooled(_) => st.metrics.pool(&plan.runtime.id, true),
        Lease::Fresh(_) => st.metrics.pool(&plan.runtime.id, false),
    }
    let queued = started.elapsed();
    st.metrics.queue_wait(queued);
    let id = uuid::Uuid::new_v4().simple().to_string();
    Ok(Prepared { id, plan, lease, queued, expected })
}

async fn obtain(st: &AppState, plan: &Plan) -> Result<Lease, ApiError> {
    let runtime = &plan.runtime.id;
    let need = plan.vm_memory_mib;
    if let Some(vm) = st.pool.take(runtime, need) {
        return Ok(Lease::Pooled(Box::new(vm)));
    }
    let adm = &st.admission;
    let overloaded = |reason| ApiError::Overloaded { reason, retry_after_secs: adm.retry_after_secs() };
    if let Some(p) = adm.try_acquire(need).map_err(overloaded)? {
        return Ok(Lease::Fresh(p));
    }
    // Idle pool VMs (other runtimes', or too small) hold capacity a request needs now: they yield.
    while st.pool.evict_one() {
        if let Some(p) = adm.try_acquire(need).map_err(overloaded)? {
            return Ok(Lease::Fresh(p));
        }
    }
    st.pool.note_pressure();
    let _slot = adm.enqueue().map_err(overloaded)?;
    let deadline = tokio::time::Instant::now() + adm.queue_timeout();
    // Pinned once: re-polling the same future keeps our place in the FIFO line.
    let acquire = adm.acquire(need);
    tokio::pin!(acquire);
    loop {
        tokio::select! {
            p = &mut acquire => return Ok(Lease::Fresh(p.map_err(overloaded)?)),
            _ = tokio::time::sleep_until(deadline) => {
                return Err(overloaded(crate::admission::AdmitError::Timeout(adm.queue_timeout().as_millis() as u64)));
            }
            _ = st.pool.parked() => {}
            _ = tokio::time::sleep(QUEUE_RECHECK) => {}
        }
        // A pool boot that was already running when we queued may have finished.
        if let Some(vm) = st.pool.take(runtime, need) {
            return Ok(Lease::Pooled(Box::new(vm)));
        }
        st.pool.evict_one();
    }
}

/// Boots (unless warm), runs the job, and destroys the VM. `on_output` sees
/// output chunks as they arrive.
pub(crate) async fn run(
    st: &AppState,
    prepared: Prepared,
    mut on_output: impl FnMut(Stage, Stream, &[u8]),
) -> ExecutionResult {
    let mut on_event = |ev: SessionEvent<'_>| {
        if let SessionEvent::Output { stage, stream, data } = ev {
            on_output(stage, stream, data)
        }
    };
    run_inner(st, prepared, None, &mut on_event).await
}

/// [`run`] as an interactive session: `inputs` reach the program as they
/// come, `on_event` sees stage starts, output and stage exits as they
/// happen. Dropping the future destroys the VM.
pub(crate) async fn run_session(
    st: &AppState,
    prepared: Prepared,
    inputs: &mut Receiver<SessionInput>,
    mut on_event: impl FnMut(SessionEvent<'_>),
) -> ExecutionResult {
    run_inner(st, prepared, Some(inputs), &mut on_event).await
}

async fn run_inner(
    st: &AppState,
    prepared: Prepared,
    inputs: Option<&mut Receiver<SessionInput>>,
    on_event: &mut impl FnMut(SessionEvent<'_>),
) -> ExecutionResult {
    let Prepared { id, plan, lease, queued, expected } = prepared;
    let runtime = plan.runtime.id.clone();
    let started = Instant::now();
    let mut tests = Vec::new();
    let on_test = |index: u32, run: tvm_protocol::StageResult| {
        let expect = expected.get(index as usize).and_then(Option::as_deref);
        tests.push(TestResultBody {
            index,
            verdict: TestVerdict::judge(&run, expect),
            comparison: expect.map(|_| COMPARISON_RULE.to_string()),
            run: StageBody::from(&run),
        });
    };
    let outcome = tokio::select! {
        r = run_job(st, &plan, lease, inputs, on_event, on_test) => r,
        _ = st.life.hard_stopped() => Err(("the server shut down before the execution finished".to_string(), Started::none())),
    };
    let total_ms = started.elapsed().as_millis() as u64;
    let mut result = ExecutionResult {
        id: id.clone(),
        verdict: Verdict::InternalError,
        runtime: runtime.clone(),
        compile: None,
        run: None,
        error: None,
        boot_ms: 0,
        queue_ms: queued.as_millis() as u64,
        total_ms,
        accel: st.vmm.accel().kind().as_str().to_string(),
        pooled: false,
        start: String::new(),
        tests: None,
        summary: None,
        start_note: None,
        trace: None,
    };
    if !plan.job.tests.is_empty() {
        result.summary = Some(TestSummary::of(plan.job.tests.len(), &tests));
        result.tests = Some(tests);
    }
    let started_as = match outcome {
        Ok((mut job, started)) => {
            if st.config.trace {
                result.trace =
                    Some(ExecutionTrace { execute_us: started.execute_us, agent: std::mem::take(&mut job.trace) });
            }
            result.verdict = job.verdict;
            result.compile = job.compile.as_ref().map(StageBody::from);
            result.run = job.run.as_ref().map(StageBody::from);
            started
        }
        Err((error, started)) => {
            warn!(execution = %id, %runtime, %error, "execution failed inside TVM");
            result.error = Some(error);
            started
        }
    };
    result.boot_ms = started_as.boot_ms;
    result.pooled = started_as.pooled;
    if let Some(kind) = started_as.kind {
        result.start = kind.as_str().to_string();
        st.metrics.start(kind);
    }
    if started_as.note.is_some() {
        st.metrics.template_fallback();
    }
    result.start_note = started_as.note;
    st.metrics.verdict(&runtime, result.verdict.as_str());
    info!(execution = %id, %runtime, verdict = %result.verdict, pooled = result.pooled, boot_ms = result.boot_ms,
          queue_ms = result.queue_ms, total_ms, "execution finished");
    result
}

/// How the VM of an execution started, as far as it got.
#[derive(Debug, Clone)]
struct Started {
    pooled: bool,
    boot_ms: u64,
    kind: Option<StartKind>,
    /// Why a fresh VM cold booted although templates are on.
    note: Option<String>,
    /// Job sent to result read, µs (0 until the job ran; a session's includes its teardown).
    execute_us: u64,
}

impl Started {
    fn none() -> Self {
        Self { pooled: false, boot_ms: 0, kind: None, note: None, execute_us: 0 }
    }
}

/// Destroys a VM that has served its job without holding up the response:
/// killing and reaping a QEMU takes 6–25 ms under TCG here (its guest RAM is
/// unmapped on exit), which a pool hit's answer would otherwise wait for.
/// Its capacity (`permit`) is freed only once it is gone, and the drain
/// waits for it ([`crate::state::Lifecycle::teardown`]); should the runtime
/// refuse the task (shutting down), dropping the closure destroys the VM
/// right there all the same.
fn tear_down(st: &AppState, vm: pyrovm::Vm, permit: VmPermit) {
    let in_flight = st.life.teardown();
    tokio::task::spawn_blocking(move || {
        drop(vm);
        drop(permit);
        drop(in_flight);
    });
}

type JobOutcome = Result<(tvm_protocol::JobResult, Started), (String, Started)>;

async fn run_job(
    st: &AppState,
    plan: &Plan,
    lease: Lease,
    mut inputs: Option<&mut Receiver<SessionInput>>,
    on_event: &mut impl FnMut(SessionEvent<'_>),
    mut on_test: impl FnMut(u32, tvm_protocol::StageResult),
) -> JobOutcome {
    let (mut vm, permit, mut pooled) = match lease {
        Lease::Pooled(p) => {
            let p = *p;
            (Some(p.vm), p.permit, true)
        }
        Lease::Fresh(permit) => (None, permit, false),
    };
    // Two attempts at most: a warm VM that died while parked is replaced once by a fresh one.
    for attempt in 0..2 {
        let (vm_now, note) = match vm.take() {
            Some(v) => (v, None),
            None => match st.vmm.start_vm(&plan.runtime, plan.vm_memory_mib).await {
                Ok(StartedVm { vm, note }) => {
                    st.metrics.boot(vm.boot_time());
                    pooled = false;
                    (vm, note)
                }
                Err(e) => return Err((format!("VM failed to start: {}", pyrovm::error_chain(&e)), Started::none())),
            },
        };
        let boot_ms = vm_now.boot_time().as_millis() as u64;
        let kind = if pooled { StartKind::Pool } else { vm_now.start_kind() };
        let mut started = Started { pooled, boot_ms, kind: Some(kind), note, execute_us: 0 };
        let vm_id = vm_now.id().to_string();
        // Kept out of the job for a plain execution, so it is destroyed off the response path.
        let mut vm_now = Some(vm_now);
        let t = Instant::now();
        // Two callbacks note it (and the future must stay Send), hence an atomic.
        let produced = std::sync::atomic::AtomicBool::new(false);
        let res = match inputs.as_deref_mut() {
            None => {
                vm_now
                    .as_mut()
                    .expect("set above")
                    .run_job(
                        &plan.job,
                        |stage, stream, data| {
                            produced.store(true, std::sync::atomic::Ordering::Relaxed);
                            on_event(SessionEvent::Output { stage, stream, data })
                        },
                        |index, run| {
                            produced.store(true, std::sync::atomic::Ordering::Relaxed);
                            on_test(index, run)
                        },
                    )
                    .await
            }
            Some(rx) => {
                // Consumed: a session's VM is destroyed inside, whatever happens.
                let vm = vm_now.take().expect("set above");
                vm.execute_interactive(&plan.job, rx, |ev| {
                    produced.store(true, std::sync::atomic::Ordering::Relaxed);
                    on_event(ev)
                })
                .await
            }
        };
        st.metrics.execution(t.elapsed());
        started.execute_us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
        match res {
            Ok(job) => {
                match vm_now {
                    Some(vm) => tear_down(st, vm, permit),
                    None => drop(permit),
                }
                return Ok((job, started));
            }
            Err(RunJobError::Send(e))
                if pooled && attempt == 0 && !produced.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                warn!(vm = %vm_id, error = %pyrovm::error_chain(&e), "warm VM was dead; booting a fresh one");
            }
            Err(e) => return Err((pyrovm::error_chain(&e), started)),
        }
    }
    Err(("no VM could run the job".into(), Started { pooled, ..Started::none() }))
}
