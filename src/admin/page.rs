//! The explorer's and status page's assets, served from the binary (an
//! air-gapped host needs nothing else): one HTML shell for `/` and
//! `/status`, the project's own script (it draws the charts as SVG from
//! the JSON API, see `page/app.js`) and its stylesheet. No third-party
//! code; the content security policy ([`super::http`]) allows only these.

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/app.css");

/// `(content type, body)` of the asset at `path`.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" | "/status" => Some(("text/html; charset=utf-8", INDEX)),
        "/assets/app.js" => Some(("text/javascript; charset=utf-8", SCRIPT)),
        "/assets/app.css" => Some(("text/css; charset=utf-8", STYLE)),
        _ => None,
    }
}
