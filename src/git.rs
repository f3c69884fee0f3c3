//! Bare repositories, their hooks, and git over HTTP.
//!
//! Every app has DIR/repos/APP.git with a `pre-receive` hook that calls
//! back into the daemon (`slipway hook pre-receive`), so the deploy runs
//! inside the push: if it fails the hook fails, git rejects the push, and
//! the repo's ref still names what is live. Git over HTTP is the real
//! `git http-backend` run as CGI, streamed both ways, so the pusher sees
//! deploy progress as it happens.
//!
//! Objects of a push under way sit in a quarantine directory that only the
//! hook's environment names; the hook forwards those variables and every
//! read here takes them as a [`Quarantine`].

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use axum::body::Body;
use axum::http::{HeaderMap, Method, Response, StatusCode};
use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::layout::Layout;
use crate::names::AppName;

/// The environment variables that let git see a push's quarantined objects.
pub const QUARANTINE_VARS: [&str; 3] =
    ["GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_QUARANTINE_PATH"];

#[derive(Debug, Clone, Default)]
pub struct Quarantine(pub Vec<(String, String)>);

pub struct Repos {
    layout: Layout,
    /// This binary, which the hooks call.
    slipway_bin: PathBuf,
    /// Held while a repo is created or its hook rewritten: concurrent first
    /// pushes to a new app would otherwise race in `git init`/`git config`
    /// ("could not lock config file"). Short; every other git step runs
    /// outside it.
    creating: tokio::sync::Mutex<()>,
}

impl Repos {
    pub fn new(layout: Layout, slipway_bin: PathBuf) -> Repos {
        Repos { layout, slipway_bin, creating: tokio::sync::Mutex::new(()) }
    }

    /// Create the app's bare repo if needed, and (re)write its hook so it
    /// always points at the running binary.
    pub async fn ensure(&self, app: &AppName) -> Result<PathBuf> {
        let repo = self.layout.repo(app);
        let _creating = self.creating.lock().await;
        if !repo.join("HEAD").is_file() {
            tokio::fs::create_dir_all(self.layout.repos()).await.context("creating repos directory")?;
            git(None, &["init", "--quiet", "--bare", "--initial-branch=main"], Some(&repo)).await?;
            for (k, v) in [("http.receivepack", "true"), ("receive.denyNonFastForwards", "false"), ("core.logAllRefUpdates", "true")] {
                git(Some(&repo), &["config", k, v], None).await?;
            }
        }
        let hook = repo.join("hooks/pre-receive");
        let script = format!(
            "#!/bin/sh\n# Installed by slipway: the deploy runs inside the push.\nexec {} hook pre-receive\n",
            crate::build::shell_quote(&self.slipway_bin.display().to_string())
        );
        // Rewritten only when it changed, and by rename: a push running
        // the hook right now must never read a half-written script.
        if tokio::fs::read_to_string(&hook).await.ok().as_deref() != Some(script.as_str()) {
            let tmp = hook.with_extension("tmp");
            tokio::fs::write(&tmp, script).await.context("writing pre-receive hook")?;
            set_mode(&tmp, 0o755)?;
            tokio::fs::rename(&tmp, &hook).await.context("installing pre-receive hook")?;
        }
        Ok(repo)
    }

