//! The `slipway` command line: flags parsed by clap into [`Cli`], each
//! subcommand a plain function over the API client. All output goes
//! through [`out`]: tables for people, `--json` for scripts.

#![allow(clippy::print_stdout)]

mod commands;
pub mod context;
pub mod remote;
pub mod images;
// integrity track: app output made safe for the operator's terminal.
pub mod printable;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use commands::{dispatch, hook as commands_hook_impl};

/// Shown under the top-level help: where the client finds the server,
/// and one example per area.
const AFTER_HELP: &str = "\
Environment:
  SLIPWAY_URL     the server's API, e.g. http://deploy.example.com:7070 or https://... (unset: a
                  context from `slipway login`, else the local socket)
  SLIPWAY_CA_FILE extra CA certificates (PEM) for an https:// server (--ca-file)
  SLIPWAY_CONTEXT the client context to use (~/.config/slipway/config.toml)
  SLIPWAY_TOKEN   an API token for SLIPWAY_URL (`slipway tokens create NAME`)
  SLIPWAY_DATA    the server's data directory (server, and the local socket)
  SLIPWAY_LOG     the server's log filter, e.g. info or slipway=debug

Examples:
  deploy    git push http://git:$SLIPWAY_TOKEN@HOST:7070/git/myapp.git main
  apps      slipway apps create myapp; slipway apps info myapp
  config    slipway config set myapp SECRET_KEY=s3cret DEBUG=0
  processes slipway ps myapp; slipway scale myapp web=2 worker=1
  releases  slipway releases myapp; slipway rollback myapp v3
  logs      slipway logs myapp -f --type web --since 1h
  one-offs  slipway run -t myapp -- python manage.py shell
  access    slipway tokens create ci --app myapp; slipway keys add me < ~/.ssh/id_ed25519.pub
  checkout  slipway login http://HOST:7070; slipway remote add myapp; git push slipway main; slipway logs -f
  shell     source <(slipway completions bash)

Inside a git checkout with a slipway remote (`slipway remote add APP`), APP may be
left out; -a APP (--app APP) names an app anywhere.";

