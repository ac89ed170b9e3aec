//! `additional_files`: a base64 zip unpacked into the work dir, safely.
//!
//! A zip is hostile input: names may climb out (`../x`, `/etc/x`), entries
//! may be symlinks, and declared sizes may lie (a zip bomb). So every name
//! must pass TVM's own file-name rules (relative, no `..`, bounded depth),
//! symlinks and other special entries are refused, directories are skipped
//! (they are implied by file paths), and contents are read through a hard cap
//! on the total, whatever the headers claim.

use std::io::Read;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;

/// Most files a zip may hold.
pub(crate) const MAX_ENTRIES: usize = 64;
/// Most bytes its files may hold together, uncompressed.
pub(crate) const MAX_TOTAL_BYTES: u64 = 16 << 20;

const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why `additional_files` was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum UnpackError {
    /// Not base64.
    #[error("is not valid base64")]
    Base64,
    /// Not a readable zip archive.
    #[error("is not a valid zip archive: {0}")]
    Zip(String),
    /// More entries than [`MAX_ENTRIES`].
    #[error("holds more than {MAX_ENTRIES} files")]
    TooManyFiles,
    /// More bytes than [`MAX_TOTAL_BYTES`] once unpacked.
    #[error("unpacks to more than {MAX_TOTAL_BYTES} bytes")]
    TooLarge,
    /// A name that is absolute, climbs out, or is otherwise unsafe.
    #[error("has an unsafe file name: {0}")]
    UnsafeName(String),
    /// A symlink or other non-regular entry.
    #[error("has an entry that is not a regular file: {0}")]
    NotRegular(String),
}

/// Decodes and unpacks `additional_files` into `(path, content)` pairs.
///
/// # Errors
/// [`UnpackError`] for anything unsafe or malformed.
pub(crate) fn unpack(b64: &str) -> Result<Vec<(String, Vec<u8>)>, UnpackError> {
    let compact: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = LENIENT_B64.decode(compact.as_bytes()).map_err(|_| UnpackError::Base64)?;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| UnpackError::Zip(e.to_string()))?;
    if archive.len() > MAX_ENTRIES * 4 {
        // Directory entries are skipped, but a central directory this long is not a submission.
        return Err(UnpackError::TooManyFiles);
    }
    let mut out = Vec::new();
    let mut total: u64 = 0;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| UnpackError::Zip(e.to_string()))?;
        let raw_name = String::from_utf8_lossy(entry.name_raw()).into_owned();
        if entry.is_dir() {
            continue;
        }
        if entry.is_symlink() || !entry.is_file() {
            return Err(UnpackError::NotRegular(raw_name));
        }
        // Both checks: the zip crate's view of the path and TVM's own rules.
        let Some(name) = entry.enclosed_name().and_then(|p| p.to_str().map(str::to_string)) else {
            return Err(UnpackError::UnsafeName(raw_name));
        };
        if name != raw_name || tvm_protocol::validate_file_path(&name).is_err() {
            return Err(UnpackError::UnsafeName(raw_name));
        }
        if out.len() == MAX_ENTRIES {
            return Err(UnpackError::TooManyFiles);
        }
        let mut content = Vec::new();
        let budget = MAX_TOTAL_BYTES - total;
        (&mut entry).take(budget + 1).read_to_end(&mut content).map_err(|e| UnpackError::Zip(e.to_string()))?;
        if content.len() as u64 > budget {
            return Err(UnpackError::TooLarge);
        }
        total += content.len() as u64;
        out.push((name, content));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD as B64;
    use std::io::Write;
    use zip::write::SimpleFileOptions;

    fn zip_of(entries: &[(&str, &[u8])]) -> String {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in entries {
            if name.ends_with('/') {
                w.add_directory(*name, opts).unwrap();
            } else {
                w.start_file(*name, opts).unwrap();
                w.write_all(data).unwrap();
            }
        }
        B64.encode(w.finish().unwrap().into_inner())
    }

    #[test]
    fn a_plain_zip_unpacks() {
        let files = unpack(&zip_of(&[("dir/", b""), ("dir/a.txt", b"hello"), ("b.py", b"x=1")])).unwrap();
        assert_eq!(files, vec![("dir/a.txt".to_string(), b"hello".to_vec()), ("b.py".to_string(), b"x=1".to_vec())]);
    }

    #[test]
    fn traversal_absolute_and_odd_names_are_refused() {
        for bad in ["../evil", "a/../../evil", "/etc/passwd", "a//b", "./x"] {
            let r = unpack(&zip_of(&[(bad, b"x")]));
            assert!(matches!(r, Err(UnpackError::UnsafeName(_))), "{bad}: {r:?}");
        }
    }

    #[test]
    fn symlinks_are_refused() {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        w.add_symlink("link", "/etc/passwd", SimpleFileOptions::default()).unwrap();
        let b = B64.encode(w.finish().unwrap().into_inner());
        assert!(matches!(unpack(&b), Err(UnpackError::NotRegular(_))));
    }

    #[test]
    fn bombs_and_floods_are_bounded() {
        // 17 MiB of zeros compresses to a few KB; the cap applies to what comes out.
        let big = vec![0u8; (MAX_TOTAL_BYTES + (1 << 20)) as usize];
        assert_eq!(unpack(&zip_of(&[("zeros", &big)])), Err(UnpackError::TooLarge));
        let names: Vec<String> = (0..=MAX_ENTRIES).map(|i| format!("f{i}")).collect();
        let entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
        assert_eq!(unpack(&zip_of(&entries)), Err(UnpackError::TooManyFiles));
        assert_eq!(unpack("not base64 !!"), Err(UnpackError::Base64));
        assert!(matches!(unpack(&B64.encode(b"not a zip")), Err(UnpackError::Zip(_))));
    }
}
