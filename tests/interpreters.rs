//! Interpreter pins: what the server offers, what it installs (once, with
//! uv, into the shared read-only DIR/tools/python), and what it says when
//! it cannot.
//!
//! There is no internet here, so uv downloads from a real local list:
//! `UV_PYTHON_DOWNLOADS_JSON_URL` names a JSON file whose one entry points
//! (file://) at an archive in python-build-standalone's `install_only`
//! layout, built by the test from an interpreter of a version the system
//! lacks (a pyenv build under /root, which app users cannot run).

mod util;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use util::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// An install_only archive of a CPython the system lacks, and its version.
struct Build {
    archive: PathBuf,
    sha256: String,
    version: String,
}

impl Build {
    /// `major.minor`, what an app pins.
    fn minor(&self) -> String {
        self.version.split('.').take(2).collect::<Vec<_>>().join(".")
    }

    /// A download list naming this build, as uv reads it.
    fn downloads_json(&self, dir: &Path) -> PathBuf {
        let v: Vec<&str> = self.version.split('.').collect();
        let json = serde_json::json!({
            format!("cpython-{}-linux-x86_64-gnu", self.version): {
                "name": "cpython",
                "arch": {"family": "x86_64", "variant": null},
                "os": "linux",
                "libc": "gnu",
                "major": v[0].parse::<u32>().expect("major"),
                "minor": v[1].parse::<u32>().expect("minor"),
                "patch": v[2].parse::<u32>().expect("patch"),
                "prerelease": "",
                "url": format!("file://{}", self.archive.display()),
                "sha256": self.sha256,
                "variant": null,
                "build": "20260101"
            }
        });
        let path = dir.join("python-downloads.json");
        std::fs::write(&path, json.to_string()).expect("write download list");
        path
    }
}

/// Built once per test binary (packing takes a few seconds). `None` when
/// this machine has no interpreter of a version /usr/bin lacks.
fn build() -> Option<&'static Build> {
    static BUILD: OnceLock<Option<Build>> = OnceLock::new();
    BUILD.get_or_init(make_build).as_ref()
}

fn make_build() -> Option<Build> {
    let roots = [std::env::var("PYENV_ROOT").ok(), Some("/root/.pyenv".to_string())];
    let prefixes: Vec<PathBuf> = roots
        .iter()
        .flatten()
        .filter_map(|r| std::fs::read_dir(Path::new(r).join("versions")).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .collect();
    // The newest that gunicorn supports (3.10 and up) and /usr/bin lacks.
    let (_, prefix, version) = prefixes
        .into_iter()
        .filter_map(|p| {
            let version = p.file_name()?.to_str()?.to_string();
            let parts: Vec<u32> = version.split('.').map(|x| x.parse().ok()).collect::<Option<_>>()?;
            let minor = format!("{}.{}", parts.first()?, parts.get(1)?);
            let ok = parts.len() == 3
                && parts[0] == 3
                && parts[1] >= 10
                && p.join(format!("bin/python{minor}")).is_file()
                && !Path::new(&format!("/usr/bin/python{minor}")).exists()
                && !Path::new(&format!("/usr/local/bin/python{minor}")).exists();
            ok.then_some((parts, p, version))
        })
        .max()?;
    let minor: String = version.split('.').take(2).collect::<Vec<_>>().join(".");
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("pbs-{version}"));
    let _ = std::fs::remove_dir_all(&work);
    let stage = work.join("stage/python");
    std::fs::create_dir_all(&stage).expect("mkdir stage");
    // The standalone layout: python/bin/python3.X, python/lib/python3.X.
    // The test suite and third-party packages are left out (size only).
    let copy = format!(
        "tar -C {src} --exclude=./lib/python{minor}/test --exclude=./lib/python{minor}/site-packages --exclude=__pycache__ -cf - . | tar -C {dst} -xf -",
        src = prefix.display(),
        dst = stage.display()
    );
    sh(&copy);
    std::fs::create_dir_all(stage.join(format!("lib/python{minor}/site-packages"))).expect("site-packages");
    // pyenv links its executable to libpython by absolute path; a
    // standalone build finds it next to itself ($ORIGIN/../lib).
    let exe = stage.join(format!("bin/python{minor}"));
    let bytes = std::fs::read(&exe).expect("read interpreter");
    let old = format!("{}/lib\0", prefix.display()).into_bytes();
    let mut new = b"$ORIGIN/../lib\0".to_vec();
    if old.len() >= new.len() {
        new.resize(old.len(), 0);
        let patched = replace_all(&bytes, &old, &new);
        std::fs::write(&exe, patched).expect("write interpreter");
    }
    let archive = work.join(format!("cpython-{version}-x86_64-unknown-linux-gnu-install_only.tar.gz"));
    sh(&format!("tar -C {} -czf {} python", work.join("stage").display(), archive.display()));
    let _ = std::fs::remove_dir_all(work.join("stage"));
    let out = Command::new("sha256sum").arg(&archive).output().expect("sha256sum");
    let sha256 = String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("digest").to_string();
    Some(Build { archive, sha256, version })
}

