//! `[static]`: files the proxy answers itself, from the live release's tree.
//!
//! A mount is resolved once, when its release's route is set: its
//! directory must exist and lie inside the release tree (a `[storage]`
//! item, which the app can write, is refused). Release trees are sealed
//! before they serve (root's, read-only to the app), so what a request
//! resolves cannot change under it: each file is canonicalized and must
//! stay inside its mount's directory, which covers `..`, percent-encoded
//! traversal and symlinks leading out alike; anything else is a 404 (403
//! for a symlink that leaves), never the file.
//!
//! tower-http's `ServeDir` was not used: it follows symlinks wherever
//! they lead (its precompressed variants too), so it cannot keep a file
//! inside the mount. Header semantics come from crates: `headers` for the
//! validators and conditionals, `http-range-header` for Range, `mime_guess`
//! for types.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use futures_util::TryStreamExt as _;
use headers::{ContentRange, ETag, HeaderMapExt as _, IfModifiedSince, IfNoneMatch, IfRange, LastModified};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::{empty_body, page, ProxyBody};
use crate::manifest::StaticMount;

/// Hashed names (`app.3f2a9c1b.css`) never change content: cache for a year.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Other names may change with the next release or a rollback: browsers
/// may keep them, but must revalidate (ETag) before each use.
const REVALIDATE: &str = "public, no-cache";

/// One app's mounts, longest prefix first. Immutable once built; it lives
/// in the proxy's route table beside the app's upstreams.
#[derive(Debug, Default)]
pub struct Statics {
    mounts: Vec<Mount>,
}

#[derive(Debug)]
struct Mount {
    /// Starts and ends with `/`.
    prefix: String,
    /// Canonical, inside the release tree.
    dir: PathBuf,
}

impl Statics {
    /// The mounts of the release whose tree is `tree`. Refuses a mapped
    /// directory that is missing or leads out of the tree.
    pub fn resolve(tree: &Path, specs: &[StaticMount]) -> Result<Statics> {
        if specs.is_empty() {
            return Ok(Statics::default());
        }
        let root = std::fs::canonicalize(tree).with_context(|| format!("resolving {}", tree.display()))?;
        let mut mounts = Vec::new();
        for s in specs {
            let what = format!("[static] {:?} = {:?}", s.prefix, s.path);
            let Ok(dir) = std::fs::canonicalize(tree.join(&s.path)) else {
                bail!("{what}: {} is not in the release (did the build phase make it?)", s.path);
            };
            if !dir.starts_with(&root) {
                bail!("{what}: {} leads out of the release tree (only files of the release itself are served)", s.path);
            }
            if !dir.is_dir() {
                bail!("{what}: {} is not a directory", s.path);
            }
            mounts.push(Mount { prefix: s.prefix.clone(), dir });
        }
        mounts.sort_by_key(|m| std::cmp::Reverse(m.prefix.len()));
        Ok(Statics { mounts })
    }

    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty()
    }

    /// Answer `req` if its path is under a mount; `None`: not ours, the
    /// app gets it.
    pub async fn serve<B>(&self, req: &Request<B>) -> Option<Response<ProxyBody>> {
        if self.mounts.is_empty() {
            return None;
        }
        let raw = req.uri().path();
        // Match on the decoded path: `/%73tatic/` is `/static/`. A path that
        // does not decode to UTF-8 is matched as sent.
        let decoded = percent_encoding::percent_decode_str(raw).decode_utf8().map(|c| c.into_owned());
        let path = decoded.as_deref().unwrap_or(raw);
        let mount = self.mounts.iter().find(|m| path.starts_with(&m.prefix))?;
        if decoded.is_err() {
            return Some(not_found());
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut resp = page(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", "Static files answer GET and HEAD only.");
            resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return Some(resp);
        }
        let rel = &path[mount.prefix.len()..];
        if !safe_relative(rel) {
            return Some(not_found());
        }
        Some(match serve_file(mount, rel, req).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::warn!(path = %raw, error = %format!("{e:#}"), "serving a static file");
                page(StatusCode::INTERNAL_SERVER_ERROR, "internal error", "The file could not be read.")
            }
        })
    }
}

