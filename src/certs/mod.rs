//! Certificates for `--https`: which one each app host is served with,
//! where it came from (ACME, the internal CA, or the operator), and when
//! it is renewed.
//!
//! The served set is a host → certificate map swapped whole through an
//! `ArcSwap`, read by the TLS handshake without a lock (the route table's
//! rule), so a renewed or uploaded certificate takes effect on the next
//! handshake and connections already open keep theirs. Everything lives
//! in DIR/tls: `ca/` (the internal root), `acme/` (the account), and
//! `certs/HOST/` (chain, key, source) so a restart serves at once.
//!
//! Issuing never blocks a deploy or another host: each host is worked on
//! by its own task, failures are kept (state, last error, next attempt
//! with backoff), shown by `slipway certs APP` and written to the event
//! log. This module knows nothing of the proxy: the proxy asks it what to
//! do with a plain HTTP request ([`Certs::intercept`]).

pub mod acme;
pub mod ca;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;

use crate::store::Store;

/// The key under which the server's own host (the API over HTTPS) is
/// registered; not a valid app name, so it never collides with one.
pub const API_HOSTS: &str = "-api";

/// The ALPN protocol of TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Where a certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Acme,
    Internal,
    Custom,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Acme => "acme",
            Source::Internal => "internal",
            Source::Custom => "custom",
        }
    }
    fn parse(s: &str) -> Option<Source> {
        match s.trim() {
            "acme" => Some(Source::Acme),
            "internal" => Some(Source::Internal),
            "custom" => Some(Source::Custom),
            _ => None,
        }
    }
}

/// What `slipway certs APP` shows for one host.
#[derive(Debug, Clone, Serialize)]
pub struct CertStatus {
    pub host: String,
    /// `valid`, `issuing`, `failed` (serving an older or fallback certificate meanwhile) or `none`.
    pub state: String,
    pub source: Option<Source>,
    pub issuer: Option<String>,
    pub names: Vec<String>,
    /// RFC 3339.
    pub not_after: Option<String>,
    pub last_error: Option<String>,
    pub next_attempt: Option<String>,
}

/// ACME settings (`--acme-email`, `--acme-directory`, `--acme-ca-file`).
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    pub email: String,
    pub directory: String,
    /// A root to trust for the directory itself (test CAs such as pebble).
    pub ca_file: Option<PathBuf>,
    pub challenge: acme::Challenge,
}

#[derive(Debug, Clone)]
pub struct CertsConfig {
    /// DIR/tls.
    pub dir: PathBuf,
    pub acme: Option<AcmeConfig>,
    /// The public HTTPS port, for redirects (443 is left out of the URL).
    pub https_port: u16,
}

/// A certificate being served, with what was read from it.
struct Served {
    key: Arc<CertifiedKey>,
    source: Source,
    issuer: String,
    names: Vec<String>,
    not_before: i64,
    not_after: i64,
}

impl Served {
    /// Renew once two thirds of its life have passed (Let's Encrypt's advice
    /// for 90-day certificates: 30 days before expiry).
    fn renew_at(&self) -> i64 {
        self.not_before + (self.not_after - self.not_before) * 2 / 3
    }
}

#[derive(Default)]
struct Work {
    issuing: bool,
    last_error: Option<String>,
    failures: u32,
    /// Unix seconds before which no new attempt is made.
    next_attempt: i64,
}

pub struct Certs {
    cfg: CertsConfig,
    store: Store,
    ca: ca::InternalCa,
    acme: acme::Acme,
    served: ArcSwap<HashMap<String, Arc<Served>>>,
    /// Serializes writers of `served` (rare); readers never lock.
    served_write: Mutex<()>,
    /// host → app, from the routes.
    hosts: ArcSwap<HashMap<String, String>>,
    apps_hosts: Mutex<HashMap<String, Vec<String>>>,
    work: Mutex<HashMap<String, Work>>,
    /// Apps whose plain HTTP is not redirected to HTTPS.
    no_redirect: ArcSwap<HashSet<String>>,
    wake: tokio::sync::Notify,
}

