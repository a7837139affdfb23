//! `sieve-tools demo --quick` in process, on the real services: the report's
//! invariants hold (every item counted once, counts add up, error-free
//! reviewers' labels equal the ground truth, machine-label accuracy computed
//! right). The headline numbers are a benchmark, not asserted here.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use crate::sieve::TestSieve;
use sea_orm::PaginatorTrait;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use sieve_scheduler::entities::item;
use sieve_scheduler::entities::label::{self, LabelSource};
use sieve_scheduler::entities::review_task::{self, TaskReason, TaskState};
use sieve_scheduler::kind::TaskKind;
use sieve_shared::messages::ModelArch;
use sieve_tools::demo::boxes::BoxData;
use sieve_tools::demo::{self, DemoArgs};
use sieve_tools::fashion_mnist::{self, Split};

/// `--quick` into project `project`, writing under `work`, with error-free
/// reviewers and the demo's defaults otherwise.
fn quick(project: &str, work: &std::path::Path) -> DemoArgs {
    DemoArgs {
        quick: true,
        reviewer_error_rate: 0.0,
        images: 0,
        classes: Vec::new(),
        project: Some(project.into()),
        resume: false,
        seed_size: 0,
        labels_per_round: 0,
        rounds: 0,
        label_budget: None,
        reviewers: 2,
        threshold: None,
        target_accuracy: None,
        audit_rate: 0.02,
        strict_calibration: false,
        data_dir: fashion_mnist::DEFAULT_DIR.into(),
        work_dir: work.to_owned(),
        step_timeout_secs: 300,
        arch: ModelArch::SmallCnn,
        // The demo's default: retrains also learn from machine labels.
        machine_labels: true,
        task: TaskKind::Classification,
        boxes_data: BoxData::Crowns,
        crowns_dir: "../ops/tree-crowns".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quick_demo_report_adds_up() {
    let sieve = TestSieve::start().await;
    let work = tempfile::tempdir().unwrap();
    // A budget under the three rounds' 900 labels, so that a good model
    // cannot leave the resumed run below with nothing to review.
    let args = DemoArgs {
        label_budget: Some(700),
        ..quick("quick", work.path())
    };
    let report = demo::run(&sieve.ctx, &args).await.unwrap();
    println!("{}", serde_json::to_string_pretty(&report).unwrap());

    assert_eq!(report.images, 2000);
    assert_eq!(
        report.machine_labels + report.human_labels + report.still_in_review + report.failed,
        2000,
        "every item is counted once"
    );
    assert_eq!(
        report.human_label_accuracy,
        Some(1.0),
        "error-free reviewers answer the truth"
    );
    assert!(report.human_labels >= 300, "reviewers worked");
    assert!((report.effort_saved - report.machine_labels as f64 / 2000.0).abs() < 1e-9);

    // Recompute machine-label accuracy from the database and the ground truth.
    let truth = fashion_mnist::load(
        std::path::Path::new(fashion_mnist::DEFAULT_DIR),
        Split::Train,
        Some(2000),
    )
    .unwrap();
    let project = sieve_scheduler::projects::get(&sieve.ctx.db, "quick")
        .await
        .unwrap();
    let items: HashMap<_, _> = item::Entity::find()
        .filter(item::Column::ProjectId.eq(project.id.as_uuid()))
        .all(&sieve.ctx.db)
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.id, i))
        .collect();
    let labels = label::Entity::find().all(&sieve.ctx.db).await.unwrap();
    let mut human_items = std::collections::HashSet::new();
    let (mut machine, mut machine_right) = (0u64, 0u64);
    for l in &labels {
        let item = &items[&l.item_id];
        let (_, index) = fashion_mnist::index_of(&item.source).unwrap();
        match l.source {
            LabelSource::Human => {
                assert!(human_items.insert(l.item_id), "one human label per item");
                assert_eq!(l.class_index, Some(i32::from(truth.labels[index])));
            }
            LabelSource::Machine => {}
            LabelSource::Import => panic!("no imports in the demo"),
        }
    }
    // Current label per item: the human one if any, else the newest machine one.
    let mut newest_machine: HashMap<_, &label::Model> = HashMap::new();
    for l in labels.iter().filter(|l| l.source == LabelSource::Machine) {
        let e = newest_machine.entry(l.item_id).or_insert(l);
        if l.created_at > e.created_at {
            *e = l;
        }
    }
    for (item_id, l) in newest_machine {
        if human_items.contains(&item_id) || items[&item_id].state != item::ItemState::AutoLabeled {
            continue;
        }
        let (_, index) = fashion_mnist::index_of(&items[&item_id].source).unwrap();
        machine += 1;
        machine_right += u64::from(l.class_index == Some(i32::from(truth.labels[index])));
    }
    assert_eq!(machine as i64, report.machine_labels);
    if machine > 0 {
        let accuracy = machine_right as f64 / machine as f64;
        assert!((report.machine_label_accuracy.unwrap() - accuracy).abs() < 1e-9);
    }
    assert!(work.path().join("report.json").exists());
    let page = std::fs::read_to_string(work.path().join("report.html")).unwrap();
    assert!(page.contains("<svg") && page.contains("Items by who labeled them"));
    // The labels came out through the export API, and the page links them.
    let export = report.export.as_ref().expect("the demo exports its labels");
    assert!(page.contains(&format!("<a href=\"{}\">", export.file)));
    assert_eq!(
        export.rows as i64,
        report.human_labels + report.machine_labels,
        "one row per labeled item, none for what is still in review"
    );
    let csv = std::fs::read_to_string(work.path().join(&export.file)).unwrap();
    assert_eq!(
        csv.lines().count() as u64,
        export.rows + 1,
        "a header and the rows"
    );
    assert!(
        csv.lines()
            .skip(1)
            .all(|row| row.contains(",human,") || row.contains(",machine,"))
    );
    assert_eq!(
        report.history.last().unwrap().machine_labels,
        report.machine_labels
    );
    // Each round says what the policy reached and what the model's ranking
    // allowed at the same accuracy (the oracle), and the page draws both.
    for round in &report.history {
        let oracle = round.oracle_share.expect("a model was active every round");
        assert!((0.0..=1.0).contains(&oracle), "{round:?}");
        assert!((0.0..=1.0).contains(&round.machine_share), "{round:?}");
    }
    let last = report.history.last().unwrap();
    assert!((last.machine_share - report.effort_saved).abs() < 1e-9);
    assert!(
        last.oracle_share.unwrap() > 0.0,
        "the final model's most confident predictions reach {}: {last:?}",
        report.oracle_target
    );
    assert!(page.contains("what the model allowed"));
    assert_eq!(report.versions.len(), report.model_versions);
    assert_eq!(report.per_class.len(), fashion_mnist::CLASSES.len());
    assert_eq!(
        report
            .per_class
            .iter()
            .map(|c| c.machine_labels)
            .sum::<u64>() as i64,
        report.machine_labels,
        "per-class machine labels add up"
    );
    assert_eq!(report.curve.len(), 3, "a curve point per target");

    // Resume the same project, as after Ctrl-C: nothing is ingested twice,
    // the human labels already given stay, and the budget counts them.
    let resumed = demo::run(
        &sieve.ctx,
        &DemoArgs {
            resume: true,
            label_budget: Some(report.human_labels as usize + 50),
            ..args.clone()
        },
    )
    .await
    .unwrap();
    assert_eq!(resumed.images, 2000, "a resumed run adds no items");
    assert_eq!(
        resumed.machine_labels + resumed.human_labels + resumed.still_in_review + resumed.failed,
        2000
    );
    // Up to the budget, or until nothing waits for people.
    assert_eq!(
        resumed.human_labels,
        report.human_labels + report.still_in_review.min(50),
        "the resumed run labels up to the budget"
    );
    let humans = label::Entity::find()
        .filter(label::Column::Source.eq(LabelSource::Human))
        .all(&sieve.ctx.db)
        .await
        .unwrap();
    let distinct: std::collections::HashSet<_> = humans.iter().map(|l| l.item_id).collect();
    assert_eq!(distinct.len(), humans.len(), "one human label per item");
    assert_eq!(humans.len() as i64, resumed.human_labels);
    sieve.teardown().await;
}

