//! Peak memory of parsing the worst request bodies, before admission.
//!
//! `cargo run --release -p pyroshell --example parse_bench` prints a
//! Markdown table (docs/performance.md, "Request parsing"): for each 32 MiB
//! body, the peak RSS and time of a process that parses it once with serde's
//! derived, unbounded decoding (what the server did before issue 19) and
//! once with [`pyroshell::wire::parse`] (what it does now). Each parse runs
//! in a fresh child process, so `ru_maxrss` is that parse's own peak.

use std::time::Instant;

use serde::Deserialize;

/// The request as it used to be decoded: derived, unbounded.
#[derive(Deserialize)]
#[allow(dead_code)]
struct Legacy {
    runtime: Option<String>,
    files: Vec<LegacyFile>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    stdin: Option<String>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct LegacyFile {
    name: String,
    content: String,
}

const BODY: usize = 32 << 20;

fn body(kind: &str) -> Vec<u8> {
    let fill = |prefix: &str, item: &str, suffix: &str| {
        let n = (BODY - prefix.len() - suffix.len()) / (item.len() + 1);
        let mut s = String::with_capacity(BODY);
        s.push_str(prefix);
        for i in 0..n {
            if i > 0 {
                s.push(',');
            }
            s.push_str(item);
        }
        s.push_str(suffix);
        s.into_bytes()
    };
    match kind {
        "tiny-args" => fill(r#"{"runtime":"python","files":[{"name":"a","content":""}],"args":["#, r#""""#, "]}"),
        "tiny-files" => fill(r#"{"runtime":"python","files":["#, r#"{"name":"a","content":""}"#, "]}"),
        "one-string" => {
            let mut s = String::from(r#"{"runtime":"python","files":[{"name":"a","content":""}],"stdin":""#);
            s.push_str(&"x".repeat(BODY - s.len() - 2));
            s.push_str("\"}");
            s.into_bytes()
        }
        other => panic!("unknown body {other}"),
    }
}

/// This process's peak resident memory (VmHWM), MiB.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    kib / 1024
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "child" {
        let b = body(&args[3]);
        let with_body = peak_rss_mib();
        let t = Instant::now();
        let ok = match args[2].as_str() {
            "derived" => serde_json::from_slice::<Legacy>(&b).is_ok(),
            _ => pyroshell::wire::parse::<pyroshell::ExecutionBody>(&b).is_ok(),
        };
        println!("{} {} {} {}", t.elapsed().as_millis(), ok, with_body, peak_rss_mib());
        return;
    }
    println!(
        "| body (32 MiB) | decoder | peak RSS with the body only | peak RSS after parsing | parse time | outcome |"
    );
    println!("|---|---|---|---|---|---|");
    let exe = std::env::current_exe().unwrap();
    for kind in ["tiny-args", "tiny-files", "one-string"] {
        for decoder in ["derived", "bounded"] {
            let out = std::process::Command::new(&exe).args(["child", decoder, kind]).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let f: Vec<&str> = text.split_whitespace().collect();
            let ok = if f.get(1) == Some(&"true") { "parsed" } else { "refused" };
            let (ms, body, peak) = (f.first().unwrap_or(&"?"), f.get(2).unwrap_or(&"?"), f.get(3).unwrap_or(&"?"));
            println!("| {kind} | {decoder} | {body} MiB | {peak} MiB | {ms} ms | {ok} |");
        }
    }
}