#[derive(Parser, Debug)]
#[command(
    name = "slipway",
    version,
    about = "git push to deploy: atomic, health-checked, reversible",
    propagate_version = true,
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// Also trust the CA certificates (PEM) in FILE, for an https:// server
    #[arg(long, global = true, env = "SLIPWAY_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon
    Server(Box<ServerArgs>),
    /// Create, list, inspect and destroy apps
    #[command(subcommand)]
    Apps(AppsCmd),
    /// Show and change an app's config vars (each change is a new release)
    #[command(subcommand)]
    Config(ConfigCmd),
    /// List an app's processes (`ps scale APP TYPE=N` scales too)
    Ps {
        /// APP, or `scale APP TYPE=N...`
        #[arg(required = true, num_args = 1.., value_name = "APP")]
        args: Vec<String>,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Set how many processes of each type run
    Scale {
        /// The app to scale
        app: String,
        /// New counts, e.g. web=2 worker=1
        #[arg(required = true, value_name = "TYPE=N")]
        counts: Vec<String>,
    },
    /// Restart an app's processes (health-checked, zero downtime)
    Restart {
        /// The app to restart
        app: String,
        /// Only this process type (default: all)
        #[arg(value_name = "TYPE")]
        ptype: Option<String>,
    },
    /// Stop all of an app's processes
    Stop {
        /// The app to stop
        app: String,
    },
    /// Start an app's live release again
    Start {
        /// The app to start
        app: String,
    },
    /// List an app's releases
    Releases {
        /// The app whose releases to list
        app: String,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Release an earlier version's code and config again
    Rollback {
        /// The app to roll back
        app: String,
        /// The release to go back to (default: the one before the live one)
        #[arg(value_name = "vN")]
        release: Option<String>,
    },
    /// Rebuild and redeploy a ref that was already pushed
    Deploy {
        /// The app to deploy
        app: String,
        /// The branch, tag or full ref (default: the live release's)
        #[arg(long = "ref", value_name = "REF")]
        git_ref: Option<String>,
    },
    /// Show an app's logs (its processes, deploys, and slipway's notes)
    Logs {
        /// The app whose logs to show
        app: String,
        /// Keep printing new lines as they are written
        #[arg(short = 'f', long, visible_short_alias = 't')]
        follow: bool,
        /// Only lines from this process type (web, worker, deploy, router, slipway, ...)
        #[arg(long = "type", value_name = "TYPE")]
        ptype: Option<String>,
        /// How many recent lines to show
        #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 100, alias = "n")]
        n: usize,
        /// Only lines newer than this, e.g. 90s, 15m, 1h30m
        #[arg(long, value_name = "DURATION")]
        since: Option<humantime::Duration>,
        /// Only lines that contain this text
        #[arg(long, value_name = "TEXT")]
        grep: Option<String>,
        /// Show a deploy's full output instead (the latest, or release vN), failed ones included
        #[arg(long, value_name = "vN", num_args = 0..=1, default_missing_value = "latest")]
        deploy: Option<String>,
    },
    /// Run a one-off command in the live release, with its env (stdin forwarded)
    Run {
        /// The app whose live release the command runs in
        app: String,
        /// Give the command a terminal (for shells, REPLs, prompts)
        #[arg(short = 't', long)]
        tty: bool,
        /// The command and its arguments, after `--`
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Promote a staging app's live build to another app, after its checks
    Promote {
        /// The staging app whose live build is promoted
        app: String,
        /// The app that receives it
        #[arg(long, value_name = "TARGET")]
        to: String,
    },
    /// Set, show or remove the URL notified of every deploy
    #[command(subcommand)]
    Webhook(WebhookCmd),
    /// Manage an app's domains
    #[command(subcommand)]
    Domains(DomainsCmd),
    /// Show an app's HTTPS certificates (`certs add APP --cert FILE --key FILE` installs one)
    #[command(args_conflicts_with_subcommands = true)]
    Certs {
        /// The app whose certificates to show
        app: Option<String>,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        cmd: Option<CertsCmd>,
    },
    /// Manage SSH keys (git over SSH, and the CLI over SSH)
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Manage API tokens
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Show the audit trail
    Events {
        /// Only this app's events (default: all you may see)
        app: Option<String>,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
        /// How many recent events to show
        #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 100)]
        n: u32,
        /// Only events newer than this, e.g. 90s, 15m, 1h30m, 2days
        #[arg(long, value_name = "DURATION")]
        since: Option<humantime::Duration>,
    },
    /// Connect this git checkout to an app: a git remote and its credential
    #[command(subcommand)]
    Remote(RemoteCmd),
    /// Log in to a server: keep its URL and a token as a named context, made current
    Login {
        /// The server's API address, e.g. http://deploy.example.com:7070
        #[arg(value_name = "URL")]
        url: String,
        /// The context's name [default: the URL's host and port]
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Internal: git's credential helper for remotes made by `remote add`
    #[command(hide = true)]
    Credential {
        /// What git asks: get, store or erase
        operation: String,
        /// The client context whose token answers
        #[arg(long, value_name = "NAME")]
        context: String,
    },
    /// Print a shell completion script: source <(slipway completions bash)
    Completions {
        /// The shell to complete for
        #[arg(value_enum, value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): slipway man > slipway.1
    Man,
    /// Internal: called by git inside a push
    #[command(hide = true)]
    Hook {
        /// The hook's name (pre-receive)
        name: String,
    },
    // backup track (issue 14 #6)
    /// Write a snapshot of the whole server (database, repos, app data, keys) to FILE (admin token)
    Backup {
        /// Where to write the backup (tar.gz); written whole or not at all
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Restore a backup into a fresh data dir (offline; then: slipway server --data DIR)
    Restore {
        /// A file written by `slipway backup`
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The new data dir: must not exist, or be empty
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
    },
    /// Where an app's processes run: this server, or the swarm its engine manages
    #[command(subcommand)]
    Scheduler(SchedulerCmd),
    /// The swarm's nodes, their state and which of slipway's tasks run on each
    Nodes {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Container images on this server (runs here, talks to the engine)
    #[command(subcommand)]
    Images(images::ImagesCmd),
    /// Internal: runs one app process in its container for the supervisor
    #[command(hide = true)]
    ContainerShim,
}

// process track: every flag also from SLIPWAY_<FLAG> and the config file
// (main.rs turns the file into SLIPWAY_* defaults before parsing).
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// TOML file of server settings (keys as the flags: `http = "0.0.0.0:80"`) [default: /etc/slipway/slipway.toml when it exists]
    #[arg(long, env = "SLIPWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Check the settings, print them and exit
    #[arg(long)]
    pub check_config: bool,
    /// Data directory [default: /var/lib/slipway as root, else $XDG_DATA_HOME/slipway]
    #[arg(long, env = "SLIPWAY_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// JSON API, git over HTTP, dashboard
    #[arg(long, env = "SLIPWAY_API", default_value = "127.0.0.1:7070", value_name = "ADDR")]
    pub api: SocketAddr,
    /// The apps, routed by Host
    #[arg(long, env = "SLIPWAY_HTTP", default_value = "0.0.0.0:8080", value_name = "ADDR")]
    pub http: SocketAddr,
    /// HTTPS for the apps: certificates by SNI, HTTP/2 and HTTP/1.1
    #[arg(long, env = "SLIPWAY_HTTPS", value_name = "ADDR")]
    pub https: Option<SocketAddr>,
    /// E-mail for the ACME account; without it every host gets a certificate from the internal CA
    #[arg(long, env = "SLIPWAY_ACME_EMAIL")]
    pub acme_email: Option<String>,
    /// ACME directory URL
    #[arg(long, env = "SLIPWAY_ACME_DIRECTORY", default_value = "https://acme-v02.api.letsencrypt.org/directory")]
    pub acme_directory: String,
    /// A CA certificate (PEM) to trust for the ACME directory, for test or private CAs
    #[arg(long, env = "SLIPWAY_ACME_CA_FILE")]
    pub acme_ca_file: Option<PathBuf>,
    /// The ACME challenge answered: http-01 (on --http) or tls-alpn-01 (on --https)
    #[arg(long, env = "SLIPWAY_ACME_CHALLENGE", default_value = "http-01")]
    pub acme_challenge: crate::certs::acme::Challenge,
    /// Git over SSH, and the CLI over SSH
    #[arg(long, env = "SLIPWAY_SSH", default_value = "0.0.0.0:2222", value_name = "ADDR")]
    pub ssh: SocketAddr,
    /// Apps answer at APP.DOMAIN
    #[arg(long, env = "SLIPWAY_DOMAIN", default_value = "localhost", value_name = "DOMAIN")]
    pub domain: String,
    /// Releases kept on disk per app, for rollback
    #[arg(long, env = "SLIPWAY_KEEP_RELEASES", default_value_t = 5, value_name = "N")]
    pub keep_releases: usize,
    /// As root, run each app as an unprivileged user of its own
    #[arg(long, env = "SLIPWAY_ISOLATION", value_enum, default_value = "on")]
    pub isolation: Isolation,
    /// Peers (CIDR) whose X-Forwarded-For/-Proto/-Host are kept; repeatable
    #[arg(long = "trusted-proxy", env = "SLIPWAY_TRUSTED_PROXY", value_delimiter = ',', value_name = "CIDR", value_parser = parse_cidr)]
    pub trusted_proxy: Vec<ipnet::IpNet>,
    /// The daemon's own log lines: text (coloured only on a terminal) or one JSON object per line
    #[arg(long, env = "SLIPWAY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// A CIDR range, or a single address (a /32 or /128).
fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not an address range like 10.0.0.0/8 or an address"))
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// Each app runs as a user of its own (when the daemon is root)
    On,
    /// Apps run as the daemon's user
    Off,
}

#[derive(Subcommand, Debug)]
pub enum SchedulerCmd {
    /// Move a running app onto the swarm (`swarm`) or back (`local`), with no failed request
    Set {
        /// The app to move
        app: String,
        /// Where it runs from now on
        #[arg(value_parser = ["local", "swarm"])]
        scheduler: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum AppsCmd {
    /// Create an app (a push by an admin creates it too)
    Create {
        /// The new app's name (lowercase letters, digits, dashes)
        app: String,
    },
    /// List the apps you may see
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show an app: state, URL, live release, git remotes, domains
    Info {
        /// The app to show
        app: String,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Destroy an app: its processes, code, data and logs
    Destroy {
        /// The app to destroy
        app: String,
        /// The app's name again, to confirm
        #[arg(long, value_name = "APP")]
        confirm: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Show an app's config vars
    Show {
        /// The app whose config to show
        app: String,
        /// Print JSON instead of KEY=VALUE lines
        #[arg(long, conflicts_with = "shell")]
        json: bool,
        /// Print `export KEY='VALUE'` lines for a shell: eval "$(slipway config show APP --shell)"
        #[arg(long)]
        shell: bool,
    },
    /// Print one config var's value
    Get {
        /// The app whose config to read
        app: String,
        /// The config var's name
        key: String,
    },
    /// Set config vars (a new release, unless nothing changes)
    Set {
        /// The app whose config to change
        app: String,
        /// The vars to set, e.g. DEBUG=0
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        /// Only store them: no release, no restart; the next deploy uses them
        #[arg(long)]
        no_restart: bool,
    },
    /// Remove config vars (a new release)
    Unset {
        /// The app whose config to change
        app: String,
        /// The vars to remove
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum RemoteCmd {
    /// Add (or update) the git remote for APP in this checkout
    Add {
        /// The app the remote pushes to
        app: String,
        /// Push over SSH (with a key from `slipway keys add`) instead of HTTP
        #[arg(long)]
        ssh: bool,
        /// The remote's name
        #[arg(long, default_value = "slipway", value_name = "NAME")]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum WebhookCmd {
    /// Notify URL of every deploy of APP
    Set {
        /// The app whose deploys are notified
        app: String,
        /// Where to POST the notification
        #[arg(value_name = "URL")]
        url: String,
    },
    /// Print the app's webhook URL
    Show {
        /// The app whose webhook to show
        app: String,
    },
    /// Stop notifying
    Unset {
        /// The app whose webhook to remove
        app: String,
    },
    /// Send a signed test event now and show the receiver's answer
    Test {
        /// The app whose webhook to test
        app: String,
    },
}

// tls track: `slipway certs ...`.
#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// Install your own certificate (PEM chain and key), hot-swapped
    Add {
        /// The app whose hosts the certificate covers
        app: String,
        /// PEM file: the certificate, then its chain
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// PEM file: the certificate's private key
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Print the internal CA's root certificate (PEM), for clients to trust
    Ca,
    /// Turn the plain HTTP to HTTPS redirect of an app on or off
    Redirect {
        /// The app to change
        app: String,
        /// on: plain HTTP answers 308 to HTTPS; off: it serves as is
        #[arg(value_parser = ["on", "off"], value_name = "on|off")]
        state: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum DomainsCmd {
    /// Route HOST to APP
    Add {
        /// The app the domain routes to
        app: String,
        /// The host name, e.g. www.example.com
        #[arg(value_name = "HOST")]
        host: String,
    },
    /// Stop routing HOST to APP
    Remove {
        /// The app the domain routes to
        app: String,
        /// The host name to remove
        #[arg(value_name = "HOST")]
        host: String,
    },
    /// List the host names that route to APP
    List {
        /// The app whose domains to list
        app: String,
        /// Print JSON instead of lines
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Register a public key (from --key, or one line on stdin)
    Add {
        /// A name for the key (shown in the audit trail)
        name: String,
        /// The public key line, e.g. 'ssh-ed25519 AAAA... you@host'
        #[arg(long, value_name = "KEY")]
        key: Option<String>,
        /// Limit the key to one app (a deployer); without it, admin
        #[arg(long, value_name = "APP")]
        app: Option<String>,
    },
    /// List the registered keys
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Remove a key
    Remove {
        /// The key's name
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokensCmd {
    /// Create an API token and print it (shown once)
    Create {
        /// A name for the token (shown in the audit trail)
        name: String,
        /// Limit the token to one app; without it, admin
        #[arg(long, value_name = "APP")]
        app: Option<String>,
    },
    /// List the tokens (names and scopes, never the secrets)
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token
    Revoke {
        /// The token's name
        name: String,
    },
}

/// Accept Heroku's colon spellings: `apps:create` is `apps create`.
pub fn expand_colon_spelling(args: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 1);
    for (i, a) in args.into_iter().enumerate() {
        if i == 1 && !a.starts_with('-') {
            if let Some((a1, a2)) = a.split_once(':') {
                out.push(a1.to_string());
                out.push(a2.to_string());
                continue;
            }
        }
        out.push(a);
    }
    out
}

/// The one place the CLI writes to stdout.
pub fn out(s: &str) {
    println!("{s}");
}

/// `slipway hook NAME`, run by git inside a push.
pub async fn commands_hook(name: &str) -> anyhow::Result<i32> {
    commands_hook_impl(name).await
}