/// Only plain names: no empty, `.` or `..` segment, no NUL.
fn safe_relative(rel: &str) -> bool {
    !rel.is_empty() && !rel.contains('\0') && rel.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

/// A file found inside a mount.
struct Found {
    path: PathBuf,
    meta: std::fs::Metadata,
}

enum Lookup {
    Found(Found),
    Missing,
    /// A symlink that leads out of the mount.
    Outside,
}

/// Resolve `rel` in the mount: a regular file whose real path is inside
/// the mount's directory.
async fn lookup(mount_dir: &Path, rel: &str) -> Lookup {
    let (dir, candidate) = (mount_dir.to_path_buf(), mount_dir.join(rel));
    let found = tokio::task::spawn_blocking(move || {
        let Ok(real) = std::fs::canonicalize(&candidate) else { return Lookup::Missing };
        if !real.starts_with(&dir) {
            return Lookup::Outside;
        }
        match std::fs::metadata(&real) {
            Ok(meta) if meta.is_file() => Lookup::Found(Found { path: real, meta }),
            _ => Lookup::Missing,
        }
    })
    .await;
    found.unwrap_or(Lookup::Missing)
}

async fn serve_file<B>(mount: &Mount, rel: &str, req: &Request<B>) -> Result<Response<ProxyBody>> {
    let file = match lookup(&mount.dir, rel).await {
        Lookup::Found(f) => f,
        Lookup::Missing => return Ok(not_found()),
        Lookup::Outside => {
            tracing::warn!(file = %rel, "static file is a symlink leading out of its directory: refused");
            return Ok(page(StatusCode::FORBIDDEN, "forbidden", "This file is not served."));
        }
    };
    let headers = req.headers();
    let ranged = headers.contains_key(header::RANGE);

    // Precompressed variants (`app.css.br`, `app.css.gz`), themselves
    // checked like any file. A range asks for bytes of the file itself.
    let mut variants = Vec::new();
    for (enc, ext) in [("br", "br"), ("gzip", "gz")] {
        if let Lookup::Found(v) = lookup(&mount.dir, &format!("{rel}.{ext}")).await {
            variants.push((enc, v));
        }
    }
    let has_variants = !variants.is_empty();
    let chosen = if ranged { None } else { pick_encoding(headers.get(header::ACCEPT_ENCODING), &variants) };
    let (encoding, file) = match chosen {
        Some(i) => {
            let (enc, v) = variants.swap_remove(i);
            (Some(enc), v)
        }
        None => (None, file),
    };

    let len = file.meta.len();
    let etag = etag_of(&file.meta)?;
    let modified = file.meta.modified().ok();
    let mut resp = Response::new(empty_body());
    let h = resp.headers_mut();
    h.typed_insert(etag.clone());
    if let Some(m) = modified {
        h.typed_insert(LastModified::from(m));
    }
    let name = rel.rsplit('/').next().unwrap_or(rel);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(if is_hashed(name) { IMMUTABLE } else { REVALIDATE }));
    if has_variants {
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }

    // Conditionals (RFC 9110 13.2.2): If-None-Match wins over
    // If-Modified-Since.
    let not_modified = match headers.typed_get::<IfNoneMatch>() {
        Some(inm) => !inm.precondition_passes(&etag),
        None => match (headers.typed_get::<IfModifiedSince>(), modified) {
            (Some(ims), Some(m)) => !ims.is_modified(m),
            _ => false,
        },
    };
    if not_modified {
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        return Ok(resp);
    }

    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type(name));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(enc) = encoding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(enc));
    }

    let mut span = 0..len;
    // If-Range: the range only holds for the representation it names.
    let range_holds = headers
        .typed_get::<IfRange>()
        .is_none_or(|ir| !ir.is_modified(Some(&etag), modified.map(LastModified::from).as_ref()));
    if let (Some(value), true) = (headers.get(header::RANGE).and_then(|v| v.to_str().ok()), range_holds) {
        match http_range_header::parse_range_header(value).and_then(|r| r.validate(len)) {
            // One range: 206. Several: the whole file (RFC 9110 14.2 lets
            // a server ignore Range; multipart bodies serve no asset use).
            Ok(ranges) if ranges.len() == 1 => {
                let (start, end) = (*ranges[0].start(), *ranges[0].end());
                *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
                if let Ok(cr) = ContentRange::bytes(start..=end, len) {
                    resp.headers_mut().typed_insert(cr);
                }
                span = start..end + 1;
            }
            Ok(_) => {}
            Err(http_range_header::RangeUnsatisfiableError::Unsatisfiable) => {
                let mut resp = Response::new(empty_body());
                *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                resp.headers_mut().typed_insert(ContentRange::unsatisfied_bytes(len));
                return Ok(resp);
            }
            // Malformed: ignored, as RFC 9110 14.2 says.
            Err(_) => {}
        }
    }
    resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(span.end - span.start));
    if req.method() == Method::HEAD {
        return Ok(resp);
    }
    *resp.body_mut() = file_body(&file.path, span).await?;
    Ok(resp)
}

