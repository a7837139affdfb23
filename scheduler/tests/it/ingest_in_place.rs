//! A folder that already lies inside the local store's directory is
//! ingested in place: each item points at the file's own key and nothing
//! is copied; a folder outside the store, and a file whose path is no key
//! ingest may use, are copied under content-addressed keys as before. On
//! the real PostgreSQL and RabbitMQ, each test with its own database,
//! queue prefix and store.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sieve_scheduler::entities::item::ItemState;
use sieve_scheduler::ingest;
use sieve_shared::store::{image_key, sha256_hex};
use sieve_testkit::{ProjectEnv, pngs};

/// Every file under `dir` (none if it does not exist).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// The project's items by object key: (source file name, state, hash).
async fn items_by_key(env: &ProjectEnv) -> BTreeMap<String, (String, ItemState, String)> {
    env.items()
        .await
        .into_iter()
        .map(|i| {
            let name = Path::new(&i.source)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (i.object_key, (name, i.state, i.content_hash))
        })
        .collect()
}

fn copy_file(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap();
}

#[tokio::test]
async fn a_folder_inside_the_store_is_referenced_in_place_once() {
    // The store's root is named through a symlink: the folder is found
    // inside it by canonical paths, not by how either was written.
    let links = tempfile::tempdir().unwrap();
    let env = ProjectEnv::start("control", |settings| {
        settings.ingest.batch_size = 3;
        let link = links.path().join("store");
        std::os::unix::fs::symlink(&settings.store.root, &link).unwrap();
        settings.store.root = link;
    })
    .await;
    let folder = env.store.path().join("incoming/batch1");
    std::fs::create_dir_all(folder.join("sub")).unwrap();
    pngs(&folder, 0, 4);
    pngs(&folder.join("sub"), 10, 2);
    // The same bytes as 0.png, later in the folder's sorted order.
    copy_file(&folder.join("0.png"), &folder.join("zz/again.png"));
    std::fs::write(folder.join("notes.txt"), b"not an image").unwrap();

    let first = ingest::ingest_folder(&env.ctx, &env.project, &folder, false)
        .await
        .unwrap();
    assert_eq!(
        (
            first.files_seen,
            first.new_items,
            first.in_place,
            first.duplicates,
            first.failed,
            first.dispatched
        ),
        (8, 6, 6, 1, 1, 6),
        "{first:?}"
    );
    let items = items_by_key(&env).await;
    let keys: Vec<&str> = items.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "incoming/batch1/0.png",
            "incoming/batch1/1.png",
            "incoming/batch1/2.png",
            "incoming/batch1/3.png",
            "incoming/batch1/notes.txt",
            "incoming/batch1/sub/10.png",
            "incoming/batch1/sub/11.png",
        ],
        "each item names its own file; the first of two equal files wins"
    );
    assert_eq!(items["incoming/batch1/notes.txt"].1, ItemState::Failed);
    for (key, (_, _, hash)) in &items {
        let bytes = env.ctx.store.get(key).await.unwrap();
        assert_eq!(&sha256_hex(&bytes), hash, "{key} reads back its own bytes");
    }
    // Nothing was copied under the content-addressed image prefix.
    let own_area = env.store.path().join("projects");
    assert_eq!(files_under(&own_area), Vec::<PathBuf>::new());
    // The jobs name the files' keys, as workers will read them.
    let mut job_keys: Vec<String> = env
        .drain()
        .await
        .into_iter()
        .map(|(job, _)| job.object_key)
        .collect();
    job_keys.sort();
    let image_keys: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|k| !k.ends_with(".txt"))
        .collect();
    assert_eq!(job_keys, image_keys);

    let again = ingest::ingest_folder(&env.ctx, &env.project, &folder, false)
        .await
        .unwrap();
    assert_eq!(
        (
            again.new_items,
            again.in_place,
            again.duplicates,
            again.dispatched
        ),
        (0, 0, 8, 0),
        "{again:?}"
    );
    assert_eq!(items_by_key(&env).await, items, "re-ingest adds nothing");
    assert_eq!(env.jobs(0).await, 0);
    assert_eq!(files_under(&own_area), Vec::<PathBuf>::new());
    env.teardown().await;
}

