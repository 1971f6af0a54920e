//! The explorer's and status page's assets, served from the binary (an
//! air-gapped host needs nothing else): one HTML shell for `/` and
//! `/status`, the project's own script (it draws the charts as SVG from
//! the JSON API, see `page/app.js`) and its stylesheet. No third-party
//! code; the content security policy allows only these.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/app.css");

/// The policy every asset is served with: nothing from elsewhere, no
/// inline script or style, no framing.
const POLICY: &str = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// `(content type, body)` of the asset at `path`.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" | "/status" => Some(("text/html; charset=utf-8", INDEX)),
        "/assets/app.js" => Some(("text/javascript; charset=utf-8", SCRIPT)),
        "/assets/app.css" => Some(("text/css; charset=utf-8", STYLE)),
        _ => None,
    }
}

pub fn response(kind: &'static str, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert("content-security-policy", HeaderValue::from_static(POLICY));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