/// The bytes `span` of the file, streamed. Opened without following a
/// symlink: `path` is already the real path.
async fn file_body(path: &Path, span: std::ops::Range<u64>) -> Result<ProxyBody> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let std_file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut file = tokio::fs::File::from_std(std_file);
    file.seek(SeekFrom::Start(span.start)).await.context("seeking")?;
    let stream = tokio_util::io::ReaderStream::new(file.take(span.end - span.start));
    let body = StreamBody::new(stream.map_ok(Frame::data).map_err(|e| Box::new(e) as super::body::BoxError));
    Ok(body.boxed())
}

/// A strong validator from what identifies this file's content: its inode
/// (each release tree has its own, promotion's hard links share both inode
/// and content), length and modification time to the nanosecond.
fn etag_of(meta: &std::fs::Metadata) -> Result<ETag> {
    use std::os::unix::fs::MetadataExt as _;
    let tag = format!("\"{:x}-{:x}-{:x}.{:x}\"", meta.ino(), meta.len(), meta.mtime(), meta.mtime_nsec());
    tag.parse().map_err(|_| anyhow::anyhow!("unparseable etag {tag}"))
}

/// `app.3f2a9c1b.css`, Django's ManifestStaticFilesStorage
/// (`app.3f2a9c1b12ab.css`), webpack/Vite-style `.HASH.` names: a middle
/// dot-separated part of 8 to 64 hex digits.
fn is_hashed(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() >= 3
        && parts[1..parts.len() - 1]
            .iter()
            .any(|p| (8..=64).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn content_type(name: &str) -> HeaderValue {
    let mime = mime_guess::from_path(name).first_or_octet_stream();
    let text = mime.type_() == mime_guess::mime::TEXT
        || mime.subtype() == mime_guess::mime::JAVASCRIPT
        || mime.subtype() == mime_guess::mime::JSON;
    let value = if text && mime.get_param(mime_guess::mime::CHARSET).is_none() {
        format!("{mime}; charset=utf-8")
    } else {
        mime.to_string()
    };
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
}

/// The variant to send for this `Accept-Encoding`, by our preference (br,
/// then gzip) among those the client accepts with q > 0. Hand-parsed: the
/// `headers` crate has no typed Accept-Encoding, and the grammar is a
/// comma list of `token;q=N`.
fn pick_encoding(accept: Option<&HeaderValue>, variants: &[(&str, Found)]) -> Option<usize> {
    let accept = accept?.to_str().ok()?;
    let accepted = |enc: &str| {
        let mut star = false;
        for item in accept.split(',') {
            let mut parts = item.split(';');
            let token = parts.next().unwrap_or("").trim();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if token.eq_ignore_ascii_case(enc) {
                return q > 0.0;
            }
            if token == "*" {
                star = q > 0.0;
            }
        }
        star
    };
    variants.iter().position(|(enc, _)| accepted(enc))
}

fn not_found() -> Response<ProxyBody> {
    page(StatusCode::NOT_FOUND, "not found", "No such file.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_names() {
        assert!(is_hashed("app.3f2a9c1b.css"));
        assert!(is_hashed("base.3f2a9c1b12ab.js"));
        assert!(!is_hashed("jquery.min.js"));
        assert!(!is_hashed("app.css"));
        assert!(!is_hashed("deadbeef.css"));
    }

    #[test]
    fn relative_paths() {
        assert!(safe_relative("css/app.css"));
        for bad in ["", "../app.py", "css/../../x", "./a", "a//b", "a/", "a\0b"] {
            assert!(!safe_relative(bad), "{bad:?}");
        }
    }
}
