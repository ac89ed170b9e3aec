//! Progress reporting for long builds (guest kernel, runtime images).
//!
//! On a terminal this is an indicatif bar or spinner. Elsewhere (CI logs,
//! redirected stderr) indicatif draws nothing, so a plain line is printed at
//! most every [`PLAIN_INTERVAL`] and once at the end. The first plain line
//! carries no elapsed time: it would always read `0s`, and for work that
//! ends without a last line (a progress cleared when done) it would stay
//! the only one, a timer that looks frozen.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Several [`Progress`] lines drawn together (see [`Progress::spinner_in`]).
pub use indicatif::MultiProgress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Minimum time between two plain progress lines when stderr is not a terminal.
pub const PLAIN_INTERVAL: Duration = Duration::from_secs(10);

/// How often a visible spinner or bar redraws by itself, so it moves during quiet phases.
const TICK: Duration = Duration::from_millis(120);

/// How progress reaches the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// indicatif draws on the terminal.
    Terminal,
    /// Plain, rate-limited lines on stderr.
    Plain,
    /// Nothing is shown.
    Hidden,
}

/// A progress bar or spinner for one long-running operation.
///
/// Nothing is shown until the first update, so an operation that turns out to
/// be a cache hit can call [`Progress::clear`] (or just drop it) and leave no trace.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    mode: Mode,
    /// Terminal mode: whether the bar was moved to stderr yet.
    revealed: AtomicBool,
    /// Plain mode: when the last line was printed.
    last_line: Mutex<Option<Instant>>,
    /// Terminal mode: the group whose lines this one joins when revealed
    /// (several builds at once), instead of drawing on stderr alone.
    group: Option<MultiProgress>,
}

