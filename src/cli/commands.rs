//! One function per subcommand. Each parses what the server cannot check
//! for it (KEY=VALUE syntax), calls the API, and prints the answer.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{json, Value};

use super::{out, AppsCmd, Cli, Command, ConfigCmd, DomainsCmd, KeysCmd, TokensCmd, WebhookCmd};
use crate::client::Endpoint;

/// Run a client subcommand; returns the process exit code.
pub async fn dispatch(cli: Cli) -> Result<i32> {
    let api = Endpoint::from_env()?;
    let progress = |l: &str| out(l);
    match cli.command {
        Command::Server(_) | Command::Hook { .. } => bail!("internal error: server and hook are not client commands"),
        Command::Apps(AppsCmd::Create { app }) => {
            let v = api.json(Method::POST, "/api/apps", Some(&json!({ "name": app }))).await?;
            out(&format!("created {} — push to it: git push <remote> main; served at {}", app, s(&v["url"])));
        }
        Command::Apps(AppsCmd::List { json }) => {
            let v = api.json(Method::GET, "/api/apps", None).await?;
            table(&v, json, &[("name", "APP"), ("release", "RELEASE"), ("processes", "PROCS"), ("url", "URL")]);
        }
        Command::Apps(AppsCmd::Info { app, json }) => {
            let v = api.json(Method::GET, &format!("/api/apps/{}", seg(&app)), None).await?;
            if json {
                out(&v.to_string());
            } else if let Some(obj) = v.as_object() {
                for (k, val) in obj {
                    out(&format!("{k:<12} {}", s(val)));
                }
            }
        }
        Command::Apps(AppsCmd::Destroy { app, confirm }) => {
            let confirm = confirm.ok_or_else(|| anyhow!("destroying {app} removes its code, data and logs: repeat with --confirm {app}"))?;
            api.json(Method::DELETE, &format!("/api/apps/{}?confirm={}", seg(&app), seg(&confirm)), None).await?;
            out(&format!("destroyed {app}"));
        }
        Command::Config(ConfigCmd::Show { app, json }) => {
            let v = api.json(Method::GET, &format!("/api/apps/{}/config", seg(&app)), None).await?;
            if json {
                out(&v.to_string());
            } else if let Some(obj) = v.as_object() {
                for (k, val) in obj {
                    out(&format!("{k}={}", s(val)));
                }
            }
        }
        Command::Config(ConfigCmd::Get { app, key }) => {
            let v = api.json(Method::GET, &format!("/api/apps/{}/config", seg(&app)), None).await?;
            match v.get(&key) {
                Some(val) => out(&s(val)),
                None => bail!("{app} has no config key {key}"),
            }
        }
        Command::Config(ConfigCmd::Set { app, pairs }) => {
            let mut set = BTreeMap::new();
            for p in pairs {
                let (k, v) = p.split_once('=').ok_or_else(|| anyhow!("expected KEY=VALUE, got {p:?}"))?;
                set.insert(k.to_string(), v.to_string());
            }
            let body = json!({ "set": set });
            let v = api.operation(Method::POST, &format!("/api/apps/{}/config", seg(&app)), Some(&body), progress).await?;
            config_done(&app, &v);
        }
        Command::Config(ConfigCmd::Unset { app, keys }) => {
            let body = json!({ "unset": keys });
            let v = api.operation(Method::POST, &format!("/api/apps/{}/config", seg(&app)), Some(&body), progress).await?;
            config_done(&app, &v);
        }
        Command::Ps { args, json } => match args.first().map(String::as_str) {
            Some("scale") if args.len() >= 3 => scale(&api, &args[1], &args[2..]).await?,
            Some(app) if args.len() == 1 => {
                let v = api.json(Method::GET, &format!("/api/apps/{}/ps", seg(app)), None).await?;
                table(
                    &v,
                    json,
                    &[("type", "TYPE"), ("instance", "N"), ("release", "RELEASE"), ("pid", "PID"), ("state", "STATE"), ("uptime_secs", "UPTIME"), ("restarts", "RESTARTS"), ("last_exit", "LAST EXIT")],
                );
                if !json {
                    for row in v.as_array().into_iter().flatten().filter(|r| r["state"] == "crashed") {
                        out(&format!("\n{}.{} crashed; its last output:", s(&row["type"]), s(&row["instance"])));
                        for line in row["last_lines"].as_array().into_iter().flatten() {
                            out(&format!("    {}", s(line)));
                        }
                    }
                }
            }
            _ => bail!("usage: slipway ps APP | slipway ps scale APP TYPE=N..."),
        },
        Command::Scale { app, counts } => scale(&api, &app, &counts).await?,
        Command::Restart { app, ptype } => {
            let body = json!({ "type": ptype });
            api.operation(Method::POST, &format!("/api/apps/{}/restart", seg(&app)), Some(&body), progress).await?;
        }
        Command::Start { app } => {
            api.operation(Method::POST, &format!("/api/apps/{}/start", seg(&app)), None, progress).await?;
        }
        Command::Stop { app } => {
            api.json(Method::POST, &format!("/api/apps/{}/stop", seg(&app)), None).await?;
            out(&format!("stopped {app}"));
        }
        Command::Releases { app, json } => {
            let mut v = api.json(Method::GET, &format!("/api/apps/{}/releases", seg(&app)), None).await?;
            if let Some(rows) = v.as_array_mut() {
                for r in rows {
                    if let Some(c) = r.get("commit").and_then(Value::as_str).map(|c| c[..c.len().min(8)].to_string()) {
                        if !json {
                            r["commit"] = json!(c);
                        }
                    }
                    if !json {
                        r["live"] = json!(if r["live"] == json!(true) { "*" } else { "" });
                    }
                }
            }
            table(&v, json, &[("live", ""), ("version", "RELEASE"), ("commit", "COMMIT"), ("status", "STATUS"), ("actor", "BY"), ("created_at", "WHEN"), ("description", "DESCRIPTION")]);
        }
        Command::Rollback { app, release } => {
            let body = json!({ "version": release });
            api.operation(Method::POST, &format!("/api/apps/{}/rollback", seg(&app)), Some(&body), progress).await?;
        }
        Command::Deploy { app, git_ref } => {
            let body = json!({ "ref": git_ref });
            api.operation(Method::POST, &format!("/api/apps/{}/deploy", seg(&app)), Some(&body), progress).await?;
        }
        Command::Logs { app, follow, ptype, n } => {
            let mut path = format!("/api/apps/{}/logs?n={n}&follow={follow}", seg(&app));
            if let Some(t) = ptype {
                path.push_str(&format!("&type={}", seg(&t)));
            }
            let (status, mut body) = api.send(Method::GET, &path, None).await?;
            if !status.is_success() {
                let b = body.collect().await?.to_bytes();
                let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                bail!("{}", v.get("error").and_then(Value::as_str).unwrap_or("logs failed"));
            }
            let mut stdout = std::io::stdout();
            while let Some(frame) = body.frame().await {
                if let Some(d) = frame.context("reading logs")?.data_ref() {
                    stdout.write_all(d)?;
                    stdout.flush()?;
                }
            }
        }
        Command::Run { app, command } => {
            let line = command.iter().map(|a| crate::build::shell_quote(a)).collect::<Vec<_>>().join(" ");
            let v = api
                .operation(Method::POST, &format!("/api/apps/{}/run", seg(&app)), Some(&json!({ "command": line })), out)
                .await?;
            return Ok(v["exit_code"].as_i64().unwrap_or(1) as i32);
        }
        Command::Promote { app, to } => {
            let body = json!({ "to": to });
            api.operation(Method::POST, &format!("/api/apps/{}/promote", seg(&app)), Some(&body), progress).await?;
        }
        Command::Webhook(WebhookCmd::Set { app, url }) => {
            api.json(Method::PUT, &format!("/api/apps/{}/webhook", seg(&app)), Some(&json!({ "url": url }))).await?;
            out(&format!("{app} notifies {url} of every deploy"));
        }
        Command::Webhook(WebhookCmd::Show { app }) => {
            let v = api.json(Method::GET, &format!("/api/apps/{}/webhook", seg(&app)), None).await?;
            out(&s(&v["url"]));
        }
        Command::Webhook(WebhookCmd::Unset { app }) => {
            api.json(Method::DELETE, &format!("/api/apps/{}/webhook", seg(&app)), None).await?;
            out(&format!("{app} has no webhook"));
        }
        Command::Domains(DomainsCmd::Add { app, host }) => {
            api.json(Method::POST, &format!("/api/apps/{}/domains", seg(&app)), Some(&json!({ "host": host }))).await?;
            out(&format!("{host} now routes to {app}"));
        }
        Command::Domains(DomainsCmd::Remove { app, host }) => {
            api.json(Method::DELETE, &format!("/api/apps/{}/domains/{}", seg(&app), seg(&host)), None).await?;
            out(&format!("{host} removed from {app}"));
        }
        Command::Domains(DomainsCmd::List { app, json }) => {
            let v = api.json(Method::GET, &format!("/api/apps/{}/domains", seg(&app)), None).await?;
            if json {
                out(&v.to_string());
            } else {
                for h in v.as_array().into_iter().flatten() {
                    out(&s(h));
                }
            }
        }
        Command::Keys(KeysCmd::Add { name, key, app }) => {
            let key = match key {
                Some(k) => k,
                None => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line).context("reading the key from stdin")?;
                    line
                }
            };
            let v = api.json(Method::POST, "/api/keys", Some(&json!({ "name": name, "key": key.trim(), "app": app }))).await?;
            out(&format!("added key {name} ({})", s(&v["fingerprint"])));
        }
        Command::Keys(KeysCmd::List { json }) => {
            let v = api.json(Method::GET, "/api/keys", None).await?;
            table(&v, json, &[("name", "NAME"), ("fingerprint", "FINGERPRINT"), ("app", "APP"), ("created_at", "CREATED")]);
        }
        Command::Keys(KeysCmd::Remove { name }) => {
            api.json(Method::DELETE, &format!("/api/keys/{}", seg(&name)), None).await?;
            out(&format!("removed key {name}"));
        }
        Command::Tokens(TokensCmd::Create { name, app }) => {
            let v = api.json(Method::POST, "/api/tokens", Some(&json!({ "name": name, "app": app }))).await?;
            out(&s(&v["token"]));
        }
        Command::Tokens(TokensCmd::List { json }) => {
            let v = api.json(Method::GET, "/api/tokens", None).await?;
            table(&v, json, &[("name", "NAME"), ("app", "APP"), ("created_at", "CREATED")]);
        }
        Command::Tokens(TokensCmd::Revoke { name }) => {
            api.json(Method::DELETE, &format!("/api/tokens/{}", seg(&name)), None).await?;
            out(&format!("revoked {name}"));
        }
        Command::Events { app, json } => {
            let path = match app {
                Some(a) => format!("/api/events?app={}", seg(&a)),
                None => "/api/events".into(),
            };
            let v = api.json(Method::GET, &path, None).await?;
            table(&v, json, &[("at", "WHEN"), ("app", "APP"), ("actor", "WHO"), ("action", "ACTION"), ("detail", "DETAIL"), ("outcome", "OUTCOME")]);
        }
    }
    Ok(0)
}

