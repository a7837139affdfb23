//! A test environment for ingest and dispatch tests on the real services:
//! its own database, queue prefix and store, and a project with an active
//! model (never loaded: no worker runs, so the prelabel queue holds exactly
//! what was published).

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Utc;
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};
use sieve_scheduler::context::{self, Context};
use sieve_scheduler::db;
use sieve_scheduler::dispatch;
use sieve_scheduler::entities::item;
use sieve_scheduler::entities::model_version::{self, VersionStatus};
use sieve_scheduler::entities::project as project_entity;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, Project, ProjectName};
use sieve_shared::Settings;
use sieve_shared::messages::{ModelArch, PrelabelJob, decode};
use uuid::Uuid;

pub struct Env {
    pub settings: Settings,
    pub ctx: Context,
    pub project: Project,
    pub store: tempfile::TempDir,
}

impl Env {
    /// A fresh database and queue prefix, and a project with an active
    /// model, so that ingest publishes jobs unless told not to.
    pub async fn start(batch_size: usize) -> Self {
        Self::start_with(batch_size, |_| {}).await
    }

    /// [`Env::start`], with settings changed by `adjust` first.
    pub async fn start_with(batch_size: usize, adjust: impl FnOnce(&mut Settings)) -> Self {
        sieve_shared::telemetry::init_test_tracing();
        let store = tempfile::tempdir().unwrap();
        let id = Uuid::now_v7().simple().to_string();
        let tag = &id[id.len() - 12..];
        let mut settings = Settings::default();
        settings.database.url = format!("postgres://postgres@127.0.0.1:5432/sieve_test_{tag}");
        settings.database.max_connections = 5;
        settings.broker.prefix = format!("test-{tag}");
        settings.redis.prefix = format!("test-{tag}");
        settings.store.root = store.path().to_owned();
        settings.ingest.batch_size = batch_size;
        adjust(&mut settings);
        db::create_database_if_missing(&settings.database.url)
            .await
            .unwrap();
        let conn = db::connect(&settings.database).await.unwrap();
        db::migrate(&conn).await.unwrap();
        conn.close().await.unwrap();
        let ctx = Context::connect(settings.clone()).await.unwrap();
        let project = projects::create(
            &ctx.db,
            &ProjectName::parse("control").unwrap(),
            &ClassNames::parse(&["cat".into(), "dog".into()]).unwrap(),
            &Policy::default(),
            ModelArch::SmallCnn,
        )
        .await
        .unwrap();
        let version = Uuid::now_v7();
        model_version::Entity::insert(model_version::ActiveModel {
            id: Set(version),
            project_id: Set(project.id.as_uuid()),
            version: Set(1),
            parent_id: Set(None),
            training_run_id: Set(None),
            artifact_key: Set(Some("m".into())),
            checksum: Set(Some("c".into())),
            architecture: Set(None),
            metrics: Set(None),
            calibration: Set(None),
            status: Set(VersionStatus::Active),
            status_reason: Set(None),
            created_at: Set(Utc::now().fixed_offset()),
            activated_at: Set(Some(Utc::now().fixed_offset())),
        })
        .exec_without_returning(&ctx.db)
        .await
        .unwrap();
        project_entity::Entity::update(project_entity::ActiveModel {
            id: Set(project.id.as_uuid()),
            active_model_version_id: Set(Some(version)),
            ..Default::default()
        })
        .exec(&ctx.db)
        .await
        .unwrap();
        let project = projects::get(&ctx.db, "control").await.unwrap();
        Self {
            settings,
            ctx,
            project,
            store,
        }
    }

    /// Ready jobs in the prelabel queue, once the count settles on
    /// `expected` (or after a few seconds, whatever it is then).
    pub async fn jobs(&self, expected: u32) -> u32 {
        let queue = self.ctx.topology().prelabel_queue();
        let start = Instant::now();
        loop {
            let (ready, _) = sieve_shared::broker::queue_counts(&self.ctx.connection, &queue)
                .await
                .unwrap();
            if ready == expected || start.elapsed() > Duration::from_secs(3) {
                return ready;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Take every job out of the queue: the job and its priority header.
    pub async fn drain(&self) -> Vec<(PrelabelJob, Option<u8>)> {
        let channel = self.ctx.connection.create_channel().await.unwrap();
        let queue = self.ctx.topology().prelabel_queue();
        let mut out = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.clone().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let delivery = &message.delivery;
            let priority = delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(dispatch::PRIORITY_HEADER).cloned())
                .map(|v| match v {
                    AMQPValue::ShortShortUInt(p) => p,
                    other => panic!("priority header is {other:?}"),
                });
            out.push((decode::<PrelabelJob>(&delivery.data).unwrap(), priority));
        }
        channel.close(200, "drained".into()).await.ok();
        out
    }

    pub async fn items(&self) -> Vec<item::Model> {
        item::Entity::find()
            .filter(item::Column::ProjectId.eq(self.project.id.as_uuid()))
            .all(&self.ctx.db)
            .await
            .unwrap()
    }

    pub async fn teardown(self) {
        let channel = self.ctx.connection.create_channel().await.unwrap();
        context::topology(&self.settings)
            .delete(&channel)
            .await
            .unwrap();
        self.ctx.connection.close(200, "bye".into()).await.ok();
        self.ctx.db.clone().close().await.ok();
        db::drop_database(&self.settings.database.url)
            .await
            .unwrap();
    }
}

/// The item ids of `jobs`, as a set.
pub fn item_ids(jobs: &[(PrelabelJob, Option<u8>)]) -> HashSet<Uuid> {
    jobs.iter().map(|(j, _)| j.item_id.as_uuid()).collect()
}

/// `count` distinct PNGs in `dir`, starting at `first`.
pub fn pngs(dir: &Path, first: u32, count: u32) {
    for n in first..first + count {
        let bytes = n.to_le_bytes();
        let img = image::GrayImage::from_fn(4, 4, |x, y| {
            image::Luma([if y == 0 { bytes[x as usize] } else { 7 }])
        });
        img.save(dir.join(format!("{n}.png"))).unwrap();
    }
}
