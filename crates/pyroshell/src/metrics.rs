//! Prometheus metrics, kept in plain counters and rendered as text exposition.
//!
//! Hand-written rather than a metrics crate: a dozen series, all updated off
//! the hot path of a VM run, and the text format is short. Label values come
//! from bounded sets (route templates, runtime ids, verdicts, status codes),
//! never from request data, so cardinality stays fixed.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms: microVM boots take
/// ~0.2 s under KVM and seconds under TCG; executions up to the 120 s maximum.
const BUCKETS: [f64; 12] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    verdicts: BTreeMap<(String, String), u64>,
    pool_hits: BTreeMap<String, u64>,
    pool_misses: BTreeMap<String, u64>,
    rejections: BTreeMap<&'static str, u64>,
    connections_closed: BTreeMap<&'static str, u64>,
    pool_boot_failures: u64,
    /// Pool VM warm-ups by outcome (`ok`, `failed`).
    pool_warmups: BTreeMap<&'static str, u64>,
    template_fallbacks: u64,
    starts: BTreeMap<&'static str, u64>,
    pool_starts: BTreeMap<&'static str, u64>,
    boot: Histogram,
    execution: Histogram,
    queue_wait: Histogram,
}

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Values read at scrape time from the live components.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    /// Requests waiting for capacity.
    pub queue_depth: usize,
    /// VMs holding capacity (booting, pooled or running).
    pub vms: usize,
    /// Most VMs at once.
    pub max_vms: usize,
    /// Guest RAM held, MiB.
    pub memory_in_use_mib: u64,
    /// Guest RAM budget, MiB.
    pub memory_budget_mib: u64,
    /// Executions in progress.
    pub in_flight: usize,
    /// Whether the server is draining.
    pub draining: bool,
    /// Open HTTP connections.
    pub connections: usize,
    /// Their cap.
    pub max_connections: usize,
    /// Per runtime: idle pool VMs and the target.
    pub pools: Vec<(String, usize, usize)>,
    /// Template builds and failures so far (the VM manager counts them).
    pub templates: pyrovm::TemplateCounts,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic while holding this lock cannot leave counters inconsistent enough to matter.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// One HTTP request answered.
    pub fn request(&self, route: &str, status: u16) {
        self.with(|m| *m.requests.entry((route.to_string(), status)).or_default() += 1);
    }

    /// One execution finished with `verdict`.
    pub fn verdict(&self, runtime: &str, verdict: &str) {
        self.with(|m| *m.verdicts.entry((runtime.to_string(), verdict.to_string())).or_default() += 1);
    }

    /// A request was served by a pooled VM (`hit`) or had to boot one.
    pub fn pool(&self, runtime: &str, hit: bool) {
        self.with(|m| {
            let map = if hit { &mut m.pool_hits } else { &mut m.pool_misses };
            *map.entry(runtime.to_string()).or_default() += 1;
        });
    }

    /// A request was refused for capacity (`queue_full`, `queue_timeout`, ...).
    pub fn rejected(&self, reason: &'static str) {
        self.with(|m| *m.rejections.entry(reason).or_default() += 1);
    }

    /// The server closed or refused a connection: `idle`, `write_stalled`,
    /// `over_limit` or `over_ip_limit`.
    pub fn connection_closed(&self, reason: &'static str) {
        self.with(|m| *m.connections_closed.entry(reason).or_default() += 1);
    }

    /// A pool VM failed to boot.
    pub fn pool_boot_failed(&self) {
        self.with(|m| m.pool_boot_failures += 1);
    }

    /// A new pool VM ran its runtime's warm-up before parking (`ok`) or
    /// failed it and was destroyed (`ok == false`).
    pub fn pool_warm_up(&self, ok: bool) {
        self.with(|m| *m.pool_warmups.entry(if ok { "ok" } else { "failed" }).or_default() += 1);
    }

    /// A VM (of an execution or the pool) cold booted although templates
    /// are on: its template was missing, corrupt, failing or not restorable.
    pub fn template_fallback(&self) {
        self.with(|m| m.template_fallbacks += 1);
    }

    /// An execution's VM started this way (`template`, `cold`, `pool`).
    pub fn start(&self, kind: pyrovm::StartKind) {
        self.with(|m| *m.starts.entry(kind.as_str()).or_default() += 1);
    }

    /// A pool VM reached agent-ready, restored from a template or cold booted.
    pub fn pool_vm_started(&self, kind: pyrovm::StartKind) {
        self.with(|m| *m.pool_starts.entry(kind.as_str()).or_default() += 1);
    }

    /// A VM reached agent-ready after `d`.
    pub fn boot(&self, d: Duration) {
        self.with(|m| m.boot.observe(d.as_secs_f64()));
    }

    /// A job ran for `d` (send to result, boot excluded).
    pub fn execution(&self, d: Duration) {
        self.with(|m| m.execution.observe(d.as_secs_f64()));
    }

    /// A request waited `d` for capacity.
    pub fn queue_wait(&self, d: Duration) {
        self.with(|m| m.queue_wait.observe(d.as_secs_f64()));
    }

    /// Text exposition format 0.0.4.
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let gauge = |out: &mut String, name: &str, help: &str, v: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(&mut out, "tvm_queue_depth", "Requests waiting for VM capacity.", g.queue_depth.to_string());
        gauge(&mut out, "tvm_vms", "VMs holding capacity (booting, pooled or running).", g.vms.to_string());
        gauge(&mut out, "tvm_vms_max", "Most VMs alive at once.", g.max_vms.to_string());
        gauge(&mut out, "tvm_guest_memory_mib", "Guest RAM held by VMs, MiB.", g.memory_in_use_mib.to_string());
        gauge(&mut out, "tvm_guest_memory_budget_mib", "Guest RAM budget, MiB.", g.memory_budget_mib.to_string());
        gauge(&mut out, "tvm_executions_in_flight", "Executions in progress.", g.in_flight.to_string());
        gauge(&mut out, "tvm_draining", "1 while shutting down.", u8::from(g.draining).to_string());
        gauge(&mut out, "tvm_http_connections", "Open HTTP connections.", g.connections.to_string());
        gauge(&mut out, "tvm_http_connections_max", "Most open HTTP connections.", g.max_connections.to_string());
        let _ = writeln!(out, "# HELP tvm_pool_idle Warm VMs waiting at agent-ready.\n# TYPE tvm_pool_idle gauge");
        for (rt, idle, _) in &g.pools {
            let _ = writeln!(out, "tvm_pool_idle{{runtime=\"{}\"}} {idle}", escape(rt));
        }
        let _ = writeln!(out, "# HELP tvm_pool_target Configured warm VMs.\n# TYPE tvm_pool_target gauge");
        for (rt, _, target) in &g.pools {
            let _ = writeln!(out, "tvm_pool_target{{runtime=\"{}\"}} {target}", escape(rt));
        }
        self.with(|m| {
            let _ = writeln!(out, "# HELP tvm_http_requests_total HTTP requests by route and status.");
            let _ = writeln!(out, "# TYPE tvm_http_requests_total counter");
            for ((route, status), n) in &m.requests {
                let _ = writeln!(out, "tvm_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}", escape(route));
            }
            let _ = writeln!(out, "# HELP tvm_executions_total Finished executions by runtime and verdict.");
            let _ = writeln!(out, "# TYPE tvm_executions_total counter");
            for ((rt, v), n) in &m.verdicts {
                let _ =
                    writeln!(out, "tvm_executions_total{{runtime=\"{}\",verdict=\"{}\"}} {n}", escape(rt), escape(v));
            }
            for (name, help, map) in [
                ("tvm_pool_hits_total", "Executions served by a warm VM.", &m.pool_hits),
                ("tvm_pool_misses_total", "Executions that booted a VM on demand.", &m.pool_misses),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                for (rt, n) in map {
                    let _ = writeln!(out, "{name}{{runtime=\"{}\"}} {n}", escape(rt));
                }
            }
            let _ = writeln!(out, "# HELP tvm_rejections_total Requests refused for capacity, by reason.");
            let _ = writeln!(out, "# TYPE tvm_rejections_total counter");
            for (reason, n) in &m.rejections {
                let _ = writeln!(out, "tvm_rejections_total{{reason=\"{reason}\"}} {n}");
            }
            let _ = writeln!(
                out,
                "# HELP tvm_http_connections_closed_total Connections the server closed or refused, by reason."
            );
            let _ = writeln!(out, "# TYPE tvm_http_connections_closed_total counter");
            for (reason, n) in &m.connections_closed {
                let _ = writeln!(out, "tvm_http_connections_closed_total{{reason=\"{reason}\"}} {n}");
            }
            let _ = writeln!(out, "# HELP tvm_pool_boot_failures_total Pool VMs that failed to boot or to warm up (destroyed, never parked).");
            let _ = writeln!(out, "# TYPE tvm_pool_boot_failures_total counter");
            let _ = writeln!(out, "tvm_pool_boot_failures_total {}", m.pool_boot_failures);
            let _ = writeln!(out, "# HELP tvm_pool_warmups_total Pool VMs that ran their runtime's warm-up before parking, by outcome (a failed one is destroyed).");
            let _ = writeln!(out, "# TYPE tvm_pool_warmups_total counter");
            for (outcome, n) in &m.pool_warmups {
                let _ = writeln!(out, "tvm_pool_warmups_total{{outcome=\"{outcome}\"}} {n}");
            }
            let _ = writeln!(out, "# HELP tvm_vm_starts_total Executions by how their VM started (template restore, cold boot, warm pool).");
            let _ = writeln!(out, "# TYPE tvm_vm_starts_total counter");
            for (kind, n) in &m.starts {
                let _ = writeln!(out, "tvm_vm_starts_total{{start=\"{kind}\"}} {n}");
            }
            let _ = writeln!(out, "# HELP tvm_pool_vm_starts_total Pool VMs by how they started (template restore or cold boot).");
            let _ = writeln!(out, "# TYPE tvm_pool_vm_starts_total counter");
            for (kind, n) in &m.pool_starts {
                let _ = writeln!(out, "tvm_pool_vm_starts_total{{start=\"{kind}\"}} {n}");
            }
            let counter = |out: &mut String, name: &str, help: &str, v: u64| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
            };
            let t = &g.templates;
            counter(&mut out, "tvm_template_builds_total", "VM templates built.", t.built);
            counter(&mut out, "tvm_template_build_failures_total", "VM template builds that failed.", t.build_failures);
            counter(&mut out, "tvm_template_corrupt_total", "VM templates found corrupt and removed.", t.corrupt);
            counter(
                &mut out,
                "tvm_template_restore_failures_total",
                "Restores from a VM template that did not resume (the VM cold booted instead).",
                t.restore_failures,
            );
            counter(
                &mut out,
                "tvm_template_fallbacks_total",
                "VMs (executions and pool) that cold booted although templates are on.",
                m.template_fallbacks,
            );
            let _ = writeln!(
                out,
                "# HELP tvm_template_builds_running VM template builds queued or running in the background (one runs at a time, in a VM outside admission control).\n# TYPE tvm_template_builds_running gauge\ntvm_template_builds_running {}",
                t.running
            );
            m.boot.render(&mut out, "tvm_vm_boot_seconds", "VM start to agent-ready.");
            m.execution.render(&mut out, "tvm_execution_seconds", "Job sent to result received.");
            m.queue_wait.render(&mut out, "tvm_queue_wait_seconds", "Time requests waited for capacity.");
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let m = Metrics::default();
        m.request("/v1/executions", 200);
        m.request("/v1/executions", 200);
        m.request("/v1/executions", 429);
        m.verdict("python-3.11", "ok");
        m.pool("python-3.11", false);
        m.rejected("queue_full");
        m.boot(Duration::from_millis(300));
        m.boot(Duration::from_secs(3));
        m.template_fallback();
        let templates = pyrovm::TemplateCounts { built: 2, restore_failures: 1, running: 1, ..Default::default() };
        let g = Gauges { queue_depth: 2, pools: vec![("python-3.11".into(), 1, 2)], templates, ..Default::default() };
        let t = m.render(&g);
        for line in [
            "tvm_http_requests_total{route=\"/v1/executions\",status=\"200\"} 2",
            "tvm_http_requests_total{route=\"/v1/executions\",status=\"429\"} 1",
            "tvm_executions_total{runtime=\"python-3.11\",verdict=\"ok\"} 1",
            "tvm_pool_misses_total{runtime=\"python-3.11\"} 1",
            "tvm_rejections_total{reason=\"queue_full\"} 1",
            "tvm_queue_depth 2",
            "tvm_pool_idle{runtime=\"python-3.11\"} 1",
            "tvm_vm_boot_seconds_bucket{le=\"0.25\"} 0",
            "tvm_vm_boot_seconds_bucket{le=\"0.5\"} 1",
            "tvm_vm_boot_seconds_bucket{le=\"5\"} 2",
            "tvm_vm_boot_seconds_bucket{le=\"+Inf\"} 2",
            "tvm_vm_boot_seconds_count 2",
            "tvm_template_builds_total 2",
            "tvm_template_restore_failures_total 1",
            "tvm_template_corrupt_total 0",
            "tvm_template_fallbacks_total 1",
            "tvm_template_builds_running 1",
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line:?} in\n{t}");
        }
        // Every sample line belongs to a declared family.
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            assert!(t.contains(&format!("# TYPE {family} ")), "{name} has no TYPE");
        }
    }
}
