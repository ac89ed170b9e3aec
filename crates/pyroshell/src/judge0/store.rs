//! Submissions in memory: bounded in count and age, gone on restart.
//!
//! Tokens are UUIDs whose first eight hex digits name the node that owns the
//! submission (FNV-1a of the node name), so in a multi-node deployment any
//! node can tell where a token lives and forward the request there, while
//! tokens stay UUID-shaped for clients that store them as such.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::wire::Record;

/// The eight-hex-digit tag of a node name.
pub(crate) fn node_tag(node: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in node.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// A new token, tagged with `node` when there is one.
pub(crate) fn new_token(node: Option<&str>) -> String {
    let id = uuid::Uuid::new_v4().hyphenated().to_string();
    match node {
        Some(n) => format!("{}{}", node_tag(n), &id[8..]),
        None => id,
    }
}

/// The node tag of a token (its first eight hex digits), if it is UUID-shaped.
pub(crate) fn token_tag(token: &str) -> Option<&str> {
    uuid::Uuid::parse_str(token).ok()?;
    token.get(..8)
}

/// The store is full of unfinished submissions (Judge0 answers "queue is full").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, (Instant, Record)>,
    order: VecDeque<String>,
}

/// Submissions by token.
#[derive(Debug)]
pub(crate) struct Store {
    inner: Mutex<Inner>,
    max: usize,
    ttl: Duration,
}

fn finished(r: &Record) -> bool {
    r.outcome.status_id > 2
}

impl Store {
    /// At most `max` submissions, each kept for `ttl` after it was created.
    pub(crate) fn new(max: usize, ttl: Duration) -> Self {
        Store { inner: Mutex::new(Inner::default()), max: max.max(1), ttl }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn purge(&self, inner: &mut Inner) {
        let now = Instant::now();
        while let Some(t) = inner.order.front() {
            match inner.map.get(t) {
                Some((at, _)) if now.duration_since(*at) < self.ttl => break,
                _ => {
                    let t = inner.order.pop_front().unwrap_or_default();
                    inner.map.remove(&t);
                }
            }
        }
    }

    /// Adds a submission, evicting the oldest finished one when full.
    ///
    /// # Errors
    /// [`Full`] when every stored submission is still queued or running.
    pub(crate) fn insert(&self, record: Record) -> Result<(), Full> {
        let mut inner = self.lock();
        self.purge(&mut inner);
        if inner.map.len() >= self.max {
            let oldest_done = inner.order.iter().position(|t| inner.map.get(t).is_some_and(|(_, r)| finished(r)));
            let Some(i) = oldest_done else { return Err(Full) };
            if let Some(t) = inner.order.remove(i) {
                inner.map.remove(&t);
            }
        }
        inner.order.push_back(record.token.clone());
        inner.map.insert(record.token.clone(), (Instant::now(), record));
        Ok(())
    }

    /// The submission, unless unknown or expired.
    pub(crate) fn get(&self, token: &str) -> Option<Record> {
        let mut inner = self.lock();
        self.purge(&mut inner);
        inner.map.get(token).map(|(_, r)| r.clone())
    }

    /// Changes a stored submission (no-op if it expired meanwhile).
    pub(crate) fn update(&self, token: &str, f: impl FnOnce(&mut Record)) {
        if let Some((_, r)) = self.lock().map.get_mut(token) {
            f(r);
        }
    }

    /// Submissions queued (status 1) now.
    pub(crate) fn queued(&self) -> usize {
        self.lock().map.values().filter(|(_, r)| r.outcome.status_id == 1).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge0::wire::{Outcome, Spec};
    use std::time::SystemTime;

    fn rec(token: &str, status: u8) -> Record {
        Record {
            token: token.into(),
            spec: Spec {
                source_code: vec![],
                language_id: 1,
                stdin: None,
                expected_output: None,
                compiler_options: None,
                command_line_arguments: None,
                number_of_runs: 1,
                cpu_time_limit: 1.0,
                cpu_extra_time: 1.0,
                wall_time_limit: 1.0,
                memory_limit: 1,
                stack_limit: 1,
                max_processes_and_or_threads: 1,
                max_file_size: 1,
                redirect_stderr_to_stdout: false,
                callback_url: None,
                additional_files: None,
            },
            language_name: String::new(),
            created_at: SystemTime::now(),
            finished_at: None,
            outcome: Outcome { status_id: status, ..Default::default() },
        }
    }

    #[test]
    fn tokens_name_their_node() {
        let t = new_token(Some("node-a"));
        assert_eq!(token_tag(&t), Some(node_tag("node-a").as_str()));
        assert!(uuid::Uuid::parse_str(&t).is_ok(), "still a UUID: {t}");
        assert_ne!(node_tag("node-a"), node_tag("node-b"));
        assert_eq!(token_tag("not-a-token"), None);
    }

    #[test]
    fn bounded_in_count_evicting_finished_first() {
        let s = Store::new(2, Duration::from_secs(60));
        s.insert(rec("a", 3)).unwrap();
        s.insert(rec("b", 1)).unwrap();
        s.insert(rec("c", 1)).unwrap();
        assert!(s.get("a").is_none(), "the oldest finished one made room");
        assert_eq!(s.insert(rec("d", 1)), Err(Full), "nothing finished to evict");
        s.update("b", |r| r.outcome.status_id = 3);
        s.insert(rec("d", 1)).unwrap();
        assert!(s.get("b").is_none() && s.get("c").is_some() && s.get("d").is_some());
        assert_eq!(s.queued(), 2);
    }

    #[test]
    fn bounded_in_age() {
        let s = Store::new(10, Duration::from_millis(30));
        s.insert(rec("a", 3)).unwrap();
        assert!(s.get("a").is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(s.get("a").is_none());
    }
}
