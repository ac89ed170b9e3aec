//! Every available runtime of the catalog, in real VMs: a hello world that
//! also prints its arguments and echoes its stdin, a compile error (a syntax
//! error for interpreted languages), and a runtime error with its exit code.
//! One multi-file submission per language. A runtime added to the catalog
//! without a program here fails `every_available_runtime_has_programs`.

mod common;

use common::{lossy, Env};
use serde_json::Value;
use tvm_config::Catalog;

/// Per-language programs. `hello` prints `hello`, then `args: ` and its
/// arguments joined by commas, then copies stdin to stdout.
struct Lang {
    language: &'static str,
    entry: &'static str,
    hello: &'static str,
    /// Does not compile (compiled languages) or does not parse (interpreted).
    broken: &'static str,
    /// What the compiler or interpreter says about `broken` (a substring, lowercase).
    broken_says: &'static str,
    /// Writes `boom` to stderr and exits with status 3.
    fails: &'static str,
    /// A multi-file submission: (path, content); the first is the entry. Prints `multi 42`.
    multi: &'static [(&'static str, &'static str)],
}

const LANGS: &[Lang] = &[
    Lang {
        language: "python",
        entry: "main.py",
        hello: "import sys\nprint('hello')\nprint('args: ' + ','.join(sys.argv[1:]))\nsys.stdout.write(sys.stdin.read())\n",
        broken: "print('unclosed'\n",
        broken_says: "syntaxerror",
        fails: "import sys\nsys.stderr.write('boom\\n')\nsys.exit(3)\n",
        multi: &[
            ("main.py", "from pkg.util import answer\nprint('multi', answer())\n"),
            ("pkg/__init__.py", ""),
            ("pkg/util.py", "def answer():\n    return 42\n"),
        ],
    },
    Lang {
        language: "javascript",
        entry: "main.js",
        hello: "const fs = require('fs');\nconsole.log('hello');\nconsole.log('args: ' + process.argv.slice(2).join(','));\nprocess.stdout.write(fs.readFileSync(0, 'utf8'));\n",
        broken: "console.log('unclosed';\n",
        broken_says: "syntaxerror",
        fails: "process.stderr.write('boom\\n');\nprocess.exit(3);\n",
        multi: &[
            ("main.js", "const { answer } = require('./lib/answer');\nconsole.log('multi', answer());\n"),
            ("lib/answer.js", "exports.answer = () => 42;\n"),
        ],
    },
    Lang {
        language: "ruby",
        entry: "main.rb",
        hello: "puts 'hello'\nputs 'args: ' + ARGV.join(',')\nprint STDIN.read\n",
        broken: "puts(\n",
        broken_says: "syntax error",
        fails: "STDERR.puts 'boom'\nexit 3\n",
        multi: &[
            ("main.rb", "require_relative 'lib/answer'\nputs \"multi #{Answer.value}\"\n"),
            ("lib/answer.rb", "module Answer\n  def self.value\n    42\n  end\nend\n"),
        ],
    },
    Lang {
        language: "go",
        entry: "main.go",
        hello: "package main\n\nimport (\n\t\"fmt\"\n\t\"io\"\n\t\"os\"\n\t\"strings\"\n)\n\nfunc main() {\n\tfmt.Println(\"hello\")\n\tfmt.Println(\"args: \" + strings.Join(os.Args[1:], \",\"))\n\tb, _ := io.ReadAll(os.Stdin)\n\tos.Stdout.Write(b)\n}\n",
        broken: "package main\n\nfunc main() {\n\tx := 1\n}\n",
        broken_says: "not used",
        fails: "package main\n\nimport (\n\t\"fmt\"\n\t\"os\"\n)\n\nfunc main() {\n\tfmt.Fprintln(os.Stderr, \"boom\")\n\tos.Exit(3)\n}\n",
        multi: &[
            ("main.go", "package main\n\nimport (\n\t\"fmt\"\n\n\t\"example.com/calc/answer\"\n)\n\nfunc main() { fmt.Println(\"multi\", answer.Value()) }\n"),
            ("go.mod", "module example.com/calc\n\ngo 1.19\n"),
            ("answer/answer.go", "package answer\n\nfunc Value() int { return helper() }\n"),
            ("answer/helper.go", "package answer\n\nfunc helper() int { return 42 }\n"),
        ],
    },
    Lang {
        language: "rust",
        entry: "main.rs",
        hello: "use std::io::Read;\n\nfn main() {\n    println!(\"hello\");\n    let args: Vec<String> = std::env::args().skip(1).collect();\n    println!(\"args: {}\", args.join(\",\"));\n    let mut s = String::new();\n    std::io::stdin().read_to_string(&mut s).unwrap();\n    print!(\"{}\", s);\n}\n",
        broken: "fn main() {\n    let x: i32 = \"text\";\n}\n",
        broken_says: "mismatched types",
        fails: "fn main() {\n    eprintln!(\"boom\");\n    std::process::exit(3);\n}\n",
        multi: &[
            ("main.rs", "mod answer;\n\nfn main() {\n    println!(\"multi {}\", answer::value());\n}\n"),
            ("answer.rs", "mod inner;\n\npub fn value() -> i32 {\n    inner::half() * 2\n}\n"),
            ("answer/inner.rs", "pub fn half() -> i32 {\n    21\n}\n"),
        ],
    },
    Lang {
        language: "java",
        entry: "Main.java",
        hello: "import java.io.IOException;\n\npublic class Main {\n    public static void main(String[] args) throws IOException {\n        System.out.println(\"hello\");\n        System.out.println(\"args: \" + String.join(\",\", args));\n        System.out.write(System.in.readAllBytes());\n        System.out.flush();\n    }\n}\n",
        broken: "public class Main {\n    public static void main(String[] args) {\n        int x = \"text\";\n    }\n}\n",
        broken_says: "incompatible types",
        fails: "public class Main {\n    public static void main(String[] args) {\n        System.err.println(\"boom\");\n        System.exit(3);\n    }\n}\n",
        multi: &[
            ("Main.java", "public class Main {\n    public static void main(String[] args) {\n        System.out.println(\"multi \" + Answer.value());\n    }\n}\n"),
            ("Answer.java", "class Answer {\n    static int value() { return Helper.HALF * 2; }\n}\n"),
            ("Helper.java", "class Helper {\n    static final int HALF = 21;\n}\n"),
        ],
    },
    Lang {
        language: "c",
        entry: "main.c",
        hello: "#include <stdio.h>\n\nint main(int argc, char **argv) {\n    puts(\"hello\");\n    printf(\"args: \");\n    for (int i = 1; i < argc; i++) printf(\"%s%s\", i > 1 ? \",\" : \"\", argv[i]);\n    printf(\"\\n\");\n    int c;\n    while ((c = getchar()) != EOF) putchar(c);\n    return 0;\n}\n",
        broken: "int main(void) {\n    return undefined_name;\n}\n",
        broken_says: "undefined_name",
        fails: "#include <stdio.h>\n\nint main(void) {\n    fputs(\"boom\\n\", stderr);\n    return 3;\n}\n",
        multi: &[
            ("main.c", "#include <stdio.h>\n#include \"answer.h\"\n\nint main(void) {\n    printf(\"multi %d\\n\", answer());\n    return 0;\n}\n"),
            ("answer.h", "int answer(void);\n"),
            ("answer.c", "#include \"answer.h\"\n\nint answer(void) { return 42; }\n"),
        ],
    },
    Lang {
        language: "cpp",
        entry: "main.cpp",
        hello: "#include <iostream>\n\nint main(int argc, char **argv) {\n    std::cout << \"hello\\nargs: \";\n    for (int i = 1; i < argc; i++) std::cout << (i > 1 ? \",\" : \"\") << argv[i];\n    std::cout << \"\\n\";\n    char c;\n    while (std::cin.get(c)) std::cout << c;\n}\n",
        broken: "int main() {\n    int x = undefined_name;\n}\n",
        broken_says: "undefined_name",
        fails: "#include <cstdio>\n\nint main() {\n    std::fputs(\"boom\\n\", stderr);\n    return 3;\n}\n",
        multi: &[
            ("main.cpp", "#include <cstdio>\n#include \"answer.hpp\"\n\nint main() {\n    std::printf(\"multi %d\\n\", answer());\n}\n"),
            ("answer.hpp", "int answer();\n"),
            ("answer.cpp", "#include \"answer.hpp\"\n\nint answer() { return 42; }\n"),
        ],
    },
];