impl Certs {
    /// Open DIR/tls: the internal CA (made on first use), the certificates
    /// kept from earlier runs.
    pub fn open(cfg: CertsConfig, store: Store) -> Result<Arc<Certs>> {
        std::fs::create_dir_all(cfg.dir.join("certs")).with_context(|| format!("creating {}", cfg.dir.display()))?;
        set_mode(&cfg.dir, 0o700)?;
        let ca = ca::InternalCa::open(&cfg.dir.join("ca"))?;
        let acme = acme::Acme::new(cfg.dir.join("acme"), cfg.acme.clone());
        let mut served = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(cfg.dir.join("certs")) {
            for entry in entries.flatten() {
                let host = entry.file_name().to_string_lossy().to_string();
                if crate::names::parse_host(&host).is_err() {
                    continue;
                }
                match load_host(&entry.path()) {
                    Ok(s) => {
                        served.insert(host, Arc::new(s));
                    }
                    Err(e) => tracing::warn!(%host, error = %format!("{e:#}"), "ignoring a stored certificate"),
                }
            }
        }
        let no_redirect = read_lines(&cfg.dir.join("no-redirect"));
        Ok(Arc::new(Certs {
            cfg,
            store,
            ca,
            acme,
            served: ArcSwap::from_pointee(served),
            served_write: Mutex::new(()),
            hosts: ArcSwap::from_pointee(HashMap::new()),
            apps_hosts: Mutex::new(HashMap::new()),
            work: Mutex::new(HashMap::new()),
            no_redirect: ArcSwap::from_pointee(no_redirect),
            wake: tokio::sync::Notify::new(),
        }))
    }

