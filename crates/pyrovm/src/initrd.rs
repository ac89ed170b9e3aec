//! The initramfs that carries the guest agent into every VM.
//!
//! The agent travels separately from the runtime images so that images are
//! keyed by their recipe alone: rebuilding the agent never rebuilds an image.
//! The archive is a tiny newc cpio written here directly (it needs a
//! `/dev/console` device node, which a staging directory could only hold
//! with root's `mknod`).

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Why the initramfs could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    /// The agent binary is missing.
    #[error("guest agent not found at {0}; build it with `scripts/build-agent.sh` or set TVM_AGENT_BIN")]
    AgentMissing(PathBuf),
    /// The agent is dynamically linked and would not start as PID 1.
    #[error("guest agent {0} is dynamically linked; build it with `scripts/build-agent.sh` (static)")]
    AgentNotStatic(PathBuf),
    /// Reading the agent or writing the archive failed.
    #[error("initramfs I/O on {path}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Builds (or finds, keyed by the agent's hash) the initramfs for `agent` in `dir`.
pub fn ensure_initrd(agent: &Path, dir: &Path) -> Result<PathBuf, InitrdError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InitrdError::Io { path, source }
    };
    let bytes = std::fs::read(agent).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => InitrdError::AgentMissing(agent.to_path_buf()),
        _ => InitrdError::Io { path: agent.to_path_buf(), source: e },
    })?;
    if !is_static_elf(&bytes) {
        return Err(InitrdError::AgentNotStatic(agent.to_path_buf()));
    }
    let key = hex::encode(&Sha256::digest(&bytes)[..12]);
    let path = dir.join(format!("initrd-{key}.cpio"));
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(".initrd-{key}.{}.tmp", std::process::id()));
    let archive = newc_archive(&bytes);
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&archive).and_then(|_| f.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(path)
}

/// True for an ELF executable without a program interpreter (PT_INTERP).
pub fn is_static_elf(b: &[u8]) -> bool {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8])) as usize;
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 > b.len() || u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) != 3
    })
}

/// The architecture of an ELF64 little-endian executable (`e_machine`:
/// 62 is x86_64, 183 aarch64); `None` for anything else.
pub fn elf_arch(b: &[u8]) -> Option<tvm_config::GuestArch> {
    if b.len() < 20 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return None;
    }
    match u16::from_le_bytes([b[18], b[19]]) {
        62 => Some(tvm_config::GuestArch::X86_64),
        183 => Some(tvm_config::GuestArch::Aarch64),
        _ => None,
    }
}

fn newc_archive(agent: &[u8]) -> Vec<u8> {
    const DIR: u32 = 0o040755;
    let mut out = Vec::new();
    let mut ino = 1;
    let mut entry = |name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        ino += 1;
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    for d in ["dev", "proc", "sys", "newroot"] {
        entry(d, DIR, (0, 0), &[]);
    }
    // The kernel opens /dev/console for PID 1's stdio before anything is mounted.
    entry("dev/console", 0o020600, (5, 1), &[]);
    entry("init", 0o100755, (0, 0), agent);
    entry("TRAILER!!!", 0, (0, 0), &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_aligned_and_terminated() {
        let a = newc_archive(b"abc");
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        let s = String::from_utf8_lossy(&a);
        assert!(s.contains("TRAILER!!!") && s.contains("dev/console") && s.contains("newroot"));
    }

    #[test]
    fn static_detection() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static_elf(&me), "test binaries are dynamically linked");
        assert!(!is_static_elf(b"#!/bin/sh\n"));
    }
}
