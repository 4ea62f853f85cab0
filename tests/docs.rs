//! The docs render as written: every Markdown file of the repository has
//! balanced code fences (CommonMark: a fence with text after it can only
//! open a block, so a closing fence followed by prose swallows the rest of
//! the file), and the "try it" command is the same in the README, in
//! `deploy/dev-up.sh` and in the daemon's log.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fence line: at most 3 spaces of indent, then 3 or more backticks or
/// tildes. Returns (indent, the fence char, its length, the text after).
fn fence(line: &str) -> Option<(usize, char, usize, &str)> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = &line[indent..];
    let c = rest.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let len = rest.len() - rest.trim_start_matches(c).len();
    (len >= 3).then(|| (indent, c, len, rest[len..].trim()))
}

/// The fence problems of one Markdown text: a closing fence with text
/// after it, and a block still open at the end (1-based line numbers).
fn fence_problems(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut open: Option<(usize, char, usize)> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let Some((_, c, len, after)) = fence(line) else {
            continue;
        };
        match open {
            None => {
                // An info string may not contain a backtick on a ``` fence.
                if c == '`' && after.contains('`') {
                    problems.push(format!(
                        "line {n}: a fence whose info string has a backtick (text after a closing fence?): {line:?}"
                    ));
                }
                open = Some((n, c, len));
            }
            Some((_, oc, olen)) if c == oc && len >= olen => {
                if after.is_empty() {
                    open = None;
                } else {
                    // CommonMark reads it as code, and the block runs on;
                    // the author meant a close: take it as one so that one
                    // mistake is reported once.
                    problems.push(format!(
                        "line {n}: text after a closing fence (it does not close the block): {line:?}"
                    ));
                    open = None;
                }
            }
            Some(_) => {}
        }
    }
    if let Some((n, _, _)) = open {
        problems.push(format!(
            "line {n}: a code block opened here is never closed"
        ));
    }
    problems
}

/// Every `.md` file of the repository (not `target/`, `.tools/`, `.git`).
fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            if p.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "node_modules" {
                    walk(&p, out);
                }
            } else if name.ends_with(".md") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root(), &mut out);
    out.sort();
    out
}

#[test]
fn every_markdown_file_has_balanced_fences() {
    let files = markdown_files();
    for must in ["README.md", "docs/PROTOCOL.md", "examples/README.md"] {
        assert!(files.contains(&root().join(must)), "{must} not found");
    }
    let mut problems = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for p in fence_problems(&text) {
            problems.push(format!(
                "{}: {p}",
                f.strip_prefix(root()).unwrap().display()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_catches_an_unbalanced_fence() {
    let fixture = root().join("tests/fixtures/docs/unbalanced-fence.md.txt");
    let problems = fence_problems(&std::fs::read_to_string(fixture).unwrap());
    assert_eq!(
        problems,
        vec![
            "line 6: text after a closing fence (it does not close the block): \"``` The text after the closing fence keeps the block open,\"".to_string(),
            "line 9: a code block opened here is never closed".to_string(),
        ]
    );
    // And the well-formed shapes pass: ~~~ fences, longer closing fences,
    // an indented fence, a ``` inside a ~~~ block.
    let good = "~~~\n```\n~~~\n\n````md\n```\n`````\n\n  ```sh\n  ls\n  ```\n";
    assert_eq!(fence_problems(good), Vec::<String>::new());
    assert_eq!(
        fence_problems("```\nopen"),
        vec!["line 1: a code block opened here is never closed"]
    );
}

#[test]
fn one_try_it_command_everywhere() {
    let args = opencode_nats_bridge::app::TRY_IT_ARGS;
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        readme.contains(&format!(
            "$ target/release/opencode-nats-bridge prompt {args}\n"
        )),
        "README's quick start does not show `prompt {args}`"
    );
    let dev_up = std::fs::read_to_string(root().join("deploy/dev-up.sh")).unwrap();
    assert!(
        dev_up.contains(&format!("$bin prompt$server {args}\n")),
        "dev-up.sh's banner does not show `prompt {args}`"
    );
    // The daemon's log (app::try_it): the binary by its path, --server
    // only off the default URL.
    let line = opencode_nats_bridge::app::try_it("nats://127.0.0.1:4222");
    assert!(line.ends_with(&format!(" prompt {args}")), "{line}");
    assert!(!line.contains("--server"), "{line}");
    let line = opencode_nats_bridge::app::try_it("nats://127.0.0.1:4999");
    assert!(
        line.contains(&format!(" prompt --server nats://127.0.0.1:4999 {args}")),
        "{line}"
    );
}
