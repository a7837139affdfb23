//! Ingest from an S3 bucket (`s3://BUCKET/PREFIX`) against a real S3 API:
//! moto's server (`moto_server`, from PyPI's `moto[s3]`, installed by
//! `ops/install-deps.sh`), reached through the `s3.*` settings exactly as a
//! MinIO would be: endpoint, region, key pair, plain HTTP allowed. The
//! images are copied into sieve's own store, content-addressed; PostgreSQL
//! and RabbitMQ are the real ones, as in every ingest test.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sieve_scheduler::entities::item::ItemState;
use sieve_scheduler::ingest::prefix::{self, Prefix};
use sieve_scheduler::ingest::{self, Options, Source};
use sieve_shared::settings::Secret;
use sieve_shared::store::{image_key, sha256_hex};
use sieve_testkit::ProjectEnv;

/// Where `ops/install-deps.sh` puts moto's server.
const MOTO: &str = "/var/tmp/sieve-moto/bin/moto_server";

/// A moto S3 server on a free port, stopped on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    async fn start() -> Self {
        let binary = if Path::new(MOTO).exists() {
            PathBuf::from(MOTO)
        } else {
            PathBuf::from("moto_server")
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e}; ops/install-deps.sh installs moto's S3 server",
                    binary.display()
                )
            });
        let moto = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let started = Instant::now();
        while reqwest::get(&moto.endpoint).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "moto_server did not start"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        moto
    }

    async fn create_bucket(&self, bucket: &str) {
        let status = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success(), "creating bucket {bucket}: {status}");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

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
    let endpoint = moto.endpoint.clone();
    let env = ProjectEnv::start("control", |settings| {
        settings.ingest.batch_size = 2;
        settings.s3.endpoint = Some(endpoint);
        settings.s3.allow_http = true;
        settings.s3.access_key_id = Some("AKIAMOTOTEST".into());
        settings.s3.secret_access_key = Some(Secret::new("moto-secret-key"));
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
