//! The layering rule of `src/lib.rs` ("# Layers") holds: every `crate::` path in a
//! module's code names its own module or one of a lower layer. The rule is read from
//! `lib.rs` itself, so the documentation and the check cannot drift apart; a module
//! missing from it fails too (a new module must be given its place).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `module → layer`, from the `# Layers` block of `src/lib.rs`.
fn layers(lib: &str) -> BTreeMap<String, usize> {
    let block = lib
        .split("//! # Layers")
        .nth(1)
        .expect("src/lib.rs has a '# Layers' section");
    let mut out = BTreeMap::new();
    let mut in_code = false;
    for line in block.lines().skip(1) {
        let Some(text) = line.strip_prefix("//!") else {
            break;
        };
        if text.trim_start().starts_with("```") {
            if in_code {
                break;
            }
            in_code = true;
            continue;
        }
        if !in_code {
            continue;
        }
        let mut words = text.split_whitespace();
        let Some(Ok(layer)) = words.next().map(str::parse::<usize>) else {
            continue;
        };
        for m in words {
            out.insert(m.to_owned(), layer);
        }
    }
    assert!(!out.is_empty(), "no layers in src/lib.rs");
    out
}

/// The top-level modules of `src` and their files.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let path = e.path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            let mut files = Vec::new();
            let mut stack = vec![path];
            while let Some(d) = stack.pop() {
                for f in std::fs::read_dir(&d).unwrap().flatten() {
                    let p = f.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if p.extension().is_some_and(|x| x == "rs") {
                        files.push(p);
                    }
                }
            }
            out.entry(name).or_insert_with(Vec::new).extend(files);
        } else if path.extension().is_some_and(|x| x == "rs") && name != "lib" && name != "main" {
            out.entry(name).or_insert_with(Vec::new).push(path);
        }
    }
    out
}

/// The first segment of every `crate::` path in `code` (comments removed), with
/// `use crate::{a::x, b}` groups taken apart.
fn crate_paths(code: &str) -> Vec<String> {
    let code: String = code
        .lines()
        .map(|l| match l.find("//") {
            // A `//` inside a string (a URL) cuts the rest of the line: acceptable,
            // no path of this crate follows one in this code base.
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // e.g. `my_crate::`
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            out.push(ident(&item));
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

#[test]
fn every_module_imports_only_from_lower_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rule = layers(&std::fs::read_to_string(root.join("src/lib.rs")).unwrap());
    let mut broken = Vec::new();
    for (module, files) in modules(&root.join("src")) {
        let Some(&layer) = rule.get(&module) else {
            broken.push(format!("{module}: not in the layers of src/lib.rs"));
            continue;
        };
        for file in files {
            let code = std::fs::read_to_string(&file).unwrap();
            for target in crate_paths(&code) {
                if target == module {
                    continue;
                }
                match rule.get(&target) {
                    Some(&t) if t < layer => {}
                    Some(&t) => broken.push(format!(
                        "{}: {module} (layer {layer}) uses crate::{target} (layer {t})",
                        file.strip_prefix(root).unwrap().display()
                    )),
                    None => broken.push(format!(
                        "{}: crate::{target} is not a module in the layers",
                        file.strip_prefix(root).unwrap().display()
                    )),
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "the layering rule is broken:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_path_reader_finds_groups_and_skips_comments() {
    let code = "use crate::{store::{A, B}, domain::C};\n\
                // crate::api in a comment\n\
                let x = crate::metrics::Metrics::new(); /// crate::app\n\
                use my_crate::x;";
    assert_eq!(crate_paths(code), ["store", "domain", "metrics"]);
}
