//! `broker.urls`: the nodes of a RabbitMQ cluster, tried in turn at every
//! (re)connect. Here one node is the real broker and the others are ports
//! nothing listens on (a node that is down), so whichever node a process
//! starts with, its connection ends up on the live one and carries
//! messages; with every node down, the error names them all. The failover
//! of a running fleet across a real three-node cluster is
//! `sieve-tools bench cluster` (docs/benchmarks.md).

#![allow(clippy::unwrap_used)]

use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use sieve_shared::Settings;
use sieve_shared::broker;

/// An address where nothing listens: a port bound, then released.
fn down_node() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

#[tokio::test]
async fn a_connection_finds_the_live_node_of_several() {
    let live = Settings::default().broker.url;
    let mut settings = Settings::default();
    // The live node in every position: a process starts at a node picked
    // by its id, and must get past the dead ones from any of them.
    for position in 0..3 {
        let mut nodes = vec![down_node(), down_node()];
        nodes.insert(position, live.clone());
        settings.broker.urls = nodes;
        let conn = broker::connect(&settings.broker, "nodes test")
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let queue = format!("test-nodes-{}", uuid::Uuid::now_v7().simple());
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                Default::default(),
                b"hello",
                Default::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("the message came back");
        assert_eq!(got.delivery.data, b"hello");
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .ok();
        conn.close(200, "bye".into()).await.ok();
    }

    settings.broker.urls = vec![down_node(), down_node()];
    let err = broker::connect(&settings.broker, "nodes test")
        .await
        .unwrap_err()
        .to_string();
    for node in &settings.broker.urls {
        let port = node.rsplit(':').next().unwrap().trim_end_matches("/%2f");
        assert!(err.contains(port), "{err} names {node}");
    }
}
