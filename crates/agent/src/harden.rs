//! What a stage's process does to itself, after dropping to the runner
//! user and before `exec`, so the program can reach as little of the kernel
//! as possible: no capabilities in any set (bounding, ambient, inheritable,
//! locked by securebits) and a seccomp filter refusing the system calls that
//! only an attacker needs (debugging other processes, mounts, namespaces,
//! kernel modules, eBPF, perf, keyrings, clocks, io_uring).
//!
//! The filters are compiled into BPF in the parent, so the child between
//! `fork` and `exec` only issues raw system calls on prepared memory.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

use crate::error::Error;

/// System calls a job gets `EPERM` for. Most already need a capability the
/// job does not have; the filter is the second wall, and it also covers the
/// calls an unprivileged user may make (ptrace of its own processes,
/// unprivileged user namespaces, userfaultfd, perf, bpf, keyrings, io_uring).
pub const DENIED: &[(&str, i64)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("syslog", libc::SYS_syslog),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("vhangup", libc::SYS_vhangup),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
];

/// Port I/O exists only on x86_64: denied there besides [`DENIED`] (aarch64
/// has no such system calls).
#[cfg(target_arch = "x86_64")]
pub const DENIED_ARCH: &[(&str, i64)] = &[("iopl", libc::SYS_iopl), ("ioperm", libc::SYS_ioperm)];
/// Port I/O exists only on x86_64: nothing to add on this architecture.
#[cfg(not(target_arch = "x86_64"))]
pub const DENIED_ARCH: &[(&str, i64)] = &[];

/// The seccomp architecture of the agent's own build: a filter for another
/// architecture would refuse every call of the job.
#[cfg(target_arch = "x86_64")]
const SECCOMP_ARCH: TargetArch = TargetArch::x86_64;
/// The seccomp architecture of the agent's own build: a filter for another
/// architecture would refuse every call of the job.
#[cfg(target_arch = "aarch64")]
const SECCOMP_ARCH: TargetArch = TargetArch::aarch64;

/// `clone` flags that create namespaces; `clone` with any of them is refused.
/// (CLONE_NEWTIME is left out: in `clone`'s flags that bit is part of the
/// exit signal, and only `clone3`/`unshare` can ask for it, both refused.)
pub const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// The seccomp programs of a stage, installed in order. Two programs because
/// a seccompiler filter has a single match action: `EPERM` for the deny list
/// and namespace-creating `clone`, `ENOSYS` for `clone3` (its flags live in
/// memory a filter cannot read; ENOSYS makes glibc fall back to `clone`,
/// whose flags the first program checks).
pub fn filters() -> Result<Vec<BpfProgram>, Error> {
    let arch = SECCOMP_ARCH;
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().chain(DENIED_ARCH).map(|&(_, nr)| (nr, Vec::new())).collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let cond = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag)?;
            SeccompRule::new(vec![cond])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::Seccomp)?;
    deny.insert(libc::SYS_clone, clone_rules);
    let eperm = SeccompFilter::new(deny, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch)
        .map_err(Error::Seccomp)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(Error::Seccomp)?;
    [eperm, clone3].into_iter().map(|f| BpfProgram::try_from(f).map_err(Error::Seccomp)).collect()
}

/// [`filters`], compiled once per agent: every stage installs the same
/// programs. Compiled at start-up, before the agent reports ready
/// (`main`), so the clones of a template inherit them compiled and a job
/// does not pay for it (a few ms of first-time code under TCG).
///
/// # Errors
/// As [`filters`]; a failure is not cached, so the next stage tries again.
pub fn stage_filters() -> Result<&'static [BpfProgram], Error> {
    static FILTERS: std::sync::OnceLock<Vec<BpfProgram>> = std::sync::OnceLock::new();
    if let Some(compiled) = FILTERS.get() {
        return Ok(compiled);
    }
    let compiled = filters()?;
    Ok(FILTERS.get_or_init(|| compiled))
}

/// Installs `programs` in the calling thread. Needs `no_new_privs` (set
/// earlier by the sandbox) or CAP_SYS_ADMIN. Async-signal-safe: a raw system
/// call on prepared memory.
pub fn install(programs: &[BpfProgram]) -> io::Result<()> {
    for prog in programs {
        if seccompiler::apply_filter(prog).is_err() {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Empties the bounding and ambient capability sets and locks the
/// securebits so no later `execve` (of a set-uid file, or as uid 0) can give
/// capabilities back. Must run while still root: dropping from the bounding
/// set needs CAP_SETPCAP.
pub fn drop_bounding_and_ambient() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        for cap in 0..64 {
            // EINVAL marks the end of the capabilities this kernel knows.
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(err);
            }
        }
        if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        // SECBIT_NOROOT: uid 0 gains nothing on exec; NO_CAP_AMBIENT_RAISE;
        // each with its lock bit, so the job cannot undo them.
        const SECBITS: libc::c_ulong = (1 << 0) | (1 << 1) | (1 << 6) | (1 << 7);
        if libc::prctl(libc::PR_SET_SECUREBITS, SECBITS, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Empties the permitted, effective and inheritable sets. `setuid` away from
/// root already clears permitted and effective, but not inheritable.
pub fn clear_capability_sets() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: capset reads a version-3 header and two data structs we own.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_for_the_build_architecture() {
        let progs = filters().unwrap();
        assert_eq!(progs.len(), 2);
        // The kernel refuses programs longer than 4096 instructions.
        assert!(progs.iter().all(|p| !p.is_empty() && p.len() < 4096), "{:?}", progs.iter().map(Vec::len));
    }

    #[test]
    fn deny_list_has_no_duplicates_and_spares_what_runtimes_need() {
        let mut nrs: Vec<i64> = DENIED.iter().chain(DENIED_ARCH).map(|&(_, nr)| nr).collect();
        nrs.sort_unstable();
        nrs.dedup();
        assert_eq!(nrs.len(), DENIED.len() + DENIED_ARCH.len());
        for needed in [libc::SYS_clone, libc::SYS_clone3, libc::SYS_execve, libc::SYS_kill, libc::SYS_prctl] {
            assert!(!nrs.contains(&needed), "{needed} must stay allowed (clone/clone3 are filtered separately)");
        }
    }

    /// In a forked child of the test process: install the filters and check
    /// what they do, reporting through the exit code.
    #[test]
    fn filters_refuse_the_deny_list_and_namespace_clones_only() {
        let progs = filters().unwrap();
        // SAFETY: the child makes raw system calls only and ends with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = unsafe {
                let errno = || *libc::__errno_location();
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || install(&progs).is_err() {
                    libc::_exit(10);
                }
                if libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) != -1 || errno() != libc::EPERM {
                    libc::_exit(11);
                }
                if libc::unshare(libc::CLONE_NEWUSER) != -1 || errno() != libc::EPERM {
                    libc::_exit(12);
                }
                if libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) != -1 || errno() != libc::ENOSYS {
                    libc::_exit(13);
                }
                let ns = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong;
                if libc::syscall(libc::SYS_clone, ns, 0, 0, 0, 0) != -1 || errno() != libc::EPERM {
                    libc::_exit(14);
                }
                // A plain fork-like clone still works.
                let child = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0);
                if child == 0 {
                    libc::_exit(0);
                }
                if child < 0 {
                    libc::_exit(15);
                }
                let mut status = 0;
                libc::waitpid(child as libc::pid_t, &mut status, 0);
                if libc::getpid() <= 0 {
                    libc::_exit(16);
                }
                0
            };
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child died: {status}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "check number {} failed", libc::WEXITSTATUS(status));
    }
}
