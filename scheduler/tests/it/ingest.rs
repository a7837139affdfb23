//! Folder, manifest and store-prefix ingest on the real PostgreSQL and
//! RabbitMQ: each test with its own database, queue prefix and store
//! directory. No worker runs, so the prelabel queue's depth is the number
//! of jobs ingest published.

#![allow(clippy::unwrap_used)]

use std::ops::Deref;
use std::path::Path;

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::label::{self, LabelSource};
use sieve_scheduler::ingest::prefix::Prefix;
use sieve_scheduler::ingest::{self, IngestSummary};
use sieve_testkit::ProjectEnv;
use uuid::Uuid;

/// The kit's [`ProjectEnv`] (project `ingest`, batches of 3) with the
/// lookups these tests share.
struct Env(ProjectEnv);

impl Deref for Env {
    type Target = ProjectEnv;

    fn deref(&self) -> &ProjectEnv {
        &self.0
    }
}

impl Env {
    async fn start(max_line_bytes: u64) -> Self {
        Self(
            ProjectEnv::start("ingest", |settings| {
                settings.ingest.batch_size = 3;
                settings.ingest.max_line_bytes = max_line_bytes;
            })
            .await,
        )
    }

    async fn item(&self, source_prefix: &str) -> item::Model {
        let items = self.items().await;
        items
            .into_iter()
            .find(|i| i.source.starts_with(source_prefix))
            .unwrap_or_else(|| panic!("no item from {source_prefix}"))
    }

    async fn labels(&self) -> Vec<label::Model> {
        let ids: Vec<Uuid> = self.items().await.iter().map(|i| i.id).collect();
        label::Entity::find()
            .filter(label::Column::ItemId.is_in(ids))
            .all(&self.ctx.db)
            .await
            .unwrap()
    }

    async fn manifest(&self, path: &Path) -> anyhow::Result<IngestSummary> {
        ingest::ingest_manifest(&self.ctx, &self.project, path, None, false).await
    }

    async fn teardown(self) {
        self.0.teardown().await;
    }
}