    /// Serve one smart-HTTP request by running `git http-backend`.
    /// `path_info` is `/APP.git/...`; `env` adds the push's identity.
    pub async fn http_backend(
        &self,
        method: &Method,
        path_info: &str,
        query: &str,
        headers: &HeaderMap,
        body: Body,
        env: Vec<(String, String)>,
    ) -> Result<(Response<Body>, tokio::sync::oneshot::Receiver<()>)> {
        let mut cmd = Command::new("git");
        cmd.arg("http-backend")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_else(|_| crate::runtime::SYSTEM_PATH.into()))
            .env("GIT_PROJECT_ROOT", self.layout.repos())
            .env("GIT_HTTP_EXPORT_ALL", "1")
            .env("REQUEST_METHOD", method.as_str())
            .env("PATH_INFO", path_info)
            .env("QUERY_STRING", query)
            .env("SERVER_PROTOCOL", "HTTP/1.1")
            .env("GATEWAY_INTERFACE", "CGI/1.1")
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group: an abandoned push is ended whole (http-backend
            // and the receive-pack it runs).
            .process_group(0)
            .kill_on_drop(true);
        for (name, value) in headers {
            let Ok(v) = value.to_str() else { continue };
            match name.as_str() {
                "content-type" => cmd.env("CONTENT_TYPE", v),
                "content-length" => cmd.env("CONTENT_LENGTH", v),
                "git-protocol" => cmd.env("GIT_PROTOCOL", v),
                "content-encoding" => cmd.env("HTTP_CONTENT_ENCODING", v),
                _ => &mut cmd,
            };
        }
        let mut child = cmd.spawn().context("starting git http-backend")?;
        let pgid = child.id().map(|p| p as i32).unwrap_or(0);
        let mut stdin = child.stdin.take().context("http-backend stdin")?;
        let stdout = child.stdout.take().context("http-backend stdout")?;
        let mut stderr = child.stderr.take().context("http-backend stderr")?;
        let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));

        let ended_body = ended.clone();
        tokio::spawn(async move {
            let abandoned = copy_body(body, &mut stdin).await;
            let _ = stdin.shutdown().await;
            drop(stdin);
            if let Some(why) = abandoned {
                // The request body never completed, so no hook (deploy) has
                // started: git should end on its own at EOF; if it has not
                // shortly, end its group.
                tracing::info!(why, "push abandoned by its client");
                tokio::time::sleep(ABANDONED_GRACE).await;
                if !ended_body.load(std::sync::atomic::Ordering::SeqCst) && pgid > 1 {
                    // SAFETY: kill(2) on our own child's process group.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                }
            }
        });
        // git goes on without its client (receive-pack may still update
        // refs after the pusher left): report when it has really ended.
        let (exited_tx, exited) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut buf = String::new();
            let _ = stderr.read_to_string(&mut buf).await;
            if !buf.trim().is_empty() {
                tracing::debug!(stderr = %buf.trim(), "git http-backend");
            }
            let _ = child.wait().await;
            ended.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = exited_tx.send(());
        });

        // CGI response: header lines, a blank line, then the body.
        let mut out = BufReader::new(stdout);
        let mut resp = Response::builder().status(StatusCode::OK);
        loop {
            let mut line = String::new();
            if out.read_line(&mut line).await.context("reading http-backend headers")? == 0 {
                bail!("git http-backend ended before its headers");
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let Some((k, v)) = line.split_once(':') else { continue };
            let v = v.trim();
            if k.eq_ignore_ascii_case("status") {
                let code = v.split_whitespace().next().and_then(|c| c.parse().ok()).unwrap_or(500);
                resp = resp.status(code);
            } else {
                resp = resp.header(k, v);
            }
        }
        let stream = tokio_util::io::ReaderStream::new(out);
        Ok((resp.body(Body::from_stream(stream)).context("building git response")?, exited))
    }
}

/// A push whose client sends nothing for this long is abandoned.
const PUSH_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long git gets to end by itself after its client abandoned the push.
const ABANDONED_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Copy a request body into git, giving up when the client goes away or
/// stays silent for [`PUSH_IDLE_TIMEOUT`]. `Some(reason)`: abandoned.
async fn copy_body(body: Body, stdin: &mut tokio::process::ChildStdin) -> Option<&'static str> {
    let mut stream = body.into_data_stream();
    loop {
        match tokio::time::timeout(PUSH_IDLE_TIMEOUT, stream.next()).await {
            Ok(Some(Ok(chunk))) => {
                if stdin.write_all(&chunk).await.is_err() {
                    return None; // git stopped reading: it ends by itself
                }
            }
            Ok(Some(Err(_))) => return Some("the client went away mid-request"),
            Ok(None) => return None,
            Err(_) => return Some("no bytes from the client for 30s"),
        }
    }
}

