//! Console logging. Standard error is the serial console, which is slow under
//! emulation, so everything but fatal errors is off unless the kernel command
//! line says `tvm.debug=1`.

use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Turns debug logging on when `cmdline` (the text of `/proc/cmdline`) asks for it.
pub fn init(cmdline: &str) {
    DEBUG.store(debug_requested(cmdline), Ordering::Relaxed);
}

/// Whether debug messages are printed.
pub fn enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

fn debug_requested(cmdline: &str) -> bool {
    cmdline.split_ascii_whitespace().any(|w| w == "tvm.debug=1")
}

/// Milliseconds since boot; logs carry it so boot and job timings can be read
/// straight off the console.
pub fn uptime_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(t) => t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000,
        Err(_) => 0,
    }
}

/// Prints one line to the console.
pub fn emit(level: &str, args: std::fmt::Arguments<'_>) {
    let t = uptime_ms();
    eprintln!("[{:>5}.{:03}] tvm-agent {level}: {args}", t / 1000, t % 1000);
}

/// Prints a fatal error with its causes; always shown.
pub fn fatal(err: &dyn std::error::Error) {
    emit("fatal", format_args!("{}", crate::error::chain(err)));
}

/// Prints a debug line when `tvm.debug=1`.
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::enabled() {
            $crate::log::emit("debug", format_args!($($arg)*));
        }
    };
}
pub(crate) use debug;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_flag_is_a_whole_word() {
        assert!(debug_requested("console=ttyS0 panic=-1 tvm.debug=1\n"));
        assert!(debug_requested("tvm.debug=1"));
        assert!(!debug_requested("console=ttyS0 tvm.debug=0"));
        assert!(!debug_requested("xtvm.debug=1 tvm.debug=10"));
        assert!(!debug_requested(""));
    }
}
