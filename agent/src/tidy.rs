//! The tidy test (after rust-analyzer's): reads the agent's source and fails when a boundary of
//! docs/ARCHITECTURE.md breaks. Who may import lapin (the session) and rusqlite (the store), where `unsafe`
//! may appear (`sys`), that imports between modules run one way (top to bottom, no cycles),
//! that nothing but `run` reaches into the session and the executor never into broker code, and that every
//! source file of the workspace opens with a `//!` note of what it owns. No broker, no build: plain text.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers, top first: a module may import its own layer or lower ones, never a higher one.
const LAYERS: &[&[&str]] = &[
    &["lib", "status"],
    &["session"],
    &["intake", "executor", "raw", "store", "data_dir", "http"],
    &[
        "task", "claim", "config", "limits", "meta", "retry", "stages", "sys", "testing",
    ],
];

/// (module, modules it must not import even though the layers allow it).
const FORBIDDEN: &[(&str, &[&str])] = &[
    ("executor", &["raw", "intake"]),
    ("store", &["executor", "intake", "raw", "data_dir"]),
    ("raw", &["store", "executor", "intake"]),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `agent/src` belongs to: `store/sql.rs` -> `store`, `lib.rs` -> `lib`.
fn module_of(path: &Path) -> String {
    let rel = path.strip_prefix(src()).expect("a file under src");
    let first = rel.components().next().expect("a relative path");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_owned()
}

/// The code of a file without its comment lines (doc links name modules without importing them).
fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter(|l| !l.trim_start().starts_with("//"))
}

/// Top-level modules named as `crate::<module>` in `text`'s code.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in code_lines(text) {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                found.insert(name);
            }
            rest = after;
        }
    }
    found
}

fn uses(text: &str, krate: &str) -> bool {
    code_lines(text)
        .any(|l| l.contains(&format!("{krate}::")) || l.contains(&format!("use {krate}")))
}

fn agent_sources() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "tidy.rs"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("readable source");
            (p, text)
        })
        .collect()
}

fn rank(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|layer| layer.contains(&module))
        .unwrap_or_else(|| {
            panic!("module {module} is in no layer of tidy.rs: add it where it belongs")
        })
}

#[test]
fn only_the_session_imports_lapin_and_only_the_store_rusqlite() {
    for (path, text) in agent_sources() {
        let module = module_of(&path);
        if module != "session" && module != "main" {
            assert!(
                !uses(&text, "lapin"),
                "{} imports lapin: only session/ may",
                path.display()
            );
        }
        if module != "store" {
            assert!(
                !uses(&text, "rusqlite"),
                "{} imports rusqlite: only store/ may",
                path.display()
            );
        }
    }
}

#[test]
fn unsafe_code_only_in_sys() {
    for (path, text) in agent_sources() {
        let allowed = path.ends_with("src/sys.rs");
        let has = code_lines(&text).any(|l| {
            l.contains("unsafe {") || l.contains("unsafe fn") || l.contains("allow(unsafe_code)")
        });
        assert!(
            allowed || !has,
            "{} uses unsafe: only sys.rs may",
            path.display()
        );
    }
}

#[test]
fn imports_run_one_way_without_cycles() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, text) in agent_sources() {
        let module = module_of(&path);
        if module == "main" {
            continue; // the binary uses the library from outside
        }
        for import in crate_imports(&text) {
            if import == module {
                continue;
            }
            assert!(
                rank(&import) >= rank(&module),
                "{} ({module}) imports crate::{import}, a higher layer: imports run top to bottom (see LAYERS)",
                path.display()
            );
            if import == "session" {
                assert_eq!(
                    module,
                    "lib",
                    "{}: only `run` (lib.rs) uses the session",
                    path.display()
                );
            }
            for (who, not) in FORBIDDEN {
                assert!(
                    !(module == *who && not.contains(&import.as_str())),
                    "{} ({module}) must not import crate::{import}",
                    path.display()
                );
            }
            graph.entry(module.clone()).or_default().insert(import);
        }
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle among the agent's modules: {}",
            cycle.join(" -> ")
        );
    }
}

/// A cycle in `graph`, as the list of modules along it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry((*a).into()).or_default().insert((*b).into());
        }
        g
    };
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])),
        None
    );
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(
        crate_imports("use crate::store::Store;\n// crate::session\nlet x = crate::limits::A;"),
        ["limits", "store"].into_iter().map(String::from).collect()
    );
}

#[test]
fn every_source_file_opens_with_a_note_of_what_it_owns() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in [
        "wire",
        "agent",
        "service-setup",
        "tests",
        "benches",
        "test-support",
    ] {
        let dir = root.join(dir);
        if dir.exists() {
            rust_files(&dir, &mut files);
        }
    }
    assert!(files.len() > 20, "found only {} source files", files.len());
    for path in files {
        let text = std::fs::read_to_string(&path).expect("readable source");
        assert!(
            text.starts_with("//!"),
            "{} does not open with a `//!` note of what it owns",
            path.display()
        );
    }
}
