//! Transient failures retried later, and where a dead letter came from.
//!
//! A prediction job that failed transiently (the object store not
//! answering) is not requeued at once: that would spend its delivery limit
//! within a second. The worker publishes a copy, with confirms, into the
//! delay queue of its attempt ([`Topology::retry_route`]), and only then
//! acknowledges the original; the broker moves the copy back onto the
//! prelabel queue when its delay has passed. A crash between the publish and
//! the ack leaves two copies, and the second result is absorbed like any
//! redelivery. Past the last delay the job goes to the dead-letter queue with
//! its reason. The attempt count and the last error travel in headers.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::topology::{Route, Topology};

/// Which attempt this delivery of a job is (absent on the first).
pub const ATTEMPT_HEADER: &str = "sieve-attempt";
/// Why the previous attempt failed.
pub const ERROR_HEADER: &str = "sieve-error";
/// On a dead letter a worker published itself: the queue the job came from.
pub const DEAD_QUEUE_HEADER: &str = "sieve-dead-queue";
/// On a dead letter a worker published itself: why it gave up.
pub const DEAD_REASON_HEADER: &str = "sieve-dead-reason";
/// The reason of a job dead-lettered after its last retry failed too.
pub const RETRIES_EXHAUSTED: &str = "retries_exhausted";
/// How often workers put a job back for faults of their own (a model they
/// cannot load, a store they cannot read): counted apart from its attempts.
pub const OWN_FAULTS_HEADER: &str = "sieve-own-faults";
/// The reason of a job dead-lettered after [`OWN_FAULT_BUDGET`] workers in
/// a row could not run it for faults of their own.
pub const WORKER_FAULTS: &str = "worker_faults";
/// How often a job came back from a worker that took it and never answered
/// (it died, or its connection did) before this copy was made: the broker's
/// `x-delivery-count` does not survive a copy, so every copy a worker makes
/// carries the sum on (see [`returns`]).
pub const RETURNS_HEADER: &str = "sieve-returns";
/// The reason of a job dead-lettered by a worker because it came back
/// `broker.delivery_limit` times: workers died while it was in flight.
pub const QUARANTINED: &str = "quarantined";

/// How many times workers' own faults may put one job back. A worker's fault
/// must not spend the item's attempts (a misconfigured worker beside good
/// ones would dead-letter what the good ones can do), but neither may a job
/// no worker can run (a model broken everywhere) circle for ever.
pub const OWN_FAULT_BUDGET: u32 = 10;

/// Headers are bounded; an error message is kept to this many bytes.
const MAX_ERROR_BYTES: usize = 1000;

/// Which attempt a delivery is: 1 for a job's first delivery.
pub fn attempt(properties: &BasicProperties) -> u32 {
    header_count(properties, ATTEMPT_HEADER).unwrap_or(1).max(1)
}

/// How often a quorum queue delivered this message before and got it back
/// (its `x-delivery-count`): 0 on a first delivery.
pub fn delivery_count(properties: &BasicProperties) -> u32 {
    header_count(properties, "x-delivery-count").unwrap_or(0)
}

/// How often this job came back unanswered, over every copy of it: the
/// broker's count of this message plus what earlier copies carried.
pub fn returns(properties: &BasicProperties) -> u32 {
    delivery_count(properties).saturating_add(header_count(properties, RETURNS_HEADER).unwrap_or(0))
}

/// The headers of a copy of a job put back as it is, for later (not a
/// retry: no attempt spent), carrying how often it came back.
pub fn deferred(properties: &BasicProperties) -> FieldTable {
    own_headers(properties)
}

/// A header's value as a non-negative count, whatever integer type carried it.
fn header_count(properties: &BasicProperties, name: &str) -> Option<u32> {
    header(properties, name).and_then(|v| match v {
        AMQPValue::LongLongInt(n) => u32::try_from(n).ok(),
        AMQPValue::LongInt(n) => u32::try_from(n).ok(),
        AMQPValue::LongUInt(n) => Some(n),
        AMQPValue::ShortInt(n) => u32::try_from(n).ok(),
        AMQPValue::ShortUInt(n) => Some(u32::from(n)),
        _ => None,
    })
}

