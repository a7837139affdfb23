//! A detector's training run: K heads on the frozen ImageNet MobileNetV2, from people's boxes.
//!
//! Every training image is cut into the overlapping tiles the detector sees at inference
//! ([`detect::tile_pixels`]); each tile's targets are the boxes mostly inside it. The
//! backbone's feature maps of every tile are computed once, a chunk of tiles at a time (the
//! pixels of a chunk are all that is held), and the heads train on them for every epoch. The
//! holdout images then go through the finished detector whole, as prelabel jobs will: each is
//! right when its proposal matches the people's boxes both ways at IoU 0.5 (the evidence routing
//! is calibrated on), and the committee's objects give the average precision.

use std::sync::Arc;

use futures_util::StreamExt;
use image::RgbImage;
use sieve_shared::box_scores::{self, CommitteeBox, ImageScores};
use sieve_shared::boxes::LabeledBox;
use sieve_shared::messages::{HoldoutEvaluation, Snapshot, Split, TrainJob};
use tokio_util::sync::CancellationToken;

use super::{RunError, Trained, imagenet_backbone, supervised};
use crate::context::Worker;
use crate::images;
use crate::model::detect::{self, Detector, MATCH_IOU};
use crate::model::detector::{self, FeatureMaps, TrainOptions};
use crate::model::{ArchitectureConfig, FaceCommittee, Model, faces};

/// Tiles whose pixels are held at once on the way to their feature maps (a 384-pixel tile is
/// 1.7 MiB of input; its maps, 0.2 MiB).
const FEATURE_CHUNK: usize = 32;
/// A box is a tile's training target when at least this share of it lies inside the tile.
const MIN_VISIBLE: f32 = 0.5;

/// An example's image and boxes, decoded.
struct Example {
    image: RgbImage,
    boxes: Vec<LabeledBox>,
    random: bool,
}

pub(super) async fn train(
    worker: &Arc<Worker>,
    job: &TrainJob,
    snapshot: &Snapshot,
    stop: &CancellationToken,
) -> Result<Trained, RunError> {
    let classes = job.class_names.len();
    let config = ArchitectureConfig {
        proposal_threshold: job.params.proposal_threshold,
        ..ArchitectureConfig::detector(
            classes,
            job.params.members.max(2) as usize,
            job.params.input_size() as usize,
        )
    };
    detect::validate(&config).map_err(|e| RunError::Permanent(e.to_string()))?;
    if let Some((example, b)) = snapshot.examples.iter().find_map(|e| {
        e.boxes
            .as_ref()?
            .iter()
            .find(|b| b.class as usize >= classes)
            .map(|b| (e, b))
    }) {
        return Err(RunError::Permanent(format!(
            "snapshot example {} has a box of class {} but the project has {classes} classes",
            example.item_id, b.class
        )));
    }
    let (train_set, holdout) = load(worker, snapshot).await?;
    if train_set.is_empty() {
        return Err(RunError::Permanent(format!(
            "a detector needs images with people's boxes to train on; none of the snapshot's {} examples is a usable training image",
            snapshot.examples.len()
        )));
    }
    let train_size = train_set.len();
    let detector = fit(worker, job, stop, &config, train_set).await?;
    let (detector, evaluations, average_precision) =
        tokio::task::spawn_blocking(move || evaluate(detector, &holdout))
            .await
            .map_err(|e| RunError::Permanent(format!("evaluation panicked: {e}")))?
            .map_err(|e| RunError::Permanent(e.to_string()))?;
    Ok(Trained {
        model: Model::Detector(detector),
        evaluations,
        base: None,
        train_size,
        average_precision,
    })
}

