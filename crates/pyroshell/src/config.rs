//! Server configuration ([`ServeConfig`]) and the capacity derived from it.
//!
//! Durations are milliseconds and sizes bytes or MiB so the struct reads the
//! same from a TOML file, the environment or flags; the binary converts human
//! units ("30s", "32M") with `tvm_config::parse_*` before filling it in.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tvm_config::Catalog;

/// Guest RAM kept back for the host itself when the budget is derived.
const HOST_RESERVE_MIB: u64 = 1024;

/// Everything `tvm serve` can be told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Address to listen on; port 0 picks a free port (the chosen address is printed).
    pub listen: SocketAddr,
    /// Accepted API keys (`Authorization: Bearer KEY` or `X-API-Key: KEY`); empty disables auth.
    pub api_keys: Vec<String>,
    /// Warm VMs kept for every available runtime not named in `pool_sizes`.
    pub pool_size: usize,
    /// Warm VMs per runtime, keyed by runtime id or alias; overrides `pool_size`.
    pub pool_sizes: BTreeMap<String, usize>,
    /// Pool VMs idle longer than this are destroyed and replaced (ms).
    pub pool_max_idle_ms: u64,
    /// Run the runtime's warm-up (`warmup` in the catalog) in each new pool
    /// VM before it waits for a job, so a pool hit finds the runtime's and
    /// the agent's code already translated (under TCG the biggest part of a
    /// short job; see `Pyrovm::warm_up`). Costs the warm-up's CPU once per
    /// pool VM.
    pub pool_warm_up: bool,
    /// Most VMs alive at once, pool included; derived from cores and memory when unset.
    pub max_vms: Option<usize>,
    /// Guest RAM all VMs together may be given (MiB); host memory minus 1 GiB when unset.
    pub memory_budget_mib: Option<u64>,
    /// Requests that may wait for capacity; more are refused with 429.
    pub queue_capacity: usize,
    /// How long a request may wait for capacity before it is refused with 429 (ms).
    pub queue_timeout_ms: u64,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long a client may take to send its request body before 408 (ms).
    pub body_timeout_ms: u64,
    /// How long a client may take to send its request line and headers
    /// before the connection is closed (ms): slowloris defence.
    pub header_timeout_ms: u64,
    /// A connection with no request in progress for this long, or whose
    /// writes have been blocked this long, is closed (ms). Bounds every
    /// stall: before protocol detection, in a partial request line or
    /// HTTP/2 preface, and keep-alive idleness.
    pub idle_timeout_ms: u64,
    /// Most open connections; more are answered 503 and closed at once.
    /// Also capped by the descriptor limit, keeping room for VMs.
    pub max_connections: usize,
    /// Most open connections from one client address.
    pub max_connections_per_ip: usize,
    /// Request bodies read and parsed at once; more wait (within `body_timeout_ms`).
    pub max_concurrent_parses: usize,
    /// Host names (or addresses) requests may name in `Host`, besides the
    /// loopback names a loopback listener always accepts: `name`,
    /// `.example.com` (any subdomain), or `*` (any). Empty: a loopback
    /// listener accepts only loopback names (DNS-rebinding defence), other
    /// listeners any host.
    pub allowed_hosts: Vec<String>,
    /// Origins browsers may call from (CORS); empty: no CORS headers, so
    /// browsers keep other origins from reading answers. `*` allows any.
    pub cors_origins: Vec<String>,
    /// After SIGTERM, how long in-flight executions may take to finish (ms).
    pub drain_grace_ms: u64,
    /// Whether executions may ask for network access. Guests have no NIC yet, so this must stay false.
    pub allow_network: bool,
    /// Build missing runtime images in the background at startup.
    pub build_images: bool,
    /// Add `trace` (where each execution's time went, host and agent steps)
    /// to native API results. Off by default: it is for `tvm bench --api`
    /// (`tvm serve --trace`) and for finding where a slow execution spent its time.
    pub trace: bool,
    /// Log as JSON lines (read by the binary when it installs the subscriber; see [`crate::init_tracing`]).
    pub json_logs: bool,
    /// The Judge0-compatible API (`[judge0]`).
    pub judge0: crate::judge0::Judge0Config,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_keys: Vec::new(),
            pool_size: 0,
            pool_sizes: BTreeMap::new(),
            pool_max_idle_ms: 10 * 60_000,
            pool_warm_up: true,
            max_vms: None,
            memory_budget_mib: None,
            queue_capacity: 64,
            queue_timeout_ms: 30_000,
            // Files (16 MiB) as base64 fit; a body that cannot be valid is refused before it is buffered.
            max_body_bytes: 32 << 20,
            // 32 MiB at a slow 2 MB/s; a client slower than that is not worth a task.
            body_timeout_ms: 15_000,
            header_timeout_ms: 10_000,
            idle_timeout_ms: 30_000,
            max_connections: 4096,
            max_connections_per_ip: 512,
            max_concurrent_parses: 4,
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
            drain_grace_ms: 30_000,
            allow_network: false,
            build_images: true,
            trace: false,
            json_logs: false,
            judge0: crate::judge0::Judge0Config::default(),
        }
    }
}

