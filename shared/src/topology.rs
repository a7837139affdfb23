//! The RabbitMQ topology (DESIGN §4), declared in one place.
//!
//! Every name is derived from a prefix (`sieve` by default, giving
//! `sieve.prelabel`, `sieve.results`, ...), so that tests and several
//! deployments can share one broker without seeing each other's messages.
//! Declaring is idempotent: both services declare on start-up, whichever comes
//! first creates.
//!
//! Transient failures of prediction jobs wait in **delay queues**, one per
//! configured delay (`sieve.prelabel.retry.5s`, ...): a quorum queue with a
//! per-queue message TTL and no consumer, whose expired messages are
//! dead-lettered (at-least-once) back onto `sieve.prelabel`. One TTL per
//! queue, not per message: every message in a queue expires in the order it
//! arrived, so none waits behind a longer-lived one (RabbitMQ expires
//! messages only from the head of a queue). The delay is in the queue's name,
//! so changing `broker.retry_delays_ms` declares new queues instead of
//! redeclaring old ones with other arguments (which RabbitMQ refuses).

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::settings::BrokerSettings;

/// Where a message type travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Prelabel,
    Results,
    Train,
    TrainEvents,
    Control,
    Dead,
    /// The delay queue that holds a prediction job for `delay_ms` before it
    /// returns to `sieve.prelabel`.
    PrelabelRetry {
        delay_ms: u64,
    },
}

impl Route {
    /// Work queues are `mandatory`: an unroutable job is an error, never a
    /// silent drop. The control fanout may legitimately have no listener (no
    /// worker running), and workers learn the model from each job anyway.
    pub fn mandatory(self) -> bool {
        !matches!(self, Route::Control)
    }
}

/// Consumers on the training queue hold a job for as long as training takes;
/// RabbitMQ's default consumer timeout (30 min) would cancel them.
const TRAIN_CONSUMER_TIMEOUT_MS: i64 = 6 * 60 * 60 * 1000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    delivery_limit: u32,
    /// Waits before the 1st, 2nd, ... retry of a transiently failed job.
    retry_delays_ms: Vec<u64>,
}

impl Topology {
    /// The topology of a prefix, with the default retry delays.
    pub fn new(prefix: impl Into<String>, delivery_limit: u32) -> Self {
        Self {
            prefix: prefix.into(),
            delivery_limit,
            retry_delays_ms: BrokerSettings::default().retry_delays_ms,
        }
    }

    /// The topology the settings describe.
    pub fn from_settings(broker: &BrokerSettings) -> Self {
        Self::new(&broker.prefix, broker.delivery_limit)
            .with_retry_delays(broker.retry_delays_ms.clone())
    }

    pub fn with_retry_delays(mut self, delays_ms: Vec<u64>) -> Self {
        self.retry_delays_ms = delays_ms;
        self
    }

    pub fn retry_delays_ms(&self) -> &[u64] {
        &self.retry_delays_ms
    }

    /// Where the retry after the `attempt`-th failed attempt (1-based) waits,
    /// or `None` when the retries are used up.
    pub fn retry_route(&self, attempt: u32) -> Option<Route> {
        let index = usize::try_from(attempt).ok()?.checked_sub(1)?;
        self.retry_delays_ms
            .get(index)
            .map(|&delay_ms| Route::PrelabelRetry { delay_ms })
    }

    /// The delay queue for `delay_ms`: `sieve.prelabel.retry.30s`.
    pub fn retry_queue(&self, delay_ms: u64) -> String {
        let delay = if delay_ms.is_multiple_of(1000) {
            format!("{}s", delay_ms / 1000)
        } else {
            format!("{delay_ms}ms")
        };
        format!("{}.{delay}", self.retry_queue_prefix())
    }

    /// What every delay queue's name starts with.
    pub fn retry_queue_prefix(&self) -> String {
        self.name("prelabel.retry")
    }