/// `slipway hook pre-receive`: git runs this inside a push. It forwards
/// the ref updates and the quarantine to the daemon and prints the
/// deploy's progress, which git shows the pusher as `remote:` lines.
pub async fn hook(name: &str) -> Result<i32> {
    if name != "pre-receive" {
        bail!("unknown hook {name:?}");
    }
    let push = std::env::var("SLIPWAY_PUSH").map_err(|_| anyhow!("pushes must go through slipway's git endpoints"))?;
    let socket = std::env::var_os("SLIPWAY_SOCKET").ok_or_else(|| anyhow!("SLIPWAY_SOCKET is not set"))?;
    let mut refs = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading ref updates")?;
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let [old, new, name] = parts[..] {
            refs.push(json!({ "old": old, "new": new, "name": name }));
        }
    }
    let env: BTreeMap<String, String> = crate::git::QUARANTINE_VARS
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    let api = Endpoint::Socket(socket.into());
    let body = json!({ "push": push, "refs": refs, "env": env });
    let mut stdout = std::io::stdout();
    let result = api
        .operation(Method::POST, "/internal/pre-receive", Some(&body), |l| {
            let _ = writeln!(stdout, "{l}");
            let _ = stdout.flush();
        })
        .await;
    match result {
        Ok(_) => Ok(0),
        Err(e) => {
            for line in format!("{e:#}").lines() {
                let _ = writeln!(stdout, "!      {line}");
            }
            let _ = stdout.flush();
            Ok(1)
        }
    }
}

