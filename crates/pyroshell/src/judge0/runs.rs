//! Judge0 submissions through TVM's compile-once-run-many path: the
//! `number_of_runs` of one submission, and the submissions of a batch that
//! share one build (language, source, compiler options, additional files and
//! limits), become the `tests` of one execution: one VM, one compile, each
//! run in a fresh work dir once every process of the previous run is gone.
//!
//! Judge0's own worker (`IsolateJob#perform`) compiles and runs a submission
//! `number_of_runs` times, stops after the first run that is not Accepted,
//! and reports the mean `time` and mean `memory` (an integer column, so the
//! mean truncated) of the runs it made, with the last run's output and
//! status. The results here are the same: every run happens in the VM, and
//! the outcome is computed from the runs Judge0 would have made.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use pyrovm::MAX_STDIN_BYTES;
use tvm_protocol::MAX_TESTS;

use super::wire::{self, Outcome, Spec};
use super::{add_compiler_options, Built};
use crate::api::{Encoding, TestBody};
use crate::error::ApiError;
use crate::exec;
use crate::piston::Interleaved;
use crate::state::AppState;

/// Whether `spec` may run as tests of a shared execution. Runs with
/// `redirect_stderr_to_stdout` may not: a test's result carries its two
/// streams apart, and Judge0's `2>&1` keeps the order they were written in.
pub(super) fn can_share(spec: &Spec) -> bool {
    !spec.redirect_stderr_to_stdout
}

/// Whether `a` and `b` build and run the same program under the same limits,
/// so they can be tests of one execution (stdin, arguments, expected output,
/// number of runs and callback may differ).
pub(super) fn same_build(a: &Spec, b: &Spec) -> bool {
    can_share(a)
        && can_share(b)
        && a.language_id == b.language_id
        && a.source_code == b.source_code
        && a.compiler_options == b.compiler_options
        && a.additional_files == b.additional_files
        && a.cpu_time_limit == b.cpu_time_limit
        && a.cpu_extra_time == b.cpu_extra_time
        && a.wall_time_limit == b.wall_time_limit
        && a.memory_limit == b.memory_limit
        && a.stack_limit == b.stack_limit
        && a.max_processes_and_or_threads == b.max_processes_and_or_threads
        && a.max_file_size == b.max_file_size
}

/// The stdin bytes every run of `spec` gets, over all its runs.
fn stdin_bytes(spec: &Spec) -> u64 {
    spec.stdin.as_ref().map_or(0, |s| s.len() as u64) * u64::from(spec.number_of_runs)
}

/// Splits `specs` (in order) into groups that can each be one execution:
/// the same build, at most [`MAX_TESTS`] runs and [`MAX_STDIN_BYTES`] of
/// stdin in all. Returns each group's indices into `specs`, in order.
pub(super) fn groups(specs: &[&Spec]) -> Vec<Vec<usize>> {
    let mut out: Vec<(Vec<usize>, usize, u64)> = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let (runs, stdin) = (s.number_of_runs as usize, stdin_bytes(s));
        let fits = |(members, r, b): &&mut (Vec<usize>, usize, u64)| {
            same_build(specs[members[0]], s) && r + runs <= MAX_TESTS && b + stdin <= MAX_STDIN_BYTES
        };
        match out.iter_mut().find(|g| fits(g)) {
            Some(g) => {
                g.0.push(i);
                g.1 += runs;
                g.2 += stdin;
            }
            None => out.push((vec![i], runs, stdin)),
        }
    }
    out.into_iter().map(|(members, _, _)| members).collect()
}

/// Judge0's result of one submission from its runs in order: the runs up to
/// and including the first that is not Accepted count; the last of them
/// gives status, output and message, `time` and `memory` are their means.
pub(super) fn combine(runs: impl IntoIterator<Item = Outcome>) -> Outcome {
    let mut times = Vec::new();
    let mut memories = Vec::new();
    let mut last = Outcome { status_id: 13, message: Some("no run was made".into()), ..Default::default() };
    for run in runs {
        times.extend(run.time);
        memories.extend(run.memory);
        last = run;
        if last.status_id != 3 {
            break;
        }
    }
    if !times.is_empty() {
        last.time = Some(times.iter().sum::<f64>() / times.len() as f64);
    }
    if !memories.is_empty() {
        last.memory = Some(memories.iter().sum::<u64>() / memories.len() as u64);
    }
    last
}