/// With a target, a small project's loop asks for the random evidence the
/// gate needs: more than the 2% sample is reviewed first, and the last
/// version is calibrated on at least the minimum 0.97 needs. At the audit
/// rate alone, 900 labels of 2,000 items give about a hundred random checks
/// (the seed's holdout and the 2% sample), short of the 125.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_project_with_a_target_asks_for_its_evidence() {
    let sieve = TestSieve::start().await;
    let work = tempfile::tempdir().unwrap();
    let args = DemoArgs {
        target_accuracy: Some(0.97),
        ..quick("evidence", work.path())
    };
    let report = demo::run(&sieve.ctx, &args).await.unwrap();
    assert_eq!(report.human_labels, 900);
    let project = sieve_scheduler::projects::get(&sieve.ctx.db, "evidence")
        .await
        .unwrap();
    let status = sieve_scheduler::operate::status::project_status(&sieve.ctx, &project)
        .await
        .unwrap();
    let calibration = status.calibration.expect("a target and an active model");
    println!("{calibration:?}");
    assert_eq!(calibration.needed, 125);
    assert!(
        calibration.random_checks >= calibration.needed,
        "the last version rests on {} random checks",
        calibration.random_checks
    );
    let sampled = review_task::Entity::find()
        .filter(review_task::Column::Reason.eq(TaskReason::Sample))
        .filter(review_task::Column::State.eq(TaskState::Done))
        .count(&sieve.ctx.db)
        .await
        .unwrap();
    // The 2% sample of 2,000 items is 40 (sd 6).
    assert!(sampled >= 150, "{sampled} random checks answered");
    sieve.teardown().await;
}