/// A detector of `config`'s shape: its heads trained on `train_set`'s boxes over the frozen
/// ImageNet MobileNetV2.
async fn fit(
    worker: &Arc<Worker>,
    job: &TrainJob,
    stop: &CancellationToken,
    config: &ArchitectureConfig,
    train_set: Vec<Example>,
) -> Result<Detector, RunError> {
    let backbone = imagenet_backbone(worker).await?;
    let heads_config = detect::heads_config(config);
    let (input, side) = (heads_config.input, heads_config.side());

    // Feature maps of every training tile, and each tile's targets.
    let train_size = train_set.len();
    let (features, targets, backbone) = {
        let backbone = backbone.clone();
        tokio::task::spawn_blocking(move || {
            let mut values = Vec::new();
            let mut targets = Vec::new();
            let mut pixels = Vec::new();
            let mut tiles = 0usize;
            let mut pending = 0usize;
            for example in &train_set {
                let (grid, tile_pixels) =
                    detect::tile_pixels(&example.image, input, detect::TILE_OVERLAP);
                for tile in &grid {
                    targets.push(tile.boxes_within(&example.boxes, MIN_VISIBLE));
                }
                pixels.extend(tile_pixels);
                pending += grid.len();
                tiles += grid.len();
                if pending >= FEATURE_CHUNK {
                    let maps = detector::backbone_features(&backbone, &pixels, pending, input)?;
                    values.extend(maps.into_values());
                    pixels.clear();
                    pending = 0;
                }
            }
            if pending > 0 {
                let maps = detector::backbone_features(&backbone, &pixels, pending, input)?;
                values.extend(maps.into_values());
            }
            let channels = if tiles == 0 {
                0
            } else {
                values.len() / (tiles * side * side)
            };
            FeatureMaps::new(values, tiles, channels, side).map(|maps| (maps, targets, backbone))
        })
        .await
        .map_err(|e| RunError::Permanent(format!("the backbone panicked: {e}")))?
        .map_err(|e| RunError::Permanent(e.to_string()))?
    };
    tracing::info!(run = %job.run_id, images = train_size, tiles = features.images(), "detector: training the heads on cached feature maps");

    let options = TrainOptions {
        epochs: job.params.epochs.max(1) as usize,
        batch_size: job.params.batch_size.max(1) as usize,
        learning_rate: job.params.learning_rate,
        seed: job.params.seed,
        ..TrainOptions::default()
    };
    let device = crate::backend::device();
    let heads = supervised(worker, job, stop, move |on_epoch| {
        detector::train_heads(
            &features,
            &targets,
            &heads_config,
            &options,
            &device,
            |report| on_epoch(report),
        )
        .map(|(heads, _)| heads)
    })
    .await?;
    Detector::new(config, backbone, heads).map_err(|e| RunError::Permanent(e.to_string()))
}

/// A de-identification version: the pretrained face committee from `worker.face_weights`,
/// and, once people have boxed plates (any class but `face`) in training images, detection
/// heads trained on those boxes ([`FaceCommittee::with_plates`]). It is evaluated on the
/// snapshot's holdout (people's boxes), so that routing can calibrate it to the project's
/// target: an image is right when no box a person drew, face or plate, is missing from the
/// committee's proposal (recall first: an extra box only blurs more), as sure as
/// [`ImageScores::confidence`]. Without plate heads, the holdout is the champion's too (the
/// same networks), so its accuracy is also the champion's on the same holdout.
///
/// [`ImageScores::confidence`]: sieve_shared::box_scores::ImageScores::confidence
pub(super) async fn package_faces(
    worker: &Arc<Worker>,
    job: &TrainJob,
    snapshot: &Snapshot,
    stop: &CancellationToken,
) -> Result<Trained, RunError> {
    let dir = worker.settings.worker.face_weights.clone();
    let classes = job.class_names.len();
    let faces = tokio::task::spawn_blocking(move || {
        FaceCommittee::load(&dir, classes, &crate::backend::device())
    })
    .await
    .map_err(|e| RunError::Permanent(format!("loading the face detector panicked: {e}")))?
    .map_err(|e| {
        RunError::Permanent(format!(
            "the face detector's weights do not load ({e}); run ops/fetch-face-weights.sh or set worker.face_weights"
        ))
    })?;
    let faces = faces
        .with_plate_threshold(job.params.proposal_threshold)
        .map_err(|e| RunError::Permanent(e.to_string()))?;
    let (train_set, holdout) = load(worker, snapshot).await?;
    let boxes_plates = |e: &Example| e.boxes.iter().any(|b| b.class != faces::FACE);
    let train_size = if train_set.iter().any(boxes_plates) {
        train_set.len()
    } else {
        0
    };
    let faces = if train_size > 0 {
        // The heads learn every class but faces (MTCNN's): a face is background to them.
        let plate_set: Vec<Example> = train_set
            .into_iter()
            .map(|e| Example {
                boxes: e
                    .boxes
                    .into_iter()
                    .filter(|b| b.class != faces::FACE)
                    .collect(),
                ..e
            })
            .collect();
        let config =
            ArchitectureConfig::detector(classes, faces::MEMBERS, job.params.input_size() as usize);
        detect::validate(&config).map_err(|e| RunError::Permanent(e.to_string()))?;
        tracing::info!(run = %job.run_id, images = train_size, "deidentify: training plate heads on people's boxes");
        let plates = fit(worker, job, stop, &config, plate_set).await?;
        faces
            .with_plates(plates)
            .map_err(|e| RunError::Permanent(e.to_string()))?
    } else {
        faces
    };
    // The base version (MTCNN alone, or with older plate heads) on the same holdout, so the
    // promotion gate compares like with like.
    let base = match &job.base {
        Some(base) => match worker.cache.get(base).await {
            Ok(model) => match &*model {
                Model::Faces(base) => Some(base.clone()),
                _ => None,
            },
            Err(err) if err.is_transient() => return Err(RunError::Transient(err.to_string())),
            Err(err) => return Err(RunError::Permanent(format!("base model refused: {err}"))),
        },
        None => None,
    };
    let (faces, evaluations, base_evaluations) = tokio::task::spawn_blocking(move || {
        let evaluations = face_verdicts(&faces, &holdout)?;
        let base_evaluations = base
            .map(|base| face_verdicts(&base, &holdout))
            .transpose()?;
        Ok::<_, crate::model::ModelError>((faces, evaluations, base_evaluations))
    })
    .await
    .map_err(|e| RunError::Permanent(format!("evaluation panicked: {e}")))?
    .map_err(|e| RunError::Permanent(e.to_string()))?;
    // Without a base, the same face networks are the champion's: their verdicts are its.
    let base = match base_evaluations {
        Some(base) => Some(base),
        None if !faces.finds_plates() => Some(evaluations.clone()),
        None => None,
    };
    Ok(Trained {
        model: Model::Faces(faces),
        evaluations,
        base,
        train_size,
        average_precision: None,
    })
}

