//! Where the client points: named server contexts in
//! `~/.config/slipway/config.toml` (`slipway login URL` adds one and makes
//! it current), and the git credential helper that hands a context's token
//! to git for HTTP pushes, so the token never sits in a remote's URL.
//!
//! The file holds tokens: it is written with mode 0600, and a token is
//! printed nowhere.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};

/// `config.toml`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The context used when none is named (SLIPWAY_CONTEXT names one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, ServerContext>,
}

/// One server and the token to use there.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerContext {
    pub url: String,
    pub token: String,
}

impl ClientConfig {
    /// `$XDG_CONFIG_HOME/slipway/config.toml`, else `~/.config/...`.
    pub fn path() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        Some(base.join("slipway").join("config.toml"))
    }

    /// The file, or an empty config when there is none.
    pub fn load() -> Result<ClientConfig> {
        let Some(path) = ClientConfig::path() else { return Ok(ClientConfig::default()) };
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("reading {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClientConfig::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self) -> Result<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = ClientConfig::path().ok_or_else(|| anyhow!("no home directory to keep the client config in (set HOME)"))?;
        let dir = path.parent().ok_or_else(|| anyhow!("bad config path"))?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let text = toml::to_string_pretty(self).context("encoding the client config")?;
        // Written aside and renamed: a crash never leaves half a file, and
        // the new file is 0600 from its first byte.
        let tmp = dir.join(".config.toml.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The context to use: `name`, else SLIPWAY_CONTEXT, else the current one.
    pub fn selected(&self, name: Option<&str>) -> Result<Option<(String, ServerContext)>> {
        let env = std::env::var("SLIPWAY_CONTEXT").ok().filter(|v| !v.is_empty());
        let Some(name) = name.map(str::to_string).or(env).or_else(|| self.current.clone()) else { return Ok(None) };
        match self.contexts.get(&name) {
            Some(c) => Ok(Some((name, c.clone()))),
            None => bail!("no context named {name:?} in the client config; `slipway login URL --name {name}` adds it"),
        }
    }
}

/// A context name from a URL: its host and port, e.g. `example.com-7070`.
pub fn default_name(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '-' }).collect()
}

/// `slipway credential get` (git runs it): answer with the context's token
/// for the URL git asks about; `store` and `erase` are for git's other
/// helpers, not this one: the token lives in the client config.
pub fn credential_helper(operation: &str, context: &str) -> Result<i32> {
    // Read git's request to its end, as the protocol wants.
    let mut protocol = None;
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading git's credential request")?;
        if line.is_empty() {
            break;
        }
        if let Some(p) = line.strip_prefix("protocol=") {
            protocol = Some(p.to_string());
        }
    }
    if operation != "get" {
        return Ok(0);
    }
    let config = ClientConfig::load()?;
    let Some((_, ctx)) = config.selected(Some(context))? else { return Ok(0) };
    // Only over the scheme the context itself uses: a redirect elsewhere
    // gets nothing.
    if protocol.as_deref().is_some_and(|p| !ctx.url.starts_with(&format!("{p}://"))) {
        return Ok(0);
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "username=slipway")?;
    writeln!(stdout, "password={}", ctx.token)?;
    Ok(0)
}
