//! slipway: a self-hosted "git push to deploy" platform. See
//! ARCHITECTURE.md for the code map and the invariants.

pub mod acl;
pub mod api;
pub mod auth;
pub mod backup;
pub mod build;
pub mod certs;
pub mod cli;
pub mod client;
pub mod container;
pub mod dashboard;
pub mod depfiles;
pub mod deploy_output;
pub mod git;
pub mod layout;
pub mod listener;
pub mod logs;
pub mod manifest;
pub mod metrics;
pub mod names;
pub mod platform;
pub mod notify;
pub mod oneoff;
pub mod progress;
pub mod proxy;
pub mod release;
pub mod runtime;
pub mod server;
pub mod ssh;
pub mod storage;
pub mod store;
pub mod supervisor;
pub mod systemd;
pub mod tally;
pub mod tls;
pub mod upgrade;