/// When a box version's proposal for an image is right.
#[derive(Clone, Copy, Debug)]
enum Rule {
    /// Every proposed box matches a person's and every person's box is matched (detection).
    AllRight,
    /// No box a person drew is missing (de-identification: recall first).
    NoneMissing,
}

/// A box version's verdict on one holdout image, as routing sees the image: its confidence,
/// and as its class the class of its least certain proposed box (routing's `top_class`, so a
/// class with evidence enough is calibrated on its own images); its label that class when the
/// proposal is right by `rule`, and `u32::MAX` (no class) when not. With the proposal's tally
/// of right boxes, for a precision target.
fn verdict(scores: &ImageScores, example: &Example, rule: Rule) -> HoldoutEvaluation {
    let proposal = scores.labeled_boxes();
    let tally = box_scores::tally(&proposal, &example.boxes, MATCH_IOU);
    let right = match rule {
        Rule::AllRight => box_scores::all_right(&proposal, &example.boxes, MATCH_IOU),
        Rule::NoneMissing => tally.right as usize == example.boxes.len(),
    };
    let class = scores.as_scores(0.0).top_class;
    HoldoutEvaluation {
        label: if right { class } else { u32::MAX },
        predicted: class,
        confidence: scores.confidence(),
        random: Some(example.random),
        correct: Some(right),
        boxes: Some(tally),
    }
}

/// The face committee's verdict on every holdout image: right when no box a person drew is
/// missing from its proposal, as sure as the image's confidence.
fn face_verdicts(
    faces: &FaceCommittee,
    holdout: &[Example],
) -> Result<Vec<HoldoutEvaluation>, crate::model::ModelError> {
    holdout
        .iter()
        .map(|example| {
            let members = faces.detect(std::slice::from_ref(&example.image))?;
            let scores = faces::score(&members[0], faces.plate_threshold());
            Ok(verdict(&scores, example, Rule::NoneMissing))
        })
        .collect()
}

/// The snapshot's examples with their images, split into training and holdout; an image that
/// cannot be read or decoded is skipped with a warning, an example without boxes is refused.
async fn load(
    worker: &Worker,
    snapshot: &Snapshot,
) -> Result<(Vec<Example>, Vec<Example>), RunError> {
    let max_pixels = worker.settings.ingest.max_pixels;
    // Owned keys: a stream over borrowed examples makes the run's future
    // not `Send` for every lifetime (a known limit of the compiler).
    let keys: Vec<String> = snapshot
        .examples
        .iter()
        .map(|e| e.object_key.clone())
        .collect();
    let fetched: Vec<_> = futures_util::stream::iter(keys)
        .map(|key| {
            let store = worker.store.clone();
            async move { store.get(&key).await }
        })
        .buffered(16)
        .collect()
        .await;
    let (mut train_set, mut holdout) = (Vec::new(), Vec::new());
    let mut skipped = 0usize;
    for (example, got) in snapshot.examples.iter().zip(fetched) {
        let Some(boxes) = example.boxes.clone() else {
            return Err(RunError::Permanent(format!(
                "snapshot example {} has a class label, not boxes: a detector trains on boxes",
                example.item_id
            )));
        };
        let bytes = match got {
            Ok(bytes) => bytes,
            Err(err) if err.is_transient() => return Err(RunError::Transient(err.to_string())),
            Err(err) => {
                tracing::warn!(key = %example.object_key, error = %err, "snapshot image unavailable; skipped");
                skipped += 1;
                continue;
            }
        };
        let image = match tokio::task::spawn_blocking(move || images::decode(&bytes, max_pixels))
            .await
            .map_err(|e| RunError::Permanent(format!("image decoding panicked: {e}")))?
        {
            Ok(image) => image.to_rgb8(),
            Err(err) => {
                tracing::warn!(key = %example.object_key, error = %err, "snapshot image does not decode; skipped");
                skipped += 1;
                continue;
            }
        };
        let decoded = Example {
            image,
            boxes,
            random: example.random,
        };
        match example.split {
            Split::Train => train_set.push(decoded),
            Split::Holdout => holdout.push(decoded),
        }
    }
    if skipped > 0 {
        tracing::warn!(
            skipped,
            "snapshot images that could not be used were skipped"
        );
    }
    Ok((train_set, holdout))
}

