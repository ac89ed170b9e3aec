//! Judge0 language ids for TVM runtimes.
//!
//! A TVM runtime keeps Judge0's published id when Judge0 CE (1.13 seeds,
//! `db/languages/active.rb`, or the hosted 1.14 list) has the same language
//! at the same release line (`major.minor`; Node.js, GCC, Clang and Java by
//! major); its name then carries TVM's real installed version, e.g.
//! `Python (3.13.5)` under Judge0's id 109 for `Python (3.13.2)`. Versions
//! Judge0 never had get ids of TVM's own, from 1000 up, fixed per runtime id
//! so they never move when the catalog grows. Judge0 ids TVM has no runtime
//! for (71 Python 3.8.1, 62 OpenJDK 13, ...) are simply absent.

use tvm_config::Runtime;

/// `(TVM runtime id, Judge0 id)`: Judge0's own ids first, then TVM's.
const IDS: &[(&str, u32)] = &[
    // Judge0's ids.
    ("ruby-2.7", 72),
    ("java-17", 91),
    ("python-3.11", 92),
    ("node-18", 93),
    ("node-20", 97),
    ("node-22", 102),
    ("c-gcc-14", 103),
    ("cpp-gcc-14", 105),
    ("go-1.22", 106),
    ("rust-1.85", 108),
    ("python-3.13", 109),
    ("c-clang-19", 110),
    // TVM's own ids, for versions Judge0 never shipped.
    ("python-3.9", 1001),
    ("node-16", 1010),
    ("node-24", 1011),
    ("node-26", 1012),
    ("ruby-3.1", 1020),
    ("ruby-3.3", 1021),
    ("go-1.19", 1030),
    ("go-1.21", 1031),
    ("go-1.24", 1032),
    ("rust-1.63", 1040),
    ("rust-1.78", 1041),
    ("java-11", 1050),
    ("java-21", 1051),
    ("c-gcc-11", 1060),
    ("c-gcc-12", 1061),
    ("c-clang-14", 1062),
    ("cpp-gcc-11", 1070),
    ("cpp-gcc-12", 1071),
    ("cpp-clang-14", 1072),
    ("cpp-clang-19", 1073),
];

/// The Judge0 id of a runtime. Runtimes added to the catalog after this table
/// get a stable id from 2000 up derived from their id (FNV-1a), so adding one
/// never renumbers another.
pub(crate) fn judge0_id(runtime_id: &str) -> u32 {
    if let Some((_, id)) = IDS.iter().find(|(r, _)| *r == runtime_id) {
        return *id;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in runtime_id.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    2000 + h % 1_000_000
}

/// Judge0's display name, with TVM's full installed `version`: `C++ (GCC 14.2.0)`, `JavaScript (Node.js 22.11.0)`.
pub(crate) fn display_name(rt: &Runtime, version: &str) -> String {
    let clang = rt.id.contains("clang");
    match rt.language.as_str() {
        "python" => format!("Python ({version})"),
        "javascript" => format!("JavaScript (Node.js {version})"),
        "ruby" => format!("Ruby ({version})"),
        "go" => format!("Go ({version})"),
        "rust" => format!("Rust ({version})"),
        "java" => format!("Java (OpenJDK {version})"),
        "c" if clang => format!("C (Clang {version})"),
        "c" => format!("C (GCC {version})"),
        "cpp" if clang => format!("C++ (Clang {version})"),
        "cpp" => format!("C++ (GCC {version})"),
        other => format!("{other} ({version})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tvm_config::Catalog;

    #[test]
    fn every_runtime_has_a_distinct_id() {
        let cat = Catalog::builtin();
        let mut ids: Vec<u32> = cat.runtimes().iter().map(|r| judge0_id(&r.id)).collect();
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n, "ids collide");
        for (rt, _) in IDS {
            assert!(cat.get(rt).is_some(), "{rt} is not in the catalog");
        }
        assert_eq!(judge0_id("python-3.11"), 92);
        assert!(judge0_id("cobol-1") >= 2000);
        assert_eq!(judge0_id("cobol-1"), judge0_id("cobol-1"));
    }

    #[test]
    fn names_carry_the_installed_version() {
        let cat = Catalog::builtin();
        assert_eq!(display_name(cat.get("cpp-gcc-14").unwrap(), "14.2.0"), "C++ (GCC 14.2.0)");
        assert_eq!(display_name(cat.get("node-22").unwrap(), "22.11.0"), "JavaScript (Node.js 22.11.0)");
        assert_eq!(display_name(cat.get("c-clang-19").unwrap(), "19.1.7"), "C (Clang 19.1.7)");
    }
}
