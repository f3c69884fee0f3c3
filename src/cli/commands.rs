//! One function per subcommand. Each parses what the server cannot check
//! for it (KEY=VALUE syntax), calls the API, and prints the answer.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{json, Value};

use super::context::{self, ClientConfig, ServerContext};
use super::{out, AppsCmd, CertsCmd, Cli, Command, ConfigCmd, DomainsCmd, KeysCmd, RemoteCmd, SchedulerCmd, TokensCmd, WebhookCmd};
use crate::client::Endpoint;

/// Run a client subcommand; returns the process exit code.
pub async fn dispatch(cli: Cli) -> Result<i32> {
    if let Some(ca) = &cli.ca_file {
        crate::client::set_ca_file(ca.clone());
    }
    // The two that need no server: generated from the same definitions
    // as the parser, so they never drift from it.
    match &cli.command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "slipway", &mut buf);
            std::io::stdout().write_all(&buf)?;
            return Ok(0);
        }
        Command::Man => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut buf).context("rendering the man page")?;
            std::io::stdout().write_all(&buf)?;
            return Ok(0);
        }
        Command::Credential { operation, context } => return context::credential_helper(operation, context),
        Command::Login { url, name } => {
            let token = match std::env::var("SLIPWAY_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
                Some(t) => t,
                None => {
                    eprint!("API token for {url} (slipway tokens create NAME): ");
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line).context("reading the token from stdin")?;
                    line
                }
            };
            let token = token.trim().to_string();
            let api = Endpoint::tcp(url, &token)?;
            api.json(Method::GET, "/api/apps", None).await.with_context(|| format!("checking the token against {url}"))?;
            let name = name.clone().unwrap_or_else(|| context::default_name(url));
            crate::names::check_label(&name).map_err(|e| anyhow!("context name: {e}"))?;
            let mut config = ClientConfig::load()?;
            config.contexts.insert(name.clone(), ServerContext { url: url.trim_end_matches('/').to_string(), token });
            config.current = Some(name.clone());
            let path = config.save()?;
            out(&format!("logged in to {url}: context {name} is current ({})", path.display()));
            return Ok(0);
        }
        Command::Remote(RemoteCmd::Add { app, ssh, name }) => {
            let mut config = ClientConfig::load()?;
            // The credential helper finds the token by context: a server
            // given by SLIPWAY_URL becomes one.
            let (ctx_name, ctx) = match std::env::var("SLIPWAY_URL").ok().filter(|u| !u.is_empty()) {
                Some(url) => {
                    let token = std::env::var("SLIPWAY_TOKEN").ok().filter(|t| !t.trim().is_empty()).ok_or_else(|| anyhow!("SLIPWAY_URL is set but SLIPWAY_TOKEN is not"))?;
                    let name = context::default_name(&url);
                    let ctx = ServerContext { url: url.trim_end_matches('/').to_string(), token: token.trim().to_string() };
                    config.contexts.insert(name.clone(), ctx.clone());
                    config.save()?;
                    (name, ctx)
                }
                None => config.selected(None)?.ok_or_else(|| anyhow!("remote add needs a server: `slipway login URL` first"))?,
            };
            let api = Endpoint::tcp(&ctx.url, &ctx.token)?;
            let v = api.json(Method::GET, &format!("/api/apps/{}", seg(app)), None).await?;
            let (http, ssh_url) = remotes(&api, app, &v);
            let ssh_url = ssh_url.starts_with("ssh://").then_some(ssh_url);
            let url = super::remote::add(app, &http, ssh_url.as_deref(), *ssh, name, &ctx_name)?;
            out(&format!("remote {name} → {url}; push with: git push {name} main"));
            return Ok(0);
        }
        _ => {}
    }
    let api = Endpoint::from_env()?;
    let progress = |l: &str| out(l);
    match cli.command {
        Command::Server(_)
        | Command::Hook { .. }
        | Command::Completions { .. }
        | Command::Man
        | Command::Credential { .. }
        | Command::Login { .. }
        | Command::Remote(_)
        | Command::Images(_)
        | Command::Restore { .. }
        | Command::ContainerShim => {
            bail!("internal error: not a client command")
        }
        Command::Apps(AppsCmd::Create { app }) => {
            let v = api.json(Method::POST, "/api/apps", Some(&json!({ "name": app }))).await?;
            out(&format!("created {app}, served at {}", s(&v["url"])));
            let (http, ssh) = remotes(&api, &app, &v);
            out(&format!("push to it:  git push {http} main"));
            out(&format!("   or SSH:   git push {ssh} main   (with a key added by `slipway keys add`)"));
        }
        Command::Apps(AppsCmd::List { json }) => {
            let v = api.json(Method::GET, "/api/apps", None).await?;
            table(&v, json, &[("name", "APP"), ("release", "RELEASE"), ("processes", "PROCS"), ("url", "URL")]);
        }
        Command::Apps(AppsCmd::Info { app, json }) => {
            let mut v = api.json(Method::GET, &format!("/api/apps/{}", seg(&app)), None).await?;
            let (http, ssh) = remotes(&api, &app, &v);
            v["git_http"] = json!(http);
            v["git_ssh"] = json!(ssh);
            if json {
                out(&v.to_string());
            } else {
                for (label, key) in [
                    ("app", "name"),
                    ("state", "state"),
                    ("url", "url"),
                    ("release", "release"),
                    ("commit", "commit"),
                    ("processes", "processes"),
                    ("git (http)", "git_http"),
                    ("git (ssh)", "git_ssh"),
                    ("domains", "domains"),
                    ("config", "config_keys"),
                ] {
                    out(&format!("{label:<12} {}", s(&v[key])));
                }
            }
        }
        Command::Apps(AppsCmd::Destroy { app, confirm }) => {
            let confirm = confirm.ok_or_else(|| anyhow!("destroying {app} removes its code, data and logs: repeat with --confirm {app}"))?;
            api.json(Method::DELETE, &format!("/api/apps/{}?confirm={}", seg(&app), seg(&confirm)), None).await?;
            out(&format!("destroyed {app}"));
        }
        Command::Config(ConfigCmd::Show { app, json, shell }) => {
            let v = api.json(Method::GET, &format!("/api/apps/{}/config", seg(&app)), None).await?;
            if json {
                out(&v.to_string());
            } else if shell {
                // Keys are validated names; values are quoted whole.
                for (k, val) in v.as_object().into_iter().flatten() {
                    out(&format!("export {k}={}", crate::build::shell_quote(val.as_str().unwrap_or_default())));
                }
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
        Command::Config(ConfigCmd::Set { app, pairs, no_restart }) => {
            let mut set = BTreeMap::new();
            for p in pairs {
                // The value is never echoed: it may be a secret.
                let (k, v) = p.split_once('=').ok_or_else(|| anyhow!("expected KEY=VALUE, got {:?}", p.split('=').next().unwrap_or_default()))?;
                set.insert(k.to_string(), v.to_string());
            }
            let body = json!({ "set": set, "no_restart": no_restart });
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
                // swarm track: tasks say their node instead of a pid.
                let on_swarm = v.as_array().into_iter().flatten().any(|r| r.get("node").is_some());
                let cols: &[(&str, &str)] = if on_swarm {
                    &[("type", "TYPE"), ("instance", "N"), ("release", "RELEASE"), ("node", "NODE"), ("state", "STATE"), ("task", "TASK"), ("last_exit", "LAST ERROR")]
                } else {
                    &[("type", "TYPE"), ("instance", "N"), ("release", "RELEASE"), ("pid", "PID"), ("state", "STATE"), ("uptime_secs", "UPTIME"), ("restarts", "RESTARTS"), ("last_exit", "LAST EXIT")]
                };
                table(&v, json, cols);
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
        Command::Scheduler(SchedulerCmd::Set { app, scheduler }) => {
            let body = json!({ "scheduler": scheduler });
            api.operation(Method::POST, &format!("/api/apps/{}/scheduler", seg(&app)), Some(&body), progress).await?;
        }
        Command::Nodes { json } => {
            let v = api.json(Method::GET, "/api/nodes", None).await?;
            table(&v, json, &[("node", "NODE"), ("role", "ROLE"), ("state", "STATE"), ("availability", "AVAILABILITY"), ("addr", "ADDRESS"), ("tasks", "SLIPWAY TASKS")]);
        }
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
            if !json {
                // A collected release is history only: its code must be rebuilt.
                for r in v.as_array_mut().into_iter().flatten() {
                    if r["collected"] == json!(true) {
                        r["status"] = json!(format!("{} (code collected)", s(&r["status"])));
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
        Command::Logs { app, deploy: Some(version), .. } => {
            let (status, body) = api.send(Method::GET, &format!("/api/apps/{}/releases/{}/output", seg(&app), seg(&version)), None).await?;
            let b = body.collect().await?.to_bytes();
            if !status.is_success() {
                let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                bail!("{}", v.get("error").and_then(Value::as_str).unwrap_or("no deploy output"));
            }
            std::io::stdout().write_all(&b)?;
        }
        Command::Logs { app, follow, ptype, n, since, grep, deploy: None } => {
            let mut path = format!("/api/apps/{}/logs?n={n}&follow={follow}", seg(&app));
            if let Some(t) = ptype {
                warn_unknown_type(&api, &app, &t).await;
                path.push_str(&format!("&type={}", seg(&t)));
            }
            if let Some(d) = since {
                path.push_str(&format!("&since={}", std::time::Duration::from(d).as_secs().max(1)));
            }
            if let Some(g) = grep {
                path.push_str(&format!("&grep={}", seg(&g)));
            }
            let (status, mut body) = api.send(Method::GET, &path, None).await?;
            if !status.is_success() {
                let b = body.collect().await?.to_bytes();
                let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                bail!("{}", v.get("error").and_then(Value::as_str).unwrap_or("logs failed"));
            }
            let mut stdout = std::io::stdout();
            // App output: its control sequences are shown, not obeyed.
            let mut printable = super::printable::Printable::new();
            while let Some(frame) = body.frame().await {
                if let Some(d) = frame.context("reading logs")?.data_ref() {
                    stdout.write_all(&printable.filter(d))?;
                    stdout.flush()?;
                }
            }
            stdout.write_all(&printable.finish())?;
        }
        Command::Run { app, tty, command } => {
            let line = command.iter().map(|a| quote_word(a)).collect::<Vec<_>>().join(" ");
            // `ssh -t git@HOST run APP -- bash`: the SSH client asked for
            // the terminal this command now runs on.
            let tty = tty || (std::env::var_os("SLIPWAY_SSH_SESSION").is_some() && std::io::IsTerminal::is_terminal(&std::io::stdin()));
            let io = api.upgrade(&format!("/api/apps/{}/attach", seg(&app)), crate::oneoff::UPGRADE).await?;
            return crate::oneoff::attach(io, line, tty).await;
        }
        Command::Promote { app, to } => {
            let body = json!({ "to": to });
            api.operation(Method::POST, &format!("/api/apps/{}/promote", seg(&app)), Some(&body), progress).await?;
        }
        Command::Webhook(WebhookCmd::Set { app, url }) => {
            let v = api.json(Method::PUT, &format!("/api/apps/{}/webhook", seg(&app)), Some(&json!({ "url": url }))).await?;
            out(&format!("{app} notifies {url} of every deploy"));
            out(&format!("signed: {}: sha256=HMAC-SHA256(secret, body), secret {}", s(&v["signature_header"]), s(&v["secret"])));
        }
        Command::Webhook(WebhookCmd::Show { app }) => {
            let v = api.json(Method::GET, &format!("/api/apps/{}/webhook", seg(&app)), None).await?;
            out(&format!("url     {}", s(&v["url"])));
            out(&format!("secret  {}", s(&v["secret"])));
        }
        Command::Webhook(WebhookCmd::Test { app }) => {
            let v = api.json(Method::POST, &format!("/api/apps/{}/webhook/test", seg(&app)), None).await?;
            out(&format!("delivered to {}: {}", s(&v["url"]), s(&v["status"])));
        }
        Command::Webhook(WebhookCmd::Unset { app }) => {
            api.json(Method::DELETE, &format!("/api/apps/{}/webhook", seg(&app)), None).await?;
            out(&format!("{app} has no webhook"));
        }
        // tls track: certificates.
        Command::Certs { cmd: Some(CertsCmd::Add { app, cert, key }), .. } => {
            let read = |p: &std::path::Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
            let body = json!({ "cert": read(&cert)?, "key": read(&key)? });
            let v = api.json(Method::POST, &format!("/api/apps/{}/certs", seg(&app)), Some(&body)).await?;
            let hosts: Vec<String> = v["hosts"].as_array().into_iter().flatten().map(s).collect();
            out(&format!("{app} now serves your certificate for {}", hosts.join(", ")));
        }
        Command::Certs { cmd: Some(CertsCmd::Ca), .. } => {
            let v = api.json(Method::GET, "/api/certs/ca", None).await?;
            out(s(&v["pem"]).trim_end());
        }
        Command::Certs { cmd: Some(CertsCmd::Redirect { app, state }), .. } => {
            let body = json!({ "redirect": state == "on" });
            api.json(Method::PUT, &format!("/api/apps/{}/certs/redirect", seg(&app)), Some(&body)).await?;
            out(&format!("plain HTTP redirect for {app}: {state}"));
        }
        Command::Certs { app: Some(app), json, cmd: None } => {
            let v = api.json(Method::GET, &format!("/api/apps/{}/certs", seg(&app)), None).await?;
            if json {
                out(&v.to_string());
            } else {
                table(
                    &v["hosts"],
                    false,
                    &[("host", "HOST"), ("state", "STATE"), ("source", "SOURCE"), ("issuer", "ISSUER"), ("not_after", "EXPIRES"), ("last_error", "LAST ERROR")],
                );
            }
        }
        Command::Certs { app: None, cmd: None, .. } => bail!("usage: slipway certs APP | certs add APP --cert FILE --key FILE | certs ca"),
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
        // backup track (issue 14 #6)
        Command::Backup { file } => backup(&api, &file).await?,
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
        Command::Events { app, json, n, since } => {
            let mut path = format!("/api/events?n={n}");
            if let Some(a) = app {
                path.push_str(&format!("&app={}", seg(&a)));
            }
            if let Some(d) = since {
                path.push_str(&format!("&since={}", std::time::Duration::from(d).as_secs().max(1)));
            }
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

/// Line sources that are not process types: the pipeline's own lines, the
/// proxy's access lines, slipway's notes.
const LOG_SOURCES: [&str; 3] = ["deploy", "router", "slipway"];

/// `--type` names nothing the app runs: say so (the filter still applies,
/// as the type may come back with the next release).
async fn warn_unknown_type(api: &Endpoint, app: &str, ptype: &str) {
    if LOG_SOURCES.contains(&ptype) {
        return;
    }
    let Ok(v) = api.json(Method::GET, &format!("/api/apps/{}/ps", seg(app)), None).await else { return };
    let mut types: Vec<String> = v.as_array().into_iter().flatten().filter_map(|r| r["type"].as_str().map(str::to_string)).collect();
    types.dedup();
    if !types.iter().any(|t| t == ptype) {
        let known = types.iter().map(String::as_str).chain(LOG_SOURCES).collect::<Vec<_>>().join(", ");
        eprintln!("warning: {app} runs no process of type {ptype:?} (known: {known}); showing nothing may be right");
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
        None if v["unchanged"] == json!(true) => out(&format!("{app} config unchanged: no new release")),
        None => out(&format!("{app} config stored (takes effect at the next deploy)")),
    }
}

/// The app's git remotes, HTTP and SSH, as this client reaches the server:
/// its host from SLIPWAY_URL (or the server's API address through the
/// socket), the paths and the SSH port from the server. The token is
/// never part of the URL: git asks for it (any user name, the token as
/// password), or a credential helper answers.
fn remotes(api: &Endpoint, app: &str, v: &Value) -> (String, String) {
    let authority = match api {
        Endpoint::Tcp { authority, .. } => authority.clone(),
        Endpoint::Socket(_) => v["api_addr"].as_str().unwrap_or("localhost:7070").to_string(),
    };
    let host = match authority.rsplit_once(':') {
        Some((h, _)) if !h.is_empty() => h.to_string(),
        _ => authority.clone(),
    };
    let host = if host == "0.0.0.0" || host == "[::]" { "localhost".to_string() } else { host };
    let http = format!("{}://{authority}/git/{app}.git", api.scheme());
    let ssh = match v["ssh_port"].as_u64() {
        Some(port) => format!("ssh://git@{host}:{port}/{app}.git"),
        None => "(SSH not served)".to_string(),
    };
    (http, ssh)
}

/// A word of a command line, quoted only when the shell needs it, so the
/// event log shows `python manage.py shell` as it was typed.
fn quote_word(w: &str) -> String {
    if !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@+%".contains(&b)) {
        w.to_string()
    } else {
        crate::build::shell_quote(w)
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

/// Print rows as a table, or the raw JSON with `--json`. comfy-table
/// lays it out: on a terminal, long cells (an event's detail, a commit
/// subject) wrap within the terminal's width instead of running past it.
fn table(v: &Value, json: bool, cols: &[(&str, &str)]) {
    if json {
        out(&v.to_string());
        return;
    }
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Dynamic)
        .set_header(cols.iter().map(|(_, h)| *h));
    for r in v.as_array().into_iter().flatten() {
        t.add_row(cols.iter().map(|(k, _)| s(&r[*k])));
    }
    // The preset pads each cell by one space on both sides: trimmed, the
    // lines read as before (and as `grep`/`awk` expect).
    for line in t.to_string().lines() {
        out(line.strip_prefix(' ').unwrap_or(line).trim_end());
    }
}

// backup track (issue 14 #6): stream the daemon's snapshot into a
// temporary file beside FILE, check the whole archive, then rename it:
// FILE is a complete backup or is not there at all.
async fn backup(api: &Endpoint, file: &std::path::Path) -> Result<()> {
    let (status, mut body) = api.send(Method::GET, "/api/backup", None).await?;
    if !status.is_success() {
        let bytes = body.collect().await.context("reading response")?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        bail!("{}", v.get("error").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| format!("server answered {status}")));
    }
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new().prefix(".slipway-backup-").tempfile_in(&dir).with_context(|| format!("creating a file in {}", dir.display()))?;
    let mut w = std::io::BufWriter::new(tmp.as_file());
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the backup transfer broke off")?;
        if let Some(data) = frame.data_ref() {
            w.write_all(data).with_context(|| format!("writing {}", tmp.path().display()))?;
        }
    }
    w.flush().with_context(|| format!("writing {}", tmp.path().display()))?;
    drop(w);
    tmp.as_file().sync_all().context("syncing the backup")?;
    let summary = crate::backup::verify(tmp.path()).context("the backup received is not whole")?;
    tmp.persist(file).with_context(|| format!("writing {}", file.display()))?;
    out(&format!("backup of {} app{} written to {} ({:.1} MiB)", summary.apps, if summary.apps == 1 { "" } else { "s" }, file.display(), summary.bytes as f64 / 1048576.0));
    Ok(())
}