impl Progress {
    /// A bar of `len` steps (0 if the length is learned later, see [`Progress::set_length`]).
    pub fn bar(len: u64, msg: &str) -> Self {
        let style = ProgressStyle::with_template("{spinner:.green} {msg} [{bar:30.cyan/blue}] {pos}/{len} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        Self::visible(Some(len), style, msg)
    }

    /// A spinner with a message, for work whose length is unknown.
    pub fn spinner(msg: &str) -> Self {
        let style = ProgressStyle::with_template("{spinner:.green} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        Self::visible(None, style, msg)
    }

    /// A spinner that is one line of `group`, for work running beside other
    /// work of the same command (e.g. `tvm image build --jobs 2`). Without a
    /// terminal it prints plain lines like [`Progress::spinner`].
    pub fn spinner_in(group: &MultiProgress, msg: &str) -> Self {
        let mut p = Self::spinner(msg);
        p.group = Some(group.clone());
        p
    }

    /// A progress that shows nothing anywhere (tests, JSON output).
    pub fn hidden() -> Self {
        Self::with_mode(ProgressBar::hidden(), Mode::Hidden)
    }

    fn visible(len: Option<u64>, style: ProgressStyle, msg: &str) -> Self {
        let mode = if std::io::stderr().is_terminal() { Mode::Terminal } else { Mode::Plain };
        // Hidden until the first update (see `reveal`): indicatif draws on every
        // change, including the message set here.
        let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::hidden()).with_style(style);
        bar.set_message(msg.to_string());
        Self::with_mode(bar, mode)
    }

    fn with_mode(bar: ProgressBar, mode: Mode) -> Self {
        Self { bar, mode, revealed: AtomicBool::new(false), last_line: Mutex::new(None), group: None }
    }

    /// Replaces the message.
    pub fn set_message(&self, msg: impl Into<String>) {
        self.reveal();
        self.bar.set_message(msg.into());
        self.plain_line(false);
    }

    /// The current message.
    pub fn message(&self) -> String {
        self.bar.message()
    }

    /// Sets the number of steps of a bar.
    pub fn set_length(&self, len: u64) {
        self.bar.set_length(len);
    }

    /// Sets the number of steps done, clamped to the length (step counts are estimates).
    pub fn set_position(&self, pos: u64) {
        self.reveal();
        self.bar.set_position(self.bar.length().map_or(pos, |len| pos.min(len)));
        self.plain_line(false);
    }

    /// Steps done so far.
    pub fn position(&self) -> u64 {
        self.bar.position()
    }

    /// Adds `delta` steps done (clamped like [`Progress::set_position`]).
    pub fn inc(&self, delta: u64) {
        self.set_position(self.bar.position().saturating_add(delta));
    }

    /// Ends successfully, leaving `msg` as the last line.
    pub fn finish(&self, msg: impl Into<String>) {
        self.reveal();
        if let Some(len) = self.bar.length() {
            self.bar.set_position(len);
        }
        self.bar.finish_with_message(msg.into());
        self.plain_line(true);
    }

    /// Ends unsuccessfully, leaving `msg` as the last line.
    pub fn fail(&self, msg: impl Into<String>) {
        self.reveal();
        self.bar.abandon_with_message(msg.into());
        self.plain_line(true);
    }

    /// Ends and erases the bar; shows nothing if nothing was shown yet.
    pub fn clear(&self) {
        self.bar.finish_and_clear();
    }

    /// On a terminal, starts drawing (and ticking) at the first update.
    fn reveal(&self) {
        if self.mode == Mode::Terminal && !self.revealed.swap(true, Ordering::SeqCst) {
            match &self.group {
                // The group draws all its lines on stderr together.
                Some(group) => drop(group.add(self.bar.clone())),
                None => self.bar.set_draw_target(ProgressDrawTarget::stderr()),
            }
            self.bar.enable_steady_tick(TICK);
        }
    }

    /// Without a terminal, prints the state at most every [`PLAIN_INTERVAL`], and always at the end.
    fn plain_line(&self, last: bool) {
        if self.mode != Mode::Plain {
            return;
        }
        let mut last_line = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let due = match *last_line {
            None => true,
            Some(t) => now.duration_since(t) >= PLAIN_INTERVAL,
        };
        if last || due {
            let elapsed = (last || last_line.is_some()).then(|| self.bar.elapsed());
            *last_line = Some(now);
            eprintln!("{}", plain_line(&self.bar.message(), self.bar.position(), self.bar.length(), elapsed));
        }
    }
}

/// One plain progress line: message, steps (for bars with a length) and
/// elapsed seconds (`None`: the first line, which says only what started).
fn plain_line(msg: &str, pos: u64, len: Option<u64>, elapsed: Option<Duration>) -> String {
    let steps = match len {
        Some(len) if len > 0 => format!(" [{pos}/{len} {}%]", pos.min(len) * 100 / len),
        _ => String::new(),
    };
    match elapsed {
        Some(e) => format!("{msg}{steps} {}s", e.as_secs()),
        None => format!("{msg}{steps}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_line_shows_percent_only_for_bars() {
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(plain_line("compiling", 50, Some(200), secs(7)), "compiling [50/200 25%] 7s");
        assert_eq!(plain_line("compiling", 500, Some(200), secs(0)), "compiling [500/200 100%] 0s");
        assert_eq!(plain_line("bootstrapping", 0, None, secs(3)), "bootstrapping 3s");
        assert_eq!(plain_line("starting", 0, Some(0), secs(0)), "starting 0s");
        // The first line has no timer that could look frozen at 0s.
        assert_eq!(
            plain_line("building the VM template of c (once)", 0, None, None),
            "building the VM template of c (once)"
        );
        assert_eq!(plain_line("compiling", 0, Some(200), None), "compiling [0/200 0%]");
    }

    #[test]
    fn hidden_progress_tracks_state_and_clamps() {
        let p = Progress::hidden();
        p.set_length(10);
        p.set_message("x");
        p.inc(3);
        assert_eq!(p.position(), 3);
        p.set_position(50);
        assert_eq!(p.position(), 10);
        assert_eq!(p.message(), "x");
        p.set_message(format!("phase {}", 2));
        let done = format!("done in {} s", 1);
        p.finish(&done);
        assert_eq!(p.message(), done);
    }
}
