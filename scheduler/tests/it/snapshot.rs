//! Training snapshots on the real services: the audit sample is never
//! trained on, and every example says whether it was picked at random — the
//! only evidence calibration may use.

#![allow(clippy::unwrap_used)]

use sea_orm::{ActiveValue::Set, EntityTrait};
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::label::{self, LabelSource};
use sieve_scheduler::entities::review_task::{self, TaskReason};
use sieve_scheduler::training;
use sieve_shared::messages::{Snapshot, SnapshotExample, Split, TrainParams};
use sieve_testkit::{with_app, with_app_configured};

const REASONS: [TaskReason; 5] = [
    TaskReason::LowConfidence,
    TaskReason::Disagreement,
    TaskReason::Seed,
    TaskReason::Audit,
    TaskReason::Sample,
];

/// Forty items of project `snap`, their tasks given the [`REASONS`] in turn
/// and answered through the review API; then a training run's snapshot,
/// each example with its task's reason and its item.
async fn reviewed_snapshot(
    app: &sieve_testkit::App,
) -> (
    training::RunSummary,
    Vec<(SnapshotExample, TaskReason, item::Model)>,
) {
    let seeded = app.seed("snap", &["cat", "dog"], 40).await;
    for (i, task) in seeded.tasks.iter().enumerate() {
        review_task::Entity::update(review_task::ActiveModel {
            id: Set(task.task_id),
            reason: Set(REASONS[i % REASONS.len()]),
            ..Default::default()
        })
        .exec(app.db())
        .await
        .unwrap();
    }
    let token = app.token("rev", Role::Reviewer).await;
    for _ in 0..seeded.tasks.len() {
        app.label_next("snap", &token, "cat").await;
    }

    let run = training::request(
        &app.ctx,
        &seeded.project,
        "test",
        TrainParams::default(),
        true,
    )
    .await
    .unwrap();
    let key = format!(
        "projects/{}/snapshots/{}.json",
        seeded.project.id, run.run_id
    );
    let snapshot: Snapshot =
        serde_json::from_slice(&app.ctx.store.get(&key).await.unwrap()).unwrap();
    assert_eq!(snapshot.examples.len(), seeded.tasks.len());
    let mut examples = Vec::new();
    for example in snapshot.examples {
        let i = seeded
            .tasks
            .iter()
            .position(|t| t.item_id == example.item_id.as_uuid())
            .unwrap();
        let item = item::Entity::find_by_id(example.item_id.as_uuid())
            .one(app.db())
            .await
            .unwrap()
            .unwrap();
        examples.push((example, REASONS[i % REASONS.len()], item));
    }
    (run, examples)
}

#[tokio::test]
async fn audit_sample_is_holdout_and_random_picks_are_flagged() {
    with_app(60, |app| async move {
        let (run, examples) = reviewed_snapshot(&app).await;
        let mut by_hash_holdout = 0;
        for (example, reason, item) in &examples {
            assert_eq!(example.random, reason.is_random(), "{reason:?}");
            match reason {
                TaskReason::Audit | TaskReason::Sample => {
                    assert_eq!(example.split, Split::Holdout, "{reason:?} is never trained on");
                }
                _ => {
                    assert_eq!(example.split, Split::of_hash(&item.content_hash));
                    by_hash_holdout += usize::from(example.split == Split::Holdout);
                }
            }
        }
        let audit_sample = 2 * examples.len() / REASONS.len();
        assert_eq!(run.holdout, audit_sample + by_hash_holdout);
        println!(
            "{} examples: {audit_sample} from the audit sample, {by_hash_holdout} more holdout by hash",
            examples.len()
        );
    })
    .await;
}

/// Once the holdout holds `training.holdout_random_checks` random checks,
/// the labels people gave for the model's doubt train, whatever their hash;
/// the random checks stay held out, and the seed set still splits by hash.
#[tokio::test]
async fn enough_random_checks_send_labels_picked_for_doubt_to_training() {
    // The sixteen audit and sample labels are enough; of the eight seed
    // labels, a fifth or so are held out by hash and count too.
    with_app_configured(
        60,
        |settings| settings.training.holdout_random_checks = 16,
        |app| async move {
            let (run, examples) = reviewed_snapshot(&app).await;
            let mut seed_holdout = 0;
            for (example, reason, item) in &examples {
                match reason {
                    TaskReason::Audit | TaskReason::Sample => {
                        assert_eq!(example.split, Split::Holdout, "{reason:?}");
                    }
                    TaskReason::Seed => {
                        assert_eq!(example.split, Split::of_hash(&item.content_hash));
                        seed_holdout += usize::from(example.split == Split::Holdout);
                    }
                    _ => assert_eq!(
                        example.split,
                        Split::Train,
                        "{reason:?} trains once the random checks suffice"
                    ),
                }
            }
            assert_eq!(
                run.holdout,
                2 * examples.len() / REASONS.len() + seed_holdout
            );
        },
    )
    .await;
}

