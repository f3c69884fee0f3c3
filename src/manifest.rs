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
    /// The signal that stops it: the app's `stop_signal`, else what its
    /// app server expects (uWSGI takes TERM as "reload"; INT stops it),
    /// else TERM.
    pub stop_signal: i32,
    pub stop_timeout: Duration,
    pub limits: Limits,
}

/// Resource limits of one process type (`[processes.X]`), enforced by the
/// runtime: rlimits and cgroups on the host, the engine's limits for
/// containers. `None` takes the runtime's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Bytes of memory (`memory = "512M"`).
    pub memory: Option<u64>,
    /// CPUs, fractional (`cpus = 0.5`).
    pub cpus: Option<f64>,
    /// Processes and threads (`processes = 256`).
    pub processes: Option<u32>,
    /// Open file descriptors (`open_files = 4096`).
    pub open_files: Option<u32>,
}

/// A release path kept across releases (`[storage]`): `path` inside the
/// release (a directory, or a single file such as an SQLite database) is
/// DIR/apps/APP/data/storage/NAME.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageMount {
    /// Relative to the release root; validated: no `..`, no absolute path.
    pub path: String,
    /// A plain name under the app's storage directory.
    pub name: String,
}

/// Files served by slipway's proxy itself (`[static]`): requests under
/// `prefix` (`/static/`) are answered from `path` inside the release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticMount {
    /// Starts and ends with `/`.
    pub prefix: String,
    /// Relative to the release root; validated like storage paths.
    pub path: String,
}