fn lang(language: &str) -> &'static Lang {
    LANGS.iter().find(|l| l.language == language).unwrap_or_else(|| panic!("no test programs for {language}"))
}

/// `tvm run --json --runtime ID` on files written into a fresh directory.
fn run(env: &Env, runtime: &str, files: &[(&str, &str)], stdin: Option<&str>, args: &[&str]) -> Value {
    let dir = tempfile::tempdir_in(env.work.path()).unwrap();
    let mut paths = Vec::new();
    for (name, content) in files {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        paths.push(p);
    }
    let mut cmd = env.tvm();
    cmd.args(["run", "--json", "--runtime", runtime]);
    if let Some(input) = stdin {
        let p = dir.path().join("stdin.txt");
        std::fs::write(&p, input).unwrap();
        cmd.arg("--stdin").arg(p);
    }
    let out = cmd.args(&paths).arg("--").args(args).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{runtime}: not JSON ({e}): stdout={} stderr={}", lossy(&out.stdout), lossy(&out.stderr))
    });
    env.assert_clean();
    v
}

fn text(v: &Value, stage: &str, stream: &str) -> String {
    v[stage][stream].as_str().unwrap_or_default().to_string()
}

/// The four programs of `language` against every available version of it.
fn check_language(language: &str) {
    let catalog = Catalog::builtin();
    let l = lang(language);
    let versions: Vec<_> =
        catalog.runtimes().iter().filter(|r| r.language == language && r.unavailable.is_none()).collect();
    assert!(!versions.is_empty(), "no available {language} runtime");
    let env = Env::new();
    for r in &versions {
        let id = r.id.as_str();
        let compiled = r.compile.is_some();

        let v = run(&env, id, &[(l.entry, l.hello)], Some("one\ntwo\n"), &["x", "y z"]);
        assert_eq!(v["verdict"], "ok", "{id} hello: {v}");
        assert_eq!(v["runtime"], id);
        assert_eq!(text(&v, "run", "stdout"), "hello\nargs: x,y z\none\ntwo\n", "{id} hello: {v}");

        let v = run(&env, id, &[(l.entry, l.broken)], None, &[]);
        let (verdict, stage) = if compiled { ("compile_error", "compile") } else { ("runtime_error", "run") };
        assert_eq!(v["verdict"], verdict, "{id} broken: {v}");
        let said = format!("{}{}", text(&v, stage, "stderr"), text(&v, stage, "stdout")).to_lowercase();
        assert!(said.contains(l.broken_says), "{id}: the {stage} output names the problem: {said}");
        if compiled {
            assert!(v["run"].is_null(), "{id}: nothing runs after a compile error: {v}");
        }

        let v = run(&env, id, &[(l.entry, l.fails)], None, &[]);
        assert_eq!(v["verdict"], "runtime_error", "{id} fails: {v}");
        assert_eq!(v["run"]["exit_code"], 3, "{id} fails: {v}");
        assert_eq!(text(&v, "run", "stderr"), "boom\n", "{id} fails: {v}");
    }
    // Multi-file: once, with the language's default version.
    let default = catalog.for_extension(l.entry.rsplit('.').next().unwrap()).unwrap();
    let v = run(&env, &default.id, l.multi, None, &[]);
    assert_eq!(v["verdict"], "ok", "{} multi-file: {v}", default.id);
    assert_eq!(text(&v, "run", "stdout"), "multi 42\n", "{} multi-file: {v}", default.id);
}

#[test]
fn every_available_runtime_has_programs() {
    for r in Catalog::builtin().runtimes().iter().filter(|r| r.unavailable.is_none()) {
        let l = lang(&r.language);
        assert!(r.extensions.iter().any(|e| l.entry.ends_with(&format!(".{e}"))), "{}: entry {}", r.id, l.entry);
    }
}

#[test]
fn python() {
    check_language("python");
}

#[test]
fn javascript() {
    check_language("javascript");
}

#[test]
fn ruby() {
    check_language("ruby");
}

#[test]
fn go() {
    check_language("go");
}

#[test]
fn rust() {
    check_language("rust");
}

#[test]
fn java() {
    check_language("java");
}

#[test]
fn c() {
    check_language("c");
}

#[test]
fn cpp() {
    check_language("cpp");
}
