//! The `slipway` binary: parse, set up tracing, dispatch. Everything else
//! lives in the library's modules.

use clap::Parser;
use slipway::cli::{self, Cli, Command};

fn main() {
    let args = cli::expand_colon_spelling(std::env::args().collect());
    if args.get(1).map(String::as_str) == Some("server") {
        // Before any thread exists (the environment is then safe to set).
        if let Err(e) = config_file_as_env(&args) {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
    // Inside a checkout with a slipway remote, APP may be left out.
    let args = match cli::remote::fill_in_app(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(args);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    // Defence in depth: a command run for an SSH client is only ever a client.
    if std::env::var_os("SLIPWAY_SSH_SESSION").is_some() && matches!(cli.command, Command::Server(_) | Command::Hook { .. } | Command::Images(_) | Command::ContainerShim | Command::Backup { .. } | Command::Restore { .. }) {
        eprintln!("error: not available over SSH");
        std::process::exit(2);
    }
    let code = runtime.block_on(async {
        match cli.command {
            Command::Server(args) if args.check_config => check_config(*args).map(|()| 0),
            Command::Server(args) => {
                init_tracing(args.log_format);
                run_server(*args).await.map(|()| 0)
            }
            Command::Hook { name } => cli::commands_hook(&name).await,
            // Local to the server machine: they talk to the engine, not the daemon.
            Command::Images(cmd) => cli::images::run(cmd).await,
            Command::ContainerShim => slipway::runtime::container::shim_main().await,
            // backup track: offline, on the machine that will run the server.
            Command::Restore { file, data } => slipway::backup::restore(&file, &data).map(|s| {
                slipway::cli::out(&format!(
                    "restored {} app{} into {}; start it with: slipway server --data {} (live releases are rebuilt from their commits at start)",
                    s.apps,
                    if s.apps == 1 { "" } else { "s" },
                    data.display(),
                    data.display()
                ));
                0
            }),
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
    let domain = slipway::names::parse_host(&args.domain)?;
    let data = args.data.unwrap_or_else(slipway::layout::Layout::default_root);
    slipway::server::run(slipway::server::ServerConfig {
        data,
        api: args.api,
        http: args.http,
        https: args.https,
        acme: args.acme_email.map(|email| slipway::certs::AcmeConfig {
            email,
            directory: args.acme_directory,
            ca_file: args.acme_ca_file,
            challenge: args.acme_challenge,
        }),
        ssh: args.ssh,
        domain,
        keep_releases: args.keep_releases.max(1),
        isolation: args.isolation != cli::Isolation::Off,
        trusted_proxies: args.trusted_proxy,
    })
    .await
}

/// The server's settings file, as defaults below the environment and the
/// flags: each `key = value` becomes `SLIPWAY_KEY` unless that is set.
/// `--config FILE` / `SLIPWAY_CONFIG` name it; else /etc/slipway/slipway.toml
/// is read when it exists.
fn config_file_as_env(args: &[String]) -> anyhow::Result<()> {
    use anyhow::Context;
    const KEYS: &[&str] = &["data", "api", "http", "https", "ssh", "domain", "keep-releases", "isolation", "log-format"];
    let given = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--config=").map(String::from).or_else(|| (a == "--config").then(|| args.get(i + 1).cloned()).flatten())
    });
    let (path, required) = match given.or_else(|| std::env::var("SLIPWAY_CONFIG").ok()) {
        Some(p) => (std::path::PathBuf::from(p), true),
        None => (std::path::PathBuf::from("/etc/slipway/slipway.toml"), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading the config file {}", path.display())),
    };
    let table: toml::Table = toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?;
    for (key, value) in table {
        let flag = key.replace('_', "-");
        if !KEYS.contains(&flag.as_str()) {
            anyhow::bail!("config file {}: unknown setting {key:?} (known: {})", path.display(), KEYS.join(", "));
        }
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => anyhow::bail!("config file {}: {key} must be a string or a number, not {}", path.display(), other.type_str()),
        };
        let var = format!("SLIPWAY_{}", flag.replace('-', "_").to_uppercase());
        if std::env::var_os(&var).is_none() {
            std::env::set_var(var, value);
        }
    }
    Ok(())
}

/// `slipway server --check-config`: validate as a start would, print the
/// effective settings, start nothing.
fn check_config(args: cli::ServerArgs) -> anyhow::Result<()> {
    if args.https.is_some() {
        anyhow::bail!("--https is not supported yet; put a TLS terminator in front of --http");
    }
    let domain = slipway::names::parse_host(&args.domain)?;
    let data = args.data.clone().unwrap_or_else(slipway::layout::Layout::default_root);
    #[allow(clippy::print_stdout)]
    {
        println!("data = {:?}\napi = \"{}\"\nhttp = \"{}\"\nssh = \"{}\"\ndomain = {domain:?}\nkeep-releases = {}\nisolation = \"{}\"\nlog-format = \"{}\"",
            data.display().to_string(), args.api, args.http, args.ssh, args.keep_releases.max(1),
            if args.isolation == cli::Isolation::Off { "off" } else { "on" },
            if args.log_format == cli::LogFormat::Json { "json" } else { "text" });
        println!("config ok");
    }
    Ok(())
}

fn init_tracing(format: cli::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLIPWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        cli::LogFormat::Json => builder.json().init(),
        // Colour codes only for a person at a terminal, never in journald
        // or a file.
        cli::LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
