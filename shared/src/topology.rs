//! The RabbitMQ topology (DESIGN §4), declared in one place.
//!
//! Every name is derived from a prefix (`sieve` by default, giving
//! `sieve.prelabel`, `sieve.results`, ...), so that tests and several
//! deployments can share one broker without seeing each other's messages.
//! Declaring is idempotent: both services declare on start-up, whichever comes
//! first creates.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

/// Where a message type travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Prelabel,
    Results,
    Train,
    TrainEvents,
    Control,
    Dead,
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
}

impl Topology {
    pub fn new(prefix: impl Into<String>, delivery_limit: u32) -> Self {
        Self {
            prefix: prefix.into(),
            delivery_limit,
        }
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
            Route::Dead => (String::new(), self.dead_queue()),
            Route::Control => (self.control_exchange(), String::new()),
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
        channel
            .queue_declare(
                self.dead_queue().into(),
                queue,
                self.quorum_arguments(false),
            )
            .await?;
        channel
            .queue_bind(
                self.dead_queue().into(),
                self.dead_letter_exchange().into(),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

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
        Ok(())
    }

    /// Remove everything [`Topology::declare`] made. For tests and teardown of
    /// a throw-away prefix; never call this on a production prefix.
    pub async fn delete(&self, channel: &Channel) -> lapin::Result<()> {
        let mut queues = self.work_queues().to_vec();
        queues.push(self.dead_queue());
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
}
