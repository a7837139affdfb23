//! The reviewer's page at `/review`: one HTML file, its script and its style
//! sheet, compiled into the binary, so the page needs nothing from any other
//! origin (no CDN).
//!
//! The page asks for an API token, keeps it in `sessionStorage` and sends it
//! only as an `Authorization` header, never as a cookie, so another site
//! cannot make a browser act with it (no CSRF). It writes every piece of
//! data (class names, file names, errors) with `textContent`, so data is only
//! ever text; the headers below forbid inline script, plugins, framing and
//! referrers on top of that.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::context::Context;

const PAGE: &str = include_str!("../../assets/review.html");
const SCRIPT: &str = include_str!("../../assets/review.js");
const STYLE: &str = include_str!("../../assets/review.css");

/// Scripts and styles only from these files; images from here or from the
/// blob URLs the script makes of the images it fetched with the token.
/// The browse page is served under the same policy.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' blob:; \
     script-src 'self'; style-src 'self'; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn routes() -> Router<Context> {
    Router::new()
        .route(
            "/review",
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            "/review/review.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/review/review.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

/// A compiled-in file with the headers every page of the scheduler gets
/// (also the browse page's, `browse_page.rs`).
pub(super) fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // For browsers that predate `frame-ancestors`.
            (header::X_FRAME_OPTIONS, "DENY"),
            // Built into the binary: a new release must not be hidden by a
            // cached old script.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
