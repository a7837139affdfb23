//! The object store's contract, held by both backends sieve runs on: a
//! local directory and an S3 bucket prefix (the kit's [`Moto`], a real S3
//! API). Each check runs the same code against both, so a difference
//! between them (a missing object's error, a listing's boundaries, a
//! multipart upload) fails here rather than in a deployment.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use futures_util::TryStreamExt;
use sieve_shared::Settings;
use sieve_shared::store::{Listed, MARKER, Store, StoreError};
use sieve_testkit::Moto;

/// Every promise the stages rely on, on one store.
async fn holds_the_contract(store: &Store, what: &str) {
    // Round trip, size, a missing object.
    store
        .put("a/b/c.bin", Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(store.get("a/b/c.bin").await.unwrap(), "hello", "{what}");
    assert_eq!(store.size("a/b/c.bin").await.unwrap(), 5, "{what}");
    for missing in [
        store.get("a/b/nope").await,
        store.size("a/b/nope").await.map(|_| Bytes::new()),
    ] {
        let err = missing.expect_err(what);
        assert!(matches!(err, StoreError::NotFound(_)), "{what}: {err}");
        assert!(!err.is_transient(), "{what}");
    }
    // Keys that escape are refused before the backend sees them.
    for key in ["../etc/passwd", "a/../../b", "", "a//b"] {
        let err = store.get(key).await.expect_err(key);
        assert!(
            matches!(err, StoreError::InvalidKey { .. }),
            "{what} {key}: {err}"
        );
    }

    // Listings stop at whole segments.
    for key in ["in/a/1.bin", "in/a/sub/2.bin", "in/ab/3.bin", "out/4.bin"] {
        store.put(key, Bytes::from_static(b"1234")).await.unwrap();
    }
    let mut listed: Vec<Listed> = store.list("in/a/").try_collect().await.unwrap();
    listed.sort_by(|a, b| a.key.cmp(&b.key));
    let keys: Vec<&str> = listed.iter().map(|l| l.key.as_str()).collect();
    assert_eq!(keys, ["in/a/1.bin", "in/a/sub/2.bin"], "{what}");
    assert!(listed.iter().all(|l| l.size == 4), "{what}");
    let none: Vec<Listed> = store.list("nowhere").try_collect().await.unwrap();
    assert!(none.is_empty(), "{what}");

    // A multipart upload is invisible until finished, and an aborted one
    // leaves nothing. Parts larger than S3's 5 MiB minimum.
    let part = vec![7u8; 3 * 1024 * 1024];
    let mut upload = store.upload("big/table.bin").await.unwrap();
    for _ in 0..4 {
        upload.write(&part).await.unwrap();
    }
    assert!(
        matches!(
            store.size("big/table.bin").await,
            Err(StoreError::NotFound(_))
        ),
        "{what}: visible before finish"
    );
    upload.finish().await.unwrap();
    assert_eq!(
        store.size("big/table.bin").await.unwrap(),
        12 * 1024 * 1024,
        "{what}"
    );
    let streamed: Vec<Bytes> = store
        .get_stream("big/table.bin")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        streamed.iter().map(Bytes::len).sum::<usize>(),
        12 * 1024 * 1024
    );
    let mut aborted = store.upload("big/aborted.bin").await.unwrap();
    aborted.write(&part).await.unwrap();
    aborted.abort().await.unwrap();
    assert!(
        matches!(
            store.size("big/aborted.bin").await,
            Err(StoreError::NotFound(_))
        ),
        "{what}: an aborted upload left an object"
    );

    // Deleting is idempotent.
    store.delete("out/4.bin").await.unwrap();
    store.delete("out/4.bin").await.unwrap();
    assert!(matches!(
        store.get("out/4.bin").await,
        Err(StoreError::NotFound(_))
    ));

    // The blocking side (ingest's readers, the worker's batch reads) sees
    // the same objects, with the size limit checked before reading.
    let blocking = store.blocking();
    let read = tokio::task::spawn_blocking(move || {
        blocking
            .put_content_addressed("ab/cd.png", Bytes::from_static(b"pixels"))
            .unwrap();
        (
            blocking.get("ab/cd.png").unwrap(),
            blocking.get_at_most("a/b/c.bin", 4).unwrap(),
            blocking.get_at_most("a/b/c.bin", 5).unwrap(),
            blocking.get("ab/none.png").map(|_| ()),
        )
    })
    .await
    .unwrap();
    assert_eq!(read.0, "pixels", "{what}");
    assert!(
        read.1.unwrap_err().contains("over the limit of 4"),
        "{what}"
    );
    assert_eq!(read.2.unwrap(), "hello", "{what}");
    assert!(matches!(read.3, Err(StoreError::NotFound(_))), "{what}");
    assert_eq!(store.get("ab/cd.png").await.unwrap(), "pixels", "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_directory_holds_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.store.root = dir.path().to_owned();
    let store = Store::connect(&settings.store, &settings.s3).await.unwrap();
    assert!(dir.path().join(MARKER).exists());
    holds_the_contract(&store, "local").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_prefix_holds_the_contract_and_is_marked_before_workers_use_it() {
    let moto = Moto::start().await;
    moto.create_bucket("sieve-store").await;
    let mut settings = Settings::default();
    let nowhere = tempfile::tempdir().unwrap();
    settings.store.root = nowhere.path().join("never-written");
    moto.store_in(&mut settings, "sieve-store", "deploy/one");

    // A worker refuses a prefix the scheduler has not marked.
    let err = Store::connect_existing(&settings.store, &settings.s3)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("s3://sieve-store/deploy/one") && err.to_string().contains(MARKER),
        "{err}"
    );
    let store = Store::connect(&settings.store, &settings.s3).await.unwrap();
    assert_eq!(store.describe(), "s3://sieve-store/deploy/one");
    Store::connect_existing(&settings.store, &settings.s3)
        .await
        .unwrap();

    holds_the_contract(&store, "s3").await;

    // The keys live under the prefix of the bucket, and nowhere on disk.
    let bucket = Store::s3_bucket(&settings.s3, "sieve-store").unwrap();
    assert_eq!(bucket.get("deploy/one/a/b/c.bin").await.unwrap(), "hello");
    assert!(bucket.get("a/b/c.bin").await.is_err());
    assert!(!settings.store.root.exists());

    // A bucket that is not there, or half a key pair: refused with the reason.
    let mut missing = settings.clone();
    missing.store.url = Some("s3://no-such-bucket/x".into());
    let err = Store::connect(&missing.store, &missing.s3)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("s3://no-such-bucket/x"), "{err}");
    let mut half = settings.clone();
    half.s3.secret_access_key = None;
    let err = Store::connect(&half.store, &half.s3).await.unwrap_err();
    assert!(err.to_string().contains("s3.secret_access_key"), "{err}");
}

#[test]
fn a_store_url_that_is_neither_s3_nor_file_is_refused_by_name() {
    let mut settings = Settings::default();
    settings.store.url = Some("gs://bucket/x".into());
    let err = settings.validate().unwrap_err().to_string();
    assert!(
        err.contains("gs://bucket/x") && err.contains("s3://BUCKET/PREFIX"),
        "{err}"
    );
    settings.store.url = Some("s3://bucket/a/../b".into());
    assert!(settings.validate().is_err());
    settings.store.url = Some("s3://bucket/a/b/".into());
    settings.validate().unwrap();
}
