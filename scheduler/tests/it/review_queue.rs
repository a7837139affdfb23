//! The review queue on the real PostgreSQL: concurrent claimers never share a
//! task, leases expire and are reclaimed, stale and bad submits write nothing.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use sea_orm::{ActiveValue::Set, EntityTrait, PaginatorTrait};
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::label;
use sieve_scheduler::entities::review_task::{self, TaskReason, TaskState};
use sieve_scheduler::error::AppError;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, Project, ProjectName};
use sieve_scheduler::review::{self, Submission};
use sieve_shared::ids::TaskId;
use sieve_shared::messages::ModelArch;
use sieve_testkit::Sandbox;
use uuid::Uuid;

async fn project_with_tasks(test: &Sandbox, tasks: usize) -> Project {
    let project = projects::create(
        &test.db,
        &ProjectName::parse("queue").unwrap(),
        &ClassNames::parse(&["cat".into(), "dog".into()]).unwrap(),
        &Policy::default(),
        ModelArch::SmallCnn,
        sieve_shared::kind::TaskKind::Classification,
    )
    .await
    .unwrap();
    let now = Utc::now().fixed_offset();
    for i in 0..tasks {
        let item_id = sieve_testkit::insert_item(&test.db, &project, i, ItemState::InReview).await;
        review_task::Entity::insert(review_task::ActiveModel {
            id: Set(Uuid::now_v7()),
            project_id: Set(project.id.as_uuid()),
            item_id: Set(item_id),
            prediction_id: Set(None),
            reason: Set(TaskReason::LowConfidence),
            priority: Set(i as f32),
            state: Set(TaskState::Open),
            lease_holder: Set(None),
            lease_expires_at: Set(None),
            fencing_token: Set(0),
            created_at: Set(now),
            updated_at: Set(now),
            closed_at: Set(None),
        })
        .exec_without_returning(&test.db)
        .await
        .unwrap();
    }
    project
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_never_get_the_same_task() {
    let test = Sandbox::start(|s| s.database.max_connections = 20).await;
    let project = project_with_tasks(&test, 60).await;
    let claimers = (0..8).map(|n| {
        let db = test.db.clone();
        let project = project.clone();
        tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(task) =
                review::claim_next(&db, &project, &format!("r{n}"), Duration::from_secs(60))
                    .await
                    .unwrap()
            {
                mine.push(task.task_id);
            }
            mine
        })
    });
    let mut all = Vec::new();
    for claimer in claimers {
        all.extend(claimer.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    println!(
        "claims: {} by 8 reviewers, {} distinct",
        all.len(),
        unique.len()
    );
    assert_eq!(all.len(), 60, "every task claimed");
    assert_eq!(unique.len(), 60, "no task claimed twice");
    drop(test);
}

#[tokio::test]
async fn most_uncertain_first_and_expired_leases_are_reclaimed() {
    let test = Sandbox::start(|s| s.database.max_connections = 20).await;
    let project = project_with_tasks(&test, 3).await;
    let db = &test.db;

    // Priority 2 is the most uncertain of 0, 1, 2.
    let slow = review::claim_next(db, &project, "slow", Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(slow.remaining, 2);
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The lease expired: the same task goes to the next reviewer, first.
    let fast = review::claim_next(db, &project, "fast", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fast.task_id, slow.task_id);
    assert!(fast.fencing_token > slow.fencing_token);

    let stale = review::submit(
        db,
        TaskId::from_uuid(slow.task_id),
        "slow",
        &Submission {
            fencing_token: slow.fencing_token,
            class: "cat".into(),
            boxes: None,
            force: false,
        },
    )
    .await;
    assert!(matches!(stale, Err(AppError::Conflict(_))), "{stale:?}");
    let unknown_class = review::submit(
        db,
        TaskId::from_uuid(fast.task_id),
        "fast",
        &Submission {
            fencing_token: fast.fencing_token,
            class: "horse".into(),
            boxes: None,
            force: false,
        },
    )
    .await;
    assert!(
        matches!(unknown_class, Err(AppError::Invalid(_))),
        "{unknown_class:?}"
    );
    assert_eq!(
        label::Entity::find().count(db).await.unwrap(),
        0,
        "refused submits write nothing"
    );

    let done = review::submit(
        db,
        TaskId::from_uuid(fast.task_id),
        "fast",
        &Submission {
            fencing_token: fast.fencing_token,
            class: "dog".into(),
            boxes: None,
            force: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(done.class_index, Some(1));
    let again = review::submit(
        db,
        TaskId::from_uuid(fast.task_id),
        "fast",
        &Submission {
            fencing_token: fast.fencing_token,
            class: "cat".into(),
            boxes: None,
            force: false,
        },
    )
    .await;
    assert!(
        matches!(again, Err(AppError::Conflict(_))),
        "a double submit changes nothing"
    );
    assert_eq!(label::Entity::find().count(db).await.unwrap(), 1);
    let item = item::Entity::find_by_id(done.item_id)
        .one(db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(item.state, ItemState::HumanLabeled);

    let missing = review::submit(
        db,
        TaskId::new(),
        "x",
        &Submission {
            fencing_token: 1,
            class: "cat".into(),
            boxes: None,
            force: false,
        },
    )
    .await;
    assert!(matches!(missing, Err(AppError::NotFound(_))));
    drop(test);
}