/// One `--pool-size` value: `N` for every runtime, or `RUNTIME=N` for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolArg {
    /// Applies to every runtime without its own size.
    All(usize),
    /// Applies to one runtime (id or alias).
    Runtime(String, usize),
}

impl std::str::FromStr for PoolArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid pool size {s:?} (expected N or RUNTIME=N, e.g. 2 or python=2)");
        match s.split_once('=') {
            None => s.trim().parse().map(PoolArg::All).map_err(|_| bad()),
            Some((rt, n)) if !rt.trim().is_empty() => {
                n.trim().parse().map(|n| PoolArg::Runtime(rt.trim().to_string(), n)).map_err(|_| bad())
            }
            Some(_) => Err(bad()),
        }
    }
}

impl ServeConfig {
    /// Defaults overridden by a TOML file (same field names as this struct).
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{} is not a valid server config: {e}", path.display()))
    }

    /// Applies one `--pool-size` flag.
    pub fn apply_pool_arg(&mut self, arg: PoolArg) {
        match arg {
            PoolArg::All(n) => self.pool_size = n,
            PoolArg::Runtime(rt, n) => {
                self.pool_sizes.insert(rt, n);
            }
        }
    }

    /// Checks what can be checked before binding: runtime names, network, sizes.
    pub fn validate(&self, catalog: &Catalog) -> Result<(), String> {
        if self.allow_network {
            return Err("allow_network = true is not supported yet: guests have no network device".into());
        }
        self.judge0.validate()?;
        for name in self.pool_sizes.keys() {
            match catalog.get(name) {
                None => return Err(format!("pool size for unknown runtime {name:?}")),
                Some(r) if r.unavailable.is_some() => {
                    return Err(format!("pool size for unavailable runtime {name:?}"));
                }
                Some(_) => {}
            }
        }
        if self.max_vms == Some(0) {
            return Err("max_vms must be at least 1".into());
        }
        if self.api_keys.iter().any(|k| k.is_empty()) {
            return Err("an API key is empty".into());
        }
        if self.max_body_bytes < 1024 {
            return Err("max_body_bytes must be at least 1024".into());
        }
        if self.header_timeout_ms < 100 || self.body_timeout_ms < 100 || self.idle_timeout_ms < 100 {
            return Err("header, body and idle timeouts must be at least 100ms".into());
        }
        if self.max_connections == 0 || self.max_connections_per_ip == 0 || self.max_concurrent_parses == 0 {
            return Err("max_connections, max_connections_per_ip and max_concurrent_parses must be at least 1".into());
        }
        if let Some(h) = self.allowed_hosts.iter().find(|h| h.is_empty() || h.contains(['/', ':', ' '])) {
            return Err(format!("allowed host {h:?} is not a host name (no scheme, port or path)"));
        }
        for o in &self.cors_origins {
            if o != "*" && axum::http::HeaderValue::from_str(o).is_err() {
                return Err(format!("CORS origin {o:?} is not a valid origin"));
            }
        }
        Ok(())
    }

    /// Pool size of each available runtime (id → size), resolving aliases.
    pub fn pool_targets(&self, catalog: &Catalog) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for r in catalog.runtimes().iter().filter(|r| r.unavailable.is_none()) {
            let own = self.pool_sizes.iter().find(|(name, _)| r.answers_to(name)).map(|(_, n)| *n);
            out.insert(r.id.clone(), own.unwrap_or(self.pool_size));
        }
        out
    }
}

