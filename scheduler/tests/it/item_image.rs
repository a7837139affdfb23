//! `GET /api/v1/items/{id}/image` streams the stored bytes (issue 25 item
//! 6): a large image is sent in chunks as it is read, not held whole in
//! the scheduler's memory first, with its type from its magic bytes.

#![allow(clippy::unwrap_used)]

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use sieve_scheduler::entities::api_token::Role;
use sieve_testkit::with_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_image_is_streamed_whole() {
    with_app(60, |app| async move {
        let seeded = app.seed("big", &["cat", "dog"], 1).await;
        let item = seeded.tasks[0].item_id;
        // A PNG signature, then 8 MiB: far more than one read.
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        bytes.extend((0..8 * 1024 * 1024).map(|i: u32| (i % 251) as u8));
        app.ctx
            .store
            .put("uploads/big.png", bytes.clone().into())
            .await
            .unwrap();
        app.db()
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE items SET object_key = 'uploads/big.png' WHERE id = $1",
                [item.into()],
            ))
            .await
            .unwrap();
        let token = app.token("rita", Role::Reviewer).await;
        let response = app
            .http
            .get(app.url(&format!("/api/v1/items/{item}/image")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "image/png");
        // Streamed: sent chunked, its length not known up front.
        assert!(
            response.headers().get("content-length").is_none(),
            "{:?}",
            response.headers()
        );
        assert_eq!(response.headers()["transfer-encoding"], "chunked");
        let body = response.bytes().await.unwrap();
        assert_eq!(body.len(), bytes.len());
        assert!(body == bytes, "the bytes differ");
    })
    .await;
}
