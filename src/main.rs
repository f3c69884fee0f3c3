//! The `slipway` binary: parse, set up tracing, dispatch. Everything else
//! lives in the library's modules.

use clap::Parser;
use slipway::cli::{self, Cli, Command};

fn main() {
    let args = cli::expand_colon_spelling(std::env::args().collect());
    let cli = Cli::parse_from(args);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    // Defence in depth: a command run for an SSH client is only ever a client.
    if std::env::var_os("SLIPWAY_SSH_SESSION").is_some() && matches!(cli.command, Command::Server(_) | Command::Hook { .. }) {
        eprintln!("error: not available over SSH");
        std::process::exit(2);
    }
    let code = runtime.block_on(async {
        match cli.command {
            Command::Server(args) => {
                init_tracing();
                run_server(args).await.map(|()| 0)
            }
            Command::Hook { name } => cli::commands_hook(&name).await,
            _ => cli::dispatch(cli).await,
        }
    });
    match code {
        Ok(c) => std::process::exit(c),
        Err(e) => {
            // The whole chain, once, on one line.
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run_server(args: cli::ServerArgs) -> anyhow::Result<()> {
    if args.https.is_some() {
        anyhow::bail!("--https is not supported yet; put a TLS terminator in front of --http");
    }
    let domain = slipway::names::parse_host(&args.domain)?;
    let data = args.data.unwrap_or_else(slipway::layout::Layout::default_root);
    slipway::server::run(slipway::server::ServerConfig {
        data,
        api: args.api,
        http: args.http,
        ssh: args.ssh,
        domain,
        keep_releases: args.keep_releases.max(1),
        isolation: args.isolation != cli::Isolation::Off,
    })
    .await
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLIPWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