/// The `tvm serve` flags, ready to flatten into the binary's clap parser
/// (beside its `--accel`/`--vmm`); [`ServeArgs::into_config`] applies them
/// over the config file. Durations and sizes take human units ("30s", "32M").
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// Server config file (TOML with ServeConfig's fields); flags override it.
    #[arg(long = "serve-config", env = "TVM_SERVE_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Address to listen on (port 0: any free port; the address is printed) [default: 127.0.0.1:8080].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Accepted API key (repeatable; none: no auth). Prefer TVM_API_KEYS (comma-separated): argv is visible to all users.
    #[arg(long = "api-key", env = "TVM_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// Warm VMs: N for every runtime, or RUNTIME=N (repeatable).
    #[arg(long = "pool-size", value_name = "N|RUNTIME=N")]
    pub pool: Vec<PoolArg>,
    /// Recycle pool VMs idle longer than this (e.g. 10m).
    #[arg(long, value_name = "DUR")]
    pub pool_max_idle: Option<String>,
    /// Park new pool VMs without running their runtime's warm-up first
    /// (saves the warm-up's CPU per pool VM; pool hits then pay the
    /// runtime's first start, under TCG about half a Python hello).
    #[arg(long)]
    pub no_pool_warm_up: bool,
    /// Add `trace` to native API results: where each execution's time went
    /// (host and agent steps, µs).
    #[arg(long)]
    pub trace: bool,
    /// Most VMs at once, pool included [default: from cores and memory].
    #[arg(long)]
    pub max_vms: Option<usize>,
    /// Guest RAM budget of all VMs together (e.g. 8G) [default: host memory - 1 GiB].
    #[arg(long, value_name = "SIZE")]
    pub memory_budget: Option<String>,
    /// Requests that may wait for capacity; more get 429 [default: 64].
    #[arg(long = "queue")]
    pub queue: Option<usize>,
    /// How long a request may wait for capacity before 429 (e.g. 30s).
    #[arg(long, value_name = "DUR")]
    pub queue_timeout: Option<String>,
    /// Largest request body; larger get 413 (e.g. 32M).
    #[arg(long, value_name = "SIZE")]
    pub max_body: Option<String>,
    /// Time in-flight executions get after SIGTERM (e.g. 30s).
    #[arg(long, value_name = "DUR")]
    pub drain_grace: Option<String>,
    /// Time a client gets to send its request body; slower ones get 408 (e.g. 15s).
    #[arg(long, value_name = "DUR")]
    pub body_timeout: Option<String>,
    /// Time a client gets to send its request headers; slower connections are closed (e.g. 10s).
    #[arg(long, value_name = "DUR")]
    pub header_timeout: Option<String>,
    /// Close connections with no request in progress (or blocked writes) for this long (e.g. 30s).
    #[arg(long, value_name = "DUR")]
    pub idle_timeout: Option<String>,
    /// Most open connections [default: 4096, less if the descriptor limit is lower].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Most open connections from one client address [default: 512].
    #[arg(long)]
    pub max_connections_per_ip: Option<usize>,
    /// Request bodies parsed at once [default: 4].
    #[arg(long)]
    pub max_concurrent_parses: Option<usize>,
    /// Host names requests may use besides loopback names (comma-separated; `.example.com` for subdomains, `*` any).
    #[arg(long, value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Origins allowed to call the API from a browser (CORS; comma-separated; `*` any) [default: none].
    #[arg(long, value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Do not build missing runtime images in the background.
    #[arg(long)]
    pub no_build_images: bool,
    /// Log JSON lines (the binary reads this before installing its subscriber).
    #[arg(long)]
    pub json_logs: bool,
    /// Judge0 API settings.
    #[command(flatten)]
    pub judge0: crate::judge0::Judge0Args,
}

