//! A real S3 API for tests: moto's server (`moto_server`, from PyPI's
//! `moto[s3]`, installed by `ops/install-deps.sh`) on a free port, reached
//! through the `s3.*` settings exactly as a MinIO would be: endpoint,
//! region, key pair, plain HTTP allowed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sieve_shared::Settings;
use sieve_shared::settings::Secret;

/// Where `ops/install-deps.sh` puts moto's server.
const MOTO: &str = "/var/tmp/sieve-moto/bin/moto_server";

/// A moto S3 server of the test's own, stopped on drop (its buckets live
/// in its memory and go with it).
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub async fn start() -> Self {
        let binary = if Path::new(MOTO).exists() {
            PathBuf::from(MOTO)
        } else {
            PathBuf::from("moto_server")
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e}; ops/install-deps.sh installs moto's S3 server",
                    binary.display()
                )
            });
        let moto = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let started = Instant::now();
        while reqwest::get(&moto.endpoint).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "moto_server did not start"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        moto
    }

    pub async fn create_bucket(&self, bucket: &str) {
        let status = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success(), "creating bucket {bucket}: {status}");
    }

    /// Point `settings`' `s3.*` at this server.
    pub fn configure(&self, settings: &mut Settings) {
        settings.s3.endpoint = Some(self.endpoint.clone());
        settings.s3.allow_http = true;
        settings.s3.access_key_id = Some("AKIAMOTOTEST".into());
        settings.s3.secret_access_key = Some(Secret::new("moto-secret-key"));
    }

    /// Make sieve's store `s3://BUCKET/PREFIX` on this server (the bucket
    /// must exist), with `store.root` left pointing at a directory that
    /// nothing may write to.
    pub fn store_in(&self, settings: &mut Settings, bucket: &str, prefix: &str) {
        self.configure(settings);
        settings.store.url = Some(format!("s3://{bucket}/{prefix}"));
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}
