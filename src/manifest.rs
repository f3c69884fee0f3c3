//! What an app brings: its `Procfile` and `slipway.toml`, parsed and
//! validated once into a [`Manifest`] that the pipeline and supervisor use.
//!
//! Both files come from a pushed repo, so both are hostile input: sizes are
//! bounded, unknown keys are refused with the key's name, and nothing here
//! touches the file system beyond reading the two files of one release.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("Procfile line {line}: {msg}")]
    Procfile { line: usize, msg: String },
    #[error("slipway.toml: {0}")]
    Toml(String),
    #[error("{0} is larger than 64 KiB")]
    TooLarge(&'static str),
    #[error("{0} is a symlink; slipway reads only regular files from a release")]
    Symlink(&'static str),
    #[error("reading {0}: {1}")]
    Io(&'static str, std::io::Error),
}

/// How new code reaches running processes of one type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// Start new processes, health-check, switch, drain the old ones.
    Replace,
    /// Send a signal to the running master (gunicorn reloads on HUP).
    Signal(i32),
    /// Touch a file the app server watches (uWSGI `--touch-reload`).
    Touch(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    /// A one-shot program: run once, never restarted.
    Never,
}

#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub name: String,
    pub command: String,
    pub restart: RestartPolicy,
    pub reload: Reload,
    pub stop_signal: i32,
    pub stop_timeout: Duration,
}

#[derive(Debug, Clone)]
pub enum DeployPolicy {
    /// Deploy pushes to this branch. `None`: `main`, or `master` when the
    /// repo has no `main`.
    Branch(Option<String>),
    /// Deploy refs matching any of these glob patterns (`*` only).
    Refs(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Manifest {
    /// Long-running process types, `release` excluded, in Procfile order.
    pub processes: Vec<ProcessSpec>,
    pub release_command: Option<String>,
    pub test_command: Option<String>,
    pub promote_check: Option<String>,
    pub deploy: DeployPolicy,
    pub health_path: String,
    pub health_timeout: Duration,
}

impl Manifest {
    pub fn process(&self, name: &str) -> Option<&ProcessSpec> {
        self.processes.iter().find(|p| p.name == name)
    }

    /// Read and validate the manifest of a checked-out release.
    pub fn load(dir: &Path) -> Result<Manifest, ManifestError> {
        let procfile = read_small(dir, "Procfile")?;
        let toml = read_small(dir, "slipway.toml")?;
        Manifest::parse(procfile.as_deref().unwrap_or(""), toml.as_deref().unwrap_or(""))
    }

    pub fn parse(procfile: &str, toml_text: &str) -> Result<Manifest, ManifestError> {
        let entries = parse_procfile(procfile)?;
        let file: FileToml =
            toml::from_str(toml_text).map_err(|e| ManifestError::Toml(one_line(&e.to_string())))?;

        let mut release_command = None;
        let mut processes = Vec::new();
        for (name, command) in entries {
            if name == "release" {
                release_command = Some(command);
                continue;
            }
            let opts = file.processes.get(&name).cloned().unwrap_or_default();
            processes.push(ProcessSpec {
                restart: match opts.restart.as_deref() {
                    None | Some("always") => RestartPolicy::Always,
                    Some("on-failure") => RestartPolicy::OnFailure,
                    Some("never") => RestartPolicy::Never,
                    Some(other) => {
                        return Err(ManifestError::Toml(format!(
                            "processes.{name}.restart: unknown policy {other:?} (always, on-failure, never)"
                        )))
                    }
                },
                reload: parse_reload(&name, opts.reload.as_deref())?,
                stop_signal: match opts.stop_signal.as_deref() {
                    None => libc::SIGTERM,
                    Some(s) => parse_signal(s).ok_or_else(|| {
                        ManifestError::Toml(format!("processes.{name}.stop_signal: unknown signal {s:?}"))
                    })?,
                },
                stop_timeout: match opts.stop_timeout.as_deref() {
                    None => Duration::from_secs(10),
                    Some(s) => parse_duration(s).ok_or_else(|| {
                        ManifestError::Toml(format!("processes.{name}.stop_timeout: bad duration {s:?}"))
                    })?,
                },
                name,
                command,
            });
        }
        for name in file.processes.keys() {
            if !processes.iter().any(|p| &p.name == name) {
                return Err(ManifestError::Toml(format!(
                    "[processes.{name}] names a type that the Procfile does not define"
                )));
            }
        }
        if let Some(cmd) = file.release.command {
            release_command = Some(cmd);
        }

        let deploy = match (file.deploy.branch, file.deploy.refs) {
            (Some(_), Some(_)) => {
                return Err(ManifestError::Toml("[deploy] takes branch or refs, not both".into()))
            }
            (Some(b), None) => {
                crate::names::check_ref(&format!("refs/heads/{b}"))
                    .map_err(|e| ManifestError::Toml(format!("[deploy] branch: {e}")))?;
                DeployPolicy::Branch(Some(b))
            }
            (None, Some(refs)) => {
                if refs.is_empty() || refs.iter().any(|r| !r.starts_with("refs/")) {
                    return Err(ManifestError::Toml(
                        "[deploy] refs must be full ref patterns such as \"refs/tags/release-*\"".into(),
                    ));
                }
                DeployPolicy::Refs(refs)
            }
            (None, None) => DeployPolicy::Branch(None),
        };

        let health_path = file.healthcheck.path.unwrap_or_else(|| "/".into());
        if !health_path.starts_with('/') || health_path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ManifestError::Toml(format!(
                "[healthcheck] path must start with / and hold no spaces: {health_path:?}"
            )));
        }
        let health_timeout = match file.healthcheck.timeout.as_deref() {
            None => Duration::from_secs(30),
            Some(s) => parse_duration(s)
                .ok_or_else(|| ManifestError::Toml(format!("[healthcheck] timeout: bad duration {s:?}")))?,
        };

        Ok(Manifest {
            processes,
            release_command,
            test_command: file.test.command,
            promote_check: file.promote.check,
            deploy,
            health_path,
            health_timeout,
        })
    }
}

/// `TYPE: command` lines; `#` comments and blank lines skipped.
pub fn parse_procfile(text: &str) -> Result<Vec<(String, String)>, ManifestError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |msg: String| ManifestError::Procfile { line: i + 1, msg };
        let (name, command) = line
            .split_once(':')
            .ok_or_else(|| err("expected `TYPE: command`".into()))?;
        let name = name.trim();
        let command = command.trim();
        let name_ok = !name.is_empty()
            && name.len() <= 30
            && name.as_bytes()[0].is_ascii_lowercase()
            && name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-');
        if !name_ok {
            return Err(err(format!(
                "process type {:?} must be lowercase letters, digits, - or _",
                name.chars().take(40).collect::<String>()
            )));
        }
        if command.is_empty() {
            return Err(err(format!("process type {name} has no command")));
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(err(format!("process type {name} is defined twice")));
        }
        out.push((name.to_string(), command.to_string()));
    }
    Ok(out)
}