impl ServeArgs {
    /// The config file (or defaults) with these flags applied.
    pub fn into_config(self) -> Result<ServeConfig, String> {
        use tvm_config::{parse_duration_ms, parse_size_bytes};
        let mut c = match &self.config {
            Some(p) => ServeConfig::load(p)?,
            None => ServeConfig::default(),
        };
        let ms = |s: &Option<String>| s.as_deref().map(parse_duration_ms).transpose();
        let bytes = |s: &Option<String>| s.as_deref().map(parse_size_bytes).transpose();
        if let Some(l) = self.listen {
            c.listen = l;
        }
        if !self.api_keys.is_empty() {
            c.api_keys = self.api_keys;
        }
        for p in self.pool {
            c.apply_pool_arg(p);
        }
        if let Some(v) = ms(&self.pool_max_idle)? {
            c.pool_max_idle_ms = v;
        }
        if self.no_pool_warm_up {
            c.pool_warm_up = false;
        }
        if self.trace {
            c.trace = true;
        }
        if let Some(v) = ms(&self.queue_timeout)? {
            c.queue_timeout_ms = v;
        }
        if let Some(v) = ms(&self.drain_grace)? {
            c.drain_grace_ms = v;
        }
        if let Some(v) = ms(&self.body_timeout)? {
            c.body_timeout_ms = v;
        }
        if let Some(v) = ms(&self.header_timeout)? {
            c.header_timeout_ms = v;
        }
        if let Some(v) = ms(&self.idle_timeout)? {
            c.idle_timeout_ms = v;
        }
        c.max_connections = self.max_connections.unwrap_or(c.max_connections);
        c.max_connections_per_ip = self.max_connections_per_ip.unwrap_or(c.max_connections_per_ip);
        c.max_concurrent_parses = self.max_concurrent_parses.unwrap_or(c.max_concurrent_parses);
        if !self.allowed_hosts.is_empty() {
            c.allowed_hosts = self.allowed_hosts;
        }
        if !self.cors_origins.is_empty() {
            c.cors_origins = self.cors_origins;
        }
        if let Some(v) = bytes(&self.max_body)? {
            c.max_body_bytes = usize::try_from(v).map_err(|_| "max body is too large".to_string())?;
        }
        if let Some(v) = bytes(&self.memory_budget)? {
            c.memory_budget_mib = Some(v >> 20);
        }
        c.max_vms = self.max_vms.or(c.max_vms);
        c.queue_capacity = self.queue.unwrap_or(c.queue_capacity);
        c.build_images &= !self.no_build_images;
        c.json_logs |= self.json_logs;
        c.judge0 = self.judge0.apply(c.judge0)?;
        Ok(c)
    }
}

/// The host as admission control sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// Usable CPU cores.
    pub cores: usize,
    /// Physical memory in MiB.
    pub memory_mib: u64,
}

impl Host {
    /// Reads cores (affinity-aware) and `MemTotal` from /proc/meminfo.
    pub fn detect() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map(|kb| kb / 1024)
            .unwrap_or(2048);
        Self { cores, memory_mib }
    }
}

/// How many VMs and how much guest RAM the server may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Most VMs alive at once.
    pub max_vms: usize,
    /// Guest RAM of all VMs together, MiB.
    pub memory_budget_mib: u64,
}

