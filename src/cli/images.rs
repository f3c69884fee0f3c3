//! `slipway images`: the container images on this server. Runs on the
//! server machine and talks to the engine directly (like `slipway
//! server`, not through the daemon): building a base image needs root
//! and debootstrap here.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use super::out;
use crate::container::base::{self, ImportBase};
use crate::container::{server_id, Engine, LABEL_APP, LABEL_BASE, LABEL_SERVER};
use crate::layout::Layout;
use crate::progress::Progress;

#[derive(Subcommand, Debug)]
pub enum ImagesCmd {
    /// Build the Python base image with debootstrap and import it (no registry needed); cached by tag
    ImportBase {
        /// Debian suite [default: the host's]
        #[arg(long)]
        suite: Option<String>,
        /// Debian mirror [default: the host's apt mirror]
        #[arg(long)]
        mirror: Option<String>,
        /// Keeps downloaded packages between runs
        #[arg(long, default_value = "/var/cache/slipway/debootstrap")]
        cache: PathBuf,
        /// Build again even if the image exists
        #[arg(long)]
        force: bool,
    },
    /// List base images and app images
    List,
    /// Remove this server's app images no container uses (a rollback to their release rebuilds them); other servers' images on the engine stay
    Prune {
        /// The server's data directory: its identity, which its images carry
        #[arg(long, env = "SLIPWAY_DATA", value_name = "DIR")]
        data: Option<PathBuf>,
    },
}

pub async fn run(cmd: ImagesCmd) -> Result<i32> {
    let engine = Engine::connect().await?;
    match cmd {
        ImagesCmd::ImportBase { suite, mirror, cache, force } => {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(crate::progress::QUEUE);
            let printer = tokio::spawn(async move {
                while let Some(line) = rx.recv().await {
                    out(&line);
                }
            });
            let opts = ImportBase {
                suite: suite.unwrap_or_else(base::host_suite),
                mirror: mirror.unwrap_or_else(base::host_mirror),
                work: std::env::temp_dir().join("slipway-import-base"),
                cache,
                force,
            };
            let result = base::import_python(&engine, &opts, &Progress::new(tx)).await;
            let _ = printer.await;
            let tag = result?;
            out(&tag);
        }
        ImagesCmd::List => {
            out(&format!("{:<40} {:<14} {:>9}  KIND", "IMAGE", "ID", "SIZE"));
            for (label, kind) in [(LABEL_BASE, "base"), (LABEL_APP, "app")] {
                for img in engine.images(label).await? {
                    let name = img.tags.first().cloned().unwrap_or_else(|| "<untagged>".into());
                    out(&format!("{name:<40} {:<14} {:>7}MB  {kind}", base::short_id(&img.id), img.size / 1_000_000));
                }
            }
        }
        ImagesCmd::Prune { data } => {
            let server = server_id(&data.unwrap_or_else(Layout::default_root));
            let mut removed = 0;
            for img in engine.images(LABEL_APP).await? {
                // This server's tags only: an image another server also
                // tagged stays for it. Untagged, it goes by the server label.
                let names = if img.tags.is_empty() {
                    if img.labels.get(LABEL_SERVER) == Some(&server) { vec![img.id.clone()] } else { vec![] }
                } else {
                    img.tags_of_server(&server, None)
                };
                for n in names {
                    if engine.remove_image(&n).await? {
                        removed += 1;
                    }
                }
            }
            out(&format!("removed {removed} image{}", if removed == 1 { "" } else { "s" }));
        }
    }
    Ok(0)
}
