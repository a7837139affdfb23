//! Committee scores for boxes: how sure a detector committee is about each
//! object it found in an image, and about the image as a whole.
//!
//! Each member proposes scored boxes. Boxes of different members that are
//! the same object are matched greedily: all boxes, highest score first,
//! each joining the first object of its class whose first (best) box it
//! overlaps at IoU ≥ the match threshold and that has no box from its
//! member yet; otherwise it starts an object. Greedy matching is what
//! detection benchmarks use for the same job (matching detections to truth
//! for mAP), it is deterministic, and with a handful of members it is as
//! good as an optimal assignment in all but contrived overlaps.
//!
//! Per object: its **confidence** (the members' mean score, a member that
//! missed it counting 0, so confidence already falls with disagreement),
//! its **agreement** (the share of members that found it) and the
//! **spread** of its corners across members (their standard deviation,
//! mean over the four corners, over the square root of the box's area: 0
//! when every member drew the same box). Per image: the least certain
//! object, the candidates just under the acceptance threshold (possible
//! misses), and how much the members disagree on the count. Pure
//! functions, shared so the worker that computes them and the scheduler
//! that routes on them agree on one definition.

use serde::{Deserialize, Serialize};

use crate::boxes::LabeledBox;

/// A detector committee proposes the objects whose confidence reaches this,
/// unless its project set its own threshold.
pub const DETECTION_PROPOSAL_THRESHOLD: f32 = 0.5;
/// A de-identification committee's plate heads propose from this: recall
/// first, since a plate left out leaks and an extra box only blurs more.
pub const PLATE_PROPOSAL_THRESHOLD: f32 = 0.35;
use crate::scores::Scores;

/// A box one member proposed, with its score in `[0, 1]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoredBox {
    pub class: u32,
    pub score: f32,
    pub x_min: f32,
    pub y_min: f32,
    pub x_max: f32,
    pub y_max: f32,
}

impl ScoredBox {
    pub fn as_box(&self) -> LabeledBox {
        LabeledBox {
            class: self.class,
            x_min: self.x_min,
            y_min: self.y_min,
            x_max: self.x_max,
            y_max: self.y_max,
        }
    }
}

/// One object as the committee sees it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommitteeBox {
    /// The members' mean corners.
    #[serde(flatten)]
    pub at: LabeledBox,
    /// Mean score over all members (0 for one that missed it).
    pub confidence: f32,
    /// Share of members that found it.
    pub agreement: f32,
    /// Corner standard deviation over √area (0: identical boxes).
    pub spread: f32,
}

impl CommitteeBox {
    /// The object as one scored box, its confidence the score.
    pub fn scored(&self) -> ScoredBox {
        ScoredBox {
            class: self.at.class,
            score: self.confidence,
            x_min: self.at.x_min,
            y_min: self.at.y_min,
            x_max: self.at.x_max,
            y_max: self.at.y_max,
        }
    }
}

/// How sure the committee is about one image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageScores {
    /// The objects at or above the threshold: the proposal.
    pub boxes: Vec<CommitteeBox>,
    /// The lowest confidence among them (1 when there are none: nothing
    /// proposed is in doubt).
    pub least_certain: f32,
    /// Objects under the threshold by less than the band: near misses.
    pub near_misses: u32,
    /// How likely the likeliest object the proposal leaves out is (0:
    /// none): over the candidates under the threshold, near or not, the
    /// chance that at least one of those on the same place (IoU at the
    /// match threshold, whatever their class) is an object.
    #[serde(default)]
    pub likeliest_miss: f32,
    /// Spread of the members' counts of objects at or above the threshold:
    /// (most − fewest) / max(1, mean).
    pub count_disagreement: f32,
}

