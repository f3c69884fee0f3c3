//! The embedded SSH server on `--ssh`: git over SSH (`git-receive-pack`,
//! `git-upload-pack`) and the CLI over SSH (`ssh git@HOST apps list`, as
//! with Dokku). Public keys only, registered with `slipway keys add`;
//! an unknown key is refused during the handshake. No shell, no pty, no
//! forwarding is ever given.
//!
//! A push over SSH takes the same path as one over HTTP: it is registered
//! with the platform, receive-pack runs the same pre-receive hook, and the
//! deploy's progress reaches the pusher as `remote:` lines.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, Msg, PublicKeyOffer, Server as _, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, MethodSet};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::watch;

use crate::auth::Principal;
use crate::layout::Layout;
use crate::names::AppName;
use crate::platform::{Platform, Push};

/// Parse one `ssh-ed25519 AAAA… comment` line; returns the key as stored
/// (without its comment) and its SHA-256 fingerprint.
pub fn parse_public_key(line: &str) -> Result<(String, String)> {
    let line = line.trim();
    if line.is_empty() || line.len() > 16 * 1024 || line.contains('\n') {
        bail!("expected one public key line, such as `ssh-ed25519 AAAA... you@host`");
    }
    let key = PublicKey::from_openssh(line).map_err(|e| anyhow!("not an OpenSSH public key: {e}"))?;
    let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
    let mut bare = key.clone();
    bare.set_comment("");
    let text = bare.to_openssh().map_err(|e| anyhow!("encoding the key: {e}"))?;
    Ok((text.trim().to_string(), fingerprint))
}

/// The server's config, with its host key: generated at first start and
/// kept (mode 0600) in the data directory, so clients can pin it.
pub fn config(layout: &Layout) -> Result<Arc<russh::server::Config>> {
    let path = layout.root().join("ssh_host_ed25519_key");
    let key = if path.exists() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        PrivateKey::from_openssh(text).map_err(|e| anyhow!("parsing {}: {e}", path.display()))?
    } else {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut seed);
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        let text = key.to_openssh(russh::keys::ssh_key::LineEnding::LF).map_err(|e| anyhow!("encoding host key: {e}"))?;
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        f.write_all(text.as_bytes()).context("writing host key")?;
        key
    };
    let mut methods = MethodSet::empty();
    methods.push(russh::MethodKind::PublicKey);
    Ok(Arc::new(russh::server::Config {
        keys: vec![key],
        methods,
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        // proxy track: idle connections are closed by the accept loop's SSH_IDLE.
        inactivity_timeout: Some(SSH_IDLE),
        ..Default::default()
    }))
}

// proxy track (issue 10 #3): our own accept loop (admission caps, survives EMFILE), a first-byte
// deadline, an authentication deadline and an idle timeout per connection.
/// A client must start the SSH handshake this soon after connecting.
const SSH_FIRST_BYTE: Duration = Duration::from_secs(10);
/// ... and be authenticated this soon.
const SSH_AUTH_DEADLINE: Duration = Duration::from_secs(30);
/// A connection with nothing moved either way for this long is closed.
const SSH_IDLE: Duration = Duration::from_secs(15 * 60);

