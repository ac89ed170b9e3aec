//! Names of the guest's signal numbers.
//!
//! A stage's `signal` is a number as the guest's Linux kernel delivers it,
//! whatever the host is: a client on macOS (where SIGBUS is 10, not 7) must
//! name it by Linux's table, not its own. Numbers follow Linux's generic
//! `asm/signal.h` (x86_64 and arm64 agree); real-time signals have no name.

/// Linux's names of signals 1..=31, by number.
const NAMES: [&str; 31] = [
    "SIGHUP",
    "SIGINT",
    "SIGQUIT",
    "SIGILL",
    "SIGTRAP",
    "SIGABRT",
    "SIGBUS",
    "SIGFPE",
    "SIGKILL",
    "SIGUSR1",
    "SIGSEGV",
    "SIGUSR2",
    "SIGPIPE",
    "SIGALRM",
    "SIGTERM",
    "SIGSTKFLT",
    "SIGCHLD",
    "SIGCONT",
    "SIGSTOP",
    "SIGTSTP",
    "SIGTTIN",
    "SIGTTOU",
    "SIGURG",
    "SIGXCPU",
    "SIGXFSZ",
    "SIGVTALRM",
    "SIGPROF",
    "SIGWINCH",
    "SIGIO",
    "SIGPWR",
    "SIGSYS",
];

/// The Linux name of guest signal `n` (`11` → `SIGSEGV`), or `None` for a
/// number Linux does not name (0, real-time signals, out of range).
pub fn linux_signal_name(n: i32) -> Option<&'static str> {
    usize::try_from(n).ok().and_then(|n| n.checked_sub(1)).and_then(|i| NAMES.get(i)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_linux_numbering() {
        let named: Vec<_> = [1, 6, 7, 9, 10, 11, 15, 24, 31].iter().map(|&n| linux_signal_name(n).unwrap()).collect();
        assert_eq!(
            named,
            ["SIGHUP", "SIGABRT", "SIGBUS", "SIGKILL", "SIGUSR1", "SIGSEGV", "SIGTERM", "SIGXCPU", "SIGSYS"]
        );
        for n in [0, 32, 34, 64, -1, i32::MAX] {
            assert_eq!(linux_signal_name(n), None, "{n}");
        }
    }
}
