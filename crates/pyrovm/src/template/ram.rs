//! Guest RAM of a QEMU template as a file of its own (`ram`), mapped
//! copy-on-write by every clone instead of being copied in by a migration.
//!
//! While a template is built, its VM's RAM is a memfd the VMM maps shared
//! ([`guest_ram_memfd`]); once the VM is saved (the migration stream then
//! holds device state only, QEMU's `x-ignore-shared`), its non-zero pages
//! are written to the sparse `ram` file ([`write_sparse`]) with their
//! digest. Each restoring process copies that file once into a sealed memfd
//! ([`sealed_copy`]) that every clone it starts maps privately: a clone's
//! writes are its own, the pages it only reads are shared with every other
//! clone of the same process, and nothing (root included) can change the
//! memfd after it is sealed.
//!
//! Why a sealed memfd and not the file itself: QEMU 7.2 opens `mem-path`
//! read-write even for a private mapping (the `rom` property of 8.2 is
//! missing), and a VMM running as its own uid must not be able to write
//! the template every later clone starts from, nor the pages of clones
//! running beside it (a private mapping shows later writes to the file in
//! every page not yet copied).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The RAM file's name in a template directory.
pub const RAM_FILE: &str = "ram";

/// The unit pages are compared and hashed in, bytes.
const PAGE: u64 = 4096;

/// Bytes read or written per system call.
const CHUNK: usize = 1 << 20;

/// What `meta.json` records about a template's RAM file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamMeta {
    /// The file's length: the guest's RAM, bytes.
    pub bytes: u64,
    /// Bytes of non-zero pages in it (the rest are holes).
    pub data_bytes: u64,
    /// [`digest`] of its content, hex.
    pub sha256: String,
}

/// A memfd of `bytes` (all zero) for a template VM's RAM, mapped shared by
/// its VMM (`memory-backend-file,share=on`), so that TVM reads the guest's
/// pages from it once the VM is saved.
///
/// # Errors
/// `memfd_create` or `ftruncate` failing.
pub fn guest_ram_memfd(bytes: u64) -> io::Result<File> {
    let file = memfd("tvm-template-ram", false)?;
    file.set_len(bytes)?;
    Ok(file)
}

/// Writes the non-zero pages of `src` (`bytes` long) into the new file
/// `path` (0600, sparse: zero pages stay holes) and syncs it.
///
/// # Errors
/// Reading `src`, creating or writing `path`; `path` may then exist
/// partly written (it is in the build's staging directory).
pub fn write_sparse(src: &File, bytes: u64, path: &Path) -> io::Result<RamMeta> {
    let out = File::options().write(true).create_new(true).mode(0o600).open(path)?;
    out.set_len(bytes)?;
    let mut hasher = Sha256::new();
    let mut data_bytes = 0;
    for_each_page(src, bytes, |offset, page| {
        hash_page(&mut hasher, offset, page);
        data_bytes += page.len() as u64;
        out.write_all_at(page, offset)
    })?;
    out.sync_all()?;
    Ok(RamMeta { bytes, data_bytes, sha256: hex::encode(hasher.finalize()) })
}

/// The digest of a RAM file: sha256 over each non-zero page as its offset
/// (u64, little-endian) followed by its bytes, in file order. Zero pages
/// (and holes) do not count, so the digest names the content whichever
/// pages happen to be allocated. Reads only the file's data extents.
///
/// # Errors
/// Reading the file.
pub fn digest(file: &File) -> io::Result<String> {
    let bytes = file.metadata()?.len();
    let mut hasher = Sha256::new();
    for_each_page(file, bytes, |offset, page| {
        hash_page(&mut hasher, offset, page);
        Ok(())
    })?;
    Ok(hex::encode(hasher.finalize()))
}

/// A sealed in-memory copy of the RAM file `file` (`bytes` long): a memfd
/// its clones' VMMs reopen read-write through `/proc/self/fd` (QEMU 7.2
/// insists) and map privately; its write, grow and shrink seals make
/// every write to it fail, whoever tries. Only non-zero pages take memory.
///
/// # Errors
/// Reading `file`, or creating, filling or sealing the memfd.
pub fn sealed_copy(file: &File, bytes: u64) -> io::Result<OwnedFd> {
    let copy = memfd("tvm-guest-ram", true)?;
    copy.set_len(bytes)?;
    for_each_page(file, bytes, |offset, page| copy.write_all_at(page, offset))?;
    let fd = OwnedFd::from(copy);
    seal_against_writes(&fd)?;
    // SAFETY: plain fchmod on a descriptor we own. 0666: the VMM's uid must
    // be able to reopen it read-write; the seals, not the mode, keep it
    // unchanged.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o666) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// How many times [`seal_against_writes`] tries before it gives up on
/// `EBUSY` (sleeping 10, 20, 40, 80 ms in between).
const SEAL_ATTEMPTS: u32 = 5;

/// Adds the seal, shrink, grow and write seals to the memfd `fd`.
///
/// `F_SEAL_WRITE` first waits (about 150 ms) for every page's extra
/// references to go and answers `EBUSY` if one stays: a page just written can
/// sit in another CPU's LRU batch (the writing thread moved between CPUs)
/// until that CPU drains it, which it does soon. So `EBUSY` is tried again a
/// few times (seen once in a CI-like run on 2 busy cores: a template restore
/// fell back to a cold boot).
///
/// # Errors
/// `fcntl(F_ADD_SEALS)`'s error; `EBUSY` only after [`SEAL_ATTEMPTS`] tries.
fn seal_against_writes(fd: &OwnedFd) -> io::Result<()> {
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    let mut pause = std::time::Duration::from_millis(10);
    let mut attempt = 1;
    loop {
        // SAFETY: plain fcntl on a descriptor we own.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) || attempt == SEAL_ATTEMPTS {
            return Err(err);
        }
        std::thread::sleep(pause);
        pause *= 2;
        attempt += 1;
    }
}

