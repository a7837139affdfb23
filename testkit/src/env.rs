//! A scheduler context without HTTP or workers, for ingest and dispatch
//! tests: a [`Sandbox`], a [`Context`] on it and one project whose active
//! model is a stub (never loaded: no worker runs, so the prelabel queue
//! holds exactly what was published).

use std::ops::Deref;
use std::time::{Duration, Instant};

use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use sieve_scheduler::context::Context;
use sieve_scheduler::dispatch;
use sieve_scheduler::entities::item;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, Project, ProjectName};
use sieve_shared::Settings;
use sieve_shared::messages::{ModelArch, PrelabelJob, decode};

use crate::fixtures::activate_stub;
use crate::sandbox::Sandbox;

/// Derefs to its [`Sandbox`] (`settings`, `store`, `db`).
pub struct ProjectEnv {
    pub ctx: Context,
    /// Classes `cat` and `dog`, an active stub model version.
    pub project: Project,
    sandbox: Sandbox,
}

impl Deref for ProjectEnv {
    type Target = Sandbox;

    fn deref(&self) -> &Sandbox {
        &self.sandbox
    }
}

impl ProjectEnv {
    /// A sandbox with settings changed by `configure`, a context on it, and
    /// project `name` with an active stub version, so ingest publishes jobs.
    pub async fn start(name: &str, configure: impl FnOnce(&mut Settings)) -> Self {
        let sandbox = Sandbox::start(configure).await;
        let ctx = Context::connect(sandbox.settings.clone()).await.unwrap();
        let project = projects::create(
            &ctx.db,
            &ProjectName::parse(name).unwrap(),
            &ClassNames::parse(&["cat".into(), "dog".into()]).unwrap(),
            &Policy::default(),
            ModelArch::SmallCnn,
            sieve_shared::kind::TaskKind::Classification,
        )
        .await
        .unwrap();
        let (project, _) = activate_stub(&ctx.db, &project, None).await;
        Self {
            ctx,
            project,
            sandbox,
        }
    }

    /// Ready jobs in the prelabel queue, once the count settles on
    /// `expected` (or after a few seconds, whatever it is then): a lagging
    /// count does not flake, a wrong one is reported.
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

    /// Take every job out of the prelabel queue: the job and its priority
    /// header.
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

    /// The project's items.
    pub async fn items(&self) -> Vec<item::Model> {
        item::Entity::find()
            .filter(item::Column::ProjectId.eq(self.project.id.as_uuid()))
            .all(&self.ctx.db)
            .await
            .unwrap()
    }

    /// Close the context's connections, then remove the sandbox.
    pub async fn teardown(self) {
        self.ctx.connection.close(200, "bye".into()).await.ok();
        self.ctx.db.clone().close().await.ok();
        self.ctx.claims.clone().close().await.ok();
    }
}

/// The item ids of drained `jobs`, as a set.
pub fn item_ids(jobs: &[(PrelabelJob, Option<u8>)]) -> std::collections::HashSet<uuid::Uuid> {
    jobs.iter().map(|(j, _)| j.item_id.as_uuid()).collect()
}