/// A new team's small project on an easy set (a few thousand images of
/// three Fashion-MNIST classes a small CNN tells apart), routed as the
/// README shows (`--target-accuracy 0.97 --audit-rate 0.02`) with the
/// defaults otherwise: once the model is good enough, the loop gathers its
/// evidence and labels most of what waits by machine, at the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_easy_small_project_is_labeled_by_machine_at_its_target() {
    // The holdout here is a few hundred images, where a point of accuracy is sampling noise.
    // With point estimates compared and no margin, a round's better trained (and better
    // evidenced) candidate was refused at 0.983 against 0.989, and the gate stayed shut on the
    // first version's thin evidence; the gate now allows for that noise
    // (`training::gate`), with the default margin of 0.
    let sieve = TestSieve::start().await;
    let work = tempfile::tempdir().unwrap();
    let args = DemoArgs {
        classes: vec!["trouser".into(), "bag".into(), "sneaker".into()],
        target_accuracy: Some(0.97),
        ..quick("easy", work.path())
    };
    let report = demo::run(&sieve.ctx, &args).await.unwrap();
    println!(
        "{} machine labels at {:?}, {} human labels, curve {:?}",
        report.machine_labels, report.machine_label_accuracy, report.human_labels, report.curve
    );
    assert_eq!(report.per_class.len(), 3);
    let unlabeled = report.images as i64 - report.human_labels;
    assert!(
        report.machine_labels * 2 > unlabeled,
        "{} of the {unlabeled} items no person labeled were labeled by machine",
        report.machine_labels
    );
    let accuracy = report.machine_label_accuracy.unwrap();
    assert!(accuracy >= 0.97, "machine labels {accuracy} right");
    sieve.teardown().await;
}

