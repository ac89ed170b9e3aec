//! Where the agent's time goes in its one job ([`tvm_protocol::JobResult::trace`]):
//! named marks in µs since the job frame was decoded, read by `tvm bench
//! --api` (through `tvm serve --trace`). A VM runs exactly one job, so the trace is one per
//! process; marks past [`MAX_TRACE_MARKS`] are dropped (the set is fixed, so
//! only a job with many stages could get there).

use std::sync::Mutex;
use std::time::Instant;

use tvm_protocol::{TraceMark, MAX_TRACE_MARKS};

static TRACE: Mutex<Option<(Instant, Vec<TraceMark>)>> = Mutex::new(None);

/// Starts the trace: the job frame was just decoded.
pub fn begin() {
    *lock() = Some((Instant::now(), Vec::with_capacity(MAX_TRACE_MARKS)));
}

/// Notes that `step` just finished. Does nothing before [`begin`].
pub fn mark(step: &str) {
    if let Some((start, marks)) = lock().as_mut() {
        if marks.len() < MAX_TRACE_MARKS {
            let at_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
            marks.push(TraceMark { step: step.to_string(), at_us });
        }
    }
}

/// The marks so far, leaving the trace empty.
pub fn take() -> Vec<TraceMark> {
    lock().as_mut().map(|(_, marks)| std::mem::take(marks)).unwrap_or_default()
}

fn lock() -> std::sync::MutexGuard<'static, Option<(Instant, Vec<TraceMark>)>> {
    // A panic while marking leaves nothing half-written that matters.
    TRACE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_ordered_bounded_and_taken_once() {
        mark("before begin");
        begin();
        for i in 0..MAX_TRACE_MARKS + 5 {
            mark(&format!("step{i}"));
        }
        let marks = take();
        assert_eq!(marks.len(), MAX_TRACE_MARKS);
        assert_eq!(marks[0].step, "step0");
        assert!(marks.windows(2).all(|w| w[0].at_us <= w[1].at_us));
        assert!(take().is_empty());
    }
}
