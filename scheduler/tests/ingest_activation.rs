//! A model activated in the middle of an ingest: every item, whether it
//! was inserted before or after the activation, gets a job naming the new
//! version, so one pass of a worker over the queue routes them all — none
//! waits for the sweeper with only a prediction by the retired version.
//!
//! The ingest is held half-way by a named pipe among its files (reading it
//! blocks until the test writes an image into it), so that the activation,
//! and its rescore, land between the first half's inserts and the second
//! half's, as when `sieve serve` activates a model during a long
//! `sieve ingest`. No worker runs: the test takes the jobs from the queue
//! and applies a result for each, as a worker would, through the result
//! consumer's own function.

#![allow(clippy::unwrap_used)]

mod ingest_env;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use ingest_env::{Env, pngs};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};
use sieve_scheduler::entities::item::ItemState;
use sieve_scheduler::entities::model_version::{self, VersionStatus};
use sieve_scheduler::entities::prediction;
use sieve_scheduler::{ingest, models, results};
use sieve_shared::messages::{PredictionOutput, PrelabelOutcome, PrelabelResult, SCHEMA_VERSION};
use sieve_shared::scores::Scores;
use uuid::Uuid;

const IMAGES: u32 = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_ingested_around_an_activation_are_routed_by_the_new_version() {
    let env = Env::start(4).await;
    let v1 = env.project.active_model_version_id.unwrap();
    let v2 = Uuid::now_v7();
    model_version::Entity::insert(model_version::ActiveModel {
        id: Set(v2),
        project_id: Set(env.project.id.as_uuid()),
        version: Set(2),
        parent_id: Set(Some(v1)),
        training_run_id: Set(None),
        artifact_key: Set(Some("m2".into())),
        checksum: Set(Some("c2".into())),
        architecture: Set(None),
        metrics: Set(None),
        calibration: Set(None),
        status: Set(VersionStatus::Candidate),
        status_reason: Set(None),
        created_at: Set(Utc::now().fixed_offset()),
        activated_at: Set(None),
    })
    .exec_without_returning(&env.ctx.db)
    .await
    .unwrap();
    // A manifest of 24 images with a named pipe in the middle: batches of 4,
    // so the first 12 items are inserted and published, then reading waits.
    let dir = tempfile::tempdir().unwrap();
    pngs(dir.path(), 1, IMAGES);
    let gate = dir.path().join("gate.png");
    let made = std::process::Command::new("mkfifo")
        .arg(&gate)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo failed");
    let mut manifest = String::from("path\n");
    for n in 1..=IMAGES {
        manifest.push_str(&format!("{n}.png\n"));
        if n == IMAGES / 2 {
            manifest.push_str("gate.png\n");
        }
    }
    let list = dir.path().join("list.csv");
    std::fs::write(&list, manifest).unwrap();
    let running = {
        let (ctx, project, list) = (env.ctx.clone(), env.project.clone(), list.clone());
        tokio::spawn(
            async move { ingest::ingest_manifest(&ctx, &project, &list, None, false).await },
        )
    };
    let started = Instant::now();
    loop {
        let items = env.items().await;
        if items.len() == IMAGES as usize / 2 && items.iter().all(|i| i.dispatched_at.is_some()) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the first half was not ingested: {} items",
            items.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Activate (and rescore) while the ingest waits, then let it go on.
    models::activate(&env.ctx, &env.project, v2).await.unwrap();
    let feed = tokio::task::spawn_blocking(move || {
        let img = image::GrayImage::from_pixel(6, 6, image::Luma([200]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        img.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        // Opening a pipe for writing waits for its reader: the ingest.
        std::fs::write(&gate, bytes.into_inner()).unwrap();
    });
    let limit = Duration::from_secs(60);
    tokio::time::timeout(limit, feed)
        .await
        .expect("the ingest never read the pipe")
        .unwrap();
    let summary = tokio::time::timeout(limit, running)
        .await
        .expect("the ingest did not finish")
        .unwrap()
        .unwrap();
    assert_eq!(summary.new_items, u64::from(IMAGES) + 1, "{summary:?}");
    let before = IMAGES as usize / 2;

    // Every item has a job naming the new version, whenever it was inserted.
    let jobs = env.drain().await;
    let items: HashSet<Uuid> = env.items().await.iter().map(|i| i.id).collect();
    let by_v2: HashSet<Uuid> = jobs
        .iter()
        .filter(|(job, _)| job.model.version_id.as_uuid() == v2)
        .map(|(job, _)| job.item_id.as_uuid())
        .collect();
    let missing = items.difference(&by_v2).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} items have no job for the new version ({} inserted before the activation)",
        items.len(),
        before
    );

    // A worker's pass over the queue: one result per job, by the version
    // the job names. Every item ends routed, by the new version.
    let outcomes: Vec<PrelabelResult> = jobs
        .iter()
        .map(|(job, _)| PrelabelResult {
            schema: SCHEMA_VERSION,
            job_id: job.job_id,
            project_id: job.project_id,
            item_id: job.item_id,
            model_version_id: job.model.version_id,
            worker_id: "test".into(),
            outcome: PrelabelOutcome::Scored(PredictionOutput {
                probabilities: vec![0.99, 0.01],
                member_votes: vec![0, 0, 0],
                scores: Scores {
                    top_class: 0,
                    confidence: 0.99,
                    margin: 0.98,
                    entropy: 0.06,
                    disagreement: 0.0,
                    mutual_information: 0.0,
                },
                embedding: None,
            }),
        })
        .collect();
    for chunk in outcomes.chunks(16) {
        results::apply(&env.ctx.db, chunk).await.unwrap();
    }
    let waiting: Vec<_> = env
        .items()
        .await
        .into_iter()
        .filter(|i| i.state == ItemState::Queued)
        .collect();
    assert!(
        waiting.is_empty(),
        "{} items still wait for a prediction that routes them",
        waiting.len()
    );
    let routed_by_v2 = prediction::Entity::find()
        .filter(prediction::Column::ModelVersionId.eq(v2))
        .all(&env.ctx.db)
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.routed_to.as_deref() != Some("kept"))
        .count();
    assert_eq!(routed_by_v2, items.len());
    env.teardown().await;
}
