//! An admin answer and how it goes on the wire: status, content type,
//! cache policy, and gzip when the client accepts it (the explorer's
//! first render and its refreshes stay small: JSON of numbers shrinks
//! about tenfold).

use std::io::Write;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderValue, VARY};
use hyper::{Response, StatusCode};

/// Bodies shorter than this go as they are.
const GZIP_FROM: usize = 1024;

/// The policy the pages are served with: nothing from elsewhere, no
/// inline script or style, no framing.
const POLICY: &str = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub struct Answer {
    pub status: StatusCode,
    pub kind: &'static str,
    pub body: Bytes,
    /// A page asset: served with the content security policy.
    pub page: bool,
    /// A 401 that names its scheme (`WWW-Authenticate: Bearer`).
    pub challenge: bool,
}

impl Answer {
    pub fn text(status: StatusCode, body: String) -> Answer {
        Answer {
            status,
            kind: "text/plain; version=0.0.4",
            body: Bytes::from(body),
            page: false,
            challenge: false,
        }
    }

    pub fn json(status: StatusCode, v: &serde_json::Value) -> Answer {
        Answer {
            status,
            kind: "application/json",
            body: Bytes::from(v.to_string()),
            page: false,
            challenge: false,
        }
    }

    /// `{"error": message}`.
    pub fn error(status: StatusCode, message: &str) -> Answer {
        Answer::json(status, &serde_json::json!({ "error": message }))
    }

    pub fn asset(kind: &'static str, body: &'static str) -> Answer {
        Answer {
            status: StatusCode::OK,
            kind,
            body: Bytes::from_static(body.as_bytes()),
            page: true,
            challenge: false,
        }
    }

    /// Says which scheme the refused request needs.
    pub fn challenge(mut self) -> Answer {
        self.challenge = true;
        self
    }

    /// The response, gzipped if `gzip` and worth it.
    pub fn into_response(self, gzip: bool) -> Response<Full<Bytes>> {
        let zipped = (gzip && self.body.len() >= GZIP_FROM)
            .then(|| compress(&self.body))
            .flatten();
        let encoded = zipped.is_some();
        let mut resp = Response::new(Full::new(zipped.unwrap_or(self.body)));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(self.kind));
        h.insert(VARY, HeaderValue::from_static("accept-encoding"));
        if encoded {
            h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        h.insert(
            "x-content-type-options",
            HeaderValue::from_static("nosniff"),
        );
        if self.challenge {
            h.insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tallyd admin\""),
            );
        }
        if self.page {
            h.insert("content-security-policy", HeaderValue::from_static(POLICY));
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        } else {
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        resp
    }
}

/// Whether the request's `Accept-Encoding` names gzip.
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(hyper::header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| {
            let mut parts = e.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| p.trim().replace(' ', "") == "q=0");
            name.eq_ignore_ascii_case("gzip") && !refused
        })
}

fn compress(body: &[u8]) -> Option<Bytes> {
    let mut z = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    z.write_all(body).ok()?;
    z.finish().ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_used_when_accepted_and_worth_it() {
        let mut h = HeaderMap::new();
        assert!(!accepts_gzip(&h));
        h.insert(
            hyper::header::ACCEPT_ENCODING,
            HeaderValue::from_static("br, gzip;q=0.8"),
        );
        assert!(accepts_gzip(&h));
        h.insert(
            hyper::header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip;q=0, identity"),
        );
        assert!(!accepts_gzip(&h));
        let big = Answer::text(StatusCode::OK, "x".repeat(5000)).into_response(true);
        assert_eq!(big.headers()[CONTENT_ENCODING], "gzip");
        let small = Answer::text(StatusCode::OK, "ok".into()).into_response(true);
        assert!(small.headers().get(CONTENT_ENCODING).is_none());
    }
}