fn parse_reload(name: &str, s: Option<&str>) -> Result<Reload, ManifestError> {
    let bad = |s: &str| {
        ManifestError::Toml(format!(
            "processes.{name}.reload: {s:?} is not \"replace\", \"signal:SIG\" or \"touch:PATH\""
        ))
    };
    match s {
        None | Some("replace") => Ok(Reload::Replace),
        Some(s) => {
            if let Some(sig) = s.strip_prefix("signal:") {
                parse_signal(sig).map(Reload::Signal).ok_or_else(|| bad(s))
            } else if let Some(path) = s.strip_prefix("touch:") {
                // Relative to the release and inside it: no absolute paths,
                // no climbing out with `..`.
                let ok = !path.is_empty()
                    && !path.starts_with('/')
                    && path.split('/').all(|c| c != ".." && !c.is_empty());
                if ok {
                    Ok(Reload::Touch(path.to_string()))
                } else {
                    Err(bad(s))
                }
            } else {
                Err(bad(s))
            }
        }
    }
}

pub fn parse_signal(s: &str) -> Option<i32> {
    let s = s.trim().to_ascii_uppercase();
    let s = s.strip_prefix("SIG").unwrap_or(&s);
    Some(match s {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "WINCH" => libc::SIGWINCH,
        _ => return None,
    })
}

