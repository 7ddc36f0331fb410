//! The proxy's modules import only downward: no module reaches, through any chain of
//! `crate::` paths, back to itself. A circle makes two files one unit that cannot be read,
//! tested or changed apart, which is what this crate grew out of (the same check as
//! weft-control's `tests/layers.rs`).
//!
//! `cargo test -p weft-proxy --test layers -- --nocapture` prints the modules floor by floor
//! (each one stands above everything it uses) with what each imports, on standard error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every module of `src/` and the modules each one names by a `crate::` path outside its tests
/// and comments.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("src/ is readable") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_stem().expect("file name").to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).expect("source is readable");
            modules.insert(name, text);
        }
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(name, text)| (name.clone(), named_modules(text, &names, name)))
        .collect()
}

/// The modules `text` names as `crate::module`, before its `#[cfg(test)]` section.
fn named_modules(text: &str, names: &BTreeSet<String>, own: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let mut out = BTreeSet::new();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        for (at, _) in line.match_indices("crate::") {
            let rest = &line[at + "crate::".len()..];
            let module: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            // `use crate::{a, b}` names several.
            if module.is_empty() && rest.starts_with('{') {
                let inside = rest[1..].split('}').next().unwrap_or_default();
                for part in inside.split(',') {
                    let m: String = part.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if names.contains(&m) && m != own {
                        out.insert(m);
                    }
                }
            } else if names.contains(&module) && module != own {
                out.insert(module);
            } else if module.starts_with(char::is_uppercase) && own != "lib" {
                // `crate::Item`: something the crate root defines or re-exports.
                out.insert("lib".to_string());
            }
        }
        // The crate root names its modules without `crate::`.
        if own == "lib" {
            let words = line.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'));
            for word in words {
                if let Some((m, _)) = word.split_once("::")
                    && names.contains(m)
                {
                    out.insert(m.to_string());
                }
            }
        }
    }
    out
}

/// Every circle, as the modules on it in order, each found once.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut found = BTreeSet::new();
    for start in graph.keys() {
        let mut path = vec![start.clone()];
        walk(graph, start, &mut path, &mut found);
    }
    found.into_iter().collect()
}

fn walk(graph: &BTreeMap<String, BTreeSet<String>>, start: &str, path: &mut Vec<String>, found: &mut BTreeSet<Vec<String>>) {
    let last = path.last().expect("non-empty").clone();
    for next in graph.get(&last).into_iter().flatten() {
        if next == start {
            // Rotated to begin at its smallest name, so each circle is reported once.
            let min = path.iter().enumerate().min_by_key(|(_, m)| *m).map(|(i, _)| i).unwrap_or(0);
            let mut circle = path.clone();
            circle.rotate_left(min);
            found.insert(circle);
        } else if !path.contains(next) && next.as_str() > start {
            path.push(next.clone());
            walk(graph, start, path, found);
            path.pop();
        }
    }
}

/// Floor of each module: 1 for one that imports nothing here, else one above its highest
/// import. Modules on a circle have no floor.
fn floors(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, usize> {
    let mut floor = BTreeMap::new();
    loop {
        let before = floor.len();
        for (m, uses) in graph {
            if floor.contains_key(m) {
                continue;
            }
            if let Some(highest) = uses.iter().map(|u| floor.get(u).copied()).collect::<Option<Vec<usize>>>() {
                floor.insert(m.clone(), highest.into_iter().max().unwrap_or(0) + 1);
            }
        }
        if floor.len() == before {
            return floor;
        }
    }
}

#[test]
fn modules_import_only_downward() {
    let graph = imports();
    assert!(graph.len() > 10, "read {} modules from src/", graph.len());
    let floor = floors(&graph);
    let top = floor.values().copied().max().unwrap_or(0);
    for f in (1..=top).rev() {
        for (m, _) in floor.iter().filter(|(_, x)| **x == f) {
            let uses: Vec<&str> = graph[m].iter().map(String::as_str).collect();
            eprintln!("floor {f}  {m:<14} -> {}", uses.join(", "));
        }
    }
    for (m, uses) in graph.iter().filter(|(m, _)| !floor.contains_key(*m)) {
        let uses: Vec<&str> = uses.iter().map(String::as_str).collect();
        eprintln!("no floor {m:<14} -> {} (on or above a circle)", uses.join(", "));
    }
    let circles = circles(&graph);
    for c in &circles {
        eprintln!("circle: {} -> {}", c.join(" -> "), c[0]);
    }
    assert!(circles.is_empty(), "modules import each other in a circle: {circles:?}");
}

#[test]
fn the_reader_sees_a_circle() {
    // The check itself: a made-up pair that imports each other is reported.
    let names: BTreeSet<String> = ["a", "b", "c", "lib"].map(String::from).into();
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", "use crate::b::X;\n"),
        ("b", "use crate::{c, a};\n// crate::a in a comment does not count\n"),
        ("lib", "pub use a::X;\n"),
        ("c", "fn f() {}\n#[cfg(test)]\nmod tests { use crate::a; }\n"),
    ]
    .into_iter()
    .map(|(m, text)| (m.to_string(), named_modules(text, &names, m)))
    .collect();
    assert_eq!(graph["b"], ["a", "c"].map(String::from).into());
    assert!(graph["c"].is_empty(), "imports in tests are not counted");
    assert_eq!(
        named_modules("fn f(_: crate::Bound) {}\n", &names, "c"),
        ["lib"].map(String::from).into(),
        "an item of the crate root is an import of lib"
    );
    assert_eq!(circles(&graph), vec![vec!["a".to_string(), "b".to_string()]]);
    assert_eq!(floors(&graph).get("c"), Some(&1));
    assert_eq!(floors(&graph).get("a"), None, "a module on a circle has no floor");
}
