//! Per-language test programs, shared by the suites that run every language
//! (`runtimes.rs` under QEMU, `firecracker.rs` through the Firecracker backend).

/// Per-language programs. `hello` prints `hello`, then `args: ` and its
/// arguments joined by commas, then copies stdin to stdout.
pub struct Lang {
    pub language: &'static str,
    pub entry: &'static str,
    pub hello: &'static str,
    /// Does not compile (compiled languages) or does not parse (interpreted).
    pub broken: &'static str,
    /// What the compiler or interpreter says about `broken` (a substring, lowercase).
    pub broken_says: &'static str,
    /// Writes `boom` to stderr and exits with status 3.
    pub fails: &'static str,
    /// A multi-file submission: (path, content); the first is the entry. Prints `multi 42`.
    pub multi: &'static [(&'static str, &'static str)],
}

pub const LANGS: &[Lang] = &[
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

pub fn lang(language: &str) -> &'static Lang {
    LANGS.iter().find(|l| l.language == language).unwrap_or_else(|| panic!("no test programs for {language}"))
}
