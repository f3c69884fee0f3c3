//! The client inside a git checkout, as Heroku's and Dokku's are:
//! `slipway remote add APP` adds the git remote (its token handed to git
//! by `slipway credential`, never written into the URL), and afterwards
//! commands run there may leave `APP` out: it comes from the remote, and
//! `-a APP` / `--app APP` names another one anywhere.

use std::process::Command;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::names::AppName;

/// The git config key (under `remote.NAME.`) that marks a slipway remote.
const APP_KEY: &str = "slipwayapp";

/// Commands whose first positional argument is the app, by their words.
fn app_command(args: &[String]) -> Option<usize> {
    let word = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match word(1) {
        "ps" if word(2) == "scale" => None,
        "ps" | "scale" | "restart" | "stop" | "start" | "releases" | "rollback" | "deploy" | "logs" | "run" | "promote" => Some(1),
        "apps" if matches!(word(2), "info" | "destroy") => Some(2),
        "config" if matches!(word(2), "show" | "get" | "set" | "unset") => Some(2),
        "webhook" if matches!(word(2), "set" | "show" | "unset" | "test") => Some(2),
        "domains" if matches!(word(2), "add" | "remove" | "list") => Some(2),
        "scheduler" if word(2) == "set" => Some(2),
        _ => None,
    }
}

/// Options of those commands that take a value (the value is not a
/// positional argument).
const VALUE_OPTIONS: [&str; 9] = ["-n", "--lines", "--n", "--type", "--since", "--grep", "--ref", "--to", "--confirm"];

/// Put the app into `args` where the parser expects it: from `-a/--app`,
/// or, when it is left out, from the checkout's slipway remote.
pub fn fill_in_app(mut args: Vec<String>) -> Result<Vec<String>> {
    let Some(words) = app_command(&args) else { return Ok(args) };
    let end = args.iter().position(|a| a == "--").unwrap_or(args.len());
    // `-a APP`, `--app APP`, `--app=APP`, anywhere before `--`.
    let mut explicit = None;
    let mut i = 1 + words;
    let mut end = end;
    while i < end {
        let a = args[i].clone();
        if a == "-a" || a == "--app" {
            let v = args.get(i + 1).filter(|_| i + 1 < end).cloned().ok_or_else(|| anyhow!("{a} needs an APP"))?;
            args.drain(i..i + 2);
            end -= 2;
            explicit = Some(v);
        } else if let Some(v) = a.strip_prefix("--app=") {
            explicit = Some(v.to_string());
            args.remove(i);
            end -= 1;
        } else {
            i += 1;
        }
    }
    let at = 1 + words;
    if let Some(app) = explicit {
        args.insert(at, app);
        return Ok(args);
    }
    let mut positionals = Vec::new();
    let mut i = at;
    while i < end {
        let a = &args[i];
        if VALUE_OPTIONS.contains(&a.as_str()) {
            i += 2;
            continue;
        }
        if !a.starts_with('-') {
            positionals.push(a.clone());
        }
        i += 1;
    }
    let is_version = |s: &str| s.strip_prefix('v').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let omitted = match positionals.first() {
        None => true,
        // KEY=VALUE, TYPE=N, an upper-case KEY: never an app's name.
        Some(first) => {
            AppName::parse(first).is_err()
                || (args[1] == "rollback" && positionals.len() == 1 && is_version(first))
                // `scheduler set swarm`: a scheduler, not an app.
                || (args[1] == "scheduler" && positionals.len() == 1)
        }
    };
    // A command run for an SSH client names its app: the daemon's own
    // working directory is no checkout of the client's.
    if !omitted || std::env::var_os("SLIPWAY_SSH_SESSION").is_some() {
        return Ok(args);
    }
    match checkout_app()? {
        Some(app) => {
            args.insert(at, app);
            Ok(args)
        }
        // Let the parser say what is missing.
        None => Ok(args),
    }
}

/// The app of this checkout's slipway remote, if there is exactly one.
pub fn checkout_app() -> Result<Option<String>> {
    let out = match Command::new("git").args(["config", "--get-regexp", &format!(r"^remote\..*\.{APP_KEY}$")]).output() {
        Ok(o) => o,
        // No git at all: no checkout to learn from.
        Err(_) => return Ok(None),
    };
    let mut apps: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect();
    apps.sort();
    apps.dedup();
    match apps.len() {
        0 => Ok(None),
        1 => Ok(apps.pop()),
        _ => bail!("this checkout has remotes for several apps ({}): name one with -a APP", apps.join(", ")),
    }
}

/// `slipway remote add`: the remote `name` for `app`, over HTTP (the
/// context's token handed to git by the credential helper) or SSH.
pub fn add(app: &str, http_url: &str, ssh_url: Option<&str>, ssh: bool, name: &str, context: &str) -> Result<String> {
    let url = if ssh {
        ssh_url.ok_or_else(|| anyhow!("the server does not serve git over SSH"))?.to_string()
    } else {
        http_url.to_string()
    };
    let inside = Command::new("git").args(["rev-parse", "--is-inside-work-tree"]).output().context("running git")?;
    if !inside.status.success() {
        bail!("not in a git checkout: run this where your app's code is");
    }
    let exists = Command::new("git").args(["remote", "get-url", name]).output().context("running git")?.status.success();
    git(&["remote", if exists { "set-url" } else { "add" }, name, &url])?;
    git(&["config", &format!("remote.{name}.{APP_KEY}"), app])?;
    if !ssh {
        let exe = std::env::current_exe().context("locating slipway")?;
        let key = format!("credential.{http_url}.helper");
        // An empty helper first resets any inherited list for this URL:
        // only slipway answers for it.
        let _ = Command::new("git").args(["config", "--unset-all", &key]).output();
        git(&["config", "--add", &key, ""])?;
        let helper = format!("!{} credential --context {}", crate::build::shell_quote(&exe.display().to_string()), crate::build::shell_quote(context));
        git(&["config", "--add", &key, &helper])?;
    }
    Ok(url)
}

fn git(args: &[&str]) -> Result<()> {
    let out = Command::new("git").args(args).output().context("running git")?;
    if !out.status.success() {
        bail!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