/// Read one file of a commit, when it exists and is a regular blob of at
/// most `max` bytes.
pub async fn read_file(repo: &Path, q: &Quarantine, commit: &str, path: &str, max: u64) -> Result<Option<Vec<u8>>> {
    // A symlink is a blob too (holding its target's path): look at the
    // tree entry's mode, so a link is refused by name, never read as text.
    let entry = git_q(repo, q, &["ls-tree", "--format=%(objectmode)", commit, "--", path])
        .output()
        .await
        .context("running git ls-tree")?;
    if String::from_utf8_lossy(&entry.stdout).trim() == "120000" {
        bail!("{path} is a symlink; slipway reads only regular files from a release");
    }
    let spec = format!("{commit}:{path}");
    let out = git_q(repo, q, &["cat-file", "-t", &spec]).output().await.context("running git cat-file")?;
    if !out.status.success() || String::from_utf8_lossy(&out.stdout).trim() != "blob" {
        return Ok(None);
    }
    let size = git_q(repo, q, &["cat-file", "-s", &spec]).output().await.context("running git cat-file")?;
    let size: u64 = String::from_utf8_lossy(&size.stdout).trim().parse().unwrap_or(u64::MAX);
    if size > max {
        bail!("{path} is larger than {max} bytes");
    }
    let out = git_q(repo, q, &["cat-file", "blob", &spec]).output().await.context("running git cat-file")?;
    Ok(Some(out.stdout))
}

/// Check `commit` out into `dest` (which must not exist yet) as plain files.
pub async fn archive(repo: &Path, q: &Quarantine, commit: &str, dest: &Path) -> Result<()> {
    tokio::fs::create_dir_all(dest).await.with_context(|| format!("creating {}", dest.display()))?;
    let mut git = git_q(repo, q, &["archive", "--format=tar", commit]);
    git.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut git = git.spawn().context("starting git archive")?;
    let git_out: Stdio = git
        .stdout
        .take()
        .context("git archive stdout")?
        .try_into()
        .context("piping git archive")?;
    let tar = Command::new("tar")
        .args(["-x", "--no-same-owner", "--no-same-permissions", "-C"])
        .arg(dest)
        .stdin(git_out)
        .stderr(Stdio::piped())
        .output();
    let (git_status, tar_out) = tokio::join!(git.wait_with_output(), tar);
    let git_out = git_status.context("waiting for git archive")?;
    let tar_out = tar_out.context("running tar")?;
    if !git_out.status.success() {
        bail!("git archive {commit} failed: {}", String::from_utf8_lossy(&git_out.stderr).trim());
    }
    if !tar_out.status.success() {
        bail!("unpacking {commit} failed: {}", String::from_utf8_lossy(&tar_out.stderr).trim());
    }
    Ok(())
}