fn replace_all(hay: &[u8], old: &[u8], new: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(old) {
            out.extend_from_slice(new);
            i += old.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

fn sh(line: &str) {
    let out = Command::new("sh").args(["-c", line]).output().expect("sh");
    assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
}

/// An app answering with the interpreter it runs on.
fn version_app(pin: &str) -> AppRepo {
    AppRepo::new(&[
        ("requirements.txt", "gunicorn==27.0.1\n"),
        ("Procfile", "web: gunicorn app:app --bind 127.0.0.1:$PORT --workers 1\n"),
        (".python-version", &format!("{pin}\n")),
        (
            "app.py",
            "import sys\n\
             def app(environ, start_response):\n\
             \x20   body = ('python %d.%d.%d\\n' % sys.version_info[:3]).encode()\n\
             \x20   start_response('200 OK', [('Content-Type', 'text/plain')])\n\
             \x20   return [body]\n",
        ),
    ])
}

/// Everything under `dir` is root's and writable by root alone.
fn assert_root_read_only(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).expect("stat");
        if m.file_type().is_symlink() {
            continue;
        }
        assert_eq!(m.uid(), 0, "{} is not root's", p.display());
        assert_eq!(m.mode() & 0o022, 0, "{} is writable by others: {:o}", p.display(), m.mode());
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&p).expect("read dir").flatten().map(|e| e.path()));
        }
    }
}

#[test]
fn a_pinned_python_is_installed_once_and_shared_read_only() {
    if !is_root() {
        eprintln!("skipping: the shared interpreter is root's, and only a root daemon installs it for app users");
        return;
    }
    let Some(build) = build() else {
        eprintln!("skipping: no interpreter of a version /usr/bin lacks to build a local download from (pyenv versions)");
        return;
    };
    let lists = tempfile::tempdir().expect("dir");
    let json = build.downloads_json(lists.path());
    let server = TestServer::start_with_env(&[], &[("UV_PYTHON_DOWNLOADS_JSON_URL", &json.display().to_string())]);
    let pin = build.minor();
    // Two apps pinning the same version, pushed at once: one installs,
    // the other waits for it and uses the same interpreter.
    let pushes: Vec<_> = ["first", "second"]
        .into_iter()
        .map(|app| {
            let repo = version_app(&pin);
            let url = server.git_url(app);
            std::thread::spawn(move || {
                let (ok, out) = repo.push(&url, "main");
                (app, ok, out)
            })
        })
        .collect();
    let mut installs = 0;
    for push in pushes {
        let (app, ok, out) = push.join().expect("push thread");
        assert!(ok, "push to {app} failed:\n{out}\nserver log:\n{}", tail(&server.server_log(), 30));
        assert!(out.contains(&format!("python {} detected", build.version)), "{out}");
        installs += out.matches(&format!("installing python {pin} with uv (once, shared)")).count();
        assert_eq!(server.get(app, "/"), (200, format!("python {}\n", build.version)));
    }
    assert_eq!(installs, 1, "installed once, not per push");
    let shared = server.data().join("tools/python");
    let install = shared.join(format!("cpython-{}-linux-x86_64-gnu", build.version));
    assert!(install.join(format!("bin/python{pin}")).is_file(), "{:?}", ls(&shared));
    assert_root_read_only(&shared);
    // A later push finds it without installing again.
    let out = version_app(&pin).deploy(&server, "third");
    assert!(!out.contains("installing python"), "{out}");
    assert!(out.contains(&format!("python {} detected", build.version)), "{out}");
}

