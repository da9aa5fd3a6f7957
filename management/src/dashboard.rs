//! The web dashboard at `/` (issue 17): plain HTML, JavaScript and CSS from `management/assets`,
//! embedded in the binary (no build step, nothing fetched from elsewhere).
//!
//! The page and its files are served without a login, as RabbitMQ serves its UI: they hold no
//! data. The script logs in to the API with HTTP Basic (credentials in the tab's
//! sessionStorage) and reads `/api/...` like any other client, so it sees exactly what the
//! user's tags allow. Every answer here carries a Content-Security-Policy that allows only
//! this origin and no inline script, `nosniff` and `X-Frame-Options: DENY`.
//!
//! The files have no version in their names (there is no build step to put one there), so they
//! are sent with `Cache-Control: no-cache` and an `ETag` (a hash of the content): a browser
//! revalidates them, gets `304` while they are unchanged, and never mixes an old script with a
//! new page after an upgrade.

use std::sync::OnceLock;

use axum::extract::{Path, Request};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use crate::api::AppState;
use crate::error::ApiError;

/// Only this origin, no inline script or style, no framing, no plugins.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const INDEX: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("../assets/index.html"),
};

/// What `/static/{name}` serves.
const STATIC: &[Asset] = &[
    Asset { name: "app.js", content_type: "text/javascript; charset=utf-8", body: include_bytes!("../assets/app.js") },
    Asset { name: "style.css", content_type: "text/css; charset=utf-8", body: include_bytes!("../assets/style.css") },
    Asset { name: "favicon.svg", content_type: "image/svg+xml", body: include_bytes!("../assets/favicon.svg") },
];

pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/static/{name}", get(static_file))
}

async fn index(request: HeaderMap) -> Response {
    serve(&INDEX, &request)
}

async fn static_file(Path(name): Path<String>, request: HeaderMap) -> Response {
    match STATIC.iter().find(|a| a.name == name) {
        Some(asset) => serve(asset, &request),
        None => secured(ApiError::not_found().into_response()),
    }
}

/// The asset, or `304` when the browser's copy (`If-None-Match`) is current.
fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let etag = etag(asset);
    let current = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim())
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag);
    let mut response = if current {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type))], asset.body).into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, value);
    }
    secured(response)
}

/// `"<first 16 bytes of SHA-256, hex>"`, computed once per file.
fn etag(asset: &Asset) -> &'static str {
    static TAGS: OnceLock<Vec<(&'static str, String)>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        std::iter::once(&INDEX)
            .chain(STATIC)
            .map(|a| {
                let hex: String = Sha256::digest(a.body)[..16].iter().map(|b| format!("{b:02x}")).collect();
                (a.name, format!("\"{hex}\""))
            })
            .collect()
    });
    tags.iter().find(|(name, _)| *name == asset.name).map_or("\"\"", |(_, tag)| tag.as_str())
}

fn secured(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// The header scripts send (the dashboard, jQuery, many others) to say a request is theirs.
const X_REQUESTED_WITH: HeaderName = HeaderName::from_static("x-requested-with");

/// A `401` to a script's request (`X-Requested-With: XMLHttpRequest`) goes without the
/// `WWW-Authenticate: Basic` challenge: with it, browsers open their own login dialog over the
/// dashboard's form. Other clients (curl, rabbitmqadmin, Prometheus) get the challenge as
/// before.
pub(crate) async fn no_challenge_for_scripts(request: Request, next: Next) -> Response {
    let from_script =
        request.headers().get(X_REQUESTED_WITH).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"XMLHttpRequest"));
    let mut response = next.run(request).await;
    if from_script && response.status() == StatusCode::UNAUTHORIZED {
        response.headers_mut().remove(header::WWW_AUTHENTICATE);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(asset: &Asset) -> &'static str {
        std::str::from_utf8(asset.body).expect("UTF-8")
    }

    #[test]
    fn the_script_never_writes_html() {
        // Queue names, client ids and connection names are chosen by clients: the script puts
        // them into the page as text only.
        let script = text(&STATIC[0]);
        for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"] {
            assert!(!script.contains(sink), "app.js uses {sink}");
        }
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_and_names_only_served_files() {
        let page = text(&INDEX);
        assert!(!page.contains("<script>") && !page.contains("<style") && !page.contains("style="), "inline code");
        // No event handler attributes (` onclick=`…).
        for (at, _) in page.match_indices(" on") {
            let rest = &page[at + 3..];
            let word = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            assert!(word == 0 || rest.as_bytes().get(word) != Some(&b'='), "an inline handler at {}", &page[at..]);
        }
        for reference in page.split(['"', '\'']).filter(|s| s.starts_with("/static/")) {
            let name = &reference["/static/".len()..];
            assert!(STATIC.iter().any(|a| a.name == name), "{reference} is not served");
        }
    }

    #[test]
    fn etags_differ_by_content_and_are_quoted() {
        let tags: Vec<&str> = std::iter::once(&INDEX).chain(STATIC).map(etag).collect();
        for (i, t) in tags.iter().enumerate() {
            assert!(t.starts_with('"') && t.ends_with('"') && t.len() == 34, "{t}");
            assert!(!tags[i + 1..].contains(t), "two files share {t}");
        }
    }

    #[test]
    fn a_current_copy_is_answered_304_with_the_security_headers() {
        let tag = etag(&STATIC[0]);
        let mut request = HeaderMap::new();
        request.insert(header::IF_NONE_MATCH, HeaderValue::from_str(&format!("\"x\", W/{tag}")).unwrap());
        let response = serve(&STATIC[0], &request);
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(response.headers()[header::ETAG], tag);
        assert_eq!(response.headers()[header::CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY);
        let stale = serve(&STATIC[0], &HeaderMap::new());
        assert_eq!(stale.status(), StatusCode::OK);
        assert_eq!(stale.headers()[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
        assert_eq!(stale.headers()[header::X_FRAME_OPTIONS], "DENY");
    }
}