/// The commit a ref points at, if the ref exists.
pub async fn resolve(repo: &Path, refname: &str) -> Option<String> {
    let out = git_q(repo, &Quarantine::default(), &["rev-parse", "--verify", "--quiet", &format!("{refname}^{{commit}}")])
        .output()
        .await
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Record a deploy in the repo: move `LIVE` to `commit` and add
/// `DEPLOYED-YYYY-MM-DD/HHMM` (UTC), with `-2`, `-3`... when that name is
/// taken. Returns the new tag's name. Must not run while receive-pack of
/// a push to this repo is under way (its objects may be quarantined).
///
/// `prefix` ("" or "APP/") names a staging app's tags (`APP/LIVE`), so that
/// one clone can fetch the tags of staging and live apps side by side.
pub async fn tag_deploy(repo: &Path, commit: &str, now: chrono::DateTime<chrono::Utc>, prefix: &str) -> Result<String> {
    let base = format!("{prefix}DEPLOYED-{}", now.format("%Y-%m-%d/%H%M"));
    let mut name = base.clone();
    let mut n = 1;
    while resolve_exact(repo, &format!("refs/tags/{name}")).await {
        n += 1;
        name = format!("{base}-{n}");
    }
    git(Some(repo), &["update-ref", &format!("refs/tags/{name}"), commit, &"0".repeat(40)], None).await?;
    git(Some(repo), &["update-ref", &format!("refs/tags/{prefix}LIVE"), commit], None).await?;
    Ok(name)
}

/// Rename the unprefixed deploy tags (`LIVE`, `DEPLOYED-*`) to `prefix`ed
/// ones, for an app that just became a staging app. Returns how many moved.
pub async fn prefix_deploy_tags(repo: &Path, prefix: &str) -> Result<usize> {
    let out = git_q(repo, &Quarantine::default(), &["for-each-ref", "--format=%(refname) %(objectname)", "refs/tags/"])
        .output()
        .await
        .context("listing tags")?;
    let mut moved = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((refname, id)) = line.split_once(' ') else { continue };
        let Some(tag) = refname.strip_prefix("refs/tags/") else { continue };
        if !(tag == "LIVE" || tag.starts_with("DEPLOYED-")) {
            continue;
        }
        let new = format!("refs/tags/{prefix}{tag}");
        git(Some(repo), &["update-ref", &new, id], None).await?;
        git(Some(repo), &["update-ref", "-d", refname, id], None).await?;
        moved += 1;
    }
    Ok(moved)
}

/// Does this exact ref exist (whatever it points at)?
async fn resolve_exact(repo: &Path, refname: &str) -> bool {
    git_q(repo, &Quarantine::default(), &["show-ref", "--verify", "--quiet", refname])
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Bring `commit` (and its history) from one app's repo into another's,
/// under a scratch ref, so promotion can release it before any branch of
/// the target names it.
pub async fn fetch_commit(from: &Path, to: &Path, commit: &str) -> Result<()> {
    // Fetching by object id needs the source to allow it; both repos are
    // ours and local, so say so for this one command only.
    git(
        Some(to),
        &[
            "fetch",
            "--quiet",
            "--no-tags",
            "--upload-pack=git -c uploadpack.allowAnySHA1InWant=true upload-pack",
            &from.display().to_string(),
            &format!("+{commit}:refs/slipway/incoming"),
        ],
        None,
    )
    .await
}

/// Point `refname` at `commit` (dropping the promotion scratch ref).
pub async fn set_ref(repo: &Path, refname: &str, commit: &str) -> Result<()> {
    git(Some(repo), &["update-ref", refname, commit], None).await?;
    let _ = git(Some(repo), &["update-ref", "-d", "refs/slipway/incoming"], None).await;
    Ok(())
}

/// The object a ref points at, as stored (an annotated tag's own id, not
/// its commit): what receive-pack's old values name.
pub async fn ref_value(repo: &Path, refname: &str) -> Option<String> {
    let out = git_q(repo, &Quarantine::default(), &["rev-parse", "--verify", "--quiet", refname]).output().await.ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A short one-line summary of a commit, for release descriptions.
pub async fn subject(repo: &Path, q: &Quarantine, commit: &str) -> String {
    match git_q(repo, q, &["log", "-1", "--format=%s", commit]).output().await {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().chars().take(100).collect(),
        _ => String::new(),
    }
}

fn git_q(repo: &Path, q: &Quarantine, args: &[&str]) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("--git-dir").arg(repo).args(args).stdin(Stdio::null());
    for var in QUARANTINE_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(q.0.iter().map(|(k, v)| (k, v)));
    cmd
}

async fn git(repo: Option<&Path>, args: &[&str], extra: Option<&Path>) -> Result<()> {
    let mut cmd = Command::new("git");
    if let Some(r) = repo {
        cmd.arg("--git-dir").arg(r);
    }
    cmd.args(args);
    if let Some(p) = extra {
        cmd.arg(p);
    }
    let out = cmd.stdin(Stdio::null()).output().await.context("running git")?;
    if !out.status.success() {
        bail!("git {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode of {}", path.display()))
}