pub async fn serve(
    p: Arc<Platform>,
    config: Arc<russh::server::Config>,
    listener: TcpListener,
    gate: Arc<crate::listener::Gate>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _alive = crate::listener::LISTENERS.up("ssh");
    let mut server = SshServer { p };
    loop {
        let (stream, peer, permit) = tokio::select! {
            c = crate::listener::accept(&listener, &gate) => c,
            _ = shutdown.wait_for(|v| *v) => return,
        };
        let _ = stream.set_nodelay(true);
        let io = crate::listener::Guarded::new(stream, permit, SSH_FIRST_BYTE, SSH_IDLE);
        let handler = server.new_client(Some(peer));
        let authed = handler.authed.clone();
        let (config, mut shutdown) = (config.clone(), shutdown.clone());
        tokio::spawn(async move {
            let session = match russh::server::run_stream(config, io, handler).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "SSH handshake failed");
                    return;
                }
            };
            let handle = session.handle();
            let deadline = tokio::time::sleep(SSH_AUTH_DEADLINE);
            tokio::pin!(session, deadline);
            let mut checked = false;
            loop {
                tokio::select! {
                    _ = &mut session => return,
                    _ = &mut deadline, if !checked => {
                        checked = true;
                        if !authed.load(std::sync::atomic::Ordering::Acquire) {
                            tracing::debug!(%peer, "SSH client not authenticated in time");
                            let _ = handle.disconnect(russh::Disconnect::ByApplication, "authentication timed out".into(), "en".into()).await;
                            return;
                        }
                    }
                    _ = async { let _ = shutdown.wait_for(|v| *v).await; } => {
                        let _ = handle.disconnect(russh::Disconnect::ByApplication, "slipway is shutting down".into(), "en".into()).await;
                        return;
                    }
                }
            }
        });
    }
}

struct SshServer {
    p: Arc<Platform>,
}

impl russh::server::Server for SshServer {
    type Handler = Connection;
    fn new_client(&mut self, _peer: Option<std::net::SocketAddr>) -> Connection {
        Connection { p: self.p.clone(), principal: None, fingerprint: None, channels: HashMap::new(), authed: Arc::default(), terminals: HashMap::new() }
    }
}

struct Connection {
    p: Arc<Platform>,
    principal: Option<Principal>,
    /// The key it authenticated with: re-checked at each command and on
    /// every revocation, so removing the key ends the session.
    fingerprint: Option<String>,
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// proxy track: set once a key is accepted; the accept loop's auth deadline reads it.
    authed: Arc<std::sync::atomic::AtomicBool>,
    /// people track: channels whose client asked for a terminal (`ssh -t`).
    terminals: HashMap<ChannelId, (String, crate::runtime::pty::WindowSize)>,
}

/// Does the key with this fingerprint still exist? (A database error is
/// not a removal.)
async fn key_valid(p: &Platform, fingerprint: &str) -> bool {
    let fp = fingerprint.to_string();
    p.store.call(move |s| s.key_by_fingerprint(&fp)).await.map(|k| k.is_some()).unwrap_or(true)
}

