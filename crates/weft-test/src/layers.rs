//! The check that a crate's modules import only downward: no module reaches, through any chain
//! of `crate::` paths, back to itself. A circle makes two files one unit that cannot be read,
//! tested or changed apart. Each crate that keeps its layers has a `tests/layers.rs` calling
//! [`check`]; `cargo test -p CRATE --test layers -- --nocapture` prints its modules floor by
//! floor (each one stands above everything it uses) with what each imports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every module of `src` (a file `src/m.rs`, and the files below `src/m/`, which are `m`'s) and
/// the modules each one names by a `crate::` path outside its tests and comments.
pub fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files: Vec<(String, String)> = Vec::new();
    read_modules(src, None, &mut files);
    let names: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in &files {
        let named = named_modules(text, &names, module);
        graph.entry(module.clone()).or_default().extend(named);
    }
    graph
}

/// The `.rs` files below `dir`, each with the top-level module it belongs to.
fn read_modules(dir: &Path, module: Option<&str>, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{} is not readable: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        let stem = path.file_stem().expect("file name").to_string_lossy().into_owned();
        let owner = module.map(str::to_string).unwrap_or_else(|| stem.clone());
        if path.is_dir() {
            read_modules(&path, Some(&owner), out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.push((owner, text));
        }
    }
}

/// Prints the modules of `src` floor by floor on standard error, and panics naming every
/// circle if there is one.
pub fn check(src: &Path) {
    let graph = imports(src);
    assert!(graph.len() > 10, "read {} modules from {}", graph.len(), src.display());
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

/// The modules `text` names as `crate::module`, before its `#[cfg(test)]` section.
pub fn named_modules(text: &str, names: &BTreeSet<String>, own: &str) -> BTreeSet<String> {
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
pub fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
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
pub fn floors(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, usize> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
