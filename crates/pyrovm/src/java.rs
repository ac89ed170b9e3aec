//! What a Java source file declares at its top level, so a submission runs
//! whatever its public class is called.
//!
//! `javac` requires a public top-level type `Foo` to live in `Foo.java`
//! (JLS §7.6), and `java` needs the main class's binary name, package
//! included. Clients name files as they like (Judge0's send `Main.java`,
//! Piston's any name, e.g. `test.java` holding `public class HelloWorld`), so
//! the plan renames such a file after its public type and runs the entry
//! file's type, as the JDK's single-file source launcher (JEP 330) would,
//! while keeping the separate compile stage (and its `compile_error`).
//!
//! This is a scanner, not a parser: it skips comments, string, text-block and
//! character literals, tracks brace depth, and reads the `package` clause and
//! the type declarations at depth 0. Anything it cannot make sense of yields
//! no answer, and the file keeps its name (`javac` then reports the problem).

use std::collections::{HashMap, HashSet};

/// The top-level declarations of one compilation unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JavaUnit {
    /// `package a.b;`, if any.
    pub package: Option<String>,
    /// The `public` top-level type, if any (at most one is legal).
    pub public_type: Option<String>,
    /// The first top-level type declared (what the source launcher runs).
    pub first_type: Option<String>,
}

impl JavaUnit {
    /// The class `java` should run for this file: its public type, else its
    /// first type, qualified with the package (`a.b.Main`).
    pub fn main_class(&self) -> Option<String> {
        let name = self.public_type.as_ref().or(self.first_type.as_ref())?;
        Some(match &self.package {
            Some(p) => format!("{p}.{name}"),
            None => name.clone(),
        })
    }
}

/// New names for the `.java` files among `files` (path, content) whose
/// public type is not what their name says: `dir/test.java` declaring
/// `public class HelloWorld` becomes `dir/HelloWorld.java`. A file keeps its
/// name when the new one is taken by another file or another rename (`javac`
/// then reports the clash as usual).
pub fn renames<'a>(files: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> HashMap<String, String> {
    let files: Vec<(&str, &[u8])> = files.into_iter().collect();
    let taken: HashSet<&str> = files.iter().map(|(name, _)| *name).collect();
    let mut targets = HashSet::new();
    let mut out = HashMap::new();
    for (name, content) in files {
        let Some(stem_at) = name.strip_suffix(".java").map(|s| s.rfind('/').map_or(0, |i| i + 1)) else {
            continue;
        };
        let Some(public) = std::str::from_utf8(content).ok().and_then(|s| scan(s).public_type) else {
            continue;
        };
        let wanted = format!("{}{public}.java", &name[..stem_at]);
        if wanted != name && !taken.contains(wanted.as_str()) && targets.insert(wanted.clone()) {
            out.insert(name.to_string(), wanted);
        }
    }
    out
}

/// The class `java` runs for an entry file's content (see
/// [`JavaUnit::main_class`]); `None` if the scanner finds no type.
pub fn main_class(content: &[u8]) -> Option<String> {
    std::str::from_utf8(content).ok().and_then(|s| scan(s).main_class())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Punct(char),
}

/// Reads the top-level declarations of `source`.
pub fn scan(source: &str) -> JavaUnit {
    let tokens = top_level_tokens(source);
    let mut unit = JavaUnit::default();
    let mut public = false;
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Ident(w) if w == "package" && unit.package.is_none() && unit.first_type.is_none() => {
                let mut name = String::new();
                i += 1;
                while let Some(t) = tokens.get(i) {
                    match t {
                        Token::Ident(part) => name.push_str(part),
                        Token::Punct('.') => name.push('.'),
                        _ => break,
                    }
                    i += 1;
                }
                if !name.is_empty() {
                    unit.package = Some(name);
                }
                public = false;
                continue;
            }
            Token::Ident(w) if w == "public" => public = true,
            Token::Ident(w) if matches!(w.as_str(), "class" | "interface" | "enum" | "record") => {
                if let Some(Token::Ident(name)) = tokens.get(i + 1) {
                    // `@interface` declares an annotation type; the `@` was
                    // already seen, so the same rule applies.
                    if unit.first_type.is_none() {
                        unit.first_type = Some(name.clone());
                    }
                    if public && unit.public_type.is_none() {
                        unit.public_type = Some(name.clone());
                    }
                    public = false;
                    i += 2;
                    continue;
                }
            }
            Token::Punct(';') | Token::Punct('}') => public = false,
            _ => {}
        }
        i += 1;
    }
    unit
}

