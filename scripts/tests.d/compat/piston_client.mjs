// npm piston-client (unmodified) against TVM: list the runtimes, then run a
// program in every language Piston names, through the client's own execute().
// Usage: node piston_client.mjs http://127.0.0.1:PORT
import { piston } from "piston-client";

const server = process.argv[2];
const client = piston({ server });

const programs = {
  python: 'import sys\nprint("hello from python", sys.argv[1:])',
  javascript: 'console.log("hello from javascript", process.argv.slice(2))',
  ruby: 'puts "hello from ruby #{ARGV}"',
  c: '#include <stdio.h>\nint main(int c, char **v) { printf("hello from c %s\\n", v[1]); return 0; }',
  "c++": '#include <iostream>\nint main(int c, char **v) { std::cout << "hello from c++ " << v[1] << "\\n"; }',
  java: 'public class Main { public static void main(String[] a) { System.out.println("hello from java " + a[0]); } }',
  go: 'package main\nimport ("fmt"; "os")\nfunc main() { fmt.Println("hello from go", os.Args[1]) }',
  rust: 'fn main() { println!("hello from rust {}", std::env::args().nth(1).unwrap()); }',
};

let passed = 0;
let failed = 0;
const check = (ok, what, detail) => {
  if (ok) {
    passed += 1;
    console.log(`ok   ${what}`);
  } else {
    failed += 1;
    console.log(`FAIL ${what}: ${JSON.stringify(detail)}`);
  }
};

const runtimes = await client.runtimes();
check(Array.isArray(runtimes) && runtimes.length > 0, "runtimes listed", runtimes);
const languages = new Set((Array.isArray(runtimes) ? runtimes : []).map((r) => r.language));
for (const [language, code] of Object.entries(programs)) {
  if (!languages.has(language)) {
    check(false, `${language} listed`, [...languages]);
    continue;
  }
  // The client's defaults (3 s run, 10 s compile) are Piston's; emulated guests need more for the JVM and Go.
  const result = await client.execute(language, code, { runTimeout: 30000, compileTimeout: 120000 });
  const out = result && result.run ? result.run.stdout : undefined;
  const ok = typeof out === "string" && out.startsWith(`hello from ${language}`) && out.includes("1") && result.run.code === 0;
  check(ok, `${language} ${result && result.version} runs`, result);
}
console.log(`piston-client: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