/// Where a job delivered with `properties` goes after this attempt failed
/// transiently with `error`, and the headers its copy carries there: the
/// next delay queue, or the dead-letter queue once the retries are used up.
/// The copy keeps the job's own headers (its dispatch priority), not the
/// broker's (`x-…`).
pub fn after_failure(
    topology: &Topology,
    properties: &BasicProperties,
    error: &str,
) -> (Route, FieldTable) {
    let attempt = attempt(properties);
    let mut headers = own_headers(properties);
    headers.insert(ERROR_HEADER.into(), text(truncate(error, MAX_ERROR_BYTES)));
    match topology.retry_route(attempt) {
        Some(route) => {
            headers.insert(
                ATTEMPT_HEADER.into(),
                AMQPValue::LongLongInt(i64::from(attempt) + 1),
            );
            (route, headers)
        }
        None => {
            headers.insert(
                ATTEMPT_HEADER.into(),
                AMQPValue::LongLongInt(attempt.into()),
            );
            headers.insert(DEAD_QUEUE_HEADER.into(), text(&topology.prelabel_queue()));
            headers.insert(DEAD_REASON_HEADER.into(), text(RETRIES_EXHAUSTED));
            (Route::Dead, headers)
        }
    }
}

/// Where a job delivered with `properties` goes after a worker could not run
/// it for a fault of its own (`error`), and the headers its copy carries:
/// a delay queue (by how often this happened to the job, not by its
/// attempts, which stay as they were), or the dead-letter queue, reason
/// [`WORKER_FAULTS`], once [`OWN_FAULT_BUDGET`] is spent.
pub fn after_own_fault(
    topology: &Topology,
    properties: &BasicProperties,
    error: &str,
) -> (Route, FieldTable) {
    let faults = header_count(properties, OWN_FAULTS_HEADER).unwrap_or(0) + 1;
    let mut headers = own_headers(properties);
    headers.insert(ERROR_HEADER.into(), text(truncate(error, MAX_ERROR_BYTES)));
    headers.insert(
        OWN_FAULTS_HEADER.into(),
        AMQPValue::LongLongInt(faults.into()),
    );
    let ladder = topology.retry_delays_ms().len() as u32;
    let delay = (faults <= OWN_FAULT_BUDGET)
        .then(|| topology.retry_route(faults.min(ladder)))
        .flatten();
    match delay {
        Some(route) => (route, headers),
        None => {
            headers.insert(DEAD_QUEUE_HEADER.into(), text(&topology.prelabel_queue()));
            headers.insert(DEAD_REASON_HEADER.into(), text(WORKER_FAULTS));
            (Route::Dead, headers)
        }
    }
}

