//! Every input a dependency spec reads, for the environment key (issue 9
//! #5): `requirements.txt` and what it pulls in with `-r`/`-c`
//! (recursively), local path dependencies (`-e ./lib`, `./pkg`,
//! `name @ file:...`, `[tool.uv.sources] x = { path = ... }`, a lock's
//! `directory`/`editable`/`path` sources). A change in any of them is a
//! new key, so a package added to a nested `base.txt` is installed.
//!
//! Everything read comes from a pushed repo: files must be regular files
//! reached through real directories (no symlink), inside the release, and
//! the walk is bounded in files, entries and bytes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// At most this many spec files (requirements, constraints, pyproject).
const MAX_FILES: usize = 64;
/// A spec file larger than this is refused.
const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// A local path dependency: entries and bytes hashed at most.
const MAX_DIR_ENTRIES: usize = 20_000;
const MAX_DIR_BYTES: u64 = 256 * 1024 * 1024;

/// The dependency inputs found so far, as release-relative paths.
#[derive(Debug, Default)]
pub struct DepInputs {
    files: BTreeSet<String>,
    /// Local packages installed as copies: their whole tree counts.
    dirs: BTreeSet<String>,
    /// Editable local packages: only their metadata counts (the code is
    /// linked, not copied, so a code change needs no new environment).
    editable: BTreeSet<String>,
    /// References outside the release (absolute paths, `../..`): only the
    /// reference itself can be keyed.
    outside: BTreeSet<String>,
}

impl DepInputs {
    /// Add a top-level spec file (`requirements.txt`, `pyproject.toml`,
    /// `uv.lock`) and everything it reads.
    pub fn add_root(&mut self, tree: &Path, rel: &str) -> Result<()> {
        self.add_file(tree, rel.to_string(), None)
    }

    /// The release-relative spec files found, for messages and tests.
    pub fn files(&self) -> impl Iterator<Item = &String> {
        self.files.iter()
    }

    fn add_file(&mut self, tree: &Path, rel: String, from: Option<&str>) -> Result<()> {
        if self.files.contains(&rel) {
            return Ok(()); // included twice, or a cycle
        }
        if self.files.len() >= MAX_FILES {
            bail!("the dependency files include more than {MAX_FILES} files");
        }
        let text = read_spec(tree, &rel).with_context(|| match from {
            Some(f) => format!("{f} includes {rel}"),
            None => format!("reading {rel}"),
        })?;
        self.files.insert(rel.clone());
        let base = parent(&rel);
        let name = rel.rsplit('/').next().unwrap_or(&rel);
        if name == "pyproject.toml" {
            self.scan_pyproject(&text, &base);
        } else if name == "uv.lock" {
            self.scan_lock(&text, &base);
        } else {
            self.scan_requirements(tree, &text, &rel, &base)?;
        }
        Ok(())
    }

