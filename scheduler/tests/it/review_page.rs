//! The review page at `/review`: its security headers and static rules, and
//! a reviewer's session in headless Chromium (driven through chromedriver
//! by WebDriver): token, claim, label with a digit and Enter, accept a
//! pre-label, undo, skip, the lease kept alive, a hostile class name shown
//! as text.
//!
//! Needs the Debian packages `chromium` and `chromium-driver`
//! (`ops/install-deps.sh` installs them); nothing is downloaded.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use fantoccini::Client;
use fantoccini::key::Key;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::json;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::label::{self, LabelSource};
use sieve_scheduler::entities::review_task::TaskState;
use sieve_testkit::{App, eventually, with_app};
use uuid::Uuid;

use super::chromium::{Driver, assert_inert, js, press, sign_in, text};

const SCRIPT: &str = include_str!("../../assets/review.js");
const PAGE: &str = include_str!("../../assets/review.html");

/// A class name that would run script if the page ever parsed data as HTML.
const HOSTILE: &str = "<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script>";

#[test]
fn the_page_never_turns_data_into_html() {
    assert_inert("review", PAGE, SCRIPT, "/review/review.js");
}

#[tokio::test]
async fn the_page_is_served_with_security_headers() {
    with_app(300, |app| async move {
        for (path, content_type) in [
            ("/review", "text/html; charset=utf-8"),
            ("/review/review.js", "text/javascript; charset=utf-8"),
            ("/review/review.css", "text/css; charset=utf-8"),
        ] {
            let response = app.http.get(app.url(path)).send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            let headers = response.headers();
            assert_eq!(headers["content-type"], content_type);
            let csp = headers["content-security-policy"].to_str().unwrap();
            for rule in [
                "default-src 'self'",
                "img-src 'self' blob:",
                "script-src 'self'",
                "frame-ancestors 'none'",
                "object-src 'none'",
            ] {
                assert!(csp.contains(rule), "{path}: {csp} lacks {rule}");
            }
            assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
            assert_eq!(headers["x-content-type-options"], "nosniff");
            assert_eq!(headers["referrer-policy"], "no-referrer");
            assert_eq!(headers["x-frame-options"], "DENY");
        }
        // The page itself is public; what it shows needs a token.
        let response = app
            .http
            .post(app.url("/api/v1/projects/any/review/next"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    })
    .await;
}

/// Wait until the page shows the task of `source`, its image loaded.
async fn shows(browser: &Client, source: &str) {
    let start = Instant::now();
    loop {
        let state = js(
            browser,
            "const i = document.getElementById('image');
             return [document.getElementById('source').textContent,
                     document.getElementById('task').checkVisibility(),
                     i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:')]",
        )
        .await;
        if state == json!([source, true, true]) {
            return;
        }
        let status = text(browser, "status").await;
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the page does not show {source} with its image: {state} (status: {status:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn human_label(app: &App, task: Uuid) -> Option<label::Model> {
    label::Entity::find()
        .filter(label::Column::ReviewTaskId.eq(task))
        .one(app.db())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reviewer_labels_from_the_keyboard_in_chromium() {
    // A 6 s lease, renewed every 2 s by the page.
    with_app(6, |app| async move {
        let started = Instant::now();
        let classes = ["cat", HOSTILE, "dog"];
        let seeded = app.seed("pets", &classes, 3).await;
        let [first, second, third] = [0, 1, 2].map(|i| seeded.tasks[i].clone());
        let token = app.token("alice", Role::Reviewer).await;

        let driver = Driver::start();
        let browser = driver.browser().await;
        let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(session(
            &app,
            &browser,
            &token,
            [&first, &second, &third],
        )))
        .await;
        browser.close().await.ok();
        drop(driver);
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
        println!("browser session took {:?}", started.elapsed());
    })
    .await;
}

async fn session(app: &App, browser: &Client, token: &str, tasks: [&sieve_testkit::SeededTask; 3]) {
    let [first, second, third] = tasks;
    sign_in(browser, &app.url("/review?project=pets"), "pets", token).await;

    // The first task, large, with its pre-label and the top classes.
    shows(browser, &first.source).await;
    assert_eq!(
        js(
            browser,
            "return ['login', 'skip-form', 'empty']
                .map((id) => document.getElementById(id).checkVisibility())"
        )
        .await,
        json!([false, false, false]),
        "only the task is on screen"
    );
    assert!(text(browser, "prelabel").await.contains("cat"));
    assert_eq!(
        js(
            browser,
            "return document.querySelectorAll('#topk li').length"
        )
        .await,
        json!(3)
    );
    assert!(text(browser, "votes").await.contains("2 × cat"));
    // The token stays in the tab, never in the URL.
    assert_eq!(
        js(
            browser,
            "return sessionStorage.getItem('sieve.review.token')"
        )
        .await,
        json!(token)
    );
    assert!(
        !browser
            .current_url()
            .await
            .unwrap()
            .as_str()
            .contains(token)
    );
    // The hostile class name is text: no element made of it, no script ran.
    assert_eq!(
        js(
            browser,
            "return document.querySelector('#classes button[data-index=\"1\"] .name').textContent"
        )
        .await,
        json!(HOSTILE)
    );
    assert_eq!(
        js(
            browser,
            "return [document.querySelectorAll('#classes img, #classes script').length, typeof window.__pwned]"
        )
        .await,
        json!([0, "undefined"])
    );
    // All three tasks are counted: this one, the preloaded one, one open.
    eventually(
        "the count of what is left",
        Duration::from_secs(10),
        || async { (text(browser, "remaining").await == "3 left").then_some(()) },
    )
    .await;

    // 3 picks "dog"; Enter submits it.
    press(browser, &['3']).await;
    assert!(text(browser, "accept").await.contains("dog"));
    press(browser, &[Key::Enter.into()]).await;
    let labeled = eventually("the first label", Duration::from_secs(10), || {
        human_label(app, first.task_id)
    })
    .await;
    assert_eq!(labeled.class_index, Some(2));
    assert_eq!(labeled.source, LabelSource::Human);
    assert_eq!(labeled.reviewer.as_deref(), Some("alice"));

    // The preloaded second task; Enter alone accepts its pre-label.
    shows(browser, &second.source).await;
    assert_eq!(second.proposed, 1);
    press(browser, &[Key::Enter.into()]).await;
    let accepted = eventually("the accepted pre-label", Duration::from_secs(10), || {
        human_label(app, second.task_id)
    })
    .await;
    assert_eq!(accepted.class_index, Some(1));

    // U takes it back: the label is gone and the task is shown again.
    shows(browser, &third.source).await;
    press(browser, &['u']).await;
    shows(browser, &second.source).await;
    assert!(human_label(app, second.task_id).await.is_none());
    let reopened = app.task(second.task_id).await;
    assert_eq!(reopened.state, TaskState::Claimed);
    assert_eq!(reopened.lease_holder.as_deref(), Some("alice"));
    let item = item::Entity::find_by_id(second.item_id)
        .one(app.db())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(item.state, ItemState::InReview);
    // Label it "cat" instead.
    press(browser, &['1', Key::Enter.into()]).await;
    let corrected = eventually("the corrected label", Duration::from_secs(10), || {
        human_label(app, second.task_id)
    })
    .await;
    assert_eq!(corrected.class_index, Some(0));

    // The third task, held while the page is open: the lease is renewed
    // past its 6 s.
    shows(browser, &third.source).await;
    let claimed = app.task(third.task_id).await.lease_expires_at.unwrap();
    eventually("a renewed lease", Duration::from_secs(10), || async {
        let now = app.task(third.task_id).await.lease_expires_at.unwrap();
        (now > claimed).then_some(())
    })
    .await;

    // S asks why (prefilled), Enter skips: the task is open again, then,
    // being the only one left, comes straight back.
    press(browser, &['s']).await;
    eventually("the skip form", Duration::from_secs(5), || async {
        let open = js(
            browser,
            "return document.getElementById('skip-form').checkVisibility()
                && document.activeElement.id === 'skip-reason'",
        )
        .await;
        (open == json!(true)).then_some(())
    })
    .await;
    press(browser, &[Key::Enter.into()]).await;
    eventually("the recorded skip", Duration::from_secs(10), || async {
        let (count, reason, by) = app.skips(third.task_id).await;
        (count == 1).then_some((reason, by))
    })
    .await;
    assert_eq!(
        app.skips(third.task_id).await,
        (1, Some("not sure".into()), Some("alice".into()))
    );
    shows(browser, &third.source).await;
    assert!(text(browser, "status").await.contains("Skipped"));

    // Leaving the page gives the held task back.
    browser.goto("about:blank").await.unwrap();
    eventually(
        "the task released on leaving",
        // The page's keepalive request lands once Chromium and the server
        // get to it: generous, as the whole suite runs beside it.
        Duration::from_secs(30),
        || async { (app.task(third.task_id).await.state == TaskState::Open).then_some(()) },
    )
    .await;
    assert!(human_label(app, third.task_id).await.is_none());
    let all = label::Entity::find().all(app.db()).await.unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
}