/// The members' boxes matched into objects, most confident first.
pub fn committee_boxes(members: &[Vec<ScoredBox>], match_iou: f32) -> Vec<CommitteeBox> {
    if members.is_empty() {
        return Vec::new();
    }
    let mut all: Vec<(usize, &ScoredBox)> = members
        .iter()
        .enumerate()
        .flat_map(|(m, boxes)| boxes.iter().map(move |b| (m, b)))
        .collect();
    all.sort_by(|a, b| b.1.score.total_cmp(&a.1.score));
    // Each object: its boxes, one per member at most, the first the best.
    let mut objects: Vec<Vec<(usize, &ScoredBox)>> = Vec::new();
    for (member, b) in all {
        let home = objects.iter_mut().find(|object| {
            let first = object[0].1;
            first.class == b.class
                && !object.iter().any(|(m, _)| *m == member)
                && first.as_box().iou(&b.as_box()) >= match_iou
        });
        match home {
            Some(object) => object.push((member, b)),
            None => objects.push(vec![(member, b)]),
        }
    }
    let k = members.len() as f32;
    let mut out: Vec<CommitteeBox> = objects
        .iter()
        .map(|object| {
            let n = object.len() as f32;
            let mean = |f: fn(&ScoredBox) -> f32| object.iter().map(|(_, b)| f(b)).sum::<f32>() / n;
            let at = LabeledBox {
                class: object[0].1.class,
                x_min: mean(|b| b.x_min),
                y_min: mean(|b| b.y_min),
                x_max: mean(|b| b.x_max),
                y_max: mean(|b| b.y_max),
            };
            let std = |f: fn(&ScoredBox) -> f32, centre: f32| {
                (object
                    .iter()
                    .map(|(_, b)| (f(b) - centre).powi(2))
                    .sum::<f32>()
                    / n)
                    .sqrt()
            };
            let corners = (std(|b| b.x_min, at.x_min)
                + std(|b| b.y_min, at.y_min)
                + std(|b| b.x_max, at.x_max)
                + std(|b| b.y_max, at.y_max))
                / 4.0;
            let side = (at.width() * at.height()).max(f32::MIN_POSITIVE).sqrt();
            CommitteeBox {
                at,
                confidence: object.iter().map(|(_, b)| b.score).sum::<f32>() / k,
                agreement: n / k,
                spread: corners / side,
            }
        })
        .collect();
    out.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    out
}

/// The image's scores: objects at or above `threshold` proposed, those
/// within `band` under it counted as possible misses.
pub fn image_scores(
    members: &[Vec<ScoredBox>],
    match_iou: f32,
    threshold: f32,
    band: f32,
) -> ImageScores {
    let objects = committee_boxes(members, match_iou);
    let (boxes, under): (Vec<CommitteeBox>, Vec<CommitteeBox>) =
        objects.into_iter().partition(|o| o.confidence >= threshold);
    let near_misses = under
        .iter()
        .filter(|o| o.confidence >= threshold - band)
        .count() as u32;
    // Something is there even when no class is sure which: candidates of
    // other classes on the same place add up (the chance that at least one
    // is right), so a committee torn between classes is not sure the place
    // is empty.
    let likeliest_miss = under
        .iter()
        .map(|o| {
            let none_there: f32 = under
                .iter()
                .filter(|other| other.at.iou(&o.at) >= match_iou)
                .map(|other| 1.0 - other.confidence)
                .product();
            1.0 - none_there
        })
        .fold(0.0_f32, f32::max);
    let least_certain = boxes.iter().map(|o| o.confidence).fold(1.0_f32, f32::min);
    let counts: Vec<f32> = members
        .iter()
        .map(|boxes| boxes.iter().filter(|b| b.score >= threshold).count() as f32)
        .collect();
    let count_disagreement = match (
        counts.iter().copied().reduce(f32::max),
        counts.iter().copied().reduce(f32::min),
    ) {
        (Some(most), Some(fewest)) => {
            let mean = counts.iter().sum::<f32>() / counts.len() as f32;
            (most - fewest) / mean.max(1.0)
        }
        _ => 0.0,
    };
    ImageScores {
        boxes,
        least_certain,
        near_misses,
        likeliest_miss,
        count_disagreement,
    }
}

impl ImageScores {
    /// How likely the proposal is right as a whole, in `[0, 1]`: the
    /// lowest of each proposed object's confidence and, for each object
    /// left out, the chance it is not one (1 − its confidence). One
    /// doubtful box or one likely miss makes the image doubtful; an image
    /// where the committee proposes nothing is only as sure as its
    /// strongest candidate is weak.
    pub fn confidence(&self) -> f32 {
        self.least_certain.min(1.0 - self.likeliest_miss)
    }

    /// Whether the committee may have missed something: a candidate just
    /// under the threshold, or members that found different numbers of
    /// objects. A recall-first kind (de-identification) sends such an
    /// image to a person whatever its confidence.
    pub fn possible_miss(&self) -> bool {
        self.near_misses > 0 || self.count_disagreement > 0.0
    }

