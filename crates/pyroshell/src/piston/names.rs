//! TVM runtimes under Piston's names: language, `runtime`, aliases and a
//! full `x.y.z` version, and Piston's resolution of `language` + a semver
//! range to the newest matching runtime.

use nodejs_semver::{Range, Version};
use tvm_config::Runtime;

/// One TVM runtime as Piston describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PistonRuntime {
    /// TVM runtime id (what runs it).
    pub id: String,
    /// Piston's language name (`python`, `javascript`, `c`, `c++`, ...).
    pub language: String,
    /// Full version (`3.13.5`): the installed package's, or the catalog's padded while the image is missing.
    pub version: String,
    /// Other names accepted as `language`.
    pub aliases: Vec<String>,
    /// The package providing several languages (`node`, `gcc`, `clang`), as Piston's `runtime` field.
    pub runtime: Option<String>,
    /// TVM's default entry file name (for unnamed files).
    pub entry: String,
    /// Whether the image is built, so it can run now.
    pub ready: bool,
}

/// Piston's language name, `runtime` and the aliases Piston's packages give,
/// for a TVM runtime. GCC keeps Piston's `c`/`c++`; Clang, which Piston does
/// not ship, is `clang`/`clang++` so that a range over `c` never mixes compilers.
pub(crate) fn piston_names(rt: &Runtime) -> (String, Option<&'static str>, &'static [&'static str]) {
    let clang = rt.id.contains("clang");
    match rt.language.as_str() {
        "python" => ("python".into(), None, &["py", "py3", "python3"]),
        "javascript" => ("javascript".into(), Some("node"), &["node", "node-javascript", "node-js", "js", "nodejs"]),
        "ruby" => ("ruby".into(), None, &["rb"]),
        "go" => ("go".into(), None, &["golang"]),
        "rust" => ("rust".into(), None, &["rs"]),
        "java" => ("java".into(), None, &[]),
        "c" if clang => ("clang".into(), Some("clang"), &[]),
        "c" => ("c".into(), Some("gcc"), &["gcc"]),
        "cpp" if clang => ("clang++".into(), Some("clang"), &[]),
        "cpp" => ("c++".into(), Some("gcc"), &["cpp", "g++"]),
        other => (other.to_string(), None, &[]),
    }
}

/// Builds the Piston view of `rt` with its `version` and readiness.
pub(crate) fn describe(rt: &Runtime, version: String, ready: bool) -> PistonRuntime {
    let (language, runtime, base) = piston_names(rt);
    let mut aliases: Vec<String> = Vec::new();
    for a in base.iter().map(|s| s.to_string()).chain(rt.aliases.iter().cloned()).chain([rt.id.clone()]) {
        if a != language && !aliases.contains(&a) {
            aliases.push(a);
        }
    }
    PistonRuntime {
        id: rt.id.clone(),
        language,
        version,
        aliases,
        runtime: runtime.map(str::to_string),
        entry: rt.entry.clone(),
        ready,
    }
}

/// The newest runtime answering to `language` (its name or an alias) whose
/// version satisfies the npm-style range `version` (`*`, `3`, `3.x`,
/// `>=3.9 <3.12`, `3.11.2`), as Piston resolves them. `None` when nothing
/// matches or the range does not parse (Piston: "runtime is unknown").
pub(crate) fn resolve<'a>(runtimes: &'a [PistonRuntime], language: &str, version: &str) -> Option<&'a PistonRuntime> {
    let range = Range::parse(version).ok()?;
    runtimes
        .iter()
        .filter(|r| r.language == language || r.aliases.iter().any(|a| a == language))
        .filter_map(|r| Version::parse(&r.version).ok().map(|v| (v, r)))
        .filter(|(v, _)| v.satisfies(&range))
        .max_by(|(a, _), (b, _)| a.cmp(b))
        .map(|(_, r)| r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tvm_config::Catalog;

    fn view() -> Vec<PistonRuntime> {
        let cat = Catalog::builtin();
        let pretend = |id: &str| match id {
            "python-3.13" => "3.13.5",
            "python-3.11" => "3.11.2",
            "python-3.9" => "3.9.2",
            "c-gcc-14" => "14.2.0",
            "c-gcc-12" => "12.2.0",
            "c-clang-19" => "19.1.7",
            "node-24" => "24.11.1",
            "node-26" => "26.0.0",
            _ => "1.0.0",
        };
        cat.runtimes()
            .iter()
            .filter(|r| r.unavailable.is_none())
            .map(|r| describe(r, pretend(&r.id).into(), true))
            .collect()
    }

    #[test]
    fn ranges_resolve_to_the_newest_match() {
        let v = view();
        let id = |l: &str, r: &str| resolve(&v, l, r).map(|x| x.id.clone());
        assert_eq!(id("python", "*").as_deref(), Some("python-3.13"));
        assert_eq!(id("python", "3").as_deref(), Some("python-3.13"));
        assert_eq!(id("python", "3.x").as_deref(), Some("python-3.13"));
        assert_eq!(id("python", ">=3.9 <3.12").as_deref(), Some("python-3.11"));
        assert_eq!(id("python", "3.9.2").as_deref(), Some("python-3.9"));
        assert_eq!(id("py", "3.11").as_deref(), Some("python-3.11"), "alias, and a partial version is a range");
        assert_eq!(id("python", "4"), None);
        assert_eq!(id("python", "not a range"), None);
        assert_eq!(id("cobol", "*"), None);
        assert_eq!(id("c", "*").as_deref(), Some("c-gcc-14"), "c never resolves to clang");
        assert_eq!(id("clang", "*").as_deref(), Some("c-clang-19"));
        assert_eq!(id("gcc", "12").as_deref(), Some("c-gcc-12"));
        assert_eq!(id("node", "*").as_deref(), Some("node-26"), "the alias is on every version");
        assert_eq!(id("javascript", "24").as_deref(), Some("node-24"));
    }

    #[test]
    fn names_follow_piston() {
        let v = view();
        let by = |id: &str| v.iter().find(|r| r.id == id).unwrap().clone();
        let cpp = by("cpp-gcc-14");
        assert_eq!((cpp.language.as_str(), cpp.runtime.as_deref()), ("c++", Some("gcc")));
        assert!(cpp.aliases.contains(&"cpp".to_string()) && cpp.aliases.contains(&"g++".to_string()));
        assert!(!cpp.aliases.contains(&"c++".to_string()), "the language is not repeated as an alias");
        let js = by("node-24");
        assert_eq!((js.language.as_str(), js.runtime.as_deref()), ("javascript", Some("node")));
        let py = by("python-3.11");
        assert_eq!(py.runtime, None);
        assert!(py.aliases.contains(&"python3.11".to_string()) && py.aliases.contains(&"py".to_string()));
    }
}
