//! Imports go one way: down the layers. Each crate's modules are listed here
//! bottom first, as ARCHITECTURE.md states them; a module may use only the
//! modules listed before it. A total order admits no cycle, so this test
//! failing means a cycle or an upward import (or a new module to place).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// stall-lab's top-level modules, bottom first.
const STALL_LAB: &[&str] = &[
    "error",
    "net",
    "load",
    "cpu",
    "arrival",
    "shutdown",
    "telemetry",
    "config",
    "runtime",
    "measure",
    "state",
    "budget",
    "params",
    "scenario",
    "report",
    "request",
    "scenarios",
    "app",
    "admin",
    "server",
    "experiment",
    "cli",
];

/// stall-watch's modules, bottom first.
const STALL_WATCH: &[&str] = &[
    "place", "culprit", "config", "cpu", "stack", "monitor", "hooks", "span", "namer", "watcher",
    "lag", "watch", "layer", "admin",
];

#[test]
fn stall_lab_imports_go_down_the_layers() {
    check(Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), STALL_LAB);
}

#[test]
fn stall_watch_imports_go_down_the_layers() {
    check(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/stall-watch/src"),
        STALL_WATCH,
    );
}

fn check(src: PathBuf, order: &[&str]) {
    let modules = top_level_modules(&src);
    let listed: BTreeSet<String> = order.iter().map(|m| (*m).to_owned()).collect();
    assert_eq!(
        modules,
        listed,
        "modules of {} and the layer list differ: place every module in tests/layers.rs and ARCHITECTURE.md",
        src.display()
    );
    let mut violations = Vec::new();
    for (rank, module) in order.iter().enumerate() {
        for used in uses_of(&src, module) {
            let Some(used_rank) = order.iter().position(|m| *m == used) else {
                continue; // an item of the crate root, not a module
            };
            if used_rank >= rank && used != *module {
                violations.push(format!("{module} uses {used}, which is not below it"));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// `foo.rs` and `foo/mod.rs` below `src`, except the crate roots and bins.
fn top_level_modules(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .expect("src dir")
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let path = entry.path();
            let name = path.file_stem()?.to_str()?.to_owned();
            let is_module = if path.is_dir() {
                path.join("mod.rs").exists()
            } else {
                path.extension().is_some_and(|e| e == "rs")
            };
            (is_module && name != "lib" && name != "main").then_some(name)
        })
        .collect()
}

/// The crate modules `module`'s code names as `crate::x` or
/// `use crate::{x, …}` (comments skipped).
fn uses_of(src: &Path, module: &str) -> BTreeSet<String> {
    let mut files = Vec::new();
    let file = src.join(format!("{module}.rs"));
    if file.exists() {
        files.push(file);
    }
    collect_rs(&src.join(module), &mut files);
    let mut used = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("source file");
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                used.extend(group.split(',').filter_map(|p| ident(p.trim())));
            } else if let Some(name) = ident(rest) {
                used.insert(name);
            }
        }
    }
    used
}

fn ident(s: &str) -> Option<String> {
    let name: String = s
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

fn collect_rs(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            collect_rs(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}
