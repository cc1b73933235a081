//! Tidy: the house rules that a reader would otherwise have to police, checked over the source
//! tree. Every source file opens with its `//!` charter; protobuf types stay in the wire
//! modules; the compute crates (`kernels`, `model`) stay free of the async runtime and gRPC;
//! every declared dependency is used. Each failure names the file (and line) to fix.

use std::fs;
use std::path::{Path, PathBuf};

/// Crates that must stay pure compute: no async runtime, no RPC, no store client.
const COMPUTE_CRATES: &[&str] = &["kernels", "model"];
const FORBIDDEN_IN_COMPUTE: &[&str] =
    &["tokio", "tokio-util", "tokio-stream", "tonic", "tonic-prost", "prost", "etcd-client", "proto"];

/// Where protobuf types may appear, as path prefixes relative to the repository root: the
/// `proto` crate itself, each service's wire module, the public clients (the CLI's client, the
/// wire-level KV benchmark, the load generator's request loop) and tests, which talk to the
/// servers as clients do.
const WIRE_PATHS: &[&str] = &[
    "proto/",
    "router/src/grpc/",
    "prefill-worker/src/grpc/",
    "decode-worker/src/grpc.rs",
    "expert-worker/src/grpc.rs",
    "expert-client/src/wire.rs",
    "cli/src/client.rs",
    "cli/src/bin/kv_bench.rs",
    "loadgen/src/run.rs",
    "loadgen/src/run/",
    "tests/",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate lies in the workspace root").to_path_buf()
}

/// The workspace members, from the root manifest's `members = [...]`.
fn members(root: &Path) -> Vec<String> {
    let manifest = fs::read_to_string(root.join("Cargo.toml")).expect("root Cargo.toml");
    let start = manifest.find("members").expect("a members list");
    let open = start + manifest[start..].find('[').expect("members = [");
    let close = open + manifest[open..].find(']').expect("members list closes");
    manifest[open + 1..close]
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && name != "fixtures" {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).to_string_lossy().replace('\\', "/")
}

fn all_sources(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for member in members(root) {
        rust_files(&root.join(member), &mut files);
    }
    files.sort();
    files
}

/// Whether `ident` occurs in `text` as a path root (`ident::`), an import (`use ident`), or an
/// `extern crate`, at an identifier boundary.
fn mentions_crate(text: &str, ident: &str) -> bool {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(pos) = text[from..].find(ident) {
        let at = from + pos;
        let end = at + ident.len();
        from = end;
        let before_ok = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        if !before_ok {
            continue;
        }
        let rest = &text[end..];
        if rest.starts_with("::") {
            return true;
        }
        let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let prefix = text[line_start..at].trim_start();
        let after_ok = rest.chars().next().is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        if after_ok
            && (prefix.starts_with("use ") || prefix.starts_with("pub use ") || prefix.starts_with("extern crate "))
        {
            return true;
        }
    }
    false
}

/// Dependency names per table of a crate manifest (`dependencies`, `dev-dependencies`,
/// `build-dependencies`, target-specific ones folded in), and the names listed as
/// `[package.metadata.cargo-machete] ignored = [...]` (used only by generated code or for
/// their features).
struct Manifest {
    normal: Vec<String>,
    dev: Vec<String>,
    build: Vec<String>,
    ignored: Vec<String>,
}

fn parse_manifest(text: &str) -> Manifest {
    let mut m = Manifest { normal: Vec::new(), dev: Vec::new(), build: Vec::new(), ignored: Vec::new() };
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        if section == "package.metadata.cargo-machete" && line.starts_with("ignored") {
            let list = line.split_once('=').map_or("", |(_, v)| v);
            m.ignored.extend(list.trim().trim_matches(|c| c == '[' || c == ']').split(',').filter_map(|s| {
                let s = s.trim().trim_matches('"');
                (!s.is_empty()).then(|| s.to_string())
            }));
            continue;
        }
        let Some((key, _)) = line.split_once('=') else { continue };
        let name = key.trim().split('.').next().unwrap_or("").trim().to_string();
        let table = section.rsplit('.').next().unwrap_or("");
        match table {
            "dependencies" => m.normal.push(name),
            "dev-dependencies" => m.dev.push(name),
            "build-dependencies" => m.build.push(name),
            _ => {}
        }
    }
    m
}