/// A distinct PNG per `seed`.
fn png(seed: u8) -> Vec<u8> {
    let img = image::GrayImage::from_pixel(4 + u32::from(seed), 4, image::Luma([seed]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn csv_and_json_lines_manifests_import_labels_and_dispatch_the_rest() {
    let env = Env::start(64 * 1024).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.png", &png(1));
    write(dir.path(), "b.png", &png(2));
    write(dir.path(), "sub/c.png", &png(3));
    write(dir.path(), "e.png", &png(5));
    write(
        dir.path(),
        "list.csv",
        b"path,label,external_id\na.png,cat,A1\n\"b.png\",,\nsub/c.png,dog,\n",
    );

    let first = env.manifest(&dir.path().join("list.csv")).await.unwrap();
    assert_eq!(first.failures, vec![]);
    assert_eq!(
        (
            first.files_seen,
            first.new_items,
            first.imported_labels,
            first.dispatched
        ),
        (3, 3, 2, 1),
        "{first:?}"
    );
    assert_eq!(env.jobs(1).await, 1, "no job for items with known labels");
    let a = env.item("a.png").await;
    assert_eq!(a.state, ItemState::HumanLabeled);
    assert!(a.source.contains("A1"), "external id kept: {}", a.source);
    assert_eq!(env.item("b.png").await.state, ItemState::Queued);
    let labels = env.labels().await;
    assert_eq!(labels.len(), 2);
    assert!(labels.iter().all(|l| l.source == LabelSource::Import));
    let c = env.item("sub/c.png").await;
    assert!(
        labels
            .iter()
            .any(|l| l.item_id == c.id && l.class_index == Some(1))
    );

    // Again: nothing new, no job, no label.
    let again = env.manifest(&dir.path().join("list.csv")).await.unwrap();
    assert_eq!(
        (again.new_items, again.duplicates, again.dispatched),
        (0, 3, 0)
    );
    assert_eq!(env.jobs(1).await, 1);
    assert_eq!(env.labels().await.len(), 2);

    // JSON Lines, by content (no telling extension), with a store key.
    env.ctx
        .store
        .put("uploads/d.png", png(4).into())
        .await
        .unwrap();
    write(
        dir.path(),
        "more.txt",
        b"{\"key\": \"uploads/d.png\", \"label\": \"dog\", \"external_id\": 9}\n{\"path\": \"e.png\"}\n",
    );
    let json = env.manifest(&dir.path().join("more.txt")).await.unwrap();
    assert_eq!(json.failures, vec![]);
    assert_eq!(
        (json.new_items, json.imported_labels, json.dispatched),
        (2, 1, 1)
    );
    assert_eq!(env.jobs(2).await, 2);
    let d = env.item("key uploads/d.png").await;
    assert_eq!(d.object_key, "uploads/d.png");
    assert_eq!(d.state, ItemState::HumanLabeled);
    assert_eq!(env.items().await.len(), 5);
    env.teardown().await;
}

#[tokio::test]
async fn bad_rows_are_reported_by_line_and_the_rest_goes_through() {
    let env = Env::start(100).await;
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "secret.png", &png(9));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write(&root, "f.png", &png(1));
    write(&root, "h.png", &png(2));
    write(&root, "notes.txt", b"not an image");
    write(&root, "empty.png", b"");
    std::os::unix::fs::symlink(outside.path().join("secret.png"), root.join("link.png")).unwrap();
    let long = format!("{}.png,\n", "x".repeat(150));
    let text = format!(
        "path,label\n\
         f.png,cat\n\
         \n\
         g.png,cat,extra\n\
         h.png,zebra\n\
         \"unterminated,\n\
         {long}\
         missing.png,\n\
         ../secret.png,\n\
         link.png,\n\
         {},\n\
         notes.txt,\n\
         empty.png,dog\n",
        outside.path().join("secret.png").display()
    );
    write(&root, "m.csv", text.as_bytes());

    let summary = env.manifest(&root.join("m.csv")).await.unwrap();
    let failure = |line: u64| {
        summary
            .failures
            .iter()
            .find(|f| f.line == Some(line))
            .unwrap_or_else(|| panic!("no failure on line {line}: {:?}", summary.failures))
            .reason
            .clone()
    };
    assert!(failure(4).contains("expected 2 fields"), "{}", failure(4));
    assert!(failure(5).contains("zebra"), "{}", failure(5));
    assert!(failure(6).contains("unterminated"), "{}", failure(6));
    assert!(failure(7).contains("over the limit"), "{}", failure(7));
    assert!(failure(8).contains("cannot read"), "{}", failure(8));
    assert!(failure(9).contains("escapes the root"), "{}", failure(9));
    assert!(failure(10).contains("symlink"), "{}", failure(10));
    assert!(failure(11).contains("escapes the root"), "{}", failure(11));
    assert!(failure(12).contains("not an image"), "{}", failure(12));
    assert!(failure(13).contains("zero bytes"), "{}", failure(13));
    assert_eq!(summary.failures.len(), 10, "{:?}", summary.failures);
    assert!(summary.has_failures());
    assert_eq!(
        (summary.new_items, summary.failed, summary.imported_labels),
        (2, 9, 1)
    );

    // f (labeled), h (unknown label: no label, dispatched), and the two
    // readable non-images as failed items with their reasons.
    let items = env.items().await;
    assert_eq!(items.len(), 4);
    assert_eq!(env.item("f.png").await.state, ItemState::HumanLabeled);
    assert_eq!(env.item("h.png").await.state, ItemState::Queued);
    let empty = env.item("empty.png").await;
    assert_eq!(empty.state, ItemState::Failed);
    assert!(empty.last_error.unwrap().contains("zero bytes"));
    assert_eq!(env.item("notes.txt").await.state, ItemState::Failed);
    assert_eq!(env.labels().await.len(), 1, "no label for a failed item");
    assert_eq!(env.jobs(1).await, 1);
    env.teardown().await;
}

#[tokio::test]
async fn a_file_that_is_not_a_manifest_is_refused_before_anything_is_written() {
    let env = Env::start(64 * 1024).await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.png", &png(1));
    write(dir.path(), "image.jsonl", &png(1));
    write(dir.path(), "columns.csv", b"file,label\na.png,cat\n");
    write(dir.path(), "list.txt", b"hello world\na.png\n");
    for name in ["a.png", "image.jsonl", "columns.csv", "list.txt"] {
        let err = env.manifest(&dir.path().join(name)).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("is not a CSV or JSON Lines manifest"),
            "{name}: {err:#}"
        );
    }
    assert!(env.items().await.is_empty());
    assert_eq!(env.jobs(0).await, 0);
    env.teardown().await;
}

#[tokio::test]
async fn folder_ingest_refuses_escaping_symlinks_and_keeps_failed_items() {
    let env = Env::start(64 * 1024).await;
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "secret.png", &png(9));
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.png", &png(1));
    write(dir.path(), "sub/b.png", &png(2));
    write(dir.path(), "empty.png", b"");
    write(dir.path(), "notes.txt", b"not an image");
    std::os::unix::fs::symlink(
        outside.path().join("secret.png"),
        dir.path().join("link.png"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("outside")).unwrap();
    // A symlink within the root is fine (and the same image as a.png).
    std::os::unix::fs::symlink(dir.path().join("a.png"), dir.path().join("alias.png")).unwrap();

    let summary = ingest::ingest_folder(&env.ctx, &env.project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!(
        (
            summary.new_items,
            summary.duplicates,
            summary.failed,
            summary.dispatched
        ),
        (2, 1, 4, 2),
        "{summary:?}"
    );
    let reason = |name: &str| {
        summary
            .failures
            .iter()
            .find(|f| f.path.ends_with(name))
            .unwrap_or_else(|| panic!("no failure for {name}: {:?}", summary.failures))
            .reason
            .clone()
    };
    assert!(
        reason("link.png").contains("symlink"),
        "{}",
        reason("link.png")
    );
    assert!(
        reason("outside").contains("symlink"),
        "{}",
        reason("outside")
    );
    assert!(reason("empty.png").contains("zero bytes"));
    assert!(reason("notes.txt").contains("not an image"));
    assert!(
        env.items()
            .await
            .iter()
            .all(|i| !i.source.contains("secret")),
        "the escaping file was never read"
    );
    assert_eq!(env.items().await.len(), 4);
    assert_eq!(env.jobs(2).await, 2);
    env.teardown().await;
}

/// The "local object-store prefix": every object under a prefix of
/// sieve's own store, by whole segments; items point at the objects where
/// they are; a second run adds nothing; bad objects are reported.
#[tokio::test]
async fn a_store_prefix_is_ingested_once_and_its_bad_objects_are_reported() {
    let env = Env::start(64 * 1024).await;
    for (key, bytes) in [
        ("incoming/batch1/a.png", png(1)),
        ("incoming/batch1/sub/b.png", png(2)),
        ("incoming/batch1/c.png", png(3)),
        ("incoming/batch1/copy-of-a.png", png(1)),
        ("incoming/batch1/notes.txt", b"not an image".to_vec()),
        ("incoming/batch1/empty.png", Vec::new()),
        // Outside the prefix: a longer name, a sibling, sieve's own area.
        ("incoming/batch10/x.png", png(9)),
        ("incoming/y.png", png(8)),
        ("projects/other/images/ab/abc", png(7)),
    ] {
        env.ctx.store.put(key, bytes.into()).await.unwrap();
    }
    let source = ingest::Source::Prefix(Prefix::parse("store:incoming/batch1/").unwrap());
    let options = ingest::Options::default();

    let first = ingest::ingest(&env.ctx, &env.project, &source, &options)
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
        (6, 3, 1, 2, 3),
        "{first:?}"
    );
    let reason = |name: &str| {
        first
            .failures
            .iter()
            .find(|f| f.path.ends_with(name))
            .unwrap_or_else(|| panic!("no failure for {name}: {:?}", first.failures))
            .reason
            .clone()
    };
    assert_eq!(
        reason("notes.txt"),
        "not an image (unknown format)",
        "{:?}",
        first.failures
    );
    assert!(reason("empty.png").contains("zero bytes"));
    assert_eq!(first.failures.len(), 2);
    let items = env.items().await;
    assert_eq!(items.len(), 5);
    assert!(
        items
            .iter()
            .all(|i| i.source.starts_with("store:incoming/batch1/")),
        "nothing from outside the prefix"
    );
    // In sieve's store already: the item points at the object itself.
    let b = env.item("store:incoming/batch1/sub/b.png").await;
    assert_eq!(b.object_key, "incoming/batch1/sub/b.png");
    assert_eq!(b.state, ItemState::Queued);
    let notes = env.item("store:incoming/batch1/notes.txt").await;
    assert_eq!(notes.state, ItemState::Failed);
    assert!(notes.last_error.unwrap().contains("not an image"));
    assert_eq!(env.jobs(3).await, 3);

    let again = ingest::ingest(&env.ctx, &env.project, &source, &options)
        .await
        .unwrap();
    assert_eq!(
        (again.new_items, again.duplicates, again.dispatched),
        (0, 6, 0),
        "{again:?}"
    );
    assert_eq!(env.items().await.len(), 5);
    assert_eq!(env.jobs(3).await, 3);

    // A prefix with nothing under it is an empty ingest, not an error.
    let none = ingest::Source::Prefix(Prefix::parse("store:nothing/here").unwrap());
    let empty = ingest::ingest(&env.ctx, &env.project, &none, &options)
        .await
        .unwrap();
    assert_eq!(empty.files_seen, 0);
    env.teardown().await;
}
