//! slipway: a self-hosted "git push to deploy" platform. See
//! ARCHITECTURE.md for the code map and the invariants.

pub mod api;
pub mod auth;
pub mod build;
pub mod cli;
pub mod client;
pub mod git;
pub mod layout;
pub mod listener;
pub mod logs;
pub mod manifest;
pub mod names;
pub mod platform;
pub mod notify;
pub mod progress;
pub mod proxy;
pub mod release;
pub mod runtime;
pub mod server;
pub mod ssh;
pub mod store;
pub mod supervisor;
