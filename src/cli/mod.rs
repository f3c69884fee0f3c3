//! The `slipway` command line: flags parsed by clap into [`Cli`], each
//! subcommand a plain function over the API client. All output goes
//! through [`out`]: tables for people, `--json` for scripts.

#![allow(clippy::print_stdout)]

mod commands;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use commands::{dispatch, hook as commands_hook_impl};

#[derive(Parser, Debug)]
#[command(name = "slipway", version, about = "git push to deploy: atomic, health-checked, reversible", propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon
    Server(ServerArgs),
    /// Manage apps
    #[command(subcommand)]
    Apps(AppsCmd),
    /// Show and change an app's config vars (each change is a new release)
    #[command(subcommand)]
    Config(ConfigCmd),
    /// List an app's processes (`ps scale APP TYPE=N` scales too)
    Ps {
        /// APP, or `scale APP TYPE=N...`
        #[arg(required = true, num_args = 1..)]
        args: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Set how many processes of each type run
    Scale {
        app: String,
        #[arg(required = true, value_name = "TYPE=N")]
        counts: Vec<String>,
    },
    /// Restart an app's processes (health-checked, zero downtime)
    Restart { app: String, ptype: Option<String> },
    /// Stop all of an app's processes
    Stop { app: String },
    /// Start an app's live release again
    Start { app: String },
    /// List an app's releases
    Releases {
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// Release an earlier version's code and config again
    Rollback {
        app: String,
        #[arg(value_name = "vN")]
        release: Option<String>,
    },
    /// Rebuild and redeploy a ref that was already pushed
    Deploy {
        app: String,
        #[arg(long = "ref")]
        git_ref: Option<String>,
    },
    /// Show an app's logs
    Logs {
        app: String,
        #[arg(short = 'f', long)]
        follow: bool,
        #[arg(long = "type")]
        ptype: Option<String>,
        #[arg(short = 'n', long, default_value_t = 100)]
        n: usize,
    },
    /// Run a one-off command in the live release, with its env
    Run {
        app: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Promote a staging app's live build to another app, after its checks
    Promote {
        app: String,
        #[arg(long)]
        to: String,
    },
    /// Set, show or remove the URL notified of every deploy
    #[command(subcommand)]
    Webhook(WebhookCmd),
    /// Manage an app's domains
    #[command(subcommand)]
    Domains(DomainsCmd),
    /// Manage SSH keys (git over SSH, and the CLI over SSH)
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Manage API tokens
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Show the audit trail
    Events {
        app: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Internal: called by git inside a push
    #[command(hide = true)]
    Hook { name: String },
}

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Data directory [default: /var/lib/slipway as root, else $XDG_DATA_HOME/slipway]
    #[arg(long, env = "SLIPWAY_DATA")]
    pub data: Option<PathBuf>,
    /// JSON API, git over HTTP
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub api: SocketAddr,
    /// The apps, routed by Host
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub http: SocketAddr,
    /// HTTPS for the apps (not served yet: refused when given)
    #[arg(long)]
    pub https: Option<SocketAddr>,
    /// Git over SSH, and the CLI over SSH
    #[arg(long, default_value = "0.0.0.0:2222")]
    pub ssh: SocketAddr,
    /// Apps answer at APP.DOMAIN
    #[arg(long, default_value = "localhost")]
    pub domain: String,
    /// Releases kept on disk per app, for rollback
    #[arg(long, default_value_t = 5)]
    pub keep_releases: usize,
    /// As root, run each app as an unprivileged user of its own
    #[arg(long, value_enum, default_value = "on")]
    pub isolation: Isolation,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    On,
    Off,
}

#[derive(Subcommand, Debug)]
pub enum AppsCmd {
    Create { app: String },
    List {
        #[arg(long)]
        json: bool,
    },
    Info {
        app: String,
        #[arg(long)]
        json: bool,
    },
    Destroy {
        app: String,
        #[arg(long)]
        confirm: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    Show {
        app: String,
        #[arg(long)]
        json: bool,
    },
    Get { app: String, key: String },
    Set {
        app: String,
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
    },
    Unset {
        app: String,
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum WebhookCmd {
    Set { app: String, url: String },
    Show { app: String },
    Unset { app: String },
}

#[derive(Subcommand, Debug)]
pub enum DomainsCmd {
    Add { app: String, host: String },
    Remove { app: String, host: String },
    List {
        app: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Register a public key (from --key, or one line on stdin)
    Add {
        name: String,
        #[arg(long)]
        key: Option<String>,
        /// Limit the key to one app (a deployer); without it, admin
        #[arg(long)]
        app: Option<String>,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Remove { name: String },
}

#[derive(Subcommand, Debug)]
pub enum TokensCmd {
    Create {
        name: String,
        #[arg(long)]
        app: Option<String>,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Revoke { name: String },
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