/// `[docker]`: whether and how the app runs in containers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DockerSpec {
    /// `enabled = false` keeps an app with a Dockerfile on the host;
    /// `None`: containers when there is a Dockerfile or an `image`.
    pub enabled: Option<bool>,
    /// A generated image's base (`image = "python"`): no Dockerfile needed.
    pub image: Option<String>,
    /// The Dockerfile's path in the release (default `Dockerfile`).
    pub dockerfile: Option<String>,
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
    /// `[build] command`: runs in the new release tree before it is sealed.
    pub build_command: Option<String>,
    pub promote_check: Option<String>,
    pub deploy: DeployPolicy,
    pub health_path: String,
    pub health_timeout: Duration,
    pub storage: Vec<StorageMount>,
    pub statics: Vec<StaticMount>,
    pub docker: DockerSpec,
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
        let file: FileToml = toml::from_str(toml_text).map_err(|e| ManifestError::Toml(describe_toml_error(&e, toml_text)))?;

        let mut release_command = None;
        let mut processes = Vec::new();
        for (name, command) in entries {
            if name == "release" {
                release_command = Some(command);
                continue;
            }
            let opts = file.processes.get(&name).cloned().unwrap_or_default();
            let limits = parse_limits(&name, &opts)?;
            let uwsgi = command.split_whitespace().any(|w| w == "uwsgi" || w.ends_with("/uwsgi"));
            processes.push(ProcessSpec {
                limits,
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
                    // uWSGI reloads on TERM (unless --die-on-term) and stops on INT.
                    None if uwsgi => libc::SIGINT,
                    None => libc::SIGTERM,
                    Some(s) => parse_signal(s).ok_or_else(|| {
                        ManifestError::Toml(format!("processes.{name}.stop_signal: unknown signal {s:?}"))
                    })?,
                },
                stop_timeout: match opts.stop_timeout.as_deref() {
                    None => Duration::from_secs(10),
                    Some(s) => duration_in(&format!("processes.{name}.stop_timeout"), s, STOP_TIMEOUT_RANGE)?,
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
        if let Some(cmd) = &file.release.command {
            release_command = Some(cmd.clone());
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
            Some(s) => duration_in("[healthcheck] timeout", s, HEALTH_TIMEOUT_RANGE)?,
        };

        let mut storage = Vec::new();
        for (path, name) in &file.storage {
            let path = release_path("[storage]", path)?;
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && !name.starts_with('.')
                && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
            if !name_ok {
                return Err(ManifestError::Toml(format!(
                    "[storage] {path:?} = {name:?}: the name must be letters, digits, '.', '_' or '-' (not starting with '.')"
                )));
            }
            if storage.iter().any(|s: &StorageMount| s.name == *name) {
                return Err(ManifestError::Toml(format!("[storage] name {name:?} is used twice")));
            }
            if storage.iter().any(|s: &StorageMount| nested(&s.path, &path)) {
                return Err(ManifestError::Toml(format!("[storage] {path:?} overlaps another storage path")));
            }
            storage.push(StorageMount { path, name: name.clone() });
        }
        let mut statics = Vec::new();
        for (prefix, path) in &file.static_files {
            let prefix_ok = prefix.starts_with('/')
                && prefix.ends_with('/')
                && prefix.len() <= 256
                && !prefix.split('/').any(|c| c == ".." || c == ".")
                && prefix.bytes().all(|c| c.is_ascii_graphic() && c != b'?' && c != b'#' && c != b'%');
            if !prefix_ok {
                return Err(ManifestError::Toml(format!(
                    "[static] {prefix:?}: a URL prefix starts and ends with / (\"/static/\")"
                )));
            }
            let path = release_path("[static]", path)?;
            statics.push(StaticMount { prefix: prefix.clone(), path });
        }
        // Longest prefix first: that is the one a request matches.
        statics.sort_by_key(|s| std::cmp::Reverse(s.prefix.len()));

        let docker = DockerSpec {
            enabled: file.docker.enabled,
            image: match file.docker.image {
                Some(i) if i.is_empty() || i.len() > 200 || i.bytes().any(|c| c.is_ascii_whitespace() || c.is_ascii_control()) => {
                    return Err(ManifestError::Toml(format!("[docker] image {i:?} is not an image name")))
                }
                other => other,
            },
            dockerfile: match file.docker.dockerfile {
                Some(d) => Some(release_path("[docker] dockerfile", &d)?),
                None => None,
            },
        };

        for (section, cmd) in [
            ("[build] command", &file.build.command),
            ("[test] command", &file.test.command),
            ("[release] command", &file.release.command),
            ("[promote] check", &file.promote.check),
        ] {
            if cmd.as_deref().is_some_and(|c| c.trim().is_empty()) {
                return Err(ManifestError::Toml(format!("{section} is empty")));
            }
        }

        Ok(Manifest {
            processes,
            release_command,
            test_command: file.test.command,
            build_command: file.build.command,
            promote_check: file.promote.check,
            deploy,
            health_path,
            health_timeout,
            storage,
            statics,
            docker,
        })
    }
}

/// `TYPE: command` lines; `#` comments and blank lines skipped.
/// Process types an app may declare: each costs processes, pipes and a
/// supervisor task, so 600 of them must not exhaust the daemon.
pub const MAX_PROCESS_TYPES: usize = 32;

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
        // process track (issue 10 #9): each type is processes and pipes.
        if out.len() == MAX_PROCESS_TYPES {
            return Err(err(format!("more than {MAX_PROCESS_TYPES} process types")));
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

/// The allowed ranges, said in the error when a value is outside them.
pub const STOP_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(600));
pub const HEALTH_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));

/// A duration as people write them (`30s`, `500ms`, `1m30s`, `2h`), or a
/// bare number of seconds; at most one hour. humantime does the parsing.
pub fn parse_duration(s: &str) -> Option<Duration> {
    parse_any_duration(s).filter(|d| *d <= Duration::from_secs(3600))
}

fn parse_any_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() || s.len() > 32 {
        return None;
    }
    if s.bytes().all(|c| c.is_ascii_digit()) {
        return Some(Duration::from_secs(s.parse().ok()?));
    }
    humantime::parse_duration(s).ok()
}

