//! The version-compatibility matrix: every language and version of the
//! catalog, where each comes from, and which is the default. Rendered as the
//! generated `docs/compatibility.md` (a test keeps it in step with the catalog).

use std::fmt::Write;

use crate::catalog::{Catalog, Runtime};

/// Whether `r` is what its file extension selects by default.
pub fn is_default(catalog: &Catalog, r: &Runtime) -> bool {
    r.extensions.iter().any(|e| catalog.for_extension(e).is_some_and(|d| d.id == r.id))
}

/// Where a runtime comes from, or why it is unavailable.
pub fn source_of(r: &Runtime) -> String {
    match (&r.unavailable, &r.image) {
        (Some(why), Some(recipe)) if recipe.oci.is_some() => format!("unavailable: {why}; {}", recipe.source()),
        (Some(why), _) => format!("unavailable: {why}"),
        // Whether the registry answers is the host's fact: `tvm runtimes --matrix` probes it.
        (None, Some(recipe)) if recipe.oci.is_some() => {
            format!("{} (buildable where its registry answers; else `tvm image import`)", recipe.source())
        }
        (None, Some(recipe)) => recipe.source(),
        (None, None) => "no recipe".into(),
    }
}

/// The guest architectures an entry supports, comma-separated (`x86_64,aarch64`).
pub fn architectures_of(r: &Runtime) -> String {
    r.architectures.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(",")
}

/// Languages in catalog order, each once.
pub fn languages(catalog: &Catalog) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for r in catalog.runtimes() {
        if !out.contains(&r.language.as_str()) {
            out.push(&r.language);
        }
    }
    out
}

fn sorted_versions<'a>(catalog: &'a Catalog, language: &str) -> Vec<&'a Runtime> {
    let mut v: Vec<&Runtime> = catalog.runtimes().iter().filter(|r| r.language == language).collect();
    // Newest first; versions compare numerically part by part ("gcc-14" > "gcc-12", "3.13" > "3.9").
    v.sort_by_key(|r| std::cmp::Reverse(version_key(&r.version)));
    v
}

fn version_key(v: &str) -> Vec<(String, u64)> {
    v.split(['.', '-'])
        .map(|p| {
            let digits: String = p.chars().filter(char::is_ascii_digit).collect();
            (p.trim_matches(|c: char| c.is_ascii_digit()).to_string(), digits.parse().unwrap_or(0))
        })
        .collect()
}

/// `docs/compatibility.md`, generated from the catalog.
pub fn compatibility_markdown(catalog: &Catalog) -> String {
    let mut s = String::new();
    let available = catalog.runtimes().iter().filter(|r| r.unavailable.is_none()).count();
    let oci = catalog
        .runtimes()
        .iter()
        .filter(|r| r.unavailable.is_none() && r.image.as_ref().is_some_and(|i| i.oci.is_some()))
        .count();
    let _ = writeln!(s, "# Runtime compatibility matrix\n");
    let _ = writeln!(
        s,
        "<!-- Generated from catalog/runtimes.toml by `tvm runtimes --matrix --markdown`; \
         a test fails when this file is stale. -->\n"
    );
    let _ = writeln!(
        s,
        "{available} of {} runtimes are available ({oci} of them from an OCI registry: buildable on a host \
         that registry answers, see docs/runtimes.md). Each version has its own image, built from the source \
         named below, so versions never share packages: adding, upgrading or removing one leaves the others \
         untouched. The guest kernel and the statically linked guest agent are the same for every runtime, \
         and nothing in a runtime depends on the host's packages. A version with no package source here is \
         listed as unavailable with the reason; no other version is substituted under its name. \
         Architectures are the guest architectures an entry is verified on (aarch64 under QEMU TCG \
         emulation on x86_64; see docs/arm64.md); its image is built per architecture.\n",
        catalog.runtimes().len()
    );
    let _ = writeln!(
        s,
        "`tvm runtimes --matrix` shows the same table with each image's state on this machine \
         (ready, buildable) and the package versions actually installed in it.\n"
    );
    for language in languages(catalog) {
        let _ = writeln!(s, "## {language}\n");
        let _ = writeln!(s, "| Version | Runtime id | Aliases | Compiled | Architectures | Source |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for r in sorted_versions(catalog, language) {
            let version =
                if is_default(catalog, r) { format!("**{}** (default)", r.version) } else { r.version.clone() };
            let aliases = r.aliases.iter().map(|a| format!("`{a}`")).collect::<Vec<_>>().join(" ");
            let compiled = if r.compile.is_some() { "yes" } else { "no" };
            let _ = writeln!(
                s,
                "| {version} | `{}` | {aliases} | {compiled} | {} | {} |",
                r.id,
                architectures_of(r),
                source_of(r)
            );
        }
        let _ = writeln!(s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        let mut v = vec!["3.9", "3.13", "3.11", "gcc-11", "gcc-14"];
        v.sort_by_key(|v| std::cmp::Reverse(version_key(v)));
        assert_eq!(v, ["gcc-14", "gcc-11", "3.13", "3.11", "3.9"]);
    }

    /// docs/compatibility.md is generated; regenerate it with
    /// `tvm runtimes --matrix --markdown > docs/compatibility.md`.
    #[test]
    fn compatibility_doc_is_current() {
        let doc = include_str!("../../../docs/compatibility.md");
        let want = compatibility_markdown(&Catalog::builtin());
        assert!(
            doc == want,
            "docs/compatibility.md is stale: run `tvm runtimes --matrix --markdown > docs/compatibility.md`"
        );
    }

    #[test]
    fn every_language_has_one_default() {
        let c = Catalog::builtin();
        for language in languages(&c) {
            let defaults = c.runtimes().iter().filter(|r| r.language == language && is_default(&c, r)).count();
            assert_eq!(defaults, 1, "{language}");
        }
    }
}