#[test]
fn an_interpreter_unpacked_by_the_operator_is_used_only_when_read_only() {
    if !is_root() {
        eprintln!("skipping: app users only exist when the daemon runs as root");
        return;
    }
    let Some(build) = build() else {
        eprintln!("skipping: no interpreter of a version /usr/bin lacks to unpack (pyenv versions)");
        return;
    };
    // An empty download list: uv has nothing to install, online or not.
    let lists = tempfile::tempdir().expect("dir");
    let empty = lists.path().join("none.json");
    std::fs::write(&empty, "{}").expect("write");
    let server = TestServer::start_with_env(&[], &[("UV_PYTHON_DOWNLOADS_JSON_URL", &empty.display().to_string())]);
    let pin = build.minor();
    let shared = server.data().join("tools/python");
    let dir = shared.join(format!("cpython-{pin}"));
    // The operator's commands, as the refusal gives them.
    sh(&format!(
        "mkdir -p {dir} && tar -xzf {archive} --strip-components=1 -C {dir} && chown -R root:root {shared} && chmod -R a+rX,go-w {shared}",
        dir = dir.display(),
        archive = build.archive.display(),
        shared = shared.display()
    ));
    // Left writable by others, it is not offered to apps.
    sh(&format!("chmod g+w {}", dir.join(format!("bin/python{pin}")).display()));
    let out = version_app(&pin).deploy_rejected(&server, "unpacked");
    assert!(out.contains("is not root's or is writable by others"), "{out}");
    assert!(out.contains(&format!("tried `uv python install {pin}` into {}", shared.display())), "{out}");
    sh(&format!("chmod -R go-w {}", shared.display()));
    let out = version_app(&pin).deploy(&server, "unpacked");
    assert!(!out.contains("installing python"), "{out}");
    assert_eq!(server.get("unpacked", "/"), (200, format!("python {}\n", build.version)));
}

#[test]
fn a_pin_nothing_can_provide_says_what_was_tried_and_what_to_do() {
    let lists = tempfile::tempdir().expect("dir");
    let empty = lists.path().join("none.json");
    std::fs::write(&empty, "{}").expect("write");
    let server = TestServer::start_with_env(&[], &[("UV_PYTHON_DOWNLOADS_JSON_URL", &empty.display().to_string())]);
    let repo = AppRepo::hello("pinned");
    repo.write("runtime.txt", "python-3.98.4\n");
    repo.commit("pin 3.98.4");
    let out = repo.deploy_rejected(&server, "pinned");
    let shared = server.data().join("tools/python");
    assert!(out.contains("python 3.98.4 is not available on this server"), "{out}");
    assert!(out.contains(&format!("tried `uv python install 3.98.4` into {}: uv says: No download found", shared.display())), "uv's reason:\n{out}");
    assert!(out.contains(&format!("`uv python install 3.98.4 --no-bin --install-dir {} &&", shared.display())), "{out}");
    assert!(out.contains(&format!("mkdir -p {}/cpython-3.98.4 && tar -xzf ARCHIVE --strip-components=1", shared.display())), "{out}");
    assert!(!out.contains("/*/"), "a PATH entry cannot hold a glob:\n{out}");
    assert!(out.contains("installing python 3.98.4 with uv (once, shared)"), "the attempt is said:\n{out}");
    // Nothing half-installed is left for a later push to find.
    assert!(ls(&shared).iter().all(|n| n.starts_with('.')), "{:?}", ls(&shared));
}