    /// How much the members disagree about the image: the larger of their
    /// disagreement on the count and the share of members that missed the
    /// least agreed object.
    pub fn disagreement(&self) -> f32 {
        let least_agreed = self
            .boxes
            .iter()
            .map(|o| 1.0 - o.agreement)
            .fold(0.0_f32, f32::max);
        self.count_disagreement.max(least_agreed)
    }

    /// The image's scores in the shape classification's routing reads:
    /// `confidence` and `disagreement` as above, `top_class` the class of
    /// the least certain object (0 with none), `margin` the distance of the
    /// confidence from the proposal threshold's side, `entropy` 0 and
    /// `mutual_information` the largest corner spread (where the members
    /// agree on an object but not on where it is).
    pub fn as_scores(&self, threshold: f32) -> Scores {
        let confidence = self.confidence();
        let least = self
            .boxes
            .iter()
            .min_by(|a, b| a.confidence.total_cmp(&b.confidence));
        Scores {
            top_class: least.map_or(0, |o| o.at.class),
            confidence,
            margin: (confidence - threshold).abs(),
            entropy: 0.0,
            disagreement: self.disagreement(),
            mutual_information: self.boxes.iter().map(|o| o.spread).fold(0.0, f32::max),
        }
    }

    /// One image's scores from two committees that look for different
    /// classes (a de-identification version's face detector and its plate
    /// heads), each at its own threshold: both proposals, the least certain
    /// box of either, every near miss, the likelier miss and the larger
    /// count disagreement. An empty side (nothing proposed, nothing under
    /// the threshold) leaves the other as it is.
    pub fn merge(self, other: ImageScores) -> ImageScores {
        let mut boxes = self.boxes;
        boxes.extend(other.boxes);
        boxes.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
        ImageScores {
            boxes,
            least_certain: self.least_certain.min(other.least_certain),
            near_misses: self.near_misses + other.near_misses,
            likeliest_miss: self.likeliest_miss.max(other.likeliest_miss),
            count_disagreement: self.count_disagreement.max(other.count_disagreement),
        }
    }

    /// The proposed boxes, as a label stores them.
    pub fn labeled_boxes(&self) -> Vec<LabeledBox> {
        self.boxes.iter().map(|o| o.at).collect()
    }
}

/// Whether `proposed` is right as a whole against `truth`: every proposed
/// box matches a distinct truth box of its class at IoU ≥ `iou`, and every
/// truth box is matched (greedy, best overlap first).
pub fn all_right(proposed: &[LabeledBox], truth: &[LabeledBox], iou: f32) -> bool {
    proposed.len() == truth.len() && matched(proposed, truth, iou) == truth.len()
}

/// The boxes a version proposed for one image, how many of them were right
/// (matched to a distinct box a person drew there), and how many people
/// drew (see [`tally`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxTally {
    pub proposed: u32,
    /// Proposed boxes matched to one a person drew, each to its own.
    pub right: u32,
    /// The boxes people drew.
    #[serde(default)]
    pub truth: u32,
}

/// `proposed` tallied against `truth` at IoU ≥ `iou`.
pub fn tally(proposed: &[LabeledBox], truth: &[LabeledBox], iou: f32) -> BoxTally {
    BoxTally {
        proposed: proposed.len() as u32,
        right: matched(proposed, truth, iou) as u32,
        truth: truth.len() as u32,
    }
}

/// How many of `found` (best first) match a distinct box of `truth` of the
/// same class at IoU ≥ `iou`, each taking the unmatched truth it overlaps
/// most.
pub fn matched(found: &[LabeledBox], truth: &[LabeledBox], iou: f32) -> usize {
    let mut taken = vec![false; truth.len()];
    let mut hits = 0;
    for b in found {
        let best = truth
            .iter()
            .enumerate()
            .filter(|(i, t)| !taken[*i] && t.class == b.class)
            .map(|(i, t)| (i, t.iou(b)))
            .filter(|(_, overlap)| *overlap >= iou)
            .max_by(|x, y| x.1.total_cmp(&y.1));
        if let Some((i, _)) = best {
            taken[i] = true;
            hits += 1;
        }
    }
    hits
}