/// Write a label for `item` as `source` and put the item in the state that
/// label leaves it in, as routing or a submit would.
async fn label(
    app: &sieve_testkit::App,
    item: uuid::Uuid,
    class_index: i32,
    source: LabelSource,
    at: chrono::DateTime<chrono::FixedOffset>,
) {
    label::Entity::insert(label::ActiveModel {
        id: Set(uuid::Uuid::now_v7()),
        item_id: Set(item),
        class_index: Set(Some(class_index)),
        boxes: Set(None),
        source: Set(source),
        reviewer: Set((source == LabelSource::Human).then(|| "rev".to_owned())),
        prediction_id: Set(None),
        model_version_id: Set(None),
        review_task_id: Set(None),
        created_at: Set(at),
    })
    .exec_without_returning(app.db())
    .await
    .unwrap();
    item::Entity::update(item::ActiveModel {
        id: Set(item),
        state: Set(match source {
            LabelSource::Machine => ItemState::AutoLabeled,
            _ => ItemState::HumanLabeled,
        }),
        ..Default::default()
    })
    .exec(app.db())
    .await
    .unwrap();
}

#[tokio::test]
async fn machine_labels_join_the_training_split_only_when_a_run_asks() {
    with_app(60, |app| async move {
        let seeded = app.seed("mach", &["cat", "dog"], 40).await;
        let now = chrono::Utc::now().fixed_offset();
        let later = now + chrono::Duration::seconds(1);
        // Items 0-9: a person said cat or dog, in turn. Items 10-39: the
        // model said dog. Item 39 was then corrected by a person to cat.
        for (i, task) in seeded.tasks.iter().enumerate() {
            let (source, class) = if i < 10 {
                (LabelSource::Human, (i % 2) as i32)
            } else {
                (LabelSource::Machine, 1)
            };
            label(&app, task.item_id, class, source, now).await;
        }
        let corrected = seeded.tasks[39].item_id;
        label(&app, corrected, 0, LabelSource::Human, later).await;
        let snapshot_of = |run: uuid::Uuid| {
            let app = app.clone();
            let key = format!("projects/{}/snapshots/{run}.json", seeded.project.id);
            async move {
                serde_json::from_slice::<Snapshot>(&app.ctx.store.get(&key).await.unwrap()).unwrap()
            }
        };

        // By default: human labels only.
        let plain = training::request(
            &app.ctx,
            &seeded.project,
            "test",
            TrainParams::default(),
            false,
        )
        .await
        .unwrap();
        assert_eq!((plain.labels, plain.machine_labels), (11, 0));
        let snapshot = snapshot_of(plain.run_id).await;
        assert_eq!(snapshot.examples.len(), 11);
        assert!(snapshot.examples.iter().all(|e| !e.machine));
        training::cancel(&app.ctx, &seeded.project, "test")
            .await
            .unwrap();

        // Asked for: the machine labels of training-split items join, flagged.
        let asked = training::request(
            &app.ctx,
            &seeded.project,
            "test",
            TrainParams {
                machine_labels: true,
                ..TrainParams::default()
            },
            false,
        )
        .await
        .unwrap();
        let snapshot = snapshot_of(asked.run_id).await;
        let mut expected_machine = 0;
        for task in &seeded.tasks[10..39] {
            let item = item::Entity::find_by_id(task.item_id)
                .one(app.db())
                .await
                .unwrap()
                .unwrap();
            let found: Vec<_> = snapshot
                .examples
                .iter()
                .filter(|e| e.item_id.as_uuid() == task.item_id)
                .collect();
            if Split::of_hash(&item.content_hash) == Split::Train {
                expected_machine += 1;
                assert_eq!(found.len(), 1, "a training-split machine label joins");
                assert!(found[0].machine && found[0].class_index == 1);
                assert_eq!(found[0].split, Split::Train);
            } else {
                assert!(
                    found.is_empty(),
                    "a holdout-split item never joins training"
                );
            }
        }
        assert!(
            expected_machine > 0,
            "some of 29 items hash into the training split"
        );
        assert_eq!((asked.labels, asked.machine_labels), (11, expected_machine));
        assert_eq!(snapshot.examples.len(), 11 + expected_machine);
        // The corrected item is there once, with the person's label.
        let corrected: Vec<_> = snapshot
            .examples
            .iter()
            .filter(|e| e.item_id.as_uuid() == corrected)
            .collect();
        assert_eq!(corrected.len(), 1);
        assert!(!corrected[0].machine && corrected[0].class_index == 0);
        // Machine labels never reach the holdout, which stays human truth.
        assert!(
            snapshot
                .examples
                .iter()
                .filter(|e| e.split == Split::Holdout)
                .all(|e| !e.machine)
        );
        assert_eq!(asked.holdout, plain.holdout);
    })
    .await;
}