    /// The rustls configuration of the `--https` listener: certificates by
    /// SNI from this map, ALPN h2, http/1.1 (and acme-tls/1 for validation).
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig> {
        let provider = Arc::new(crypto_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
        Ok(config)
    }

    /// The internal CA's root, PEM.
    pub fn ca_root_pem(&self) -> &str {
        self.ca.root_pem()
    }

    /// Set the hosts an app answers on; new ones get a certificate.
    pub fn set_hosts(&self, app: &str, hosts: Vec<String>) {
        let mut apps = self.apps_hosts.lock().unwrap_or_else(|e| e.into_inner());
        apps.insert(app.to_string(), hosts);
        self.publish_hosts(&apps);
        drop(apps);
        self.wake.notify_one();
    }

    pub fn remove_app(&self, app: &str) {
        let mut apps = self.apps_hosts.lock().unwrap_or_else(|e| e.into_inner());
        apps.remove(app);
        self.publish_hosts(&apps);
    }

    fn publish_hosts(&self, apps: &HashMap<String, Vec<String>>) {
        let map = apps.iter().flat_map(|(app, hosts)| hosts.iter().map(move |h| (h.clone(), app.clone()))).collect();
        self.hosts.store(Arc::new(map));
    }

    /// What the plain HTTP listener does with a request instead of
    /// proxying it: answer an HTTP-01 challenge, or redirect to HTTPS once
    /// the host has a certificate it should be trusted with (unless the app
    /// opted out). `None`: proxy it.
    pub fn intercept(&self, host: &str, path_and_query: &str) -> Option<Intercept> {
        if let Some(token) = path_and_query.strip_prefix("/.well-known/acme-challenge/") {
            return Some(match self.acme.http01_answer(token) {
                Some(key_auth) => Intercept::Challenge(key_auth),
                None => Intercept::NotFound,
            });
        }
        let app = self.hosts.load().get(host).cloned()?;
        if self.no_redirect.load().contains(&app) {
            return None;
        }
        let served = self.served.load().get(host).cloned()?;
        if served.source != Source::Custom && served.source != self.wanted_source(host) {
            // A stop-gap internal certificate while ACME is still trying:
            // sending people there would only show them a warning.
            return None;
        }
        let port = match self.cfg.https_port {
            443 => String::new(),
            p => format!(":{p}"),
        };
        Some(Intercept::Redirect(format!("https://{host}{port}{path_and_query}")))
    }

    /// Per-app opt-out of the HTTP → HTTPS redirect.
    pub fn set_redirect(&self, app: &str, redirect: bool) -> Result<()> {
        let mut set = (**self.no_redirect.load()).clone();
        if redirect {
            set.remove(app);
        } else {
            set.insert(app.to_string());
        }
        let mut lines: Vec<&String> = set.iter().collect();
        lines.sort();
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        write_atomic(&self.cfg.dir.join("no-redirect"), text.as_bytes())?;
        self.no_redirect.store(Arc::new(set));
        Ok(())
    }

    pub fn redirects(&self, app: &str) -> bool {
        !self.no_redirect.load().contains(app)
    }

    /// Install an operator's certificate for every host of `app` it covers.
    /// Refused, changing nothing, when the key does not match, the chain
    /// does not parse, it has expired, or it covers none of the app's hosts.
    pub async fn add_custom(&self, app: &str, chain_pem: &str, key_pem: &str) -> Result<Vec<String>> {
        let served = parse_served(chain_pem.as_bytes(), key_pem.as_bytes(), Source::Custom)?;
        if served.not_after <= chrono::Utc::now().timestamp() {
            return Err(anyhow!("the certificate expired on {}", rfc3339(served.not_after)));
        }
        let hosts = self.apps_hosts.lock().unwrap_or_else(|e| e.into_inner()).get(app).cloned().unwrap_or_default();
        let covered: Vec<String> = hosts.iter().filter(|h| covers(&served.names, h)).cloned().collect();
        if covered.is_empty() {
            return Err(anyhow!(
                "the certificate names {} cover none of {app}'s hosts ({})",
                served.names.join(", "),
                hosts.join(", ")
            ));
        }
        for host in &covered {
            self.install(host, chain_pem.as_bytes(), key_pem.as_bytes(), Source::Custom)?;
        }
        self.event(app, "certs:add", &format!("custom certificate for {}", covered.join(", ")), "ok").await;
        Ok(covered)
    }

    /// The certificate state of every host of `app`.
    pub fn status(&self, app: &str) -> Vec<CertStatus> {
        let hosts = self.apps_hosts.lock().unwrap_or_else(|e| e.into_inner()).get(app).cloned().unwrap_or_default();
        let served = self.served.load();
        let work = self.work.lock().unwrap_or_else(|e| e.into_inner());
        hosts
            .into_iter()
            .map(|host| {
                let s = served.get(&host);
                let w = work.get(&host);
                let failed = w.is_some_and(|w| w.last_error.is_some());
                let state = match (s, w) {
                    (_, Some(w)) if w.issuing => "issuing",
                    (_, _) if failed => "failed",
                    (Some(s), _) if s.not_after <= chrono::Utc::now().timestamp() => "expired",
                    (Some(_), _) => "valid",
                    (None, _) => "none",
                };
                CertStatus {
                    state: state.to_string(),
                    source: s.map(|s| s.source),
                    issuer: s.map(|s| s.issuer.clone()),
                    names: s.map(|s| s.names.clone()).unwrap_or_default(),
                    not_after: s.map(|s| rfc3339(s.not_after)),
                    last_error: w.and_then(|w| w.last_error.clone()),
                    next_attempt: w.filter(|w| w.last_error.is_some()).map(|w| rfc3339(w.next_attempt)),
                    host,
                }
            })
            .collect()
    }

    /// Keep every routed host's certificate present and fresh until
    /// `shutdown`: issue what is missing, renew what is due, retry failures
    /// with backoff. Each host is worked on by its own task.
    pub async fn maintain(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            let now = chrono::Utc::now().timestamp();
            let mut next_check = now + 3600;
            let hosts = self.hosts.load_full();
            for (host, app) in hosts.iter() {
                let due = self.due_at(host);
                let wait = self.work.lock().unwrap_or_else(|e| e.into_inner()).get(host).map(|w| (w.issuing, w.next_attempt));
                let (issuing, retry_at) = wait.unwrap_or((false, 0));
                if issuing {
                    continue;
                }
                let at = due.max(retry_at);
                if at <= now {
                    self.clone().spawn_issue(host.clone(), app.clone());
                } else {
                    next_check = next_check.min(at);
                }
            }
            let sleep = Duration::from_secs((next_check - now).clamp(1, 3600) as u64);
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// When `host` next needs a certificate (unix seconds; 0: now).
    fn due_at(&self, host: &str) -> i64 {
        let Some(s) = self.served.load().get(host).cloned() else { return 0 };
        match s.source {
            // The operator renews their own; we only tell them (`certs APP`).
            Source::Custom => i64::MAX,
            // A stop-gap internal certificate: replace it as soon as ACME can.
            source if source != self.wanted_source(host) => 0,
            _ => s.renew_at(),
        }
    }

    /// ACME for public names when an e-mail is set; the internal CA otherwise.
    fn wanted_source(&self, host: &str) -> Source {
        if self.cfg.acme.is_some() && is_public(host) {
            Source::Acme
        } else {
            Source::Internal
        }
    }

    fn spawn_issue(self: Arc<Self>, host: String, app: String) {
        self.work.lock().unwrap_or_else(|e| e.into_inner()).entry(host.clone()).or_default().issuing = true;
        tokio::spawn(async move {
            let source = self.wanted_source(&host);
            let renewal = self.served.load().contains_key(&host);
            let result = self.issue(&host, source).await;
            let now = chrono::Utc::now().timestamp();
            let outcome = {
                let mut work = self.work.lock().unwrap_or_else(|e| e.into_inner());
                let w = work.entry(host.clone()).or_default();
                w.issuing = false;
                match &result {
                    Ok(()) => {
                        w.failures = 0;
                        w.last_error = None;
                        w.next_attempt = 0;
                        None
                    }
                    Err(e) => {
                        // 10 s, 20 s, 40 s, ... up to an hour between tries.
                        let backoff = (10i64 << w.failures.min(9)).min(3600);
                        w.failures += 1;
                        w.last_error = Some(format!("{e:#}"));
                        w.next_attempt = now + backoff;
                        Some((format!("{e:#}"), backoff))
                    }
                }
            };
            let verb = if renewal { "renewed" } else { "issued" };
            match outcome {
                None => {
                    tracing::info!(%host, source = source.as_str(), "certificate {verb}");
                    self.event(&app, "certs:issue", &format!("{} certificate for {host} {verb}", source.as_str()), "ok").await;
                }
                Some((error, backoff)) => {
                    tracing::warn!(%host, source = source.as_str(), %error, retry_in_s = backoff, "certificate not issued");
                    self.event(&app, "certs:issue", &format!("{} certificate for {host}: {error}", source.as_str()), "failed").await;
                    // While ACME fails, a host that has nothing yet is served
                    // by the internal CA, so HTTPS answers at all.
                    if source == Source::Acme && !self.served.load().contains_key(&host) {
                        if let Err(e) = self.issue(&host, Source::Internal).await {
                            tracing::warn!(%host, error = %format!("{e:#}"), "internal stop-gap certificate failed");
                        }
                    }
                }
            }
            self.wake.notify_one();
        });
    }

    async fn issue(&self, host: &str, source: Source) -> Result<()> {
        let (chain, key) = match source {
            Source::Internal => self.ca.issue(host)?,
            Source::Acme => self.acme.issue(host).await?,
            Source::Custom => return Err(anyhow!("custom certificates are installed by the operator")),
        };
        self.install(host, chain.as_bytes(), key.as_bytes(), source)
    }

    /// Validate, write to DIR/tls/certs/HOST, then swap into the served map.
    fn install(&self, host: &str, chain_pem: &[u8], key_pem: &[u8], source: Source) -> Result<()> {
        let served = parse_served(chain_pem, key_pem, source)?;
        let dir = self.cfg.dir.join("certs").join(host);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        write_private(&dir.join("key.pem"), key_pem)?;
        write_atomic(&dir.join("chain.pem"), chain_pem)?;
        write_atomic(&dir.join("source"), source.as_str().as_bytes())?;
        let _w = self.served_write.lock().unwrap_or_else(|e| e.into_inner());
        let mut map = (**self.served.load()).clone();
        map.insert(host.to_string(), Arc::new(served));
        self.served.store(Arc::new(map));
        Ok(())
    }

    async fn event(&self, app: &str, action: &str, detail: &str, outcome: &str) {
        // The server's own host belongs to no app: a server-wide event.
        let app = (app != API_HOSTS).then(|| app.to_string());
        let (action, detail, outcome) = (action.to_string(), detail.to_string(), outcome.to_string());
        if let Err(e) = self.store.call(move |s| s.record_event(app.as_deref(), "slipway", &action, &detail, &outcome)).await {
            tracing::warn!(error = %format!("{e:#}"), "recording event failed");
        }
    }
}

/// The crypto provider of every TLS object here: ring, as chosen for the
/// project (pure Rust and assembly, no C toolchain or cmake in the build).
/// rustls 0.23.48 deprecates it for lacking post-quantum key exchange;
/// moving to aws-lc-rs is a build decision, not this module's.
#[allow(deprecated)]
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// What to do with a plain HTTP request instead of proxying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intercept {
    /// The key authorization of a pending HTTP-01 challenge.
    Challenge(String),
    /// An ACME challenge path with no challenge behind it.
    NotFound,
    /// Permanent redirect to this https URL.
    Redirect(String),
}

struct Resolver(Arc<Certs>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("certs::Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.trim_end_matches('.').to_ascii_lowercase();
        let acme_tls = hello.alpn().is_some_and(|mut protos| protos.any(|p| p == ACME_TLS_ALPN));
        if acme_tls {
            return self.0.acme.tls_alpn01_cert(&name);
        }
        // Only names the routes know: an unknown SNI gets no certificate
        // (and no issuance), so nobody can make the server sign for them.
        if !self.0.hosts.load().contains_key(&name) {
            return None;
        }
        self.0.served.load().get(&name).map(|s| s.key.clone())
    }
}

/// Parse and check a chain and key: the key must match the first
/// certificate. Reads issuer, names and validity for `certs APP`.
fn parse_served(chain_pem: &[u8], key_pem: &[u8], source: Source) -> Result<Served> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("reading the certificate PEM: {e}"))?;
    let leaf = chain.first().ok_or_else(|| anyhow!("no certificate in the PEM"))?.clone();
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| anyhow!("reading the private key PEM: {e}"))?;
    let provider = crypto_provider();
    let signing = provider.key_provider.load_private_key(key).map_err(|e| anyhow!("unusable private key: {e}"))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| anyhow!("the key does not match the certificate ({e})"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).map_err(|e| anyhow!("parsing the certificate: {e}"))?;
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        names.extend(cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(|s| s.to_ascii_lowercase()));
    }
    Ok(Served {
        key: Arc::new(certified),
        source,
        issuer: cert.issuer().to_string(),
        names,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

fn load_host(dir: &Path) -> Result<Served> {
    let chain = std::fs::read(dir.join("chain.pem")).context("reading chain.pem")?;
    let key = std::fs::read(dir.join("key.pem")).context("reading key.pem")?;
    let source = std::fs::read_to_string(dir.join("source")).context("reading source")?;
    let source = Source::parse(&source).ok_or_else(|| anyhow!("unknown source {source:?}"))?;
    parse_served(&chain, &key, source)
}

/// Whether a certificate name (possibly `*.example.com`) covers `host`.
fn covers(names: &[String], host: &str) -> bool {
    names.iter().any(|n| match n.strip_prefix("*.") {
        Some(parent) => host.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => n == host,
    })
}

/// Names a public ACME CA can validate: not `localhost`, not an address,
/// not a single label, not a name reserved for private use.
pub fn is_public(host: &str) -> bool {
    const PRIVATE: [&str; 6] = ["localhost", "local", "internal", "home.arpa", "lan", "test"];
    host.parse::<std::net::IpAddr>().is_err()
        && host.contains('.')
        && !PRIVATE.iter().any(|p| host == *p || host.ends_with(&format!(".{p}")))
}

fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| unix.to_string())
}

fn read_lines(path: &Path) -> HashSet<String> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect())
        .unwrap_or_default()
}

/// Write through a temporary file and a rename, so a reader (or a crash)
/// never sees half a certificate.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_mode(path, bytes, 0o644)
}

/// As [`write_atomic`], owner-only: private keys, the ACME account.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    write_mode(path, bytes, 0o600)
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        let names = vec!["*.example.com".to_string(), "example.org".to_string()];
        assert!(covers(&names, "app.example.com"));
        assert!(!covers(&names, "a.b.example.com"));
        assert!(!covers(&names, "example.com"));
        assert!(covers(&names, "example.org"));
    }

    #[test]
    fn private_names_are_not_public() {
        for h in ["localhost", "app.localhost", "10.0.0.1", "intranet", "app.internal", "box.local"] {
            assert!(!is_public(h), "{h}");
        }
        assert!(is_public("app.example.com"));
    }
}
