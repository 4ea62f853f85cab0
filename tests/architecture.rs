//! The architecture, checked (in the spirit of rust-analyzer's tidy tests):
//! the invariants README.md's "Architecture" section states fail the build
//! when broken.
//!
//! - Pure modules (the codecs, the wire contract, the mapper) import no
//!   runtime, no HTTP and no NATS client, and never await.
//! - Only `src/bus/` imports `async_nats`.
//! - Only `src/opencode/` talks HTTP (`reqwest`); besides it, only the
//!   metrics listener (`src/ops/http.rs`) opens a socket of its own.
//! - No source file under `src/` is longer than [`MAX_FILE_LINES`], and no
//!   function outside a test module is longer than [`MAX_FN_LINES`].
//! - README's code map names every module of `src/`.
//! - Only the hidden `sandbox-exec` subcommand confines a process; the
//!   daemon never confines itself.

use std::path::{Path, PathBuf};

/// The longest a source file may grow (tests included): past it, split it
/// by role.
const MAX_FILE_LINES: usize = 1000;
/// The longest a function may be (outside `#[cfg(test)]` modules).
const MAX_FN_LINES: usize = 80;

/// Modules that do no I/O: tested with plain data.
const PURE: &[&str] = &[
    "src/protocol/",
    "src/mapper.rs",
    "src/mapper/",
    "src/jsonscan.rs",
    "src/opencode/sse.rs",
    "src/opencode/events.rs",
    "src/opencode/ids.rs",
    "src/opencode/version.rs",
    "src/cluster/home.rs",
    "src/sandbox/policy.rs",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `src/`, as (path relative to the root, text).
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root().join("src"), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(root())
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            (rel, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// The code, without comments and string contents (a doc comment may name
/// `async_nats`).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .map(|l| {
            let mut out = String::new();
            let mut in_str = false;
            for c in l.chars() {
                if c == '"' {
                    in_str = !in_str;
                    out.push(c);
                } else if !in_str {
                    out.push(c);
                }
            }
            out
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn pure_modules_do_no_io() {
    let mut bad = Vec::new();
    for (path, text) in sources() {
        if !PURE.iter().any(|p| path.starts_with(p)) || path.ends_with("/tests.rs") {
            continue;
        }
        // Their unit tests may read fixtures.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        let code = code(text);
        for needle in [
            "tokio",
            "reqwest",
            "async_nats",
            ".await",
            "async fn",
            "std::fs",
            "std::net",
        ] {
            if code.contains(needle) {
                bad.push(format!("{path} uses `{needle}`"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "pure modules doing I/O:\n{}",
        bad.join("\n")
    );
}

#[test]
fn only_bus_imports_async_nats() {
    let bad: Vec<String> = sources()
        .into_iter()
        .filter(|(path, text)| !path.starts_with("src/bus/") && code(text).contains("async_nats::"))
        .map(|(path, _)| path)
        .collect();
    assert!(bad.is_empty(), "async_nats outside src/bus/: {bad:?}");
}

#[test]
fn only_opencode_talks_http_and_only_it_and_the_metrics_listener_open_sockets() {
    let mut bad = Vec::new();
    for (path, text) in sources() {
        let code = code(&text);
        if !path.starts_with("src/opencode/") && code.contains("reqwest") {
            bad.push(format!("{path} uses reqwest"));
        }
        if path != "src/ops/http.rs"
            && !path.starts_with("src/opencode/")
            && (code.contains("TcpListener")
                || code.contains("TcpStream")
                || code.contains("UdpSocket"))
        {
            bad.push(format!("{path} opens a socket"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn no_source_file_is_too_long() {
    let bad: Vec<String> = sources()
        .into_iter()
        .map(|(path, text)| (path, text.lines().count()))
        .filter(|(_, n)| *n > MAX_FILE_LINES)
        .map(|(path, n)| format!("{path}: {n} lines (at most {MAX_FILE_LINES})"))
        .collect();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// (path, function, lines) of every function outside test modules.
fn functions() -> Vec<(String, String, usize)> {
    let mut out = Vec::new();
    for (path, text) in sources() {
        if path.ends_with("/tests.rs") {
            // A test module of its own (`#[cfg(test)] mod tests;`).
            continue;
        }
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let l = lines[i];
            if l.trim_start().starts_with("#[cfg(test)]") {
                // The test module runs to the end of the file here.
                break;
            }
            let t = l.trim_start();
            let is_fn = [
                "fn ",
                "pub fn ",
                "async fn ",
                "pub async fn ",
                "pub(crate) fn ",
                "pub(super) fn ",
                "pub(crate) async fn ",
                "pub(super) async fn ",
            ]
            .iter()
            .any(|p| t.starts_with(p));
            if !is_fn {
                i += 1;
                continue;
            }
            let indent = l.len() - t.len();
            let name: String = t
                .split("fn ")
                .nth(1)
                .unwrap_or_default()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            // A declaration without a body (a trait's) ends with `;`.
            let mut j = i;
            while j < lines.len() && !lines[j].contains('{') && !lines[j].trim_end().ends_with(';')
            {
                j += 1;
            }
            if j >= lines.len() || lines[j].trim_end().ends_with(';') {
                i = j + 1;
                continue;
            }
            let closing = format!("{}}}", " ".repeat(indent));
            let mut k = j;
            if !lines[j].trim_end().ends_with('}')
                || j == i && lines[j].matches('{').count() != lines[j].matches('}').count()
            {
                k = j + 1;
                while k < lines.len() && !lines[k].starts_with(&closing) {
                    k += 1;
                }
            }
            out.push((path.clone(), name, k - i + 1));
            i += 1;
        }
    }
    out
}

#[test]
fn no_function_is_too_long() {
    let bad: Vec<String> = functions()
        .into_iter()
        .filter(|(_, _, n)| *n > MAX_FN_LINES)
        .map(|(path, name, n)| format!("{path}: fn {name} is {n} lines (at most {MAX_FN_LINES})"))
        .collect();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_scanner_measures_functions() {
    // The checks above are only as good as this count.
    let fns = functions();
    let run = fns
        .iter()
        .find(|(p, n, _)| p == "src/turn/driver.rs" && n == "run_turn")
        .expect("run_turn is found");
    assert!(run.2 > 20 && run.2 <= MAX_FN_LINES, "{run:?}");
    assert!(fns.len() > 300, "{} functions found", fns.len());
}

#[test]
fn the_code_map_names_every_module() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let map = readme
        .split("### Code map")
        .nth(1)
        .expect("README has a code map")
        .split("\n### ")
        .next()
        .unwrap();
    let mut missing = Vec::new();
    for (path, _) in sources() {
        let (dir, file) = path.rsplit_once('/').unwrap();
        let module = file.trim_end_matches(".rs");
        // A file is named by its path, or (inside a folder's row) by its name.
        let named = map.contains(&path)
            || (dir != "src"
                && map.contains(&format!("{dir}/"))
                && map.contains(&format!("`{module}")))
            || (module == "mod" && map.contains(&format!("{dir}/")));
        if !named {
            missing.push(path);
        }
    }
    assert!(
        missing.is_empty(),
        "README's code map does not name: {missing:?}"
    );
}

/// The daemon never confines itself: only the hidden `sandbox-exec`
/// subcommand (dispatched first in `main`, before any runtime or thread)
/// applies a sandbox, and only `src/sandbox/apply.rs` builds a Landlock
/// ruleset that restricts.
#[test]
fn only_the_sandbox_helper_confines_a_process() {
    let mut bad = Vec::new();
    for (path, text) in sources() {
        let code = code(&text).replace("fn sandbox_exec(", "fn _(");
        if path != "src/main.rs" && code.contains("sandbox_exec(") {
            bad.push(format!("{path} calls sandbox_exec"));
        }
        if path != "src/sandbox/apply.rs"
            && (code.contains("restrict_self") || code.contains("confine("))
        {
            bad.push(format!("{path} confines the process it runs in"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