/// Identifiers and punctuation outside comments, literals and braces. A
/// closing brace that returns to depth 0 is kept (it ends a declaration).
fn top_level_tokens(source: &str) -> Vec<Token> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '/' if next == Some('/') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                i += 2;
                while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                    i += 1;
                }
                i += 2;
            }
            '"' if next == Some('"') && chars.get(i + 2) == Some(&'"') => {
                // A text block: up to the next unescaped `"""`.
                i += 3;
                while i < chars.len() && !(chars[i..].starts_with(&['"', '"', '"'])) {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 3;
            }
            '"' | '\'' => {
                i += 1;
                while i < chars.len() && chars[i] != c && chars[i] != '\n' {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' => {
                depth += 1;
                i += 1;
            }
            '}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    tokens.push(Token::Punct('}'));
                }
                i += 1;
            }
            c if depth == 0 && (c.is_alphabetic() || c == '_' || c == '$') => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$') {
                    i += 1;
                }
                tokens.push(Token::Ident(chars[start..i].iter().collect()));
            }
            c if depth == 0 && !c.is_whitespace() => {
                tokens.push(Token::Punct(c));
                i += 1;
            }
            _ => i += 1,
        }
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_public_class_whatever_the_file_is_called() {
        let u = scan(
            "public class HelloWorld {\n  public static void main(String[] a) { System.out.println(\"hi\"); }\n}\n",
        );
        assert_eq!(u.public_type.as_deref(), Some("HelloWorld"));
        assert_eq!(u.main_class().as_deref(), Some("HelloWorld"));
    }

    #[test]
    fn package_qualifies_the_main_class() {
        let u = scan("package app.core;\n\nimport java.util.*;\n\npublic final class Main { }\n");
        assert_eq!(u.package.as_deref(), Some("app.core"));
        assert_eq!(u.main_class().as_deref(), Some("app.core.Main"));
    }

    #[test]
    fn ignores_comments_literals_and_nested_types() {
        let src = r#"
            // public class Fake1 {}
            /* public class Fake2 {} */
            import static java.lang.Math.*;
            class Helper { public class Inner {} String s = "public class Fake3 {"; char c = '{'; }
            @SuppressWarnings("unchecked")
            public class Solution {
                String t = """
                    public class Fake4 { \""" }
                    """;
                public static void main(String[] args) {}
            }
            enum Color { RED }
        "#;
        let u = scan(src);
        assert_eq!(u.public_type.as_deref(), Some("Solution"));
        assert_eq!(u.first_type.as_deref(), Some("Helper"));
        assert_eq!(u.main_class().as_deref(), Some("Solution"));
    }

    #[test]
    fn files_are_renamed_after_their_public_type_unless_taken() {
        let files: Vec<(&str, &[u8])> = vec![
            ("test.java", b"public class HelloWorld {}"),
            ("app/x.java", b"package app; public class Util {}"),
            ("Main.java", b"public class Main {}"),
            ("a.java", b"public class Main {}"),
            ("b.java", b"class NotPublic {}"),
            ("notes.txt", b"public class Txt {}"),
        ];
        let r = renames(files);
        assert_eq!(r.get("test.java").map(String::as_str), Some("HelloWorld.java"));
        assert_eq!(r.get("app/x.java").map(String::as_str), Some("app/Util.java"));
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(main_class(b"package p; public class Q {}").as_deref(), Some("p.Q"));
        assert_eq!(main_class(b"\xff\xfe"), None);
    }

    #[test]
    fn records_interfaces_and_no_public_type() {
        assert_eq!(scan("public record Point(int x, int y) {}").public_type.as_deref(), Some("Point"));
        assert_eq!(scan("public interface Shape {}").public_type.as_deref(), Some("Shape"));
        let u = scan("class A { public static void main(String[] a) {} }\nclass B {}");
        assert_eq!(u.public_type, None);
        assert_eq!(u.main_class().as_deref(), Some("A"));
        assert_eq!(scan("import a.record.B;\nclass C {}").first_type.as_deref(), Some("C"));
        assert_eq!(scan("").main_class(), None);
        assert_eq!(scan("not java at all {{{").main_class(), None);
    }
}
