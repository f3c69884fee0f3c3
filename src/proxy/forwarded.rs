//! `X-Forwarded-*` (issue 9 #7, DESIGN.md `--trusted-proxy`): a peer in a
//! trusted range (a TLS terminator or load balancer in front of slipway)
//! may tell the app who the client was and which scheme it used; anyone
//! else's claims are dropped and replaced by what slipway saw, never
//! appended to, so an app cannot be fooled into trusting a forged client
//! address or scheme.

use std::net::{IpAddr, SocketAddr};

use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::HeaderMap;
use ipnet::IpNet;

/// The scheme a client reached slipway by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Whether `peer` is in one of `trusted`.
pub fn is_trusted(trusted: &[IpNet], peer: IpAddr) -> bool {
    let peer = match peer {
        // An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d.
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
        v4 => v4,
    };
    trusted.iter().any(|net| net.contains(&peer))
}

/// The client at the other end of a connection, as `X-Forwarded-For`
/// names it: built once per connection, not per request.
#[derive(Debug, Clone)]
pub struct Peer {
    ip: IpAddr,
    header: Option<HeaderValue>,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        Peer { ip: addr.ip(), header: HeaderValue::from_str(&addr.ip().to_string()).ok() }
    }
    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

/// Rewrite the forwarding headers of a request from `peer`, which reached
/// slipway over `scheme`.
pub fn rewrite(headers: &mut HeaderMap, peer: &Peer, scheme: Scheme, trusted: bool) {
    let peer_ip = peer.header.clone();
    if trusted {
        // Keep what the trusted proxy said; add ourselves to the chain.
        let chain = match (headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()), peer_ip) {
            (Some(prev), _) => HeaderValue::from_str(&format!("{prev}, {}", peer.ip)).ok(),
            (None, ip) => ip,
        };
        if let Some(v) = chain {
            headers.insert(X_FORWARDED_FOR, v);
        }
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme.as_str()));
        }
        if !headers.contains_key(&X_FORWARDED_HOST) {
            if let Some(h) = headers.get(HOST).cloned() {
                headers.insert(X_FORWARDED_HOST, h);
            }
        }
        return;
    }
    for name in [&X_FORWARDED_FOR, &X_FORWARDED_PROTO, &X_FORWARDED_HOST, &X_FORWARDED_PORT, &X_REAL_IP, &FORWARDED] {
        headers.remove(name);
    }
    if let Some(ip) = peer_ip {
        headers.insert(X_FORWARDED_FOR, ip);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme.as_str()));
    if let Some(h) = headers.get(HOST).cloned() {
        headers.insert(X_FORWARDED_HOST, h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn untrusted_claims_are_replaced() {
        let mut h = headers(&[
            ("host", "app.localhost"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-real-ip", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6;proto=https"),
        ]);
        rewrite(&mut h, &Peer::new("10.0.0.9:5000".parse().expect("addr")), Scheme::Http, false);
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.localhost");
        assert!(h.get("x-real-ip").is_none() && h.get("forwarded").is_none());
    }

    #[test]
    fn trusted_claims_are_kept() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        assert!(is_trusted(&trusted, "10.1.2.3".parse().expect("ip")));
        assert!(is_trusted(&trusted, "::ffff:10.1.2.3".parse().expect("ip")));
        assert!(!is_trusted(&trusted, "11.0.0.1".parse().expect("ip")));
        let mut h = headers(&[("host", "app.localhost"), ("x-forwarded-for", "1.2.3.4"), ("x-forwarded-proto", "https")]);
        rewrite(&mut h, &Peer::new("10.0.0.9:5000".parse().expect("addr")), Scheme::Http, true);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
