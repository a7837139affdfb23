//! The oracle share: how much a model could label by machine at a target
//! accuracy if its confidence ranking were cut at the best place, knowing
//! the truth. It bounds what any calibrated policy can reach with that
//! model; the gap between the two is calibration's (or the evidence's),
//! not the model's.

/// The longest most-confident prefix of `predictions` (confidence, right)
/// whose accuracy is at least `target`: (its length, how many in it are
/// right). A cut falls only between distinct confidences, as a threshold
/// would. Sorts `predictions`, most confident first.
pub fn best_prefix(predictions: &mut [(f32, bool)], target: f64) -> (usize, usize) {
    predictions.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut best, mut hits) = ((0, 0), 0);
    for (i, p) in predictions.iter().enumerate() {
        hits += usize::from(p.1);
        let at_boundary = predictions.get(i + 1).is_none_or(|next| next.0 != p.0);
        if at_boundary && hits as f64 >= target * (i + 1) as f64 {
            best = (i + 1, hits);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_at_the_target_as_counted_by_hand() {
        // 100 predictions, most confident first: 90 right, then 10 wrong;
        // then 100 more, every other one wrong.
        let mut predictions = Vec::new();
        for i in 0..200 {
            let confidence = 1.0 - i as f32 / 1000.0;
            let correct = if i < 100 { i < 90 } else { i % 2 == 0 };
            predictions.push((confidence, correct));
        }
        predictions.reverse();
        // >= 95%: 94 gives 90/94 = 95.7%, 95 gives 90/95 = 94.7%.
        assert_eq!(best_prefix(&mut predictions, 0.95), (94, 90));
        // >= 97%: 92 gives 97.8%, 93 gives 96.8%.
        assert_eq!(best_prefix(&mut predictions, 0.97), (92, 90));
        // >= 99%: 90 gives 100%, 91 gives 98.9%.
        assert_eq!(best_prefix(&mut predictions, 0.99), (90, 90));
    }

    #[test]
    fn ties_are_admitted_or_refused_together() {
        // Twenty right at 0.99, then ten right and one wrong all at 0.9.
        let mut predictions = vec![(0.99, true); 20];
        predictions.extend(vec![(0.9, true); 10]);
        predictions.push((0.9, false));
        // All 31 are 96.8% right: enough for 95%.
        assert_eq!(best_prefix(&mut predictions, 0.95), (31, 30));
        // Not for 97%, and no cut falls inside the tie: only the first twenty.
        assert_eq!(best_prefix(&mut predictions, 0.97), (20, 20));
        assert_eq!(best_prefix(&mut [], 0.97), (0, 0));
    }
}
