//! Operator settings of the Judge0 API (`[judge0]` in the server config, `--judge0-*` flags).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Judge0 API settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Judge0Config {
    /// This node's name in a multi-node deployment; tokens carry it so any node can forward to the owner.
    pub node: Option<String>,
    /// Other nodes: name → base URL (`http://10.0.0.2:8080`), for forwarding token lookups.
    pub peers: BTreeMap<String, String>,
    /// Most submissions kept in memory; when all are unfinished, new ones get 503.
    pub max_submissions: usize,
    /// How long a submission is kept after it was created (ms).
    pub submission_ttl_ms: u64,
    /// Submissions executed at once in the background (`wait=false`); default: the server's VM capacity.
    pub workers: Option<usize>,
    /// Whether `callback_url` is accepted (off: 422).
    pub allow_callbacks: bool,
    /// Whether callbacks may reach loopback, private and link-local addresses.
    pub callbacks_allow_private: bool,
}

impl Default for Judge0Config {
    fn default() -> Self {
        Judge0Config {
            node: None,
            peers: BTreeMap::new(),
            max_submissions: 10_000,
            submission_ttl_ms: 3_600_000,
            workers: None,
            allow_callbacks: false,
            callbacks_allow_private: false,
        }
    }
}

impl Judge0Config {
    /// Checks names and URLs.
    ///
    /// # Errors
    /// What is wrong, for `ServeError::Config`.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = |n: &str| {
            !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if let Some(n) = &self.node {
            if !name_ok(n) {
                return Err(format!("judge0 node name {n:?} must be 1-64 of [A-Za-z0-9._-]"));
            }
        }
        let mut tags = std::collections::HashSet::new();
        for n in self.node.iter().chain(self.peers.keys()) {
            if !tags.insert(super::store::node_tag(n)) {
                return Err(format!("judge0 node {n:?} is named twice, or its token tag collides with another's"));
            }
        }
        for (n, url) in &self.peers {
            if !name_ok(n) {
                return Err(format!("judge0 peer name {n:?} must be 1-64 of [A-Za-z0-9._-]"));
            }
            let u = reqwest::Url::parse(url).map_err(|e| format!("judge0 peer {n}: {url:?} is not a URL: {e}"))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err(format!("judge0 peer {n}: {url:?} must be http or https"));
            }
        }
        if !self.peers.is_empty() && self.node.is_none() {
            return Err("judge0 peers need this node's own name (--judge0-node)".into());
        }
        if self.max_submissions == 0 || self.submission_ttl_ms == 0 || self.workers == Some(0) {
            return Err("judge0 max_submissions, submission_ttl_ms and workers must be positive".into());
        }
        Ok(())
    }
}

/// The `--judge0-*` flags of `tvm serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Judge0Args {
    /// This node's name for Judge0 tokens (multi-node deployments).
    #[arg(long = "judge0-node", env = "TVM_JUDGE0_NODE")]
    pub node: Option<String>,
    /// Another node: NAME=URL (repeatable); token lookups for its submissions are forwarded there.
    #[arg(long = "judge0-peer", value_name = "NAME=URL")]
    pub peers: Vec<String>,
    /// Most Judge0 submissions kept in memory [default: 10000].
    #[arg(long = "judge0-max-submissions")]
    pub max_submissions: Option<usize>,
    /// How long a Judge0 submission is kept (e.g. 1h) [default: 1h].
    #[arg(long = "judge0-submission-ttl", value_name = "DUR")]
    pub ttl: Option<String>,
    /// Judge0 submissions executed at once in the background [default: VM capacity].
    #[arg(long = "judge0-workers")]
    pub workers: Option<usize>,
    /// Accept Judge0 `callback_url`s.
    #[arg(long = "judge0-callbacks")]
    pub allow_callbacks: bool,
    /// Let callbacks reach loopback/private/link-local addresses (trusted networks only).
    #[arg(long = "judge0-callbacks-allow-private")]
    pub callbacks_allow_private: bool,
}

impl Judge0Args {
    /// `base` with these flags applied.
    ///
    /// # Errors
    /// A malformed peer or duration.
    pub fn apply(self, mut base: Judge0Config) -> Result<Judge0Config, String> {
        if self.node.is_some() {
            base.node = self.node;
        }
        for p in self.peers {
            let (n, u) = p.split_once('=').ok_or_else(|| format!("invalid judge0 peer {p:?} (expected NAME=URL)"))?;
            base.peers.insert(n.trim().to_string(), u.trim().to_string());
        }
        if let Some(m) = self.max_submissions {
            base.max_submissions = m;
        }
        if let Some(t) = &self.ttl {
            base.submission_ttl_ms = tvm_config::parse_duration_ms(t)?;
        }
        base.workers = self.workers.or(base.workers);
        base.allow_callbacks |= self.allow_callbacks;
        base.callbacks_allow_private |= self.callbacks_allow_private;
        Ok(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_apply_and_validate() {
        let args = Judge0Args {
            node: Some("a".into()),
            peers: vec!["b=http://127.0.0.1:9".into()],
            ttl: Some("5m".into()),
            ..Default::default()
        };
        let c = args.apply(Judge0Config::default()).unwrap();
        assert_eq!(c.submission_ttl_ms, 300_000);
        assert_eq!(c.peers["b"], "http://127.0.0.1:9");
        c.validate().unwrap();
        let bad = Judge0Config { node: None, ..c.clone() };
        assert!(bad.validate().unwrap_err().contains("own name"));
        let bad = Judge0Config { peers: [("a".to_string(), "http://x".to_string())].into(), ..c.clone() };
        assert!(bad.validate().unwrap_err().contains("named twice"));
        let bad = Judge0Config { peers: [("b".to_string(), "ftp://x".to_string())].into(), ..c };
        assert!(bad.validate().is_err());
        assert!(Judge0Args { peers: vec!["nope".into()], ..Default::default() }
            .apply(Judge0Config::default())
            .is_err());
    }
}