/// `sieve-tools demo --task detection --quick`: real Fashion-MNIST items on
/// canvases, boxed by simulated reviewers, a detector trained on their
/// boxes, its version rescoring the rest. The counts add up, the drawing
/// saved is what the edits say, the machine-accepted boxes are scored
/// against the annotations, and the detector learned (AP above chance).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quick_detection_demo_report_adds_up() {
    let sieve = TestSieve::start().await;
    let work = tempfile::tempdir().unwrap();
    let args = DemoArgs {
        task: TaskKind::Detection,
        ..quick("quick-boxes", work.path())
    };
    let report = demo::run_boxes(&sieve.ctx, &args).await.unwrap();
    println!("{}", serde_json::to_string_pretty(&report).unwrap());

    assert_eq!(report.images, 60);
    assert_eq!(
        report.machine_images + report.human_images + report.still_in_review,
        60,
        "every image is counted once"
    );
    assert!(report.human_images >= 30, "reviewers worked: {report:?}");
    let last = report.rounds.last().unwrap();
    let ap = last.average_precision.expect("a trained detector's AP");
    assert!(ap > 0.2, "the detector learned nothing: {report:?}");
    // The seed round drew every box from nothing: no savings there.
    assert_eq!(report.rounds[0].edits, report.rounds[0].boxes_reviewed);
    assert_eq!(report.rounds[0].drawing_saved, 0.0);
    let expected = 1.0 - report.edits as f64 / report.boxes_reviewed as f64;
    assert!((report.drawing_saved - expected).abs() < 1e-9, "{report:?}");
    if report.machine_images > 0 {
        assert!(last.machine_recall.is_some(), "{report:?}");
    }
    // Machine errors count against the overall saving.
    assert!(last.effort_saved <= 1.0 - last.machine_errors as f64 / report.objects as f64 + 1e-9);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.path().join("report-detection.json")).unwrap())
            .unwrap();
    assert_eq!(json["images"], 60);
    sieve.teardown().await;
}

/// The de-identification demo in quick mode: 24 scenes of real faces and drawn plates on real
/// photos, the pretrained face detector, reviewers correcting what it was unsure of (boxing the
/// plates it cannot see), plate heads trained on their boxes, and the blurred delivery measured
/// against the exact boxes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quick_deidentification_demo_delivers_every_face_blurred() {
    let sieve = TestSieve::start().await;
    let work = tempfile::tempdir().unwrap();
    let args = DemoArgs {
        task: TaskKind::Deidentify,
        ..quick("quick-faces", work.path())
    };
    let report = demo::run_faces(&sieve.ctx, &args).await.unwrap();
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    assert_eq!(report.images, 24);
    assert!(report.faces > 24, "{report:?}");
    assert!(report.plates > 0, "{report:?}");
    assert_eq!(
        report.machine_images + report.human_images,
        24,
        "every scene is labeled, by machine or by a person: {report:?}"
    );
    assert_eq!(report.delivered_images, 24, "{report:?}");
    // People fixed what they saw; the machine's own acceptances are where a face could leak.
    assert!(
        report.machine_images > 0,
        "the detector spared people nothing: {report:?}"
    );
    assert!(
        report.machine_missed * 20 <= report.machine_faces,
        "more than 5% of the faces in images no person saw went out unblurred: {report:?}"
    );
    assert!(report.delivered_face_recall >= 0.95, "{report:?}");
    // People boxed the plates the face detector cannot see; heads trained on their boxes made
    // the version that labeled last, and with it few plates went out unblurred.
    assert!(report.plate_heads, "no version learned plates: {report:?}");
    assert!(report.delivered_plate_recall >= 0.9, "{report:?}");
    assert!(report.delivered_precision >= 0.95, "{report:?}");
    // Reviewers started from the model's faces: fewer edits than drawing from nothing.
    if report.boxes_from_nothing > 0 {
        assert!(report.edits < report.boxes_from_nothing, "{report:?}");
    }
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.path().join("report-deidentify.json")).unwrap())
            .unwrap();
    assert_eq!(written["faces"], report.faces);
    sieve.teardown().await;
}
