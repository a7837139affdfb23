//! The control listener: each worker binds its own exclusive queue to the
//! control fanout and hands activation notices to the prediction loop, which
//! loads the new version between batches; cancelled training runs are
//! remembered for the training loop.

use std::sync::Arc;

use anyhow::Context as _;
use futures_util::StreamExt;
use lapin::Connection;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sieve_shared::messages::{ControlCommand, ControlMessage, ModelRef, decode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::context::Worker;

pub async fn run(
    worker: Arc<Worker>,
    connection: Arc<Connection>,
    activations: mpsc::Sender<ModelRef>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    let queue_name = format!("{}.control.{}", worker.topology().prefix(), worker.id);
    channel
        .queue_declare(
            queue_name.clone().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("declaring the control queue")?;
    channel
        .queue_bind(
            queue_name.clone().into(),
            worker.topology().control_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue_name.into(),
            format!("{}-control", worker.id).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _consuming = worker.health.consuming("control", &channel);
    loop {
        let delivery = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            next = consumer.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "control consumer error");
                    continue;
                }
                None => anyhow::bail!("the control consumer was cancelled by the broker"),
            },
        };
        match decode::<ControlMessage>(&delivery.data) {
            Ok(ControlMessage {
                command: ControlCommand::Activate { project_id, model },
                ..
            }) => {
                tracing::info!(project = %project_id, version = model.version, "activation notice");
                // A full channel only means the loop has notices to catch up on.
                let _ = activations.try_send(model);
            }
            Ok(ControlMessage {
                command: ControlCommand::CancelTraining { run_id },
                ..
            }) => {
                tracing::info!(run = %run_id, "training run cancelled");
                worker.cancel_run(run_id);
            }
            Err(err) => tracing::warn!(error = %err, "ignoring an undecodable control message"),
        }
        let _ = delivery.ack(BasicAckOptions::default()).await;
    }
}