async fn scale(api: &Endpoint, app: &str, counts: &[String]) -> Result<()> {
    let mut body = BTreeMap::new();
    for c in counts {
        let (t, n) = c.split_once('=').ok_or_else(|| anyhow!("expected TYPE=N, got {c:?}"))?;
        let n: u32 = n.parse().map_err(|_| anyhow!("invalid count in {c:?}: use a whole number"))?;
        body.insert(t.to_string(), n);
    }
    api.operation(Method::POST, &format!("/api/apps/{}/scale", seg(app)), Some(&json!(body)), out).await?;
    Ok(())
}

fn config_done(app: &str, v: &Value) {
    match v.get("release").and_then(Value::as_str) {
        Some(r) => out(&format!("{app} config updated: {r} is live")),
        None => out(&format!("{app} config updated (takes effect at the next deploy)")),
    }
}

/// Percent-encode a path segment: user input never changes the route.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// Print rows as an aligned table, or the raw JSON with `--json`.
fn table(v: &Value, json: bool, cols: &[(&str, &str)]) {
    if json {
        out(&v.to_string());
        return;
    }
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| cols.iter().map(|(k, _)| s(&r[*k])).collect())
        .collect();
    let mut widths: Vec<usize> = cols.iter().map(|(_, h)| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let fmt = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    out(&fmt(cols.iter().map(|(_, h)| h.to_string()).collect()));
    for r in rows {
        out(&fmt(r));
    }
}
