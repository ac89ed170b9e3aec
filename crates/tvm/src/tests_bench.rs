//! `tvm bench --tests N`: N tests of one C++ solution as the `tests` of one
//! execution (one VM, one compile, a fresh work dir per test) next to N
//! separate executions (a VM and a compile each), as a judge would run them.
//!
//! Every test's stdout is checked against its expected answer in both
//! modes, so a fast wrong run cannot count.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use pyrovm::{add_tests, plan, ExecutionRequest, LimitRequest, Pyrovm, SourceFile, TestRequest};
use tvm_protocol::{StageStatus, Verdict};

/// Reads `n` then `n` integers, prints their sum.
const SOLUTION: &str = r#"#include <iostream>
int main() {
    std::ios::sync_with_stdio(false);
    long long n, x, sum = 0;
    std::cin >> n;
    for (long long i = 0; i < n; i++) { std::cin >> x; sum += x; }
    std::cout << sum << "\n";
}
"#;

/// Test `i`: its stdin and the expected stdout.
fn test_case(i: usize) -> (Vec<u8>, Vec<u8>) {
    let n = 1000 + i as i64 * 100;
    let nums: Vec<i64> = (0..n).map(|k| (k * 7919 + i as i64) % 100_003 - 50_000).collect();
    let stdin = format!("{n}\n{}\n", nums.iter().map(i64::to_string).collect::<Vec<_>>().join(" "));
    (stdin.into_bytes(), format!("{}\n", nums.iter().sum::<i64>()).into_bytes())
}

fn request(stdin: Vec<u8>) -> ExecutionRequest {
    ExecutionRequest {
        runtime: "cpp".into(),
        files: vec![SourceFile { name: "main.cpp".into(), content: SOLUTION.as_bytes().to_vec() }],
        stdin,
        run_limits: LimitRequest { wall_time_ms: Some(10_000), ..Default::default() },
        ..Default::default()
    }
}

/// One mode's figures: wall seconds in all, VMs booted, compiles.
struct Row {
    secs: f64,
    vms: usize,
    compiles: usize,
}

/// All `n` tests as the `tests` of one execution.
async fn as_tests(vmm: &Pyrovm, n: usize) -> Result<Row> {
    let cases: Vec<_> = (0..n).map(test_case).collect();
    let t = Instant::now();
    let req = request(Vec::new());
    let mut p = plan(vmm.catalog(), &req, vmm.settings().vm_overhead_mib)?;
    let tests: Vec<TestRequest> =
        cases.iter().map(|(stdin, _)| TestRequest { stdin: stdin.clone(), args: vec![] }).collect();
    add_tests(&mut p, &req, &tests)?;
    let vm = vmm.boot(&p.runtime, p.vm_memory_mib).await?;
    let mut results = Vec::new();
    let job = vm.execute_each(&p.job, |_, _, _| {}, |i, r| results.push((i, r))).await?;
    let secs = t.elapsed().as_secs_f64();
    if let Some(c) = job.compile.as_ref().filter(|c| c.status != StageStatus::Ok) {
        bail!("compile failed: {}", String::from_utf8_lossy(&c.stderr));
    }
    if results.len() != n {
        bail!("{} of {n} test results arrived (verdict {})", results.len(), job.verdict);
    }
    for (i, r) in &results {
        if r.status != StageStatus::Ok || r.stdout != cases[*i as usize].1 {
            bail!("test {i}: {:?}, stdout {:?}", r.status, String::from_utf8_lossy(&r.stdout));
        }
    }
    Ok(Row { secs, vms: 1, compiles: 1 })
}

/// The same `n` tests as `n` separate executions, one after the other.
async fn separately(vmm: &Pyrovm, n: usize) -> Result<Row> {
    let t = Instant::now();
    for i in 0..n {
        let (stdin, want) = test_case(i);
        let exec = vmm.execute(&request(stdin), |_, _, _| {}).await.with_context(|| format!("execution {i}"))?;
        let r = exec.result;
        let out = r.run.as_ref().map(|run| run.stdout.as_slice()).unwrap_or_default();
        if r.verdict != Verdict::Ok || out != want {
            bail!("execution {i}: verdict {}, stdout {:?}", r.verdict, String::from_utf8_lossy(out));
        }
    }
    Ok(Row { secs: t.elapsed().as_secs_f64(), vms: n, compiles: n })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Measures both modes `runs` times with `n` tests each and prints a
/// Markdown table (medians).
///
/// # Errors
/// A VM that cannot boot, a failed compile, or a test whose output is not
/// its expected answer.
pub async fn run(vmm: &Pyrovm, runs: usize, n: usize) -> Result<()> {
    let max = tvm_protocol::MAX_TESTS;
    if !(1..=max).contains(&n) {
        bail!("--tests takes 1 to {max} tests");
    }
    println!("accelerator: {} ({})", vmm.accel().kind().as_str(), vmm.accel().reason);
    println!("{n} tests of a C++ solution (sum of 1000+ integers each), {runs} run(s) per row, medians\n");
    println!("| mode | VMs | compiles | total wall | per test | speed-up |");
    println!("|---|---:|---:|---:|---:|---:|");
    let (mut shared, mut apart) = (Vec::new(), Vec::new());
    let (mut shared_row, mut apart_row) = (None, None);
    for _ in 0..runs.max(1) {
        let r = as_tests(vmm, n).await?;
        shared.push(r.secs);
        shared_row = Some(r);
        let r = separately(vmm, n).await?;
        apart.push(r.secs);
        apart_row = Some(r);
    }
    let (s, a) = (median(shared), median(apart));
    for (name, secs, row, speedup) in
        [("`tests` (compile once, run many)", s, shared_row, a / s), ("separate executions", a, apart_row, 1.0)]
    {
        let row = row.context("no run")?;
        println!(
            "| {name} | {} | {} | {secs:.1} s | {:.0} ms | {speedup:.1}x |",
            row.vms,
            row.compiles,
            secs * 1000.0 / n as f64
        );
    }
    println!("\ntotal wall: from the request to the last test's result, boots and compiles included;");
    println!("every test's stdout was checked against its expected sum in both modes.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cases_carry_their_sums() {
        let (stdin, want) = test_case(2);
        let text = String::from_utf8(stdin).unwrap();
        let mut words = text.split_whitespace().map(|w| w.parse::<i64>().unwrap());
        let n = words.next().unwrap();
        assert_eq!(n, 1200);
        let nums: Vec<i64> = words.collect();
        assert_eq!(nums.len() as i64, n);
        assert_eq!(want, format!("{}\n", nums.iter().sum::<i64>()).into_bytes());
    }
}
