//! ACME (RFC 8555) through `instant-acme`: one account kept in
//! DIR/tls/acme/account.json, one order per host, answered by HTTP-01 on
//! `--http` (the proxy asks [`Acme::http01_answer`]) or TLS-ALPN-01 on
//! `--https` (the resolver asks [`Acme::tls_alpn01_cert`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use rustls::sign::CertifiedKey;

use super::AcmeConfig;

/// Which challenge slipway answers (`--acme-challenge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// HTTP-01 on `--http` (port 80 for a public CA).
    Http01,
    /// TLS-ALPN-01 on `--https` (port 443 for a public CA).
    TlsAlpn01,
}

impl std::str::FromStr for Challenge {
    type Err = String;
    fn from_str(s: &str) -> Result<Challenge, String> {
        match s {
            "http-01" => Ok(Challenge::Http01),
            "tls-alpn-01" => Ok(Challenge::TlsAlpn01),
            _ => Err(format!("unknown ACME challenge {s:?}: use http-01 or tls-alpn-01")),
        }
    }
}

/// How long a CA may take to validate and issue before the order counts
/// as failed (and is retried with backoff).
const ORDER_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Acme {
    dir: PathBuf,
    cfg: Option<AcmeConfig>,
    account: tokio::sync::Mutex<Option<Account>>,
    /// HTTP-01: token → key authorization, while its order is pending.
    http01: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01: host → validation certificate, while pending.
    tls_alpn01: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl Acme {
    pub fn new(dir: PathBuf, cfg: Option<AcmeConfig>) -> Acme {
        Acme {
            dir,
            cfg,
            account: tokio::sync::Mutex::new(None),
            http01: Mutex::new(HashMap::new()),
            tls_alpn01: Mutex::new(HashMap::new()),
        }
    }

    pub fn http01_answer(&self, token: &str) -> Option<String> {
        self.http01.lock().unwrap_or_else(|e| e.into_inner()).get(token).cloned()
    }

    pub fn tls_alpn01_cert(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        self.tls_alpn01.lock().unwrap_or_else(|e| e.into_inner()).get(host).cloned()
    }

    /// Order, validate and fetch a certificate for `host`: (chain PEM, key PEM).
    pub async fn issue(&self, host: &str) -> Result<(String, String)> {
        let cfg = self.cfg.as_ref().ok_or_else(|| anyhow!("no --acme-email set"))?;
        let account = self.account(cfg).await?;
        let identifiers = [Identifier::Dns(host.to_string())];
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await.with_context(|| format!("ACME order for {host}"))?;

        // Answer each pending authorization; the answers are withdrawn
        // when this function returns, whatever the outcome.
        let mut answers = Answers { acme: self, tokens: Vec::new(), hosts: Vec::new() };
        let mut auths = order.authorizations();
        while let Some(auth) = auths.next().await {
            let mut auth = auth.context("reading an ACME authorization")?;
            match auth.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => bail!("authorization for {host} is {other:?}"),
            }
            let kind = match cfg.challenge {
                Challenge::Http01 => ChallengeType::Http01,
                Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
            };
            let mut challenge = auth.challenge(kind.clone()).ok_or_else(|| anyhow!("the CA offers no {kind:?} challenge for {host}"))?;
            let key_auth = challenge.key_authorization();
            match cfg.challenge {
                Challenge::Http01 => {
                    let token = challenge.token.clone();
                    self.http01.lock().unwrap_or_else(|e| e.into_inner()).insert(token.clone(), key_auth.as_str().to_string());
                    answers.tokens.push(token);
                }
                Challenge::TlsAlpn01 => {
                    let cert = alpn_validation_cert(host, key_auth.digest().as_ref())?;
                    self.tls_alpn01.lock().unwrap_or_else(|e| e.into_inner()).insert(host.to_string(), cert);
                    answers.hosts.push(host.to_string());
                }
            }
            challenge.set_ready().await.context("telling the CA the challenge is ready")?;
        }

        let retry = RetryPolicy::new().initial_delay(Duration::from_millis(250)).backoff(1.5).timeout(ORDER_TIMEOUT);
        let status = order.poll_ready(&retry).await.with_context(|| format!("validating {host}"))?;
        drop(answers);
        if status != OrderStatus::Ready {
            bail!("order for {host} ended {status:?}{}", order_problem(&mut order).await);
        }
        let key = rcgen::KeyPair::generate().context("generating the certificate key")?;
        let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).context("CSR names")?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key).context("making the CSR")?;
        order.finalize_csr(csr.der()).await.with_context(|| format!("finalizing the order for {host}"))?;
        let chain = order.poll_certificate(&retry).await.with_context(|| format!("fetching the certificate for {host}"))?;
        Ok((chain, key.serialize_pem()))
    }

    /// The account, loaded from DIR/tls/acme/account.json or registered
    /// (and saved, 0600) on first use.
    async fn account(&self, cfg: &AcmeConfig) -> Result<Account> {
        let mut slot = self.account.lock().await;
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let builder = || match &cfg.ca_file {
            Some(ca) => Account::builder_with_root(ca).with_context(|| format!("trusting {} for the ACME directory", ca.display())),
            None => Account::builder().context("ACME HTTP client"),
        };
        let path = self.dir.join("account.json");
        let account = match std::fs::read(&path) {
            Ok(bytes) => {
                let creds: AccountCredentials = serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
                builder()?.from_credentials(creds).await.context("restoring the ACME account")?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let contact = format!("mailto:{}", cfg.email);
                let (account, creds) = builder()?
                    .create(
                        &NewAccount { contact: &[&contact], terms_of_service_agreed: true, only_return_existing: false },
                        cfg.directory.clone(),
                        None,
                    )
                    .await
                    .with_context(|| format!("registering an ACME account at {}", cfg.directory))?;
                std::fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
                super::write_private(&path, &serde_json::to_vec(&creds).context("serializing the ACME account")?)?;
                account
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        *slot = Some(account.clone());
        Ok(account)
    }
}

/// Withdraws published challenge answers when dropped.
struct Answers<'a> {
    acme: &'a Acme,
    tokens: Vec<String>,
    hosts: Vec<String>,
}

impl Drop for Answers<'_> {
    fn drop(&mut self) {
        let mut http = self.acme.http01.lock().unwrap_or_else(|e| e.into_inner());
        for t in &self.tokens {
            http.remove(t);
        }
        let mut alpn = self.acme.tls_alpn01.lock().unwrap_or_else(|e| e.into_inner());
        for h in &self.hosts {
            alpn.remove(h);
        }
    }
}

/// The CA's own words on why an order failed, when it gave any.
async fn order_problem(order: &mut instant_acme::Order) -> String {
    let mut why = String::new();
    if let Some(e) = &order.state().error {
        why.push_str(&format!(": {e}"));
    }
    let mut auths = order.authorizations();
    while let Some(Ok(auth)) = auths.next().await {
        for c in &auth.challenges {
            if let Some(e) = &c.error {
                why.push_str(&format!(": {e}"));
            }
        }
    }
    why
}

/// The self-signed certificate TLS-ALPN-01 presents (RFC 8737 §3): the
/// host as its only name and the key authorization's digest in a critical
/// acmeIdentifier extension.
fn alpn_validation_cert(host: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>> {
    let key = rcgen::KeyPair::generate().context("generating the validation key")?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).context("validation certificate names")?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).context("signing the validation certificate")?;
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    // Not `CertifiedKey::from_der`: its consistency check parses the
    // certificate with webpki, which refuses the critical acmeIdentifier.
    let signing = super::crypto_provider().key_provider.load_private_key(der).map_err(|e| anyhow!("validation key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing)))
}