/// `what = s` as a duration within `range`, or an error that says the
/// accepted forms and the range.
fn duration_in(what: &str, s: &str, range: (Duration, Duration)) -> Result<Duration, ManifestError> {
    let (min, max) = range;
    let show = |d: Duration| humantime::format_duration(d).to_string();
    match parse_any_duration(s) {
        Some(d) if d >= min && d <= max => Ok(d),
        Some(_) => Err(ManifestError::Toml(format!("{what}: {s:?} is outside {} to {}", show(min), show(max)))),
        None => Err(ManifestError::Toml(format!(
            "{what}: {s:?} is not a duration (such as \"30s\", \"500ms\" or \"1m30s\"; {} to {})",
            show(min),
            show(max)
        ))),
    }
}

/// A memory size: bytes, or a number with K, M or G (binary units, as
/// Docker's `--memory` reads them; `512M`, `1G`, `256MiB`). Hand-written:
/// the crates that parse sizes read `M` as 10^6, which would surprise
/// anyone who wrote the same value for Docker.
pub fn parse_memory(s: &str) -> Option<u64> {
    let s = s.trim();
    let i = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(i);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

fn parse_limits(name: &str, opts: &ProcessToml) -> Result<Limits, ManifestError> {
    let err = |key: &str, msg: String| ManifestError::Toml(format!("processes.{name}.{key}: {msg}"));
    let memory = match &opts.memory {
        None => None,
        Some(s) => match parse_memory(s) {
            Some(b) if (4 << 20..=1 << 40).contains(&b) => Some(b),
            Some(_) => return Err(err("memory", format!("{s:?} is outside 4M to 1024G"))),
            None => return Err(err("memory", format!("{s:?} is not a size such as \"512M\" or \"2G\""))),
        },
    };
    let cpus = match opts.cpus {
        None => None,
        Some(c) if c.is_finite() && (0.01..=1024.0).contains(&c) => Some(c),
        Some(c) => return Err(err("cpus", format!("{c} is outside 0.01 to 1024"))),
    };
    let processes = match opts.processes {
        None => None,
        Some(n) if (1..=1_000_000).contains(&n) => Some(n as u32),
        Some(n) => return Err(err("processes", format!("{n} is outside 1 to 1000000"))),
    };
    let open_files = match opts.open_files {
        None => None,
        Some(n) if (16..=1_048_576).contains(&n) => Some(n as u32),
        Some(n) => return Err(err("open_files", format!("{n} is outside 16 to 1048576"))),
    };
    Ok(Limits { memory, cpus, processes, open_files })
}

/// A path inside the release, from a pushed slipway.toml: relative, no
/// `.`/`..` components, no empty ones, nothing odd. Normalised without a
/// trailing slash.
fn release_path(what: &str, raw: &str) -> Result<String, ManifestError> {
    let p = raw.trim_end_matches('/');
    let ok = !p.is_empty()
        && p.len() <= 512
        && !p.starts_with('/')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && !p.chars().any(|c| c.is_control() || c == '\\');
    if ok {
        Ok(p.to_string())
    } else {
        Err(ManifestError::Toml(format!("{what}: {raw:?} must be a relative path inside the release, without . or ..")))
    }
}

/// Is one of two release paths inside the other (or the same)?
fn nested(a: &str, b: &str) -> bool {
    let (a, b) = (format!("{a}/"), format!("{b}/"));
    a.starts_with(&b) || b.starts_with(&a)
}

/// toml's error on one line; for an unknown key, the nearest valid one.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let msg = one_line(e.message());
    // serde's wording: "unknown field `healtcheck`, expected one of `deploy`, `test`, ..."
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((unknown, expected)) = rest.split_once('`') {
            let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            let best = candidates
                .iter()
                .map(|c| (strsim::damerau_levenshtein(unknown, c), *c))
                .filter(|(d, c)| *d <= 2.max(c.len() / 3))
                .min();
            let place = match e.span() {
                Some(span) => format!(" on line {}", text.get(..span.start).unwrap_or("").matches('\n').count() + 1),
                None => String::new(),
            };
            // history track: a section is said as it is written, `[healthcheck]`.
            let line_of = |at: usize| text.get(..at).map(|t| t.rfind('\n').map_or(0, |i| i + 1)).and_then(|from| text.get(from..));
            let section = e.span().and_then(|sp| line_of(sp.start)).is_some_and(|l| l.trim_start().starts_with('['));
            let show = |k: &str| if section { format!("[{k}]") } else { format!("{k:?}") };
            let kind = if section { "section" } else { "key" };
            return match best {
                Some((_, c)) => format!("unknown {kind} {}{place}; did you mean {}?", show(unknown), show(c)),
                None => format!("unknown {kind} {}{place}; valid here: {}", show(unknown), candidates.join(", ")),
            };
        }
    }
    msg
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
    #[serde(default)]
    build: CommandToml,
    #[serde(default)]
    storage: BTreeMap<String, String>,
    #[serde(default, rename = "static")]
    static_files: BTreeMap<String, String>,
    #[serde(default)]
    docker: DockerToml,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DockerToml {
    enabled: Option<bool>,
    image: Option<String>,
    dockerfile: Option<String>,
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
    memory: Option<String>,
    cpus: Option<f64>,
    processes: Option<i64>,
    open_files: Option<i64>,
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
    fn sections_of_design_md() {
        let m = Manifest::parse(
            "web: uwsgi --ini etc/uwsgi.ini\n",
            r#"
[build]
command = "python manage.py collectstatic --noinput"
[storage]
"media" = "media"
"src/db.sqlite3" = "db.sqlite3"
[static]
"/static/" = "staticfiles/"
"/static/admin/" = "admin-static"
[processes.web]
memory = "512M"
cpus = 0.5
processes = 64
stop_timeout = "1m30s"
[docker]
image = "python"
"#,
        )
        .expect("valid");
        assert_eq!(m.build_command.as_deref(), Some("python manage.py collectstatic --noinput"));
        assert_eq!(m.storage.len(), 2);
        assert!(m.storage.contains(&StorageMount { path: "src/db.sqlite3".into(), name: "db.sqlite3".into() }));
        assert_eq!(m.statics[0].prefix, "/static/admin/");
        assert_eq!(m.statics[1].path, "staticfiles");
        let web = m.process("web").expect("web");
        assert_eq!(web.limits.memory, Some(512 << 20));
        assert_eq!(web.limits.cpus, Some(0.5));
        assert_eq!(web.stop_signal, libc::SIGINT, "uWSGI stops on INT");
        assert_eq!(web.stop_timeout, Duration::from_secs(90));
        assert_eq!(m.docker.image.as_deref(), Some("python"));
    }

    #[test]
    fn unknown_keys_suggest_the_nearest() {
        let e = Manifest::parse("web: a", "[healtcheck]\npath = \"/\"").expect_err("typo").to_string();
        assert!(e.contains("unknown section [healtcheck] on line 1; did you mean [healthcheck]?"), "{e}");
        let e = Manifest::parse("web: a", "[processes.web]\nstop_timout = \"3s\"").expect_err("typo").to_string();
        assert!(e.contains("did you mean \"stop_timeout\""), "{e}");
        let e = Manifest::parse("web: a", "[healthcheck]\ntimeout = \"2h\"").expect_err("range").to_string();
        assert!(e.contains("outside 1s to 1h"), "{e}");
        let m = Manifest::parse("web: a", "[healthcheck]\ntimeout = \"1m30s\"").map_err(|e| e.to_string());
        assert_eq!(m.map(|m| m.health_timeout), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn refuses_paths_outside_the_release() {
        for toml in [
            "[storage]\n\"../x\" = \"x\"",
            "[storage]\n\"/etc\" = \"x\"",
            "[storage]\n\"a\" = \"../x\"",
            "[storage]\n\"a\" = \"x\"\n\"a/b\" = \"y\"",
            "[static]\n\"/static/\" = \"../x\"",
            "[static]\n\"static\" = \"x\"",
            "[static]\n\"/a/../\" = \"x\"",
            "[docker]\ndockerfile = \"../Dockerfile\"",
            "[processes.web]\nmemory = \"lots\"",
            "[processes.web]\ncpus = 0.0",
            "[build]\ncommand = \"  \"",
        ] {
            assert!(Manifest::parse("web: a", toml).is_err(), "{toml}");
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