impl Connection {
    async fn principal_for(&self, key: &PublicKey) -> Option<Principal> {
        let fp = key.fingerprint(HashAlg::Sha256).to_string();
        let found = self.p.store.call(move |s| s.key_by_fingerprint(&fp)).await.ok().flatten()?;
        Some(Principal { name: format!("key:{}", found.name), scope: found.app })
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey_offered(&mut self, _user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        if self.principal_for(offer.public_key).await.is_some() {
            return Ok(Auth::Accept);
        }
        // One line per key refused (a client may offer several).
        tracing::warn!(via = "ssh", key = %offer.public_key.fingerprint(HashAlg::Sha256), "auth failure: unknown or removed key");
        Ok(Auth::reject())
    }

    async fn auth_publickey(&mut self, _user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        match self.principal_for(key.public_key).await {
            Some(p) => {
                self.principal = Some(p);
                self.authed.store(true, std::sync::atomic::Ordering::Release);
                self.fingerprint = Some(key.public_key.fingerprint(HashAlg::Sha256).to_string());
                Ok(Auth::Accept)
            }
            None => Ok(Auth::reject()),
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    // people track: a terminal is given to CLI commands (`ssh -t git@HOST
    // run APP -- bash`); it never becomes a shell on the server.
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        _px: u32,
        _py: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let size = crate::runtime::pty::WindowSize { cols: cols.min(u16::MAX.into()) as u16, rows: rows.min(u16::MAX.into()) as u16 };
        self.terminals.insert(channel, (term.chars().take(64).collect(), size));
        session.channel_success(channel)?;
        Ok(())
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        let msg = "slipway gives no shell: push with git, or run a command such as `ssh -p PORT git@HOST apps list`\r\n";
        session.extended_data(channel, 1, msg.as_bytes().to_vec())?;
        session.exit_status_request(channel, 1)?;
        session.eof(channel)?;
        session.close(channel)?;
        Ok(())
    }

    async fn exec_request(&mut self, channel: ChannelId, data: &[u8], session: &mut Session) -> Result<(), Self::Error> {
        let Some(ch) = self.channels.remove(&channel) else {
            session.channel_failure(channel)?;
            return Ok(());
        };
        let (Some(principal), Some(fingerprint)) = (self.principal.clone(), self.fingerprint.clone()) else {
            session.channel_failure(channel)?;
            return Ok(());
        };
        if !key_valid(&self.p, &fingerprint).await {
            // Removed since this connection authenticated.
            session.channel_failure(channel)?;
            return Ok(());
        }
        session.channel_success(channel)?;
        let p = self.p.clone();
        let command = String::from_utf8_lossy(data).to_string();
        let terminal = self.terminals.remove(&channel);
        tokio::spawn(async move {
            let code = match run_exec(&p, &principal, &fingerprint, &command, ch, terminal).await {
                Ok(()) => return,
                Err((ch, e)) => {
                    let _ = ch.extended_data_bytes(1, format!("slipway: {e:#}\n").into_bytes()).await;
                    let _ = ch.exit_status(1).await;
                    let _ = ch.eof().await;
                    let _ = ch.close().await;
                    1
                }
            };
            tracing::debug!(code, "ssh command refused");
        });
        Ok(())
    }
}

/// The subcommands a key may run over SSH: the API clients, nothing else
/// (never `server` or `hook`).
const CLIENT_COMMANDS: [&str; 20] = [
    "apps", "config", "ps", "scale", "restart", "stop", "start", "releases", "rollback", "deploy", "logs", "run", "promote",
    "webhook", "domains", "keys", "tokens", "events", "help", "version",
];

/// What an exec request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Git { service: &'static str, app: String },
    Cli(Vec<String>),
}

fn parse_request(command: &str) -> Result<Request> {
    let words = split_words(command)?;
    let (first, rest) = words.split_first().ok_or_else(|| anyhow!("empty command"))?;
    let service = match first.as_str() {
        "git-receive-pack" => Some("receive-pack"),
        "git-upload-pack" => Some("upload-pack"),
        _ => None,
    };
    if let Some(service) = service {
        let [path] = rest else { bail!("expected `{first} APP.git`") };
        let name = path.trim_start_matches('/').trim_end_matches('/');
        let name = name.strip_suffix(".git").unwrap_or(name);
        return Ok(Request::Git { service, app: name.to_string() });
    }
    // Judge the command as the CLI will parse it: `apps:list` is `apps list`.
    let mut argv = vec!["slipway".to_string()];
    argv.extend(words.iter().cloned());
    let argv = crate::cli::expand_colon_spelling(argv);
    let sub = argv.get(1).map(String::as_str).unwrap_or("");
    if !CLIENT_COMMANDS.contains(&sub) {
        bail!("`{}` is not available over SSH", first.chars().take(40).collect::<String>());
    }
    Ok(Request::Cli(argv[1..].to_vec()))
}

/// Split a command line as a POSIX shell would, for quoting only: no
/// expansion of any kind happens.
pub fn split_words(s: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => cur.push(ch),
                        None => bail!("unterminated quote"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch) => cur.push(ch),
                            None => bail!("unterminated quote"),
                        },
                        Some(ch) => cur.push(ch),
                        None => bail!("unterminated quote"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(ch) = chars.next() {
                    cur.push(ch);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

type ExecError = (Channel<Msg>, anyhow::Error);

async fn run_exec(
    p: &Arc<Platform>,
    principal: &Principal,
    fingerprint: &str,
    command: &str,
    ch: Channel<Msg>,
    terminal: Option<(String, crate::runtime::pty::WindowSize)>,
) -> Result<(), ExecError> {
    let revoked = p.until_revoked(|| key_valid(p, fingerprint));
    let request = match parse_request(command) {
        Ok(r) => r,
        Err(e) => return Err((ch, e)),
    };
    match request {
        Request::Git { service, app } => {
            let (cmd, push_id) = match git_command(p, principal, service, &app).await {
                Ok(c) => c,
                Err(e) => return Err((ch, e)),
            };
            let result = bridge(ch, cmd, revoked).await;
            if let Some(id) = push_id {
                p.end_push(&id);
            }
            result
        }
        Request::Cli(args) => {
            // The CLI runs as itself, against the API, with a credential
            // that acts as this key and dies with the command.
            let token = p.begin_session(principal.clone());
            let mut api = p.api_addr;
            if api.ip().is_unspecified() {
                api.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            let exe = match std::env::current_exe() {
                Ok(e) => e,
                Err(e) => return Err((ch, anyhow!("locating slipway: {e}"))),
            };
            let mut cmd = Command::new(exe);
            cmd.args(&args)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("SLIPWAY_URL", format!("http://{api}"))
                .env("SLIPWAY_TOKEN", &token)
                .env("SLIPWAY_SSH_SESSION", "1");
            let result = match terminal {
                Some((term, size)) => {
                    cmd.env("TERM", term);
                    // A removed key ends the terminal session too.
                    tokio::select! {
                        r = bridge_terminal(ch, cmd, size) => r,
                        () = revoked => Ok(()),
                    }
                }
                None => bridge(ch, cmd, revoked).await,
            };
            p.end_session(&token);
            result
        }
    }
}

/// Check access and build the git command for one repo; registers a push.
async fn git_command(p: &Arc<Platform>, principal: &Principal, service: &str, name: &str) -> Result<(Command, Option<String>)> {
    let app = AppName::parse(name)?;
    if !principal.may_access(&app) {
        bail!("this key may not access app {app}");
    }
    let a = app.clone();
    let exists = p.store.call(move |s| s.app(&a)).await?.is_some();
    let push = service == "receive-pack";
    if !exists {
        if !(push && principal.is_admin()) {
            bail!("no app named {app}");
        }
        let a = app.clone();
        p.store.call(move |s| s.create_app(&a)).await?;
        p.register_routes(&app).await;
        p.proxy.set_upstreams(app.as_str(), Vec::new());
        p.event(Some(&app), &crate::release::Actor(principal.name.clone()), "create", "", "ok").await;
    }
    let repo = p.repos.ensure(&app).await?;
    let mut cmd = Command::new("git");
    cmd.arg(service)
        .arg(repo_arg(&repo))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_else(|_| crate::runtime::SYSTEM_PATH.into()));
    let mut push_id = None;
    if push {
        let id = p.register_push(Push { app: app.clone(), actor: principal.name.clone() });
        cmd.env("SLIPWAY_PUSH", &id).env("SLIPWAY_SOCKET", p.layout.socket());
        push_id = Some(id);
    }
    Ok((cmd, push_id))
}

fn repo_arg(repo: &Path) -> std::ffi::OsString {
    repo.as_os_str().to_owned()
}

/// Run `cmd` with the channel as its stdin, stdout and stderr; send its
/// exit status and close. The channel closing kills the command, and so
/// does `revoked` resolving (the key was removed).
async fn bridge(mut ch: Channel<Msg>, mut cmd: Command, revoked: impl std::future::Future<Output = ()>) -> Result<(), ExecError> {
    tokio::pin!(revoked);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Err((ch, anyhow!("starting the command: {e}"))),
    };
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out_writer = ch.make_writer();
    let mut err_writer = ch.make_writer_ext(Some(1));
    let out_task = tokio::spawn(async move {
        if let Some(o) = stdout.as_mut() {
            let _ = tokio::io::copy(o, &mut out_writer).await;
        }
        let _ = out_writer.shutdown().await;
    });
    let err_task = tokio::spawn(async move {
        if let Some(e) = stderr.as_mut() {
            let _ = tokio::io::copy(e, &mut err_writer).await;
        }
    });
    let status = loop {
        tokio::select! {
            msg = ch.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if let Some(i) = stdin.as_mut() {
                        if i.write_all(&data).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Some(ChannelMsg::Eof) => stdin = None,
                Some(_) => {}
                None => {
                    // The client went away: so does the command.
                    let _ = child.kill().await;
                    break None;
                }
            },
            _ = &mut revoked => {
                let _ = child.kill().await;
                let _ = ch.extended_data_bytes(1, b"slipway: this key was removed; session ended\n".to_vec()).await;
                break None;
            },
            status = child.wait() => break status.ok(),
        }
    };
    let _ = out_task.await;
    let _ = err_task.await;
    let code = status.and_then(|s| s.code()).unwrap_or(1) as u32;
    let _ = ch.exit_status(code).await;
    let _ = ch.eof().await;
    let _ = ch.close().await;
    Ok(())
}

/// people track: as [`bridge`], with the command on a terminal of its own
/// (`ssh -t`): its output and the client's keys pass through the terminal,
/// window changes resize it.
async fn bridge_terminal(mut ch: Channel<Msg>, cmd: Command, size: crate::runtime::pty::WindowSize) -> Result<(), ExecError> {
    let (mut child, term) = match crate::runtime::pty::spawn_in_terminal(cmd, size, None) {
        Ok(c) => c,
        Err(e) => return Err((ch, anyhow!("starting the command: {e}"))),
    };
    let term = Arc::new(term);
    let mut writer = ch.make_writer();
    let out_task = tokio::spawn({
        let term = term.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = term.read(&mut buf).await {
                if n == 0 || writer.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = writer.flush().await;
        }
    });
    let status = loop {
        tokio::select! {
            msg = ch.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    let _ = term.write_all(&data).await;
                }
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                    let _ = term.resize(crate::runtime::pty::WindowSize {
                        cols: col_width.min(u16::MAX.into()) as u16,
                        rows: row_height.min(u16::MAX.into()) as u16,
                    });
                }
                Some(_) => {}
                None => {
                    let _ = child.kill().await;
                    break None;
                }
            },
            status = child.wait() => break status.ok(),
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), out_task).await;
    drop(term);
    let code = status.and_then(|s| s.code()).unwrap_or(1) as u32;
    let _ = ch.exit_status(code).await;
    let _ = ch.eof().await;
    let _ = ch.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        assert_eq!(
            parse_request("git-receive-pack '/myapp.git'").ok(),
            Some(Request::Git { service: "receive-pack", app: "myapp".into() })
        );
        assert_eq!(
            parse_request("git-upload-pack 'myapp.git'").ok(),
            Some(Request::Git { service: "upload-pack", app: "myapp".into() })
        );
        assert_eq!(parse_request("apps list --json").ok(), Some(Request::Cli(vec!["apps".into(), "list".into(), "--json".into()])));
        assert_eq!(
            parse_request("config set a 'K=a b' \"Q=x\\\"y\"").ok(),
            Some(Request::Cli(vec!["config".into(), "set".into(), "a".into(), "K=a b".into(), "Q=x\"y".into()]))
        );
        for bad in ["", "server --data /", "server:--isolation=off", "hook pre-receive", "hook:pre-receive", "git-receive-pack", "git-receive-pack a b", "--help", "x 'open", "nosuch"] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn public_keys() {
        let line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl someone@host";
        let (stored, fp) = parse_public_key(line).expect("valid key");
        assert!(stored.starts_with("ssh-ed25519 AAAA") && !stored.contains("someone"));
        assert!(fp.starts_with("SHA256:"));
        for bad in ["", "ssh-ed25519", "ssh-ed25519 notbase64", "hello world", "ssh-ed25519 AAAA\nssh-ed25519 AAAA"] {
            assert!(parse_public_key(bad).is_err(), "{bad:?}");
        }
    }
}