impl Capacity {
    /// The operator's values, else: budget = host memory − 1 GiB; VMs =
    /// min(2 × cores, budget / typical VM). Two VMs per core keeps the CPU
    /// busy while guests wait on boot I/O without making every run slow.
    pub fn derive(config: &ServeConfig, host: Host, typical_vm_mib: u64) -> Self {
        let memory_budget_mib =
            config.memory_budget_mib.unwrap_or_else(|| host.memory_mib.saturating_sub(HOST_RESERVE_MIB)).max(1);
        let max_vms = config
            .max_vms
            .unwrap_or_else(|| {
                let by_mem = (memory_budget_mib / typical_vm_mib.max(1)) as usize;
                (2 * host.cores).min(by_mem)
            })
            .max(1);
        Self { max_vms, memory_budget_mib }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_args_parse_and_apply() {
        assert_eq!("2".parse::<PoolArg>(), Ok(PoolArg::All(2)));
        assert_eq!("python=3".parse::<PoolArg>(), Ok(PoolArg::Runtime("python".into(), 3)));
        assert!("=3".parse::<PoolArg>().is_err());
        assert!("python=x".parse::<PoolArg>().is_err());
        let mut c = ServeConfig::default();
        c.apply_pool_arg(PoolArg::All(1));
        c.apply_pool_arg(PoolArg::Runtime("py".into(), 2));
        let cat = Catalog::builtin();
        let t = c.pool_targets(&cat);
        assert_eq!(t["python-3.13"], 2, "alias resolves");
        assert_eq!(t["node-24"], 1);
        assert!(c.validate(&cat).is_ok());
        c.apply_pool_arg(PoolArg::Runtime("cobol".into(), 1));
        assert!(c.validate(&cat).unwrap_err().contains("cobol"));
    }

    #[test]
    fn flags_override_defaults_with_human_units() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let cli = Cli::try_parse_from([
            "tvm",
            "--listen",
            "127.0.0.1:0",
            "--api-key",
            "a",
            "--api-key",
            "b",
            "--pool-size",
            "1",
            "--pool-size",
            "python=2",
            "--max-vms",
            "3",
            "--queue",
            "5",
            "--queue-timeout",
            "1.5s",
            "--max-body",
            "1M",
            "--memory-budget",
            "2G",
            "--drain-grace",
            "2m",
            "--idle-timeout",
            "2s",
            "--max-connections",
            "100",
            "--max-connections-per-ip",
            "10",
            "--allowed-hosts",
            "tvm.example,.lab.example",
            "--cors-origins",
            "https://ui.example",
        ])
        .unwrap();
        let c = cli.serve.into_config().unwrap();
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.api_keys, vec!["a", "b"]);
        assert_eq!((c.pool_size, c.pool_sizes["python"]), (1, 2));
        assert_eq!((c.max_vms, c.queue_capacity, c.queue_timeout_ms), (Some(3), 5, 1500));
        assert_eq!((c.max_body_bytes, c.memory_budget_mib, c.drain_grace_ms), (1 << 20, Some(2048), 120_000));
        assert_eq!((c.idle_timeout_ms, c.max_connections, c.max_connections_per_ip), (2000, 100, 10));
        assert_eq!(c.allowed_hosts, vec!["tvm.example", ".lab.example"]);
        assert_eq!(c.cors_origins, vec!["https://ui.example"]);
        assert!(c.validate(&Catalog::builtin()).is_ok());
        let bad = ServeConfig { allowed_hosts: vec!["http://x".into()], ..Default::default() };
        assert!(bad.validate(&Catalog::builtin()).is_err());
        let bad = Cli::try_parse_from(["tvm", "--queue-timeout", "soon"]).unwrap().serve.into_config();
        assert!(bad.unwrap_err().contains("soon"));
        assert!(Cli::try_parse_from(["tvm", "--pool-size", "python=x"]).is_err());
    }

    #[test]
    fn network_and_zero_vms_are_refused() {
        let cat = Catalog::builtin();
        let c = ServeConfig { allow_network: true, ..Default::default() };
        assert!(c.validate(&cat).is_err());
        let c = ServeConfig { max_vms: Some(0), ..Default::default() };
        assert!(c.validate(&cat).is_err());
    }

    #[test]
    fn capacity_derives_from_cores_and_memory() {
        let host = Host { cores: 2, memory_mib: 24 << 10 };
        let c = Capacity::derive(&ServeConfig::default(), host, 480);
        assert_eq!(c, Capacity { max_vms: 4, memory_budget_mib: 23 << 10 });
        // Memory-bound: 3 GiB host, 1 GiB reserved, 736 MiB VMs → 2.
        let small = Host { cores: 8, memory_mib: 3 << 10 };
        assert_eq!(Capacity::derive(&ServeConfig::default(), small, 736).max_vms, 2);
        // Never zero, and the operator wins.
        let tiny = Host { cores: 1, memory_mib: 512 };
        assert_eq!(Capacity::derive(&ServeConfig::default(), tiny, 736).max_vms, 1);
        let cfg = ServeConfig { max_vms: Some(7), memory_budget_mib: Some(4096), ..Default::default() };
        assert_eq!(Capacity::derive(&cfg, host, 480), Capacity { max_vms: 7, memory_budget_mib: 4096 });
    }

    #[test]
    fn config_deserializes_with_defaults_and_rejects_typos() {
        let c: ServeConfig = serde_json::from_str(r#"{"listen":"0.0.0.0:9000","pool_sizes":{"python":2}}"#).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.queue_capacity, ServeConfig::default().queue_capacity);
        assert!(serde_json::from_str::<ServeConfig>(r#"{"listne":"x"}"#).is_err());
        let dir = std::env::temp_dir().join(format!("pyroshell-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("serve.toml");
        std::fs::write(&f, "api_keys = [\"k\"]\nqueue_timeout_ms = 500\n[pool_sizes]\nnode = 1\n").unwrap();
        let c = ServeConfig::load(&f).unwrap();
        assert_eq!((c.api_keys.len(), c.queue_timeout_ms, c.pool_sizes["node"]), (1, 500, 1));
        std::fs::write(&f, "max_vm = 3\n").unwrap();
        assert!(ServeConfig::load(&f).unwrap_err().contains("max_vm"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