#[test]
fn every_source_file_opens_with_its_charter() {
    let root = repo_root();
    let missing: Vec<String> = all_sources(&root)
        .into_iter()
        .filter(|f| {
            let text = fs::read_to_string(f).unwrap_or_default();
            !text.trim_start().starts_with("//!")
        })
        .map(|f| relative(&root, &f))
        .collect();
    assert!(
        missing.is_empty(),
        "source files without a `//!` charter as their first line:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn protobuf_types_stay_in_the_wire_modules() {
    let root = repo_root();
    let mut offenders = Vec::new();
    for file in all_sources(&root) {
        let rel = relative(&root, &file);
        if WIRE_PATHS.iter().any(|p| rel.starts_with(p)) || rel.contains("/tests/") {
            continue;
        }
        let text = fs::read_to_string(&file).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if mentions_crate(code, "proto") {
                offenders.push(format!("{rel}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "protobuf types outside the wire modules (move the conversion into the crate's grpc/wire module):\n  {}",
        offenders.join("\n  ")
    );
}

#[test]
fn compute_crates_stay_off_the_runtime_and_the_wire() {
    let root = repo_root();
    let mut offenders = Vec::new();
    for krate in COMPUTE_CRATES {
        let manifest = fs::read_to_string(root.join(krate).join("Cargo.toml")).expect("crate manifest");
        let m = parse_manifest(&manifest);
        for dep in m.normal.iter().chain(&m.dev).chain(&m.build) {
            if FORBIDDEN_IN_COMPUTE.contains(&dep.as_str()) {
                offenders.push(format!("{krate}/Cargo.toml depends on {dep}"));
            }
        }
        let mut files = Vec::new();
        rust_files(&root.join(krate), &mut files);
        for file in files {
            let text = fs::read_to_string(&file).unwrap_or_default();
            for (i, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for dep in FORBIDDEN_IN_COMPUTE {
                    if mentions_crate(code, &dep.replace('-', "_")) {
                        offenders.push(format!("{}:{}: uses {dep}", relative(&root, &file), i + 1));
                    }
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "kernels/ and model/ are pure compute (no tokio, tonic, prost or etcd):\n  {}",
        offenders.join("\n  ")
    );
}

#[test]
fn every_declared_dependency_is_used() {
    let root = repo_root();
    let mut unused = Vec::new();
    for member in members(&root) {
        let dir = root.join(&member);
        let manifest = fs::read_to_string(dir.join("Cargo.toml")).expect("member manifest");
        let m = parse_manifest(&manifest);
        let read_all =
            |paths: &[PathBuf]| paths.iter().map(|p| fs::read_to_string(p).unwrap_or_default()).collect::<String>();
        let mut lib_files = Vec::new();
        rust_files(&dir.join("src"), &mut lib_files);
        let mut test_files = lib_files.clone();
        for extra in ["tests", "benches", "examples"] {
            rust_files(&dir.join(extra), &mut test_files);
        }
        let build_files: Vec<PathBuf> = [dir.join("build.rs")].into_iter().filter(|p| p.is_file()).collect();
        let (lib_text, test_text, build_text) = (read_all(&lib_files), read_all(&test_files), read_all(&build_files));
        let tables = [
            ("dependencies", &m.normal, &lib_text),
            ("dev-dependencies", &m.dev, &test_text),
            ("build-dependencies", &m.build, &build_text),
        ];
        for (table, deps, text) in tables {
            for dep in deps {
                if m.ignored.contains(dep) {
                    continue;
                }
                if !mentions_crate(text, &dep.replace('-', "_")) {
                    unused.push(format!("{member}/Cargo.toml [{table}] {dep}"));
                }
            }
        }
        for ignored in &m.ignored {
            if !m.normal.iter().chain(&m.dev).chain(&m.build).any(|d| d == ignored) {
                unused.push(format!("{member}/Cargo.toml ignores {ignored}, which it does not declare"));
            }
        }
    }
    assert!(
        unused.is_empty(),
        "declared but unused dependencies (remove them, or list one used only by generated code or \
         for its features under [package.metadata.cargo-machete] ignored = [...] with a comment why):\n  {}",
        unused.join("\n  ")
    );
}

#[test]
fn the_crate_reference_finder_sees_paths_and_imports_only() {
    assert!(mentions_crate("let x = tokio::spawn(f);", "tokio"));
    assert!(mentions_crate("use serde;\n", "serde"));
    assert!(mentions_crate("  pub use half::bf16;", "half"));
    assert!(!mentions_crate("// the tokio runtime", "tokio"));
    assert!(!mentions_crate("let tokio_x = 1; my_tokio::a();", "tokio"));
    assert!(!mentions_crate("use tokio_util::sync;", "tokio"));
}