/// Runs `members` (each with its `number_of_runs`) as the tests of one
/// execution and returns each member's Judge0 outcome, in order. All of
/// them must be [`same_build`] and fit one execution (see [`groups`]).
pub(super) async fn execute_shared(st: &AppState, members: &[(&Spec, &Built)]) -> Vec<Outcome> {
    let Some((_, first)) = members.first() else { return Vec::new() };
    let mut body = first.body.clone();
    body.stdin = None;
    body.args = Vec::new();
    body.tests = members
        .iter()
        .flat_map(|(spec, built)| {
            let test = TestBody {
                stdin: spec.stdin.as_ref().map(|s| B64.encode(s)),
                stdin_encoding: Encoding::Base64,
                args: built.body.args.clone(),
                expected_output: None,
            };
            std::iter::repeat_n(test, spec.number_of_runs as usize)
        })
        .collect();
    let options = first.compiler_options.clone();
    let prepared = exec::prepare_with(st, body, move |plan| {
        add_compiler_options(plan, &options)
            .map_err(|m| ApiError::invalid("bad_compiler_options", m, "compiler_options"))
    })
    .await;
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            let failed = Outcome { status_id: 13, message: Some(e.to_string()), ..Default::default() };
            return vec![failed; members.len()];
        }
    };
    let mut out = Interleaved::default();
    let result = exec::run(st, prepared, |stage, _, data| out.push(stage, data)).await;
    let tests = result.tests.unwrap_or_default();
    let mut next = 0;
    members
        .iter()
        .map(|(spec, _)| {
            let runs = (next..next + spec.number_of_runs as usize).map(|i| match tests.get(i) {
                // A run that finished is its own result, even if TVM failed after it.
                Some(t) => wire::outcome(result.compile.as_ref(), Some(&t.run), &out.compile, &[], None, spec),
                None => wire::outcome(result.compile.as_ref(), None, &out.compile, &[], result.error.as_deref(), spec),
            });
            next += spec.number_of_runs as usize;
            combine(runs)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(source: &str, stdin: &str, runs: u32) -> Spec {
        Spec {
            source_code: source.as_bytes().to_vec(),
            language_id: 109,
            stdin: Some(stdin.as_bytes().to_vec()),
            expected_output: None,
            compiler_options: None,
            command_line_arguments: None,
            number_of_runs: runs,
            cpu_time_limit: 2.0,
            cpu_extra_time: 0.5,
            wall_time_limit: 5.0,
            memory_limit: 65_536,
            stack_limit: 64_000,
            max_processes_and_or_threads: 60,
            max_file_size: 1024,
            redirect_stderr_to_stdout: false,
            callback_url: None,
            additional_files: None,
        }
    }

    #[test]
    fn batches_group_by_build_within_the_test_bounds() {
        let a1 = spec("a", "1", 1);
        let a2 = spec("a", "2", 3);
        let b = spec("b", "1", 1);
        let mut a_more_memory = spec("a", "3", 1);
        a_more_memory.memory_limit = 131_072;
        let mut a_redirect = spec("a", "4", 1);
        a_redirect.redirect_stderr_to_stdout = true;
        let mut a_redirect2 = a_redirect.clone();
        a_redirect2.stdin = None;
        let mut a_args = spec("a", "5", 2);
        a_args.command_line_arguments = Some("x y".into());
        a_args.expected_output = Some(b"z".to_vec());
        let specs = [&a1, &b, &a2, &a_more_memory, &a_redirect, &a_redirect2, &a_args];
        assert_eq!(groups(&specs), vec![vec![0, 2, 6], vec![1], vec![3], vec![4], vec![5]]);
        // At most MAX_TESTS runs per execution.
        let many = spec("a", "", 20);
        let specs = [&many, &many, &many, &many, &a1];
        assert_eq!(groups(&specs), vec![vec![0, 1, 2, 4], vec![3]]);
        // At most MAX_STDIN_BYTES of stdin per execution.
        let big = spec("a", &"x".repeat((MAX_STDIN_BYTES / 2) as usize), 1);
        assert_eq!(groups(&[&big, &big, &big]), vec![vec![0, 1], vec![2]]);
    }

    fn run(status_id: u8, time: f64, memory: u64, stdout: &str) -> Outcome {
        Outcome {
            status_id,
            time: Some(time),
            memory: Some(memory),
            stdout: Some(stdout.as_bytes().to_vec()),
            ..Default::default()
        }
    }

    #[test]
    fn runs_combine_as_judge0s_worker_does() {
        // All accepted: means of time and memory (memory truncated, an integer column in Judge0).
        let o = combine([run(3, 0.1, 1000, "a"), run(3, 0.2, 1001, "b"), run(3, 0.3, 1003, "c")]);
        assert_eq!((o.status_id, o.memory, o.stdout.as_deref()), (3, Some(1001), Some(&b"c"[..])));
        assert!((o.time.unwrap() - 0.2).abs() < 1e-9, "{o:?}");
        // Judge0 stops after the first run that is not Accepted: later runs do not count.
        let o = combine([run(3, 0.1, 100, "a"), run(4, 0.3, 300, "wrong"), run(3, 9.0, 9000, "c")]);
        assert_eq!((o.status_id, o.memory, o.stdout.as_deref()), (4, Some(200), Some(&b"wrong"[..])));
        assert!((o.time.unwrap() - 0.2).abs() < 1e-9, "{o:?}");
        // A compile error has no time: none is made up.
        let ce = Outcome { status_id: 6, ..Default::default() };
        let o = combine([ce.clone(), ce]);
        assert_eq!((o.status_id, o.time, o.memory), (6, None, None));
        assert_eq!(combine([]).status_id, 13);
    }
}
