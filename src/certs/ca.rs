//! The internal CA (as Caddy's `tls internal`): a root made once and kept
//! in DIR/tls/ca/, which issues short leaf certificates for the names ACME
//! cannot serve (`localhost`, private names, no `--acme-email`). The
//! operator trusts the root (`slipway certs ca` prints it).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// How long internal leaf certificates live. Short, as Caddy's (12 h):
/// renewal is local and cheap, and a leaked key is worth little.
pub const LEAF_LIFETIME: time::Duration = time::Duration::hours(12);
/// The root lives ten years; replacing it means every operator re-trusts.
const ROOT_LIFETIME: time::Duration = time::Duration::days(3650);

pub struct InternalCa {
    /// The root in PEM, as handed to operators.
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl InternalCa {
    /// Load the root from `dir`, or make one there (key mode 0600).
    pub fn open(dir: &Path) -> Result<InternalCa> {
        let (cert_path, key_path) = (dir.join("root.pem"), dir.join("root.key"));
        if !cert_path.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let key = KeyPair::generate().context("generating the internal CA key")?;
            let mut params = CertificateParams::new(Vec::<String>::new()).context("internal CA parameters")?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, "slipway");
            // A random suffix, so two servers' roots are told apart in a trust store.
            dn.push(DnType::CommonName, format!("slipway internal CA {:08x}", rand::random::<u32>()));
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::hours(1);
            params.not_after = now + ROOT_LIFETIME;
            let cert = params.self_signed(&key).context("signing the internal CA root")?;
            super::write_private(&key_path, key.serialize_pem().as_bytes())?;
            super::write_atomic(&cert_path, cert.pem().as_bytes())?;
        }
        let root_pem = std::fs::read_to_string(&cert_path).with_context(|| format!("reading {}", cert_path.display()))?;
        let key_pem = std::fs::read_to_string(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem).with_context(|| format!("parsing {}", key_path.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&root_pem, key).with_context(|| format!("parsing {}", cert_path.display()))?;
        Ok(InternalCa { root_pem, issuer })
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// A leaf for `host`: (chain PEM, key PEM). The chain holds the leaf
    /// and the root, so a client trusting the root needs nothing else.
    pub fn issue(&self, host: &str) -> Result<(String, String)> {
        let key = KeyPair::generate().context("generating a leaf key")?;
        let mut params = CertificateParams::new(vec![host.to_string()]).with_context(|| format!("certificate names for {host}"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        // Clocks drift: a client a few minutes behind still accepts it.
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + LEAF_LIFETIME;
        let cert = params.signed_by(&key, &self.issuer).with_context(|| format!("signing a certificate for {host}"))?;
        Ok((format!("{}{}", cert.pem(), self.root_pem), key.serialize_pem()))
    }
}

/// Where the root is exported for operators: DIR/tls/ca/root.pem.
pub fn root_path(tls_dir: &Path) -> PathBuf {
    tls_dir.join("ca").join("root.pem")
}