fn memfd(name: &str, sealable: bool) -> io::Result<File> {
    let name = CString::new(name).expect("static name");
    let flags = libc::MFD_CLOEXEC | if sealable { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: memfd_create with a valid C string; the descriptor is owned at once.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nothing else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn hash_page(hasher: &mut Sha256, offset: u64, page: &[u8]) {
    hasher.update(offset.to_le_bytes());
    hasher.update(page);
}

/// Calls `f(offset, page)` for every non-zero page of `file`'s first
/// `bytes`, in order, reading only its data extents (`SEEK_DATA` /
/// `SEEK_HOLE`; a file system without them reads as one extent).
fn for_each_page(file: &File, bytes: u64, mut f: impl FnMut(u64, &[u8]) -> io::Result<()>) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < bytes {
        let Some((start, end)) = next_extent(file, at, bytes)? else { break };
        // Extents are page-aligned on every file system TVM uses; rounding
        // keeps pages whole on any other.
        let (start, end) = (start / PAGE * PAGE, end.div_ceil(PAGE).saturating_mul(PAGE).min(bytes));
        let mut pos = start;
        while pos < end {
            let want = (end - pos).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..want];
            file.read_exact_at(chunk, pos)?;
            for (i, page) in chunk.chunks(PAGE as usize).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    f(pos + i as u64 * PAGE, page)?;
                }
            }
            pos += want as u64;
        }
        at = end.max(at + PAGE);
    }
    Ok(())
}

/// The next data extent at or after `at` (before `bytes`), as `[start, end)`.
fn next_extent(file: &File, at: u64, bytes: u64) -> io::Result<Option<(u64, u64)>> {
    let seek = |offset: u64, whence| {
        // SAFETY: lseek on a descriptor we borrow; it only moves the offset.
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    let start = match seek(at, libc::SEEK_DATA) {
        Ok(s) => s,
        // ENXIO: no data past `at`.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((at, bytes))),
        Err(e) => return Err(e),
    };
    if start >= bytes {
        return Ok(None);
    }
    let end = seek(start, libc::SEEK_HOLE)?.min(bytes);
    Ok(Some((start, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write seal that meets `EBUSY` (here: a shared writable mapping, the
    /// same answer a page still referenced from another CPU's LRU batch gets)
    /// is tried again, and succeeds once the cause is gone; it gives up when
    /// the cause stays.
    #[test]
    fn the_write_seal_is_tried_again_while_the_memfd_is_busy() {
        let map = |fd: &OwnedFd| {
            // SAFETY: a new shared mapping of one page of a memfd we own.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    PAGE as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            p as usize
        };
        // SAFETY: unmaps a mapping `map` made and nothing else uses.
        let unmap = |p: usize| assert_eq!(unsafe { libc::munmap(p as *mut libc::c_void, PAGE as usize) }, 0);
        let sized = |name| {
            let f = memfd(name, true).unwrap();
            f.set_len(PAGE).unwrap();
            OwnedFd::from(f)
        };
        let busy = sized("busy");
        let p = map(&busy);
        let err = seal_against_writes(&busy).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
        unmap(p);
        let fd = sized("released");
        let p = map(&fd);
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(15));
            unmap(p);
        });
        seal_against_writes(&fd).expect("sealed once the mapping went");
        releaser.join().unwrap();
    }

    #[test]
    fn a_sparse_copy_keeps_the_content_and_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = 64 * PAGE;
        let ram = guest_ram_memfd(bytes).unwrap();
        ram.write_all_at(b"first page", 0).unwrap();
        ram.write_all_at(&[7u8; 5000], 10 * PAGE + 100).unwrap();
        // A written page that is all zero stays a hole in the copy.
        ram.write_all_at(&[0u8; 4096], 30 * PAGE).unwrap();
        let path = dir.path().join(RAM_FILE);
        let meta = write_sparse(&ram, bytes, &path).unwrap();
        assert_eq!(meta.bytes, bytes);
        assert_eq!(meta.data_bytes, 3 * PAGE, "pages 0, 10 and 11");
        let file = File::open(&path).unwrap();
        assert_eq!(file.metadata().unwrap().len(), bytes);
        assert_eq!(digest(&file).unwrap(), meta.sha256);
        assert_eq!(digest(&ram).unwrap(), meta.sha256, "the same content, however allocated");

        let sealed = File::from(sealed_copy(&file, bytes).unwrap());
        let mut page = vec![0u8; PAGE as usize];
        sealed.read_exact_at(&mut page, 10 * PAGE).unwrap();
        assert!(page[..100].iter().all(|&b| b == 0) && page[100..].iter().all(|&b| b == 7));
        assert_eq!(digest(&sealed).unwrap(), meta.sha256);
        // Sealed: no write, no truncation, even as root.
        assert!(sealed.write_all_at(b"x", 0).is_err());
        assert!(sealed.set_len(PAGE).is_err());

        // One changed byte is another digest.
        let out = File::options().write(true).open(&path).unwrap();
        out.write_all_at(b"F", 0).unwrap();
        assert_ne!(digest(&file).unwrap(), meta.sha256);
    }
}
