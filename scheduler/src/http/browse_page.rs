//! The browse page at `/browse?project=P`: a project's items as a grid of
//! thumbnails, filtered by class, label source, state and confidence (the
//! query parameters of `GET /api/v1/projects/{p}/items`), each opening its
//! history (`GET /api/v1/items/{id}`), with "report as wrong"
//! (`POST /api/v1/items/{id}/reopen`).
//!
//! Built like the review page (`review_page.rs`), under the same rules and
//! headers: compiled into the binary, nothing from another origin, the
//! token in `sessionStorage` (the review page's key, so a reviewer signed
//! in there is signed in here) and sent only as an `Authorization` header,
//! every piece of data written with `textContent`, images fetched with the
//! token and shown through blob: URLs.

use axum::Router;
use axum::routing::get;

use super::review_page::asset;
use crate::context::Context;

const PAGE: &str = include_str!("../../assets/browse.html");
const SCRIPT: &str = include_str!("../../assets/browse.js");
const STYLE: &str = include_str!("../../assets/browse.css");

pub fn routes() -> Router<Context> {
    Router::new()
        .route(
            "/browse",
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            "/browse/browse.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/browse/browse.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}