    /// The delay queues, one per distinct delay, shortest first.
    pub fn retry_queues(&self) -> Vec<String> {
        let mut delays = self.retry_delays_ms.clone();
        delays.sort_unstable();
        delays.dedup();
        delays.into_iter().map(|d| self.retry_queue(d)).collect()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    pub fn prelabel_queue(&self) -> String {
        self.name("prelabel")
    }
    pub fn results_queue(&self) -> String {
        self.name("results")
    }
    pub fn train_queue(&self) -> String {
        self.name("train")
    }
    pub fn train_events_queue(&self) -> String {
        self.name("train.events")
    }
    pub fn control_exchange(&self) -> String {
        self.name("control")
    }
    pub fn dead_letter_exchange(&self) -> String {
        self.name("dlx")
    }
    pub fn dead_queue(&self) -> String {
        self.name("dead")
    }
    /// A copy of every dead letter, for the scheduler: it marks the item of
    /// a dead-lettered job (so nothing sends it again until someone acts)
    /// and fails the run of a dead-lettered train job. `dead` itself is
    /// left for operators to list, retry and purge.
    pub fn dead_notices_queue(&self) -> String {
        self.name("dead.notices")
    }

    /// Work queues, in the order they are declared.
    pub fn work_queues(&self) -> [String; 4] {
        [
            self.prelabel_queue(),
            self.results_queue(),
            self.train_queue(),
            self.train_events_queue(),
        ]
    }

    /// The exchange and routing key a route publishes to.
    pub fn address(&self, route: Route) -> (String, String) {
        match route {
            Route::Prelabel => (String::new(), self.prelabel_queue()),
            Route::Results => (String::new(), self.results_queue()),
            Route::Train => (String::new(), self.train_queue()),
            Route::TrainEvents => (String::new(), self.train_events_queue()),
            // Through the fanout, like the broker's own dead letters, so the
            // notices queue sees them too.
            Route::Dead => (self.dead_letter_exchange(), String::new()),
            Route::Control => (self.control_exchange(), String::new()),
            Route::PrelabelRetry { delay_ms } => (String::new(), self.retry_queue(delay_ms)),
        }
    }

    fn quorum_arguments(&self, dead_letter: bool) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), string("quorum"));
        if dead_letter {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(self.delivery_limit as i32),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                string(&self.dead_letter_exchange()),
            );
            // At-least-once dead-lettering: a poison message is never dropped
            // on its way to the dead-letter queue. Requires reject-publish.
            args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
            args.insert("x-overflow".into(), string("reject-publish"));
        }
        args
    }

    /// Declare every exchange, queue and binding. Safe to call repeatedly and
    /// from several processes at once.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.dead_letter_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.control_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;

        let queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        for name in [self.dead_queue(), self.dead_notices_queue()] {
            channel
                .queue_declare(name.clone().into(), queue, self.quorum_arguments(false))
                .await?;
            channel
                .queue_bind(
                    name.into(),
                    self.dead_letter_exchange().into(),
                    ShortString::from(""),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }

        for name in [self.prelabel_queue(), self.results_queue()] {
            channel
                .queue_declare(name.into(), queue, self.quorum_arguments(true))
                .await?;
        }
        let mut train = self.quorum_arguments(true);
        train.insert(
            "x-consumer-timeout".into(),
            AMQPValue::LongLongInt(TRAIN_CONSUMER_TIMEOUT_MS),
        );
        channel
            .queue_declare(self.train_queue().into(), queue, train)
            .await?;
        channel
            .queue_declare(
                self.train_events_queue().into(),
                queue,
                // Dead-lettered too: a poison event must be kept, not dropped.
                self.quorum_arguments(true),
            )
            .await?;
        let mut delays = self.retry_delays_ms.clone();
        delays.sort_unstable();
        delays.dedup();
        for delay_ms in delays {
            channel
                .queue_declare(
                    self.retry_queue(delay_ms).into(),
                    queue,
                    self.delay_arguments(delay_ms),
                )
                .await?;
        }
        Ok(())
    }

    /// A delay queue: no consumer; each message expires after `delay_ms` and
    /// is dead-lettered, through the default exchange, onto the prelabel
    /// queue. At-least-once dead-lettering, so an expiring job is never
    /// dropped on its way back (quorum queues, RabbitMQ 3.10+).
    fn delay_arguments(&self, delay_ms: u64) -> FieldTable {
        let mut args = self.quorum_arguments(false);
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(delay_ms).unwrap_or(i64::MAX)),
        );
        args.insert("x-dead-letter-exchange".into(), string(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            string(&self.prelabel_queue()),
        );
        args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
        args.insert("x-overflow".into(), string("reject-publish"));
        args
    }

    /// Remove everything [`Topology::declare`] made. For tests and teardown of
    /// a throw-away prefix; never call this on a production prefix.
    pub async fn delete(&self, channel: &Channel) -> lapin::Result<()> {
        let mut queues = self.work_queues().to_vec();
        queues.push(self.dead_queue());
        queues.push(self.dead_notices_queue());
        queues.extend(self.retry_queues());
        for name in queues {
            channel
                .queue_delete(name.into(), QueueDeleteOptions::default())
                .await?;
        }
        for name in [self.control_exchange(), self.dead_letter_exchange()] {
            channel
                .exchange_delete(name.into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prefix_gives_the_design_names() {
        let t = Topology::new("sieve", 5);
        assert_eq!(t.prelabel_queue(), "sieve.prelabel");
        assert_eq!(t.results_queue(), "sieve.results");
        assert_eq!(t.train_queue(), "sieve.train");
        assert_eq!(t.train_events_queue(), "sieve.train.events");
        assert_eq!(t.control_exchange(), "sieve.control");
        assert_eq!(t.dead_letter_exchange(), "sieve.dlx");
        assert_eq!(t.dead_queue(), "sieve.dead");
        assert_eq!(
            t.address(Route::Control),
            ("sieve.control".to_owned(), String::new())
        );
    }

    #[test]
    fn each_retry_waits_in_the_queue_of_its_delay() {
        let t = Topology::new("sieve", 5).with_retry_delays(vec![500, 5_000, 5_000, 60_000]);
        assert_eq!(t.retry_route(0), None);
        assert_eq!(
            t.retry_route(1),
            Some(Route::PrelabelRetry { delay_ms: 500 })
        );
        assert_eq!(
            t.address(t.retry_route(2).expect("a second retry")),
            (String::new(), "sieve.prelabel.retry.5s".to_owned())
        );
        assert_eq!(
            t.retry_route(4),
            Some(Route::PrelabelRetry { delay_ms: 60_000 })
        );
        assert_eq!(t.retry_route(5), None, "four retries, then dead-lettered");
        assert_eq!(
            t.retry_queues(),
            [
                "sieve.prelabel.retry.500ms",
                "sieve.prelabel.retry.5s",
                "sieve.prelabel.retry.60s"
            ],
            "one queue per distinct delay"
        );
        assert!(t.retry_queue(500).starts_with(&t.retry_queue_prefix()));
    }
}