/// A delivery's own headers (its dispatch priority, its retry counts),
/// without the broker's (`x-…`), and how often it came back so far
/// ([`returns`]), which a copy must not forget.
fn own_headers(properties: &BasicProperties) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(own) = properties.headers() {
        for (name, value) in own.inner() {
            if !name.as_str().starts_with("x-") {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    let returned = returns(properties);
    if returned > 0 {
        headers.insert(
            RETURNS_HEADER.into(),
            AMQPValue::LongLongInt(returned.into()),
        );
    }
    headers
}

/// The headers of a message a consumer dead-letters itself (rather than
/// rejecting it to the broker): the queue it came from, why, and the error,
/// so `sieve failed` lists it and `sieve failed retry` sends it back there.
pub fn dead_letter_headers(queue: &str, reason: &str, error: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(DEAD_QUEUE_HEADER.into(), text(queue));
    headers.insert(DEAD_REASON_HEADER.into(), text(reason));
    headers.insert(ERROR_HEADER.into(), text(truncate(error, MAX_ERROR_BYTES)));
    headers
}

/// The queue a dead letter came from and why it was dead-lettered:
/// `retries_exhausted` from a worker, or the broker's reason (`rejected`,
/// `delivery_limit`, ...) for its last death. The broker's `x-first-death-*`
/// headers are not enough: a job that went through a delay queue "died" there
/// first (expired), so its last death, the first entry of `x-death`, is the
/// one that counts.
pub fn origin(properties: &BasicProperties) -> (Option<String>, Option<String>) {
    let own = (
        header_text(properties, DEAD_QUEUE_HEADER),
        header_text(properties, DEAD_REASON_HEADER),
    );
    if own.0.is_some() {
        return own;
    }
    let last_death = match header(properties, "x-death") {
        Some(AMQPValue::FieldArray(deaths)) => deaths.as_slice().first().and_then(|d| match d {
            AMQPValue::FieldTable(t) => Some(t.clone()),
            _ => None,
        }),
        _ => None,
    };
    if let Some(death) = last_death {
        let field = |name: &str| death.inner().get(name).and_then(as_text);
        return (field("queue"), field("reason"));
    }
    (
        header_text(properties, "x-first-death-queue"),
        header_text(properties, "x-first-death-reason"),
    )
}

/// A header's value as text, when it is a string.
pub fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    header(properties, name).as_ref().and_then(as_text)
}

fn header(properties: &BasicProperties, name: &str) -> Option<AMQPValue> {
    properties.headers().as_ref()?.inner().get(name).cloned()
}

fn as_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.to_owned()))
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(headers: FieldTable) -> BasicProperties {
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn the_delivery_count_is_read_whatever_integer_carries_it() {
        assert_eq!(delivery_count(&BasicProperties::default()), 0);
        for value in [
            AMQPValue::LongLongInt(3),
            AMQPValue::LongInt(3),
            AMQPValue::LongUInt(3),
            AMQPValue::ShortInt(3),
            AMQPValue::ShortUInt(3),
        ] {
            let mut headers = FieldTable::default();
            headers.insert("x-delivery-count".into(), value.clone());
            assert_eq!(delivery_count(&with(headers)), 3, "{value:?}");
        }
        let mut negative = FieldTable::default();
        negative.insert("x-delivery-count".into(), AMQPValue::LongLongInt(-1));
        assert_eq!(delivery_count(&with(negative)), 0);
    }

    #[test]
    fn returns_survive_every_copy() {
        let t = Topology::new("sieve", 5).with_retry_delays(vec![1_000]);
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        let returned_twice = with(headers);
        assert_eq!(returns(&returned_twice), 2);
        // A copy made for later, and one for a retry, carry the two on; the
        // broker counts the copy's own returns from zero again.
        let mut copy = deferred(&returned_twice);
        assert_eq!(returns(&with(copy.clone())), 2);
        copy.insert("x-delivery-count".into(), AMQPValue::LongLongInt(1));
        assert_eq!(returns(&with(copy.clone())), 3);
        let (_, retried) = after_failure(&t, &with(copy), "timeout");
        assert_eq!(returns(&with(retried)), 3);
        assert_eq!(returns(&BasicProperties::default()), 0);
    }

    #[test]
    fn own_faults_spend_their_own_budget_not_the_attempts() {
        let t = Topology::new("sieve", 5).with_retry_delays(vec![1_000, 5_000]);
        let mut properties = BasicProperties::default();
        let mut routes = Vec::new();
        loop {
            let (route, headers) = after_own_fault(&t, &properties, "store not mounted");
            properties = with(headers);
            // The item's attempts are untouched, however often workers fail it.
            assert_eq!(attempt(&properties), 1);
            routes.push(route);
            if route == Route::Dead {
                break;
            }
        }
        assert_eq!(routes.len() as u32, OWN_FAULT_BUDGET + 1);
        assert_eq!(routes[0], Route::PrelabelRetry { delay_ms: 1_000 });
        assert_eq!(routes[1], Route::PrelabelRetry { delay_ms: 5_000 });
        assert_eq!(routes[9], Route::PrelabelRetry { delay_ms: 5_000 });
        assert_eq!(
            origin(&properties),
            (Some("sieve.prelabel".into()), Some(WORKER_FAULTS.into()))
        );
        // A transient failure after own faults starts the item's ladder.
        let mut once = FieldTable::default();
        once.insert(OWN_FAULTS_HEADER.into(), AMQPValue::LongLongInt(3));
        let (route, _) = after_failure(&t, &with(once), "timeout");
        assert_eq!(route, Route::PrelabelRetry { delay_ms: 1_000 });
    }

    #[test]
    fn attempts_count_up_then_dead_letter_with_the_reason() {
        let t = Topology::new("sieve", 5).with_retry_delays(vec![1_000, 5_000]);
        assert_eq!(attempt(&BasicProperties::default()), 1);

        let mut first = FieldTable::default();
        first.insert("sieve-priority".into(), AMQPValue::ShortShortUInt(5));
        first.insert("x-delivery-count".into(), AMQPValue::LongLongInt(0));
        let (route, headers) = after_failure(&t, &with(first), "object store timeout");
        assert_eq!(route, Route::PrelabelRetry { delay_ms: 1_000 });
        assert!(
            headers.contains_key("sieve-priority"),
            "its own headers kept"
        );
        assert!(
            !headers.contains_key("x-delivery-count"),
            "not the broker's"
        );
        let second = with(headers);
        assert_eq!(attempt(&second), 2);
        assert_eq!(
            header_text(&second, ERROR_HEADER).as_deref(),
            Some("object store timeout")
        );

        let (route, headers) = after_failure(&t, &second, "still down");
        assert_eq!(route, Route::PrelabelRetry { delay_ms: 5_000 });
        let third = with(headers);
        assert_eq!(attempt(&third), 3);

        let (route, headers) = after_failure(&t, &third, "still down");
        assert_eq!(route, Route::Dead);
        let dead = with(headers);
        assert_eq!(attempt(&dead), 3, "attempts made");
        assert_eq!(
            origin(&dead),
            (
                Some("sieve.prelabel".to_owned()),
                Some(RETRIES_EXHAUSTED.to_owned())
            )
        );
    }

    #[test]
    fn no_delays_means_dead_letter_at_the_first_transient_failure() {
        let t = Topology::new("sieve", 5).with_retry_delays(Vec::new());
        assert_eq!(
            after_failure(&t, &BasicProperties::default(), "x").0,
            Route::Dead
        );
    }

    #[test]
    fn the_last_death_names_the_origin_not_the_delay_queue() {
        let death = |queue: &str, reason: &str| {
            let mut t = FieldTable::default();
            t.insert("queue".into(), text(queue));
            t.insert("reason".into(), text(reason));
            AMQPValue::FieldTable(t)
        };
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(
                vec![
                    death("sieve.prelabel", "delivery_limit"),
                    death("sieve.prelabel.retry.1s", "expired"),
                ]
                .into(),
            ),
        );
        headers.insert(
            "x-first-death-queue".into(),
            text("sieve.prelabel.retry.1s"),
        );
        headers.insert("x-first-death-reason".into(), text("expired"));
        assert_eq!(
            origin(&with(headers)),
            (
                Some("sieve.prelabel".to_owned()),
                Some("delivery_limit".to_owned())
            )
        );

        let mut first_only = FieldTable::default();
        first_only.insert("x-first-death-queue".into(), text("sieve.results"));
        first_only.insert("x-first-death-reason".into(), text("rejected"));
        assert_eq!(
            origin(&with(first_only)),
            (
                Some("sieve.results".to_owned()),
                Some("rejected".to_owned())
            )
        );
    }

    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = truncate(&long, MAX_ERROR_BYTES);
        assert!(cut.len() <= MAX_ERROR_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
