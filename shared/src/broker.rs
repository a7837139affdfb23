//! RabbitMQ connections, the confirming publisher, and consumers.
//!
//! One connection for publishing and one for consuming (a slow consumer must
//! not hold back confirms), a channel per consumer. Connections recover by
//! themselves (lapin's auto-recovery re-declares, re-applies QoS and
//! re-subscribes).

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::tcp::AMQPUriTcpExt;
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Unreachable, redact_url};
use crate::messages::{Message, encode};
use crate::settings::BrokerSettings;
use crate::topology::{Route, Topology};

/// Open a connection to the broker (`broker.url`, or the nodes of a cluster
/// in `broker.urls`), naming it so that operators can tell the fleet's
/// connections apart in the management UI.
///
/// Every (re)connect tries the nodes in turn, starting with the one the
/// connection last reached (a process starts at a node picked by its id,
/// which spreads a fleet over the cluster): a connection that loses its node
/// recovers on another, and lapin's auto-recovery then re-declares,
/// re-applies QoS and re-subscribes there. The nodes must share the user
/// and virtual host of the first URL, as a cluster's nodes do.
pub async fn connect(settings: &BrokerSettings, name: &str) -> Result<Connection, Unreachable> {
    let urls = settings.nodes();
    let shown: Vec<String> = urls.iter().map(|url| redact_url(url)).collect();
    let shown = shown.join(", ");
    let nodes = urls
        .iter()
        .map(|url| {
            url.parse::<AMQPUri>()
                .map_err(|err| Unreachable::new("RabbitMQ", url, err))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let start = std::process::id() as usize % nodes.len();
    let runtime = lapin::runtime::default_runtime()
        .map_err(|err| Unreachable::new("RabbitMQ", &shown, err))?;
    let properties = ConnectionProperties::default()
        .with_connection_name(name.to_owned().into())
        .enable_auto_recover();
    let first = nodes[start].clone();
    let nodes = Arc::new(nodes);
    let next = Arc::new(AtomicUsize::new(start));
    let connecting = Connection::connector(
        first,
        runtime,
        async move |_uri, runtime| {
            let start = next.load(Ordering::Relaxed);
            let mut last = std::io::Error::other("no broker node configured");
            for k in 0..nodes.len() {
                let i = (start + k) % nodes.len();
                let node = &nodes[i];
                match node
                    .connect_with_config_async(lapin::tcp::TLSConfig::default(), &runtime)
                    .await
                {
                    Ok(stream) => {
                        if i != start {
                            tracing::warn!(node = %node.authority.host, port = node.authority.port, "connected to another broker node");
                        }
                        next.store(i, Ordering::Relaxed);
                        return Ok(stream);
                    }
                    Err(err) => {
                        tracing::warn!(node = %node.authority.host, port = node.authority.port, error = %err, "broker node unreachable");
                        last = err;
                    }
                }
            }
            Err(last.into())
        },
        properties,
    );
    // Auto-recovery would retry a first connection forever; a command that
    // cannot reach the broker must say so instead of hanging.
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(connected) => connected.map_err(|err| Unreachable::new("RabbitMQ", &shown, err)),
        Err(_) => Err(Unreachable::new(
            "RabbitMQ",
            &shown,
            format!("no answer within {CONNECT_TIMEOUT:?}"),
        )),
    }
}

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a publish keeps waiting for a dropped connection to recover
/// before it reports the failure.
pub const RECOVERY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker error while publishing to {target}: {source}")]
    Broker {
        target: String,
        source: lapin::Error,
    },
    #[error("the broker refused (nacked) a message to {0}")]
    Nacked(String),
    #[error("a message to {0} was unroutable: the queue does not exist")]
    Unroutable(String),
}

/// Publishes with confirms and waits for them: when `publish*` returns `Ok`,
/// the broker has the messages durably.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    topology: Topology,
}

