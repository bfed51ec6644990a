//! The commands the README and the guide under docs/ show: every `flow-matching SUB` (or
//! `cargo run --release -- SUB`) they write names a subcommand that exists, and every `--flag`
//! on that line is one of the subcommand's flags in its `--help`. A renamed flag or a command
//! that no longer exists fails here instead of on a reader's machine.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The Markdown pages a user reads: the README, the CHANGELOG and every page under docs/.
fn pages() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut out = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    out.extend(docs);
    out
}

/// Where a command starts in a line: after `flow-matching ` or `cargo run ... -- `, returning
/// the rest of the line.
fn command_tail(text: &str) -> Vec<&str> {
    let mut tails = Vec::new();
    let mut at = 0;
    while let Some(i) = text[at..].find("flow-matching ") {
        let start = at + i;
        // `flow-matching-cli` and paths such as `target/release/flow-matching` are fine; a word
        // that merely ends in "flow-matching" (e.g. `use flow-matching`) is not a command here.
        let before = text[..start].chars().last();
        if before.is_none_or(|c| c == ' ' || c == '`' || c == '/' || c == '(' || c == '$') {
            tails.push(&text[start + "flow-matching ".len()..]);
        }
        at = start + 1;
    }
    let mut at = 0;
    while let Some(i) = text[at..].find("cargo run ") {
        let start = at + i;
        let rest = &text[start..];
        let end = rest.find('`').unwrap_or(rest.len());
        let rest = &rest[..end];
        if !rest.contains("--example") && !rest.contains("--bin") {
            if let Some(j) = rest.find(" -- ") {
                tails.push(&rest[j + 4..]);
            }
        }
        at = start + 1;
    }
    tails
}

/// The subcommand and the `--flags` of one command, up to the end of its inline code span.
fn parse(tail: &str) -> Option<(String, Vec<String>)> {
    let tail = &tail[..tail.find('`').unwrap_or(tail.len())];
    let tail = &tail[..tail.find(" # ").unwrap_or(tail.len())];
    let mut words = tail.split_whitespace();
    let sub = words.next()?;
    if !sub.chars().all(|c| c.is_ascii_lowercase() || c == '-') || sub.starts_with('-') {
        return None;
    }
    let flags = tail
        .split(|c: char| c.is_whitespace() || "[]|()=,\"'".contains(c))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(['.', ':', ';']).to_string())
        .filter(|w| {
            w[2..]
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
        .collect();
    Some((sub.to_string(), flags))
}

/// The lines of every code block plus every inline code span of a page, with their line
/// numbers; a code-block line that starts with spaces continues the command above it.
fn snippets(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut in_block = false;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            let continues = line.starts_with("  ") && !line.trim().is_empty();
            match out.last_mut() {
                Some((_, prev)) if continues && prev.contains("flow-matching ") => {
                    prev.push(' ');
                    prev.push_str(line.trim());
                }
                _ => out.push((n + 1, line.to_string())),
            }
        } else {
            for (i, span) in line.split('`').enumerate() {
                if i % 2 == 1 {
                    out.push((n + 1, span.to_string()));
                }
            }
        }
    }
    out
}

#[test]
fn documented_commands_name_real_subcommands_and_flags() {
    let mut help: HashMap<String, Option<String>> = HashMap::new();
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let name = page.file_name().unwrap().to_string_lossy().into_owned();
        for (line, snippet) in snippets(&text) {
            for tail in command_tail(&snippet) {
                let Some((sub, flags)) = parse(tail) else {
                    continue;
                };
                let h = help.entry(sub.clone()).or_insert_with(|| {
                    let (ok, out, _) = support::run_text(&[&sub, "--help"]);
                    ok.then_some(out)
                });
                let Some(h) = h else {
                    problems.push(format!("{name}:{line}: no subcommand {sub:?}: {snippet}"));
                    continue;
                };
                for f in flags {
                    if !h
                        .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[')
                        .any(|w| w == f)
                    {
                        problems.push(format!("{name}:{line}: {sub} has no flag {f}: {snippet}"));
                    }
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 50, "only {checked} documented commands found");
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
