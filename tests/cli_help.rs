//! The CLI as a newcomer meets it: help on every subcommand and argument,
//! value names that say what they are, the environment and examples at the
//! top, completions and a man page from the same definitions, remotes shown
//! where an app is created and inspected, and the log filters.

mod util;

use std::process::Command;
use std::time::Duration;

use clap::CommandFactory;
use util::*;

/// Every visible subcommand and argument without a help line, by path.
fn missing_help(cmd: &clap::Command, path: &str, out: &mut Vec<String>, counted: &mut usize) {
    for arg in cmd.get_arguments() {
        if arg.is_hide_set() || matches!(arg.get_id().as_str(), "help" | "version") {
            continue;
        }
        *counted += 1;
        if arg.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
            out.push(format!("{path} <{}>", arg.get_id()));
        }
    }
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        *counted += 1;
        let sub_path = format!("{path} {}", sub.get_name());
        if sub.get_about().is_none_or(|h| h.to_string().trim().is_empty()) {
            out.push(sub_path.clone());
        }
        missing_help(sub, &sub_path, out, counted);
    }
}

#[test]
fn every_subcommand_and_argument_has_a_help_line() {
    let mut empty = Vec::new();
    let mut counted = 0;
    missing_help(&slipway::cli::Cli::command(), "slipway", &mut empty, &mut counted);
    eprintln!("{} of {counted} subcommands and arguments have an empty help line", empty.len());
    assert!(counted > 80, "the walk found only {counted} items");
    assert!(empty.is_empty(), "no help line:\n{}", empty.join("\n"));
}

fn run(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).env_remove("SLIPWAY_URL").output().expect("slipway");
    assert!(out.status.success(), "slipway {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn help_names_values_environment_and_examples() {
    let top = run(&["--help"]);
    for needle in ["SLIPWAY_URL", "SLIPWAY_TOKEN", "SLIPWAY_DATA", "Examples:", "slipway run -t myapp", "slipway logs myapp -f"] {
        assert!(top.contains(needle), "top-level help lacks {needle:?}:\n{top}");
    }
    let logs = run(&["logs", "--help"]);
    for needle in ["-n, --lines <N>", "--type <TYPE>", "--since <DURATION>", "--grep <TEXT>", "-f, --follow"] {
        assert!(logs.contains(needle), "logs help lacks {needle:?}:\n{logs}");
    }
    assert!(run(&["deploy", "--help"]).contains("--ref <REF>"));
    assert!(run(&["promote", "--help"]).contains("--to <TARGET>"));
}

#[test]
fn completions_and_man_page_come_from_the_parser() {
    let bash = run(&["completions", "bash"]);
    assert!(bash.contains("_slipway()") && bash.contains("rollback"), "{}", &bash[..bash.len().min(300)]);
    assert!(run(&["completions", "zsh"]).starts_with("#compdef slipway"));
    assert!(run(&["completions", "fish"]).contains("complete -c slipway"));
    let man = run(&["man"]);
    assert!(man.contains(".TH slipway") && man.contains("rollback"), "{}", &man[..man.len().min(300)]);
}

#[test]
fn apps_create_and_info_show_the_remotes_state_and_release() {
    let server = TestServer::start();
    let created = server.ok(&["apps", "create", "remotes"]);
    let http = format!("http://{}/git/remotes.git", server.api);
    let ssh = format!("ssh://git@127.0.0.1:{}/remotes.git", server.ssh_port());
    assert!(created.contains(&http) && created.contains(&ssh), "{created}");
    assert!(!created.contains(&server.token), "the token stays out of the URL: {created}");
    let info = server.ok(&["apps", "info", "remotes"]);
    for needle in ["state        stopped", "release      -", &http, &ssh, "http://remotes.localhost"] {
        assert!(info.contains(needle), "info lacks {needle:?}:\n{info}");
    }
    AppRepo::hello("hi").deploy(&server, "remotes");
    let info = server.json(&["apps", "info", "remotes", "--json"]);
    assert_eq!(info["state"], "running");
    assert_eq!(info["release"], "v1");
    assert_eq!(info["git_ssh"], ssh.as_str());
}

#[test]
fn logs_filter_by_text_and_age_and_warn_on_an_unknown_type() {
    let server = TestServer::start();
    AppRepo::hello("hi").deploy(&server, "filtered");
    let all = server.ok(&["logs", "filtered", "-n", "1000"]);
    assert!(all.contains("Booting worker") && all.contains("deploy: "), "{all}");
    let grep = server.ok(&["logs", "filtered", "--grep", "Booting worker"]);
    assert!(!grep.trim().is_empty());
    assert!(grep.lines().all(|l| l.contains("Booting worker")), "{grep}");
    assert!(server.ok(&["logs", "filtered", "--since", "1h"]).contains("Booting worker"));
    // Nothing is written once the app is up: a second later, no line is newer.
    std::thread::sleep(Duration::from_millis(2100));
    let recent = server.ok(&["logs", "filtered", "--since", "1s"]);
    assert!(recent.trim().is_empty(), "{recent}");
    let out = server.cli(&["logs", "filtered", "--type", "wbe"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warning") && stderr.contains("\"wbe\"") && stderr.contains("web"), "{stderr}");
    let out = server.cli(&["logs", "filtered", "--type", "deploy"]);
    assert!(String::from_utf8_lossy(&out.stderr).is_empty());
    assert!(String::from_utf8_lossy(&out.stdout).lines().all(|l| l.contains(" deploy: ")));
}