impl Publisher {
    pub async fn new(connection: &Connection, topology: Topology) -> lapin::Result<Self> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel, topology })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub async fn publish<M: Message>(&self, message: &M) -> Result<(), PublishError> {
        self.publish_all(std::slice::from_ref(message)).await
    }

    /// Publish many messages with their confirms pipelined: all are sent, then
    /// all confirms awaited, instead of one round trip per message.
    pub async fn publish_all<M: Message>(&self, messages: &[M]) -> Result<(), PublishError> {
        let payloads: Vec<Vec<u8>> = messages.iter().map(encode).collect();
        self.publish_payloads(M::ROUTE, &payloads, None).await
    }

    /// Publish pre-encoded payloads (replaying a dead letter, tests that
    /// inject malformed messages), all with the same headers.
    pub async fn publish_payloads(
        &self,
        route: Route,
        payloads: &[Vec<u8>],
        headers: Option<FieldTable>,
    ) -> Result<(), PublishError> {
        let messages: Vec<(&[u8], Option<&FieldTable>)> = payloads
            .iter()
            .map(|p| (p.as_slice(), headers.as_ref()))
            .collect();
        self.publish_with_headers(route, &messages).await
    }

    /// Publish pre-encoded payloads, each with its own headers (a retried
    /// job carries its attempt and last error), confirms pipelined.
    ///
    /// A broker error that auto-recovery can mend (the connection dropped,
    /// the broker restarting) is not returned at once: the publish waits for
    /// the channel to recover and sends the whole set again, with backoff,
    /// for up to [`RECOVERY_DEADLINE`]. Messages confirmed before the failure
    /// may so be sent twice; every consumer is idempotent.
    pub async fn publish_with_headers(
        &self,
        route: Route,
        messages: &[(&[u8], Option<&FieldTable>)],
    ) -> Result<(), PublishError> {
        let started = std::time::Instant::now();
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            let error = match self.try_publish(route, messages).await {
                Err(PublishError::Broker { target, source })
                    if source.can_be_recovered() && started.elapsed() < RECOVERY_DEADLINE =>
                {
                    PublishError::Broker { target, source }
                }
                done => return done,
            };
            tracing::warn!(error = %error, retry_in = ?backoff, "publish failed; waiting for the broker connection to recover");
            if let PublishError::Broker { source, .. } = error {
                // Returns at once when the error carries no recovery to wait
                // for; the sleep below then paces the retries.
                let _ = tokio::time::timeout(
                    RECOVERY_DEADLINE.saturating_sub(started.elapsed()),
                    self.channel.wait_for_recovery(source),
                )
                .await;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
        }
    }

    async fn try_publish(
        &self,
        route: Route,
        messages: &[(&[u8], Option<&FieldTable>)],
    ) -> Result<(), PublishError> {
        let (exchange, routing_key) = self.topology.address(route);
        let target = if exchange.is_empty() {
            routing_key.clone()
        } else {
            exchange.clone()
        };
        let broker = |source| PublishError::Broker {
            target: target.clone(),
            source,
        };
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let options = BasicPublishOptions {
            mandatory: route.mandatory(),
            ..BasicPublishOptions::default()
        };

        let mut confirms = Vec::with_capacity(messages.len());
        for (payload, headers) in messages {
            let properties = match headers {
                Some(headers) => properties.clone().with_headers((*headers).clone()),
                None => properties.clone(),
            };
            let confirm = self
                .channel
                .basic_publish(
                    exchange.clone().into(),
                    routing_key.clone().into(),
                    options,
                    payload,
                    properties,
                )
                .await
                .map_err(broker)?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            match confirm.await.map_err(broker)? {
                // A returned mandatory message is still acked by the broker:
                // it was accepted, then dropped for want of a queue.
                Confirmation::Ack(Some(_)) => return Err(PublishError::Unroutable(target)),
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                Confirmation::Nack(_) => return Err(PublishError::Nacked(target)),
            }
        }
        Ok(())
    }
}

/// The next delivery of `consumer` (of `queue`), or `None` once `stop` is
/// cancelled: the head of every consumer loop. A delivery error is logged
/// and skipped (the channel recovers by itself, and what it held returns);
/// the broker cancelling the consumer is an error, so the loop ends and the
/// process says why.
pub async fn next_delivery(
    consumer: &mut Consumer,
    queue: &str,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Option<lapin::message::Delivery>> {
    use futures_util::StreamExt;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(None),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => return Ok(Some(delivery)),
                Some(Err(err)) => tracing::warn!(error = %err, queue, "consumer error"),
                None => anyhow::bail!("the {queue} consumer was cancelled by the broker"),
            },
        }
    }
}

/// A consumer on its own channel, with manual acks and the given prefetch.
pub async fn consume(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
    tag: &str,
) -> lapin::Result<(Channel, Consumer)> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

/// Ready messages and consumers of a queue, by a passive declare on a
/// channel of its own (a missing queue closes the channel it is asked on).
pub async fn queue_counts(connection: &Connection, queue: &str) -> lapin::Result<(u32, u32)> {
    let channel = connection.create_channel().await?;
    let q = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    if q.is_ok() {
        channel.close(200, "done".into()).await.ok();
    }
    let q = q?;
    Ok((q.message_count(), q.consumer_count()))
}

/// How many times a quorum queue has delivered this message before (the
/// `x-delivery-count` header), so a handler can tell a retry from a first try.
pub fn delivery_count(properties: &BasicProperties) -> i64 {
    use lapin::types::AMQPValue;
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned())
        .map(|v| match v {
            AMQPValue::LongLongInt(n) => n,
            AMQPValue::LongInt(n) => i64::from(n),
            AMQPValue::ShortInt(n) => i64::from(n),
            AMQPValue::LongUInt(n) => i64::from(n),
            _ => 0,
        })
        .unwrap_or(0)
}
