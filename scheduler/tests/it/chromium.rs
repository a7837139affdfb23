//! Headless Chromium for the pages' tests (`review_page.rs`,
//! `browse_page.rs`): chromedriver on a free port, a browser session on it,
//! keys pressed as a person would and scripts run in the page.
//!
//! Needs the Debian packages `chromium` and `chromium-driver`
//! (`ops/install-deps.sh` installs them); nothing is downloaded.

#![allow(clippy::unwrap_used)]

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// chromedriver on a free port; killed when dropped, even on a panic.
pub struct Driver {
    child: Child,
    port: u16,
    profile: tempfile::TempDir,
}

impl Driver {
    pub fn start() -> Self {
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start chromedriver ({e}): run ops/install-deps.sh (Debian packages chromium, chromium-driver)")
            });
        let driver = Self {
            child,
            port,
            profile: tempfile::tempdir().unwrap(),
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "chromedriver did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        driver
    }

    pub async fn browser(&self) -> Client {
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=1280,900".to_owned(),
            format!("--user-data-dir={}", self.profile.path().display()),
        ];
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .unwrap()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

pub async fn press(browser: &Client, keys: &[char]) {
    let mut actions = KeyActions::new("keyboard".into());
    for &key in keys {
        actions = actions
            .then(KeyAction::Down { value: key })
            .then(KeyAction::Up { value: key });
    }
    browser.perform_actions(actions).await.unwrap();
}

pub async fn js(browser: &Client, script: &str) -> Value {
    browser.execute(script, vec![]).await.unwrap()
}

pub async fn text(browser: &Client, id: &str) -> String {
    js(
        browser,
        &format!("return document.getElementById('{id}').textContent"),
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_owned()
}

/// The rules both pages keep, checked on their source: no sink that parses
/// data as HTML or code, data written with `textContent`, one script tag
/// (`script_src`), no inline style or event handler, nothing from another
/// origin.
pub fn assert_inert(name: &str, page: &str, script: &str, script_src: &str) {
    for sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "setAttribute('on",
    ] {
        assert!(!script.contains(sink), "{name}'s script uses {sink}");
    }
    assert!(script.contains("textContent"));
    // No inline script or style, which the CSP would block anyway.
    assert_eq!(page.matches("<script").count(), 1);
    assert!(page.contains(&format!("<script src=\"{script_src}\"")));
    assert!(!page.contains("style="));
    let handler = page
        .split(|c: char| c.is_whitespace() || c == '<')
        .find(|word| word.starts_with("on") && word.contains('='));
    assert_eq!(handler, None, "no inline event handlers in {name}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no CDN in {name}"
    );
}

/// Open a page at `url` (its `?project=` filled in from the address),
/// enter `token` and start, as a person does on either page.
pub async fn sign_in(browser: &Client, url: &str, project: &str, token: &str) {
    browser.goto(url).await.unwrap();
    let field = browser.find(Locator::Id("project")).await.unwrap();
    assert_eq!(field.prop("value").await.unwrap().as_deref(), Some(project));
    browser
        .find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    browser
        .find(Locator::Id("start"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}
