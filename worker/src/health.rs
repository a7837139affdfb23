//! The worker's health, as `/healthz` reports it.
//!
//! Healthy means the worker can do its work: both broker connections
//! (publish and consume) are connected and every consumer its capabilities
//! call for is subscribed on an open channel. Anything else is unhealthy,
//! with the reasons, so that an orchestrator's probe restarts a worker that
//! is stuck — a connection whose recovery gave up, a consumer that is gone —
//! instead of leaving it up and idle. A broker restart makes every worker
//! unhealthy for the seconds recovery takes; the probes' failure threshold
//! (`ops/k8s/worker.yaml`) is what tells a blip from a stuck worker.
//!
//! A `std::sync::Mutex`, not a Tokio one: it is held for a few pointer moves
//! and never across an `.await`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use lapin::{Channel, ChannelStatus, ConnectionStatus};
use serde::Serialize;

/// What `/healthz` answers.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Report {
    /// `ok` or `unavailable`.
    pub status: &'static str,
    /// Why the worker is unhealthy; empty when it is not.
    pub reasons: Vec<String>,
    /// Each broker connection's state (`connected`, `reconnecting`, ...).
    pub connections: BTreeMap<String, String>,
    /// Each consumer's state (`consuming`, `not started`, `gone`, ...).
    pub consumers: BTreeMap<String, String>,
}

impl Report {
    pub fn healthy(&self) -> bool {
        self.reasons.is_empty()
    }
}

enum Consumer {
    NotStarted,
    Consuming(ChannelStatus),
    Ended,
}

pub struct Health {
    connections: Vec<(&'static str, ConnectionStatus)>,
    consumers: Mutex<Vec<(&'static str, Consumer)>>,
    /// This worker's own faults, by what failed (`store`, `model`): what
    /// makes it unable to do jobs other workers can do. Set when a batch
    /// shows one, cleared by the next success.
    faults: Mutex<BTreeMap<&'static str, String>>,
}

impl Health {
    /// Watch these connections, and expect these consumers to subscribe.
    pub fn new(
        connections: Vec<(&'static str, ConnectionStatus)>,
        consumers: &[&'static str],
    ) -> Self {
        Self {
            connections,
            consumers: Mutex::new(
                consumers
                    .iter()
                    .map(|name| (*name, Consumer::NotStarted))
                    .collect(),
            ),
            faults: Mutex::new(BTreeMap::new()),
        }
    }

    /// This worker cannot do its jobs because of `what` (its store, a
    /// model it cannot load): unhealthy, with `reason`, until [`Health::clear`].
    pub fn fault(&self, what: &'static str, reason: String) {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        if faults.insert(what, reason.clone()).is_none() {
            tracing::warn!(%what, %reason, "this worker has a fault of its own; /healthz reports it");
        }
    }

    /// `what` works again.
    pub fn clear(&self, what: &'static str) {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        if faults.remove(what).is_some() {
            tracing::info!(%what, "this worker's fault cleared");
        }
    }

    fn set(&self, name: &'static str, state: Consumer) {
        let mut consumers = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        match consumers.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = state,
            None => consumers.push((name, state)),
        }
    }

    /// The consumer `name` moved to `channel` (its guard, from
    /// [`Health::consuming`], still marks it gone when dropped).
    pub fn moved(&self, name: &'static str, channel: &Channel) {
        self.set(name, Consumer::Consuming(channel.status().clone()));
    }

    /// The consumer `name` is subscribed on `channel`. It counts as gone
    /// once the returned guard drops (its loop ended, however it ended).
    #[must_use = "the consumer counts as gone when the guard drops"]
    pub fn consuming(&self, name: &'static str, channel: &Channel) -> Consuming<'_> {
        self.set(name, Consumer::Consuming(channel.status().clone()));
        Consuming { health: self, name }
    }

    pub fn report(&self) -> Report {
        let mut reasons = Vec::new();
        let connections = self
            .connections
            .iter()
            .map(|(name, status)| {
                let state = connection_state(status);
                if !status.connected() {
                    reasons.push(format!("the {name} connection to RabbitMQ is {state}"));
                }
                ((*name).to_owned(), state.to_owned())
            })
            .collect();
        let consumers = self
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, consumer)| {
                let state = match consumer {
                    Consumer::NotStarted => "not started",
                    Consumer::Ended => "gone",
                    Consumer::Consuming(channel) if channel.connected() => "consuming",
                    Consumer::Consuming(channel) if channel.reconnecting() => "reconnecting",
                    Consumer::Consuming(channel) if channel.initializing() => "opening",
                    Consumer::Consuming(_) => "closed",
                };
                if state != "consuming" {
                    reasons.push(format!("the {name} consumer is {state}"));
                }
                ((*name).to_owned(), state.to_owned())
            })
            .collect();
        reasons.extend(
            self.faults
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned(),
        );
        Report {
            status: if reasons.is_empty() {
                "ok"
            } else {
                "unavailable"
            },
            reasons,
            connections,
            consumers,
        }
    }
}

/// A subscribed consumer; marks it ended when dropped.
pub struct Consuming<'a> {
    health: &'a Health,
    name: &'static str,
}

impl Drop for Consuming<'_> {
    fn drop(&mut self) {
        self.health.set(self.name, Consumer::Ended);
    }
}

fn connection_state(status: &ConnectionStatus) -> &'static str {
    if status.connected() {
        "connected"
    } else if status.reconnecting() {
        "reconnecting"
    } else if status.connecting() {
        "connecting"
    } else if status.closing() {
        "closing"
    } else if status.closed() {
        "closed"
    } else if status.errored() {
        "failed"
    } else {
        "not connected"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_that_never_subscribed_or_ended_is_unhealthy() {
        // A default status is a connection that never connected.
        let health = Health::new(
            vec![("publish", ConnectionStatus::default())],
            &["prelabel"],
        );
        let report = health.report();
        assert_eq!(report.status, "unavailable");
        assert_eq!(
            report.reasons,
            [
                "the publish connection to RabbitMQ is not connected",
                "the prelabel consumer is not started"
            ]
        );
        health.set("prelabel", Consumer::Ended);
        assert!(
            health
                .report()
                .reasons
                .contains(&"the prelabel consumer is gone".to_owned())
        );
    }
}