#[tokio::test]
async fn a_folder_outside_the_store_is_copied_and_its_copies_win_later() {
    let env = ProjectEnv::start("control", |s| s.ingest.batch_size = 3).await;
    let outside = tempfile::tempdir().unwrap();
    pngs(outside.path(), 0, 4);

    let summary = ingest::ingest_folder(&env.ctx, &env.project, outside.path(), false)
        .await
        .unwrap();
    assert_eq!(
        (summary.new_items, summary.in_place, summary.dispatched),
        (4, 0, 4),
        "{summary:?}"
    );
    let project = env.project.id.to_string();
    let items = items_by_key(&env).await;
    for (key, (name, _, hash)) in &items {
        let original = std::fs::read(outside.path().join(name)).unwrap();
        assert_eq!(&sha256_hex(&original), hash);
        assert_eq!(key, &image_key(&project, hash), "{name} is copied");
        assert_eq!(std::fs::read(env.store.path().join(key)).unwrap(), original);
    }
    assert_eq!(files_under(&env.store.path().join("projects")).len(), 4);

    // The same images inside the store later: one item per hash, and the
    // item already there keeps its copy.
    let inside = env.store.path().join("incoming/same");
    for n in 0..4 {
        let name = format!("{n}.png");
        copy_file(&outside.path().join(&name), &inside.join(&name));
    }
    let again = ingest::ingest_folder(&env.ctx, &env.project, &inside, false)
        .await
        .unwrap();
    assert_eq!(
        (again.new_items, again.in_place, again.duplicates),
        (0, 0, 4),
        "{again:?}"
    );
    assert_eq!(items_by_key(&env).await, items);
    env.teardown().await;
}

#[tokio::test]
async fn files_whose_path_is_no_usable_key_are_copied() {
    let env = ProjectEnv::start("control", |s| s.ingest.batch_size = 10).await;
    let folder = env.store.path().join("incoming/odd");
    std::fs::create_dir_all(&folder).unwrap();
    pngs(&folder, 0, 3);
    // A control character is no key; `NAME#DIGITS` is the local store's
    // staging name, which reads as no object.
    std::fs::rename(folder.join("1.png"), folder.join("tab\there.png")).unwrap();
    std::fs::rename(folder.join("2.png"), folder.join("staged.png#1")).unwrap();

    let summary = ingest::ingest_folder(&env.ctx, &env.project, &folder, false)
        .await
        .unwrap();
    assert_eq!(
        (
            summary.new_items,
            summary.in_place,
            summary.failed,
            summary.dispatched
        ),
        (3, 1, 0, 3),
        "{summary:?}"
    );
    let project = env.project.id.to_string();
    let items = items_by_key(&env).await;
    assert_eq!(items["incoming/odd/0.png"].0, "0.png");
    for name in ["tab\there.png", "staged.png#1"] {
        let bytes = std::fs::read(folder.join(name)).unwrap();
        let key = image_key(&project, &sha256_hex(&bytes));
        assert_eq!(items[&key].0, name, "{name:?} is copied");
        assert_eq!(env.ctx.store.get(&key).await.unwrap(), bytes);
    }

    // Sieve's own area of the store is never referenced, only copied.
    let own = env.store.path().join("projects/elsewhere");
    std::fs::create_dir_all(&own).unwrap();
    pngs(&own, 20, 1);
    let summary = ingest::ingest_folder(&env.ctx, &env.project, &own, false)
        .await
        .unwrap();
    assert_eq!((summary.new_items, summary.in_place), (1, 0), "{summary:?}");
    let bytes = std::fs::read(own.join("20.png")).unwrap();
    let key = image_key(&project, &sha256_hex(&bytes));
    assert_eq!(items_by_key(&env).await[&key].0, "20.png");
    assert_eq!(env.ctx.store.get(&key).await.unwrap(), bytes);
    env.teardown().await;
}

#[tokio::test]
async fn a_manifest_of_paths_under_the_store_references_them_in_place() {
    let env = ProjectEnv::start("control", |s| s.ingest.batch_size = 10).await;
    let uploads = env.store.path().join("uploads");
    std::fs::create_dir_all(&uploads).unwrap();
    pngs(&uploads, 0, 2);
    let list = uploads.join("list.csv");
    std::fs::write(&list, "path,label\n0.png,cat\n1.png,\n").unwrap();

    let summary = ingest::ingest_manifest(&env.ctx, &env.project, &list, None, false)
        .await
        .unwrap();
    assert_eq!(
        (
            summary.new_items,
            summary.in_place,
            summary.imported_labels,
            summary.dispatched
        ),
        (2, 2, 1, 1),
        "{summary:?}"
    );
    let items = items_by_key(&env).await;
    let keys: Vec<&str> = items.keys().map(String::as_str).collect();
    assert_eq!(keys, ["uploads/0.png", "uploads/1.png"]);
    assert_eq!(items["uploads/0.png"].1, ItemState::HumanLabeled);
    assert_eq!(
        files_under(&env.store.path().join("projects")),
        Vec::<PathBuf>::new()
    );
    env.teardown().await;
}