/// The detector's verdict on every holdout image: right when its proposal matches the
/// people's boxes both ways at IoU 0.5, as sure as [`ImageScores::confidence`]; and the
/// average precision of the committee's objects over all of them.
///
/// [`ImageScores::confidence`]: sieve_shared::box_scores::ImageScores::confidence
fn evaluate(
    detector: Detector,
    holdout: &[Example],
) -> Result<(Detector, Vec<HoldoutEvaluation>, Option<f64>), crate::model::ModelError> {
    let mut evaluations = Vec::with_capacity(holdout.len());
    let mut found = Vec::with_capacity(holdout.len());
    // A few images at a time: a large image is many tiles.
    for chunk in holdout.chunks(4) {
        let images: Vec<RgbImage> = chunk.iter().map(|e| e.image.clone()).collect();
        for (example, members) in chunk.iter().zip(detector.detect(&images)?) {
            let scores = detect::score(&members, detector.proposal_threshold());
            evaluations.push(verdict(&scores, example, Rule::AllRight));
            found.push(
                box_scores::committee_boxes(&members, MATCH_IOU)
                    .iter()
                    .map(CommitteeBox::scored)
                    .collect::<Vec<_>>(),
            );
        }
    }
    let truth: Vec<Vec<LabeledBox>> = holdout.iter().map(|e| e.boxes.clone()).collect();
    let average_precision = box_scores::average_precision(&found, &truth, MATCH_IOU);
    Ok((detector, evaluations, average_precision))
}

#[cfg(test)]
mod tests {
    use sieve_shared::box_scores::{self, ScoredBox};

    use super::*;

    fn b(class: u32, x: f32, score: f32) -> ScoredBox {
        ScoredBox {
            class,
            score,
            x_min: x,
            y_min: 0.0,
            x_max: x + 20.0,
            y_max: 20.0,
        }
    }

    fn example(boxes: Vec<LabeledBox>) -> Example {
        Example {
            image: RgbImage::new(1, 1),
            boxes,
            random: true,
        }
    }

    #[test]
    fn a_verdict_takes_the_class_routing_will_and_tallies_the_boxes() {
        // Two members agree on a sure face (class 0) and a less sure plate (class 1).
        let member = vec![b(0, 0.0, 0.95), b(1, 50.0, 0.6)];
        let scores = box_scores::image_scores(&[member.clone(), member], MATCH_IOU, 0.5, 0.25);
        let face = b(0, 0.0, 1.0).as_box();
        let plate = b(1, 50.0, 1.0).as_box();
        let missed = b(1, 100.0, 1.0).as_box();

        let right = verdict(&scores, &example(vec![face, plate]), Rule::AllRight);
        assert_eq!(
            (right.predicted, right.label),
            (1, 1),
            "the plate is the least sure"
        );
        assert_eq!(right.correct, Some(true));
        assert_eq!(right.predicted, scores.as_scores(0.5).top_class);
        assert_eq!(
            right.boxes,
            Some(box_scores::BoxTally {
                proposed: 2,
                right: 2,
                truth: 2
            })
        );

        // A plate the proposal left out: wrong either way, with no class as its label.
        let wrong = verdict(
            &scores,
            &example(vec![face, plate, missed]),
            Rule::NoneMissing,
        );
        assert_eq!((wrong.predicted, wrong.label), (1, u32::MAX));
        assert_eq!(wrong.correct, Some(false));

        // A false box: wrong for detection, right for recall first.
        let extra = example(vec![face]);
        assert_eq!(
            verdict(&scores, &extra, Rule::AllRight).correct,
            Some(false)
        );
        let recall_first = verdict(&scores, &extra, Rule::NoneMissing);
        assert_eq!(recall_first.correct, Some(true));
        assert_eq!(
            recall_first.boxes,
            Some(box_scores::BoxTally {
                proposed: 2,
                right: 1,
                truth: 1
            })
        );
    }
}
