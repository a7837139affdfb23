//! Ingest from an S3 bucket (`s3://BUCKET/PREFIX`) against a real S3 API
//! (the kit's [`Moto`]). Into a local store the images are copied,
//! content-addressed; into a store in the same bucket they are used where
//! they lie. PostgreSQL and RabbitMQ are the real ones, as in every ingest
//! test.

#![allow(clippy::unwrap_used)]

use sieve_scheduler::entities::item::ItemState;
use sieve_scheduler::ingest::prefix::{self, Prefix};
use sieve_scheduler::ingest::{self, Options, Source};
use sieve_shared::store::{image_key, sha256_hex};
use sieve_testkit::{Moto, ProjectEnv};

fn png(seed: u8) -> Vec<u8> {
    let img = image::GrayImage::from_pixel(5, 3 + u32::from(seed), image::Luma([seed]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_prefix_is_copied_in_once_and_its_bad_objects_are_reported() {
    let moto = Moto::start().await;
    moto.create_bucket("photos").await;
    let env = ProjectEnv::start("control", |settings| {
        settings.ingest.batch_size = 2;
        moto.configure(settings);
        settings.ingest.max_file_bytes = 100_000;
    })
    .await;

    // Uploaded through the same signed client ingest uses.
    let bucket = prefix::s3_store(&env.settings.s3, "photos").unwrap();
    for (key, bytes) in [
        ("batch/a.png", png(1)),
        ("batch/sub/b.png", png(2)),
        ("batch/copy-of-a.png", png(1)),
        ("batch/notes.txt", b"not an image".to_vec()),
        ("batch/empty.png", Vec::new()),
        ("batch/big.bin", vec![7u8; 200_000]),
        ("batchx/c.png", png(3)),
        ("other/d.png", png(4)),
    ] {
        bucket.put(key, bytes.into()).await.unwrap();
    }

    let source = Source::Prefix(Prefix::parse("s3://photos/batch/").unwrap());
    let first = ingest::ingest(&env.ctx, &env.project, &source, &Options::default())
        .await
        .unwrap();
    assert_eq!(
        (
            first.files_seen,
            first.new_items,
            first.duplicates,
            first.failed,
            first.dispatched
        ),
        (6, 2, 1, 3, 2),
        "{first:?}"
    );
    let reason = |name: &str| {
        first
            .failures
            .iter()
            .find(|f| f.path == format!("s3://photos/batch/{name}"))
            .unwrap_or_else(|| panic!("no failure for {name}: {:?}", first.failures))
            .reason
            .clone()
    };
    assert!(reason("notes.txt").contains("not an image"));
    assert!(reason("empty.png").contains("zero bytes"));
    assert!(
        reason("big.bin").contains("over the limit of 100000"),
        "{}",
        reason("big.bin")
    );

    // Copied into sieve's store under the content-addressed key: workers
    // read only sieve's store.
    let items = env.items().await;
    assert_eq!(items.len(), 4, "a, b and the two readable non-images");
    let a = items
        .iter()
        .find(|i| i.source.ends_with("/a.png") || i.source.ends_with("/copy-of-a.png"))
        .unwrap();
    let hash = sha256_hex(&png(1));
    assert_eq!(a.content_hash, hash);
    assert_eq!(a.object_key, image_key(&env.project.id.to_string(), &hash));
    assert_eq!(env.ctx.store.get(&a.object_key).await.unwrap(), png(1));
    assert!(a.source.starts_with("s3://photos/batch/"));
    assert!(items.iter().all(|i| !i.source.contains("batchx")));
    let notes = items
        .iter()
        .find(|i| i.source.ends_with("notes.txt"))
        .unwrap();
    assert_eq!(notes.state, ItemState::Failed);
    assert_eq!(env.jobs(2).await, 2);

    let again = ingest::ingest(&env.ctx, &env.project, &source, &Options::default())
        .await
        .unwrap();
    assert_eq!(
        (
            again.new_items,
            again.duplicates,
            again.failed,
            again.dispatched
        ),
        (0, 5, 1, 0),
        "{again:?}"
    );
    assert_eq!(env.items().await.len(), 4);
    assert_eq!(env.jobs(2).await, 2);

    // A bucket that does not exist: the whole ingest fails, saying which.
    let missing = Source::Prefix(Prefix::parse("s3://no-such-bucket/x").unwrap());
    let err = ingest::ingest(&env.ctx, &env.project, &missing, &Options::default())
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("s3://no-such-bucket/x/"),
        "{err:#}"
    );
    env.teardown().await;
}

/// With sieve's store in the bucket, a prefix under the store's is read in
/// place (`s3://` or `store:` alike): its objects keep their keys and
/// nothing is copied; a prefix of the bucket outside the store is copied
/// in, as from any bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_inside_a_bucket_store_is_ingested_in_place() {
    let moto = Moto::start().await;
    moto.create_bucket("fleet").await;
    let env = ProjectEnv::start("control", |settings| {
        moto.store_in(settings, "fleet", "sieve/prod");
    })
    .await;
    let bucket = prefix::s3_store(&env.settings.s3, "fleet").unwrap();
    for (key, bytes) in [
        ("sieve/prod/incoming/a.png", png(1)),
        ("sieve/prod/incoming/b.png", png(2)),
        ("elsewhere/c.png", png(3)),
    ] {
        bucket.put(key, bytes.into()).await.unwrap();
    }

    let inside = Source::Prefix(Prefix::parse("s3://fleet/sieve/prod/incoming/").unwrap());
    let summary = ingest::ingest(&env.ctx, &env.project, &inside, &Options::default())
        .await
        .unwrap();
    assert_eq!((summary.new_items, summary.in_place), (2, 2), "{summary:?}");
    let outside = Source::Prefix(Prefix::parse("s3://fleet/elsewhere/").unwrap());
    let summary = ingest::ingest(&env.ctx, &env.project, &outside, &Options::default())
        .await
        .unwrap();
    assert_eq!((summary.new_items, summary.in_place), (1, 0), "{summary:?}");

    let items = env.items().await;
    let key_of = |hash: String| {
        items
            .iter()
            .find(|i| i.content_hash == hash)
            .unwrap()
            .object_key
            .clone()
    };
    assert_eq!(key_of(sha256_hex(&png(1))), "incoming/a.png");
    assert_eq!(key_of(sha256_hex(&png(2))), "incoming/b.png");
    let copied = key_of(sha256_hex(&png(3)));
    assert_eq!(
        copied,
        image_key(&env.project.id.to_string(), &sha256_hex(&png(3)))
    );
    // The copy went to the store's prefix of the bucket, and no directory.
    assert_eq!(
        bucket.get(&format!("sieve/prod/{copied}")).await.unwrap(),
        png(3)
    );
    assert!(
        !env.settings.store.root.join("projects").exists(),
        "nothing written to store.root"
    );
    env.teardown().await;
}