    fn scan_requirements(&mut self, tree: &Path, text: &str, rel: &str, base: &str) -> Result<()> {
        for line in logical_lines(text) {
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else { continue };
            let (opt, value) = match first.split_once('=') {
                Some((o, v)) if o.starts_with("--") => (o, Some(v.to_string())),
                _ if first.starts_with("-r") && first.len() > 2 => ("-r", Some(first[2..].to_string())),
                _ if first.starts_with("-c") && first.len() > 2 => ("-c", Some(first[2..].to_string())),
                _ if first.starts_with("-e") && first.len() > 2 => ("-e", Some(first[2..].to_string())),
                _ if first.starts_with('-') => (first, words.next().map(str::to_string)),
                _ => ("", Some(first.to_string())),
            };
            let Some(value) = value else { continue };
            match opt {
                "-r" | "--requirement" | "-c" | "--constraint" => {
                    match join(base, &value) {
                        Some(inc) => self.add_file(tree, inc, Some(rel))?,
                        None => {
                            self.outside.insert(value);
                        }
                    }
                }
                "-e" | "--editable" => self.add_path(tree, base, &value, true),
                "" => {
                    // `name @ file:///x` or a bare path (`./pkg`, `pkg.whl`).
                    let spec = match line.split_once(" @ ") {
                        Some((_, url)) => url.trim().to_string(),
                        None => value,
                    };
                    self.add_path(tree, base, &spec, false);
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn scan_pyproject(&mut self, text: &str, base: &str) {
        let Ok(doc) = text.parse::<toml::Table>() else { return };
        let sources = doc.get("tool").and_then(|t| t.get("uv")).and_then(|u| u.get("sources")).and_then(|s| s.as_table());
        for source in sources.into_iter().flat_map(|s| s.values()) {
            for entry in source.as_array().cloned().unwrap_or_else(|| vec![source.clone()]) {
                if let Some(path) = entry.get("path").and_then(|p| p.as_str()) {
                    let editable = entry.get("editable").and_then(|e| e.as_bool()).unwrap_or(false);
                    self.add_local(base, path, editable);
                }
            }
        }
        let deps = doc.get("project").and_then(|p| p.get("dependencies")).and_then(|d| d.as_array());
        for dep in deps.into_iter().flatten().filter_map(|d| d.as_str()) {
            if let Some((_, url)) = dep.split_once(" @ ") {
                let url = url.split(';').next().unwrap_or("").trim();
                if let Some(path) = url.strip_prefix("file://") {
                    self.outside.insert(path.to_string());
                }
            }
        }
    }

    fn scan_lock(&mut self, text: &str, base: &str) {
        let Ok(doc) = text.parse::<toml::Table>() else { return };
        let packages = doc.get("package").and_then(|p| p.as_array());
        for source in packages.into_iter().flatten().filter_map(|p| p.get("source")) {
            for (kind, editable) in [("directory", false), ("path", false), ("editable", true)] {
                if let Some(path) = source.get(kind).and_then(|p| p.as_str()) {
                    self.add_local(base, path, editable);
                }
            }
        }
    }

    /// A requirement that may be a local path: `./pkg`, `../x`, `/abs`,
    /// `file:...`, `pkg.whl`, `.[extra]`; anything else is a package name.
    fn add_path(&mut self, tree: &Path, base: &str, spec: &str, editable: bool) {
        let spec = spec.split(';').next().unwrap_or("").trim();
        let spec = spec.strip_prefix("file://").or_else(|| spec.strip_prefix("file:")).unwrap_or(spec);
        // Extras: `./pkg[dev]`, `.[dev]`.
        let spec = match spec.find('[') {
            Some(i) if spec.ends_with(']') => &spec[..i],
            _ => spec,
        };
        let looks_local = spec.starts_with('.') || spec.starts_with('/') || spec.contains('/')
            || [".whl", ".tar.gz", ".zip"].iter().any(|e| spec.ends_with(e));
        if !looks_local || spec.contains("://") {
            return;
        }
        // pip resolves a local path against the working directory (the
        // release root), uv against the file: key whichever exists.
        let from_root = join("", spec).filter(|r| tree.join(r).exists());
        match from_root {
            Some(r) if base.is_empty() || !tree.join(base).join(spec).exists() => self.add_local("", &r, editable),
            _ => self.add_local(base, spec, editable),
        }
    }

    fn add_local(&mut self, base: &str, path: &str, editable: bool) {
        match join(base, path) {
            Some(r) if editable => {
                self.editable.insert(r);
            }
            Some(r) => {
                self.dirs.insert(r);
            }
            None => {
                self.outside.insert(path.to_string());
            }
        }
    }

    /// Feed every input, in a fixed order, into the key's hash.
    pub fn hash_into(&self, tree: &Path, h: &mut Sha256) -> Result<()> {
        for f in &self.files {
            h.update(b"\0file\0");
            h.update(f.as_bytes());
            h.update(b"\0");
            h.update(read_spec(tree, f)?.as_bytes());
        }
        let mut budget = Budget::default();
        for d in &self.dirs {
            h.update(b"\0local\0");
            h.update(d.as_bytes());
            hash_tree(tree, d, None, h, &mut budget).with_context(|| format!("keying the local dependency {d}"))?;
        }
        for d in &self.editable {
            h.update(b"\0editable\0");
            h.update(d.as_bytes());
            let meta = ["pyproject.toml", "setup.py", "setup.cfg", "requirements.txt"];
            hash_tree(tree, d, Some(&meta), h, &mut budget).with_context(|| format!("keying the local dependency {d}"))?;
        }
        for o in &self.outside {
            h.update(b"\0outside\0");
            h.update(o.as_bytes());
        }
        Ok(())
    }
}

/// Requirement lines without comments, continuations joined.
fn logical_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for raw in text.lines() {
        let line = match raw.find(" #").or_else(|| raw.find("\t#")) {
            Some(i) => &raw[..i],
            None if raw.trim_start().starts_with('#') => "",
            None => raw,
        };
        if let Some(head) = line.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(line);
        let l = cur.trim().to_string();
        if !l.is_empty() {
            out.push(l);
        }
        cur.clear();
    }
    out
}

/// `rel`'s directory ("" for the release root).
fn parent(rel: &str) -> String {
    rel.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default()
}

/// `path` relative to `base`, normalized; `None` when absolute or outside
/// the release.
fn join(base: &str, path: &str) -> Option<String> {
    if path.starts_with('/') || path.is_empty() {
        return None;
    }
    let mut parts: Vec<&str> = base.split('/').filter(|p| !p.is_empty()).collect();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(if parts.is_empty() { ".".to_string() } else { parts.join("/") })
}

/// `rel` inside `tree` through real directories only.
fn resolve(tree: &Path, rel: &str) -> Result<PathBuf> {
    let mut p = tree.to_path_buf();
    if rel == "." {
        return Ok(p);
    }
    let parts: Vec<&str> = rel.split('/').collect();
    for (i, c) in parts.iter().enumerate() {
        p.push(c);
        let meta = std::fs::symlink_metadata(&p).with_context(|| format!("{rel} is not in the repo"))?;
        if meta.file_type().is_symlink() {
            if i + 1 == parts.len() {
                bail!("{rel} must be a regular file, not a symlink");
            }
            bail!("{rel} must not be reached through a symlink");
        }
    }
    Ok(p)
}

fn read_spec(tree: &Path, rel: &str) -> Result<String> {
    let p = resolve(tree, rel)?;
    let meta = std::fs::symlink_metadata(&p).with_context(|| format!("{rel} is not in the repo"))?;
    if !meta.file_type().is_file() || meta.len() > MAX_FILE_BYTES {
        bail!("{rel} must be a regular file of at most 1 MiB");
    }
    Ok(String::from_utf8_lossy(&std::fs::read(&p).with_context(|| format!("reading {rel}"))?).into_owned())
}

#[derive(Default)]
struct Budget {
    entries: usize,
    bytes: u64,
}

/// Hash a local package: names, kinds and contents of every entry (or only
/// the `only` files at its top), symlinks by their target, never followed.
fn hash_tree(tree: &Path, rel: &str, only: Option<&[&str]>, h: &mut Sha256, budget: &mut Budget) -> Result<()> {
    let root = resolve(tree, rel)?;
    if root.is_file() {
        let meta = std::fs::symlink_metadata(&root)?;
        budget.bytes += meta.len();
        if budget.bytes > MAX_DIR_BYTES {
            bail!("over {} MiB", MAX_DIR_BYTES >> 20);
        }
        h.update(std::fs::read(&root)?);
        return Ok(());
    }
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)?.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if matches!(name.as_ref(), "__pycache__" | ".git" | "node_modules") || name.ends_with(".pyc") {
                continue;
            }
            if only.is_some_and(|o| !o.contains(&name.as_ref())) {
                continue;
            }
            budget.entries += 1;
            if budget.entries > MAX_DIR_ENTRIES {
                bail!("over {MAX_DIR_ENTRIES} files");
            }
            let path = e.path();
            let relname = path.strip_prefix(&root).unwrap_or(&path).to_string_lossy().into_owned();
            let ft = e.file_type()?;
            h.update(b"\0");
            h.update(relname.as_bytes());
            if ft.is_symlink() {
                h.update(b"\0link\0");
                h.update(std::fs::read_link(&path)?.as_os_str().as_encoded_bytes());
            } else if ft.is_dir() {
                if only.is_none() {
                    stack.push(path);
                }
            } else if ft.is_file() {
                budget.bytes += e.metadata()?.len();
                if budget.bytes > MAX_DIR_BYTES {
                    bail!("over {} MiB", MAX_DIR_BYTES >> 20);
                }
                h.update(b"\0data\0");
                h.update(std::fs::read(&path)?);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("dir");
        for (p, c) in files {
            let p = t.path().join(p);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, c).expect("write");
        }
        t
    }

    fn key(t: &Path) -> String {
        let mut i = DepInputs::default();
        i.add_root(t, "requirements.txt").expect("inputs");
        let mut h = Sha256::new();
        i.hash_into(t, &mut h).expect("hash");
        hex::encode(h.finalize())
    }

    #[test]
    fn nested_includes_and_local_paths_are_followed() {
        let t = tree(&[
            ("requirements.txt", "-r requirements/production.txt  # prod\n-e ./libs/editable\n"),
            ("requirements/production.txt", "-r base.txt\n--constraint=constraints.txt\ngunicorn\n"),
            ("requirements/base.txt", "django\n./vendor/pkg[extra] ; python_version > '3'\n-r production.txt\n"),
            ("requirements/constraints.txt", "django<6\n"),
            ("vendor/pkg/setup.py", "setup()\n"),
            ("libs/editable/pyproject.toml", "[project]\nname='e'\n"),
            ("libs/editable/e/__init__.py", "x = 1\n"),
        ]);
        let mut i = DepInputs::default();
        i.add_root(t.path(), "requirements.txt").expect("inputs");
        let files: Vec<&String> = i.files().collect();
        assert_eq!(files, ["requirements.txt", "requirements/base.txt", "requirements/constraints.txt", "requirements/production.txt"]);
        assert!(i.dirs.contains("vendor/pkg"), "{i:?}");
        assert!(i.editable.contains("libs/editable"), "{i:?}");

        let before = key(t.path());
        std::fs::write(t.path().join("requirements/base.txt"), "django\nsix\n./vendor/pkg[extra]\n").expect("write");
        let after_base = key(t.path());
        assert_ne!(before, after_base, "a change in a nested file is a new key");
        std::fs::write(t.path().join("vendor/pkg/setup.py"), "setup(name='x')\n").expect("write");
        assert_ne!(after_base, key(t.path()), "a change in a local package is a new key");
        let k = key(t.path());
        std::fs::write(t.path().join("libs/editable/e/__init__.py"), "x = 2\n").expect("write");
        assert_eq!(k, key(t.path()), "an editable package's code is linked, not keyed");
    }

    #[test]
    fn escapes_and_missing_files_are_refused_or_keyed_by_name() {
        let t = tree(&[("requirements.txt", "-r ../../etc/passwd\n/opt/wheels/x.whl\n")]);
        let mut i = DepInputs::default();
        i.add_root(t.path(), "requirements.txt").expect("outside references are keyed by name only");
        assert!(i.outside.contains("../../etc/passwd") && i.outside.contains("/opt/wheels/x.whl"), "{i:?}");
        let t = tree(&[("requirements.txt", "-r missing.txt\n")]);
        let err = DepInputs::default().add_root(t.path(), "requirements.txt").expect_err("missing include");
        assert!(format!("{err:#}").contains("requirements.txt includes missing.txt"), "{err:#}");
        let t = tree(&[("requirements.txt", "-r linked.txt\n")]);
        std::os::unix::fs::symlink("/etc/hostname", t.path().join("linked.txt")).expect("symlink");
        assert!(DepInputs::default().add_root(t.path(), "requirements.txt").is_err(), "no symlinked spec file");
    }

    #[test]
    fn lock_and_pyproject_sources() {
        let t = tree(&[
            ("pyproject.toml", "[project]\nname='a'\ndependencies=['x']\n[tool.uv.sources]\nx = { path = 'libs/x' }\n"),
            ("uv.lock", "[[package]]\nname='a'\nsource = { editable = '.' }\n[[package]]\nname='x'\nsource = { directory = 'libs/x' }\n"),
            ("libs/x/pyproject.toml", "[project]\nname='x'\n"),
        ]);
        let mut i = DepInputs::default();
        i.add_root(t.path(), "pyproject.toml").expect("pyproject");
        i.add_root(t.path(), "uv.lock").expect("lock");
        assert!(i.dirs.contains("libs/x") && i.editable.contains("."), "{i:?}");
    }
}
