//! `sieve-worker` under SIGTERM, as a real process on the real broker: it
//! stops taking jobs, finishes and acknowledges its batch, and exits 0; every
//! job is either answered exactly once or still on the queue.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::io::Cursor;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sieve_shared::broker::{self, Publisher};
use sieve_shared::ids::{ItemId, JobId, ModelVersionId, ProjectId};
use sieve_shared::messages::{ModelRef, PrelabelJob, SCHEMA_VERSION, decode_results};
use sieve_shared::store::Store;
use sieve_shared::topology::Topology;
use sieve_worker::model::{ArchitectureConfig, Committee};
use sieve_worker::{artifact, backend};

const JOBS: usize = 3000;

fn noise_png(seed: usize) -> Vec<u8> {
    let img = image::GrayImage::from_fn(28, 28, |x, y| {
        image::Luma([((x as usize * 7 + y as usize * 13 + seed * 31) % 256) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

async fn ready(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_batch_acks_and_exits() {
    let sandbox = sieve_testkit::Sandbox::start(crate::sieve::worker_settings).await;
    let settings = sandbox.settings.clone();
    let store = Store::open(&settings.store).unwrap();
    let topology = Topology::new(&settings.broker.prefix, settings.broker.delivery_limit);
    let conn = broker::connect(&settings.broker, "drain test")
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    topology.declare(&channel).await.unwrap();

    let model =
        Committee::init(&ArchitectureConfig::small_cnn(10, 3), 1, &backend::device()).unwrap();
    let (bytes, checksum) = artifact::encode(&model).unwrap();
    store.put("models/m.bin", Bytes::from(bytes)).await.unwrap();
    let model = ModelRef {
        version_id: ModelVersionId::new(),
        version: 1,
        artifact_key: "models/m.bin".into(),
        checksum,
    };
    let project_id = ProjectId::new();
    let mut jobs = Vec::new();
    for i in 0..JOBS {
        let key = format!("images/{i}.png");
        store.put(&key, Bytes::from(noise_png(i))).await.unwrap();
        jobs.push(PrelabelJob {
            size_bytes: None,
            schema: SCHEMA_VERSION,
            job_id: JobId::new(),
            project_id,
            item_id: ItemId::new(),
            object_key: key,
            model: model.clone(),
        });
    }
    Publisher::new(&conn, topology.clone())
        .await
        .unwrap()
        .publish_all(&jobs)
        .await
        .unwrap();

    let mut worker = Command::new(env!("CARGO_BIN_EXE_sieve-worker"))
        .args([
            "--capabilities",
            "prelabel",
            "--batch-size",
            "8",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("SIEVE_BROKER__PREFIX", &settings.broker.prefix)
        .env("SIEVE_REDIS__PREFIX", &settings.redis.prefix)
        .env("SIEVE_STORE__ROOT", sandbox.store.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    let (_c, mut results) = broker::consume(&conn, &topology.results_queue(), 500, "drain-test")
        .await
        .unwrap();
    let mut answered = HashSet::new();
    // Let it work, then ask it to stop mid-stream.
    while answered.len() < 16 {
        let delivery = tokio::time::timeout(Duration::from_secs(60), results.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        for result in decode_results(&delivery.data).unwrap() {
            assert!(answered.insert(result.job_id), "a job answered twice");
        }
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let signalled = Instant::now();
    Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(30),
            "worker did not exit within its drain deadline"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "drained worker exits 0, got {status:?}");

    // Collect what it published before exiting, then account for every job.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_millis(300), results.next()).await
        {
            for result in decode_results(&delivery.data).unwrap() {
                assert!(answered.insert(result.job_id), "a job answered twice");
            }
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        let left = ready(&channel, &topology.prelabel_queue()).await as usize;
        println!(
            "after SIGTERM: {} answered, {left} still queued, {JOBS} published",
            answered.len()
        );
        if answered.len() + left == JOBS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "jobs lost: {} answered + {left} queued != {JOBS}",
            answered.len()
        );
    }
    assert!(
        answered.len() < JOBS,
        "the worker stopped before the queue was empty"
    );
    assert!(
        answered
            .iter()
            .all(|id| jobs.iter().any(|j| j.job_id == *id))
    );
    // What it held and had not started went back as it was, not counted as
    // returned by a worker that died on it (the next worker would run each
    // alone, and the delivery limit would near for nothing). Only what the
    // broker had on its way when the consumer was cancelled, at most the
    // refill after one batch's acknowledgement, returns with the channel;
    // before, all it held did (its prefetch, 24 here).
    let mut returned = 0;
    while let Some(message) = channel
        .basic_get(
            topology.prelabel_queue().as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        returned += u32::from(sieve_shared::retry::returns(&message.delivery.properties) > 0);
    }
    assert!(
        returned <= 8,
        "{returned} jobs counted as returned after a clean drain (batch size 8)"
    );

    conn.close(200, "bye".into()).await.ok();
}