/// `30s`, `500ms`, `2m`, or a bare number of seconds; at most one hour.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        _ => return None,
    };
    (d <= Duration::from_secs(3600)).then_some(d)
}

fn read_small(dir: &Path, name: &'static str) -> Result<Option<String>, ManifestError> {
    let path = dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ManifestError::Io(name, e)),
        Ok(m) if m.file_type().is_symlink() => return Err(ManifestError::Symlink(name)),
        Ok(m) if m.len() > 64 * 1024 => return Err(ManifestError::TooLarge(name)),
        Ok(_) => {}
    }
    std::fs::read_to_string(&path).map(Some).map_err(|e| ManifestError::Io(name, e))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileToml {
    #[serde(default)]
    deploy: DeployToml,
    #[serde(default)]
    test: CommandToml,
    #[serde(default)]
    release: CommandToml,
    #[serde(default)]
    healthcheck: HealthToml,
    #[serde(default)]
    processes: BTreeMap<String, ProcessToml>,
    #[serde(default)]
    promote: PromoteToml,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeployToml {
    branch: Option<String>,
    refs: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CommandToml {
    command: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HealthToml {
    path: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct ProcessToml {
    restart: Option<String>,
    reload: Option<String>,
    stop_signal: Option<String>,
    stop_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PromoteToml {
    check: Option<String>,
}

/// Does `refname` match a deploy pattern? Only `*` is special; it matches
/// any run of characters, `/` included.
pub fn ref_matches(pattern: &str, refname: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == refname;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !refname.starts_with(first) || !refname[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &refname[first.len()..refname.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_manifest() {
        let m = Manifest::parse(
            "web: gunicorn app:app\nrelease: python manage.py migrate\n# c\nworker: python w.py\n",
            r#"
[deploy]
refs = ["refs/tags/release-*"]
[healthcheck]
path = "/health"
timeout = "5s"
[processes.web]
reload = "signal:HUP"
[processes.worker]
restart = "never"
stop_timeout = "3s"
"#,
        )
        .expect("valid");
        assert_eq!(m.processes.len(), 2);
        assert_eq!(m.release_command.as_deref(), Some("python manage.py migrate"));
        assert_eq!(m.process("web").map(|p| p.reload.clone()), Some(Reload::Signal(libc::SIGHUP)));
        assert_eq!(m.process("worker").map(|p| p.restart), Some(RestartPolicy::Never));
        assert_eq!(m.health_timeout, Duration::from_secs(5));
    }

    #[test]
    fn refuses_bad_input() {
        for (procfile, toml) in [
            ("web", ""),
            ("Web: x", ""),
            ("web:", ""),
            ("web: a\nweb: b", ""),
            ("web: a", "[unknown]\nx=1"),
            ("web: a", "[processes.web]\nrestart = \"sometimes\""),
            ("web: a", "[processes.web]\nreload = \"touch:../x\""),
            ("web: a", "[processes.worker]\nrestart = \"never\""),
            ("web: a", "[healthcheck]\ntimeout = \"forever\""),
            ("web: a", "[deploy]\nbranch = \"a..b\""),
        ] {
            assert!(Manifest::parse(procfile, toml).is_err(), "{procfile:?} {toml:?}");
        }
    }

    #[test]
    fn patterns() {
        assert!(ref_matches("refs/tags/release-*", "refs/tags/release-1.0"));
        assert!(!ref_matches("refs/tags/release-*", "refs/tags/v1"));
        assert!(ref_matches("refs/heads/main", "refs/heads/main"));
        assert!(ref_matches("refs/*/x*y", "refs/tags/xaby"));
        assert!(!ref_matches("refs/*/x*y", "refs/tags/xab"));
    }
}