/// Average precision at IoU `iou` (all-point interpolation, as VOC since
/// 2010) of scored detections over many images: `found[i]` and `truth[i]`
/// are image `i`'s, ranked together by score, each detection matched to
/// the unmatched truth box of its image and class it overlaps most.
/// `None` when there is no truth box at all.
pub fn average_precision(
    found: &[Vec<ScoredBox>],
    truth: &[Vec<LabeledBox>],
    iou: f32,
) -> Option<f64> {
    let total: usize = truth.iter().map(Vec::len).sum();
    if total == 0 {
        return None;
    }
    let mut ranked: Vec<(usize, &ScoredBox)> = found
        .iter()
        .enumerate()
        .flat_map(|(i, boxes)| boxes.iter().map(move |b| (i, b)))
        .collect();
    ranked.sort_by(|a, b| b.1.score.total_cmp(&a.1.score));
    let mut taken: Vec<Vec<bool>> = truth.iter().map(|t| vec![false; t.len()]).collect();
    let mut hits = Vec::with_capacity(ranked.len());
    for (image, b) in ranked {
        let Some(image_truth) = truth.get(image) else {
            hits.push(false);
            continue;
        };
        let b = b.as_box();
        let best = image_truth
            .iter()
            .enumerate()
            .filter(|(i, t)| !taken[image][*i] && t.class == b.class)
            .map(|(i, t)| (i, t.iou(&b)))
            .filter(|(_, overlap)| *overlap >= iou)
            .max_by(|x, y| x.1.total_cmp(&y.1));
        match best {
            Some((i, _)) => {
                taken[image][i] = true;
                hits.push(true);
            }
            None => hits.push(false),
        }
    }
    // Precision at each rank, then made non-increasing from the end, and
    // summed over the ranks where recall rises.
    let mut tp = 0usize;
    let mut points: Vec<(f64, f64)> = Vec::with_capacity(hits.len());
    for (rank, hit) in hits.iter().enumerate() {
        if *hit {
            tp += 1;
        }
        points.push((tp as f64 / total as f64, tp as f64 / (rank + 1) as f64));
    }
    let mut best = 0.0_f64;
    for point in points.iter_mut().rev() {
        best = best.max(point.1);
        point.1 = best;
    }
    let mut ap = 0.0;
    let mut recall = 0.0;
    for (r, p) in points {
        if r > recall {
            ap += (r - recall) * p;
            recall = r;
        }
    }
    Some(ap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(class: u32, score: f32, x: f32, y: f32, side: f32) -> ScoredBox {
        ScoredBox {
            class,
            score,
            x_min: x,
            y_min: y,
            x_max: x + side,
            y_max: y + side,
        }
    }

    #[test]
    fn merged_scores_keep_both_proposals_and_the_worse_of_each_doubt() {
        // Faces at 0.9: one sure face, one candidate just under.
        let faces = image_scores(
            &[
                vec![
                    scored(0, 0.95, 10.0, 10.0, 20.0),
                    scored(0, 0.8, 60.0, 10.0, 20.0),
                ],
                vec![scored(0, 0.97, 10.0, 10.0, 20.0)],
            ],
            0.5,
            0.9,
            0.25,
        );
        // Plates at 0.5: one plate both members found, one only the first.
        let plates = image_scores(
            &[
                vec![
                    scored(1, 0.7, 100.0, 100.0, 30.0),
                    scored(1, 0.9, 200.0, 100.0, 30.0),
                ],
                vec![scored(1, 0.6, 100.0, 100.0, 30.0)],
            ],
            0.5,
            0.5,
            0.25,
        );
        let merged = faces.clone().merge(plates.clone());
        assert_eq!(merged.boxes.len(), faces.boxes.len() + plates.boxes.len());
        assert!(
            merged
                .boxes
                .windows(2)
                .all(|w| w[0].confidence >= w[1].confidence)
        );
        assert_eq!(
            merged.least_certain,
            faces.least_certain.min(plates.least_certain)
        );
        assert_eq!(merged.near_misses, faces.near_misses + plates.near_misses);
        assert_eq!(
            merged.likeliest_miss,
            faces.likeliest_miss.max(plates.likeliest_miss)
        );
        assert_eq!(
            merged.count_disagreement,
            faces.count_disagreement.max(plates.count_disagreement)
        );
        assert!(merged.possible_miss());
        // A side with nothing in it changes nothing.
        let empty = image_scores(&[vec![], vec![]], 0.5, 0.5, 0.25);
        assert_eq!(faces.clone().merge(empty), faces);
    }

    #[test]
    fn members_that_agree_make_one_sure_object() {
        let members = vec![
            vec![scored(0, 0.9, 10.0, 10.0, 20.0)],
            vec![scored(0, 0.8, 11.0, 10.0, 20.0)],
            vec![scored(0, 0.7, 10.0, 11.0, 20.0)],
        ];
        let objects = committee_boxes(&members, 0.5);
        assert_eq!(objects.len(), 1);
        let o = objects[0];
        assert!((o.confidence - 0.8).abs() < 1e-6, "{o:?}");
        assert_eq!(o.agreement, 1.0);
        assert!(o.spread > 0.0 && o.spread < 0.05, "{o:?}");
        assert!((o.at.x_min - 31.0 / 3.0).abs() < 1e-5);
    }

    #[test]
    fn a_box_one_member_alone_found_is_doubtful_and_classes_never_merge() {
        let members = vec![
            vec![
                scored(0, 0.9, 10.0, 10.0, 20.0),
                scored(1, 0.9, 60.0, 60.0, 10.0),
            ],
            vec![
                scored(0, 0.9, 10.0, 10.0, 20.0),
                scored(0, 0.9, 60.0, 60.0, 10.0),
            ],
        ];
        let objects = committee_boxes(&members, 0.5);
        assert_eq!(objects.len(), 3, "{objects:?}");
        let lone: Vec<&CommitteeBox> = objects.iter().filter(|o| o.agreement < 1.0).collect();
        assert_eq!(lone.len(), 2);
        assert!(lone.iter().all(|o| (o.confidence - 0.45).abs() < 1e-6));
    }

    #[test]
    fn a_member_contributes_one_box_per_object() {
        // Member 0 proposes two overlapping boxes of one object: the second
        // becomes an object of its own rather than doubling the first.
        let members = vec![
            vec![
                scored(0, 0.9, 10.0, 10.0, 20.0),
                scored(0, 0.6, 12.0, 10.0, 20.0),
            ],
            vec![scored(0, 0.8, 10.0, 10.0, 20.0)],
        ];
        let objects = committee_boxes(&members, 0.5);
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[0].agreement, 1.0);
        assert_eq!(objects[1].agreement, 0.5);
    }

    #[test]
    fn image_scores_name_the_doubtful_object_the_near_misses_and_the_count_spread() {
        let members = vec![
            vec![
                scored(0, 0.95, 0.0, 0.0, 10.0),
                scored(0, 0.5, 50.0, 50.0, 10.0),
            ],
            vec![
                scored(0, 0.9, 0.0, 0.0, 10.0),
                scored(0, 0.6, 50.0, 50.0, 10.0),
            ],
            vec![
                scored(0, 0.9, 0.0, 0.0, 10.0),
                scored(0, 0.9, 80.0, 0.0, 10.0),
            ],
        ];
        let s = image_scores(&members, 0.5, 0.6, 0.35);
        assert_eq!(s.boxes.len(), 1, "{s:?}");
        assert!((s.least_certain - 0.9166667).abs() < 1e-5, "{s:?}");
        // 50,50 at (0.5 + 0.6) / 3 = 0.367 and 80,0 at 0.3: both within
        // 0.35 of the threshold; a narrower band keeps only the first.
        assert_eq!(s.near_misses, 2);
        assert_eq!(image_scores(&members, 0.5, 0.6, 0.25).near_misses, 1);
        // Counts at ≥ 0.6: 1, 2, 2.
        assert!(
            (s.count_disagreement - 1.0 / (5.0 / 3.0)).abs() < 1e-5,
            "{s:?}"
        );
        let empty = image_scores(&[vec![], vec![]], 0.5, 0.6, 0.3);
        assert_eq!(
            (
                empty.boxes.len(),
                empty.least_certain,
                empty.count_disagreement
            ),
            (0, 1.0, 0.0)
        );
    }

    #[test]
    fn an_image_is_as_sure_as_its_least_certain_box_and_its_likeliest_miss() {
        let members = vec![
            vec![
                scored(0, 0.9, 0.0, 0.0, 10.0),
                scored(1, 0.4, 50.0, 50.0, 10.0),
            ],
            vec![scored(0, 0.8, 0.0, 0.0, 10.0)],
        ];
        let s = image_scores(&members, 0.5, 0.5, 0.1);
        // The sure object at (0.9 + 0.8) / 2; the other at 0.4 / 2 = 0.2,
        // under the threshold by 0.3: a possible miss, if not a near one.
        assert_eq!(s.near_misses, 0);
        assert!((s.likeliest_miss - 0.2).abs() < 1e-6, "{s:?}");
        assert!((s.confidence() - 0.8).abs() < 1e-6, "{s:?}");
        let scores = s.as_scores(0.5);
        assert_eq!(scores.top_class, 0);
        assert!((scores.confidence - 0.8).abs() < 1e-6);
        // Both members found the first object; they disagree on nothing
        // proposed, and count one box each at 0.5.
        assert_eq!(scores.disagreement, 0.0);
        let lonely = image_scores(
            &[vec![scored(0, 0.9, 0.0, 0.0, 10.0)], vec![]],
            0.5,
            0.4,
            0.1,
        );
        assert!((lonely.disagreement() - 1.0).abs() < 1e-6, "{lonely:?}");
        assert_eq!(s.labeled_boxes(), vec![s.boxes[0].at]);
    }

    fn at(x: f32) -> LabeledBox {
        LabeledBox {
            class: 0,
            x_min: x,
            y_min: 0.0,
            x_max: x + 10.0,
            y_max: 10.0,
        }
    }

    fn found(score: f32, x: f32) -> ScoredBox {
        scored(0, score, x, 0.0, 10.0)
    }

    #[test]
    fn average_precision_of_perfect_partial_and_misordered_detections() {
        let truth = vec![vec![at(0.0), at(20.0)]];
        let ap = |f: Vec<ScoredBox>| average_precision(&[f], &truth, 0.5).expect("truth to find");
        assert_eq!(ap(vec![found(0.9, 0.0), found(0.8, 20.0)]), 1.0);
        // One of two found: recall 0.5 at precision 1.
        assert_eq!(ap(vec![found(0.9, 0.0)]), 0.5);
        // A false positive ranked first: precision 1/2 then 2/3.
        let misordered = ap(vec![found(0.9, 50.0), found(0.8, 0.0), found(0.7, 20.0)]);
        assert!((misordered - 2.0 / 3.0).abs() < 1e-9, "{misordered}");
        // A box of another image never matches this one's truth.
        let two = vec![vec![at(0.0)], vec![]];
        assert_eq!(
            average_precision(&[vec![], vec![found(0.9, 0.0)]], &two, 0.5),
            Some(0.0)
        );
        assert_eq!(average_precision(&[vec![]], &[vec![]], 0.5), None);
    }

    #[test]
    fn a_proposal_is_all_right_only_with_every_box_matched_both_ways() {
        let truth = [at(0.0), at(20.0)];
        assert!(all_right(&[at(20.5), at(0.5)], &truth, 0.5));
        assert!(!all_right(&[at(0.0)], &truth, 0.5), "a miss");
        assert!(
            !all_right(&[at(0.0), at(20.0), at(40.0)], &truth, 0.5),
            "an extra box"
        );
        assert!(
            !all_right(&[at(0.0), at(27.0)], &truth, 0.5),
            "a box too far off"
        );
        assert!(all_right(&[], &[], 0.5), "nothing to find, nothing found");
        assert_eq!(matched(&[at(1.0), at(0.5)], &truth, 0.5), 1);
    }

    #[test]
    fn candidates_of_several_classes_on_one_place_add_up_to_a_likely_miss() {
        // Three members, each unsure of the class of one object: no class
        // reaches the threshold, yet something is surely there.
        let members = vec![
            vec![
                scored(0, 0.5, 0.0, 0.0, 10.0),
                scored(1, 0.4, 0.0, 0.0, 10.0),
            ],
            vec![
                scored(1, 0.5, 0.0, 0.0, 10.0),
                scored(2, 0.4, 0.0, 0.0, 10.0),
            ],
            vec![
                scored(2, 0.5, 0.0, 0.0, 10.0),
                scored(0, 0.4, 0.0, 0.0, 10.0),
            ],
        ];
        let s = image_scores(&members, 0.5, 0.5, 0.25);
        assert!(s.boxes.is_empty(), "{s:?}");
        // Each class at (0.5 + 0.4) / 3 = 0.3; together 1 − 0.7³ = 0.657.
        assert!((s.likeliest_miss - 0.657).abs() < 1e-3, "{s:?}");
        assert!(s.confidence() < 0.35, "{s:?}");
        // Apart, the same candidates are three separate weak misses.
        let apart = vec![
            vec![scored(0, 0.5, 0.0, 0.0, 10.0)],
            vec![scored(1, 0.5, 50.0, 0.0, 10.0)],
            vec![scored(2, 0.5, 100.0, 0.0, 10.0)],
        ];
        let s = image_scores(&apart, 0.5, 0.5, 0.25);
        assert!((s.likeliest_miss - 0.5 / 3.0).abs() < 1e-5, "{s:?}");
    }
}
