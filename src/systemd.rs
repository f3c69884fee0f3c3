//! sd_notify without libsystemd: READY=1 once serving, STOPPING=1 at the
//! start of a shutdown, WATCHDOG=1 at half the interval systemd asks for
//! (`WatchdogSec=` in dist/slipway.service). Without `$NOTIFY_SOCKET`
//! (not started by systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Send one state line to the service manager; errors are logged, never
/// fatal (a daemon must not stop because its supervisor went away).
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let result = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket: its name starts with a NUL byte.
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(state, error = %e, "notifying systemd failed");
    }
}

/// When systemd watches this service: ping it at half its interval for as
/// long as the async runtime turns (a wedged runtime stops the pings and
/// systemd restarts the daemon).
pub fn spawn_watchdog() {
    let Some(usec) = std::env::var("WATCHDOG_USEC").ok().and_then(|u| u.parse::<u64>().ok()) else { return };
    // Only when the watchdog is meant for us (WATCHDOG_PID unset or ours).
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return;
        }
    }
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notify("WATCHDOG=1");
        }
    });
}
