//! The browse page at `/browse`: its security headers and static rules,
//! and a reviewer's session in headless Chromium (`chromium.rs`): the
//! grid of a project's items, the filters mapped to the list's query, the
//! grid walked with the arrow keys, an item's history opened with Enter and
//! closed with Escape, a machine label reported with R (back in review in
//! the database), a human label's report refused with the server's reason
//! on screen, a hostile class name shown as text.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use fantoccini::key::Key;
use fantoccini::{Client, Locator};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};
use sieve_scheduler::entities::api_token::Role;
use sieve_testkit::{App, eventually, with_app};
use uuid::Uuid;

use super::chromium::{Driver, assert_inert, js, press, sign_in, text};
use super::items::{machine_label, sql};

const SCRIPT: &str = include_str!("../../assets/browse.js");
const PAGE: &str = include_str!("../../assets/browse.html");
const REVIEW_SCRIPT: &str = include_str!("../../assets/review.js");

/// A class name that would run script if the page ever parsed data as HTML.
const HOSTILE: &str = "<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script>";

#[test]
fn the_page_never_turns_data_into_html() {
    assert_inert("browse", PAGE, SCRIPT, "/browse/browse.js");
    // Every control has a label.
    for id in [
        "token",
        "project",
        "project-select",
        "filter-class",
        "filter-source",
        "filter-state",
        "filter-confidence",
        "report-reason",
        "report-force",
    ] {
        assert!(
            PAGE.contains(&format!("for=\"{id}\"")),
            "#{id} has no label"
        );
    }
    // Signed in on the review page is signed in here: the same key.
    let key = "TOKEN_KEY = 'sieve.review.token'";
    assert!(SCRIPT.contains(key) && REVIEW_SCRIPT.contains(key));
}

#[tokio::test]
async fn the_page_is_served_with_the_review_pages_headers() {
    with_app(300, |app| async move {
        let review = app.http.get(app.url("/review")).send().await.unwrap();
        let review_csp = review.headers()["content-security-policy"].clone();
        for (path, content_type, body) in [
            ("/browse", "text/html; charset=utf-8", PAGE),
            (
                "/browse/browse.js",
                "text/javascript; charset=utf-8",
                SCRIPT,
            ),
            (
                "/browse/browse.css",
                "text/css; charset=utf-8",
                include_str!("../../assets/browse.css"),
            ),
        ] {
            let response = app.http.get(app.url(path)).send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            let headers = response.headers().clone();
            assert_eq!(headers["content-type"], content_type);
            assert_eq!(headers["content-security-policy"], review_csp, "{path}");
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
            assert_eq!(headers["cache-control"], "no-cache");
            assert_eq!(response.text().await.unwrap(), body, "{path}");
        }
        // The page itself is public; what it shows needs a token.
        let response = app
            .http
            .get(app.url("/api/v1/projects/any/items"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    })
    .await;
}

/// Label `item` `class` as an ingest with labels does.
async fn import_label(app: &App, item: Uuid, class: i32) {
    sql(
        app,
        "INSERT INTO labels (id, item_id, class_index, source) VALUES ($1, $2, $3, 'import')",
        vec![Uuid::now_v7().into(), item.into(), class.into()],
    )
    .await;
    sql(
        app,
        "UPDATE items SET state = 'human_labeled' WHERE id = $1",
        vec![item.into()],
    )
    .await;
    close_tasks(app, item).await;
}

async fn close_tasks(app: &App, item: Uuid) {
    sql(
        app,
        "UPDATE review_tasks SET state = 'cancelled', closed_at = now() WHERE item_id = $1",
        vec![item.into()],
    )
    .await;
}

/// The open `reported` task of `item`, if any: (report reason, reporter,
/// the item's state).
async fn reported(app: &App, item: Uuid) -> Option<(String, String, String)> {
    let row = app
        .db()
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT r.reason, r.reported_by, i.state FROM review_tasks t
             JOIN reports r ON r.task_id = t.id JOIN items i ON i.id = t.item_id
             WHERE t.item_id = $1 AND t.reason = 'reported' AND t.state = 'open'",
            [item.into()],
        ))
        .await
        .unwrap()?;
    Some((
        row.try_get("", "reason").unwrap(),
        row.try_get("", "reported_by").unwrap(),
        row.try_get("", "state").unwrap(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reviewer_browses_filters_and_reports_from_the_keyboard_in_chromium() {
    with_app(60, |app| async move {
        // Items 0..6 propose cat, HOSTILE, dog, cat, HOSTILE, dog. 0 and 1
        // are labeled by machine, 2 "dog" by alice, 3 "dog" by an import;
        // 4 and 5 wait in review.
        let classes = ["cat", HOSTILE, "dog"];
        let seeded = app.seed("pets", &classes, 6).await;
        app.seed("birds", &["crow", "gull"], 1).await;
        let items: Vec<Uuid> = seeded.tasks.iter().map(|t| t.item_id).collect();
        machine_label(&app, items[0]).await;
        machine_label(&app, items[1]).await;
        let alice = app.token("alice", Role::Reviewer).await;
        let (status, claimed) = app
            .post("/api/v1/projects/pets/review/next", &alice, json!({}))
            .await;
        assert_eq!(status, 200, "{claimed}");
        assert_eq!(claimed["task_id"], seeded.tasks[2].task_id.to_string());
        let (status, body) = app
            .post(
                &format!("/api/v1/review/{}/submit", seeded.tasks[2].task_id),
                &alice,
                json!({ "fencing_token": claimed["fencing_token"], "class": "dog" }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        import_label(&app, items[3], 2).await;

        let driver = Driver::start();
        let browser = driver.browser().await;
        let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(session(
            &app, &browser, &alice, &items,
        )))
        .await;
        browser.close().await.ok();
        drop(driver);
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    })
    .await;
}

/// Poll `script` in the page until it returns `expected`; on a timeout,
/// fail with what it returned last and the page's status line.
async fn until(browser: &Client, what: &str, script: &str, expected: Value) {
    let start = Instant::now();
    loop {
        let seen = js(browser, script).await;
        if seen == expected {
            return;
        }
        if start.elapsed() > Duration::from_secs(15) {
            let status = text(browser, "status").await;
            panic!("{what}: expected {expected}, the page shows {seen} (status: {status:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const LISTED: &str = "const count = document.getElementById('count');
    return [count.dataset.loading, Number(count.dataset.count),
            [...document.querySelectorAll('#grid button.cell')].map((b) => b.dataset.item)]";

/// Wait until the grid shows exactly `expected`, in that order, and the
/// count says so.
async fn lists(browser: &Client, what: &str, expected: &[Uuid]) {
    let ids: Vec<String> = expected.iter().map(Uuid::to_string).collect();
    until(browser, what, LISTED, json!(["false", expected.len(), ids])).await;
}

async fn pick(browser: &Client, select: &str, value: &str) {
    browser
        .find(Locator::Id(select))
        .await
        .unwrap()
        .select_by_value(value)
        .await
        .unwrap();
}

/// The item whose cell has the focus.
async fn focused(browser: &Client) -> Value {
    js(
        browser,
        "const a = document.activeElement;
         return a && a.matches('#grid button.cell') ? a.dataset.item : (a ? a.tagName + '#' + a.id : null)",
    )
    .await
}

async fn keys(browser: &Client, keys: &[Key]) {
    let keys: Vec<char> = keys.iter().map(|&k| k.into()).collect();
    press(browser, &keys).await;
}

async fn session(app: &App, browser: &Client, token: &str, items: &[Uuid]) {
    // Four or so thumbnails a row: the grid has more than one row.
    browser.set_window_size(720, 900).await.unwrap();
    sign_in(browser, &app.url("/browse?project=pets"), "pets", token).await;

    // Every item, in id order, each thumbnail fetched with the token.
    lists(browser, "the whole project", items).await;
    until(
        browser,
        "the thumbnails",
        "return [...document.querySelectorAll('#grid img.thumb')]
            .map((i) => i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:'))",
        json!(vec![true; 6]),
    )
    .await;
    assert_eq!(
        js(
            browser,
            "return sessionStorage.getItem('sieve.review.token')"
        )
        .await,
        json!(token),
        "the review page's key: one sign-in for both pages"
    );
    assert!(
        !browser
            .current_url()
            .await
            .unwrap()
            .as_str()
            .contains(token)
    );
    assert_eq!(
        js(
            browser,
            "return [...document.querySelectorAll('#project-select option')].map((o) => o.value)"
        )
        .await,
        json!(["birds", "pets"])
    );
    // The hostile class name is text, in the grid and in the class filter:
    // no element made of it, no script ran.
    assert_eq!(
        js(
            browser,
            &format!(
                "return document.querySelector('#grid button[data-item=\"{}\"] .name').textContent",
                items[1]
            )
        )
        .await,
        json!(HOSTILE)
    );
    assert_eq!(
        js(
            browser,
            "return [...document.querySelectorAll('#filter-class option')].map((o) => o.textContent)"
        )
        .await,
        json!(["any class", "cat", HOSTILE, "dog"])
    );
    assert_eq!(
        js(
            browser,
            "return [document.querySelectorAll('script').length,
                     document.querySelectorAll('img:not(.thumb):not(#details-image)').length,
                     typeof window.__pwned]"
        )
        .await,
        json!([1, 0, "undefined"])
    );
    assert!(text(browser, "count").await.starts_with("6 items"));

    // The filters are the list's query parameters.
    pick(browser, "filter-source", "machine").await;
    lists(browser, "machine labels", &items[0..2]).await;
    pick(browser, "filter-source", "").await;
    pick(browser, "filter-class", "dog").await;
    lists(browser, "labeled dog", &items[2..4]).await;
    pick(browser, "filter-source", "import").await;
    lists(browser, "imported dogs", &items[3..4]).await;
    browser
        .find(Locator::Id("reset"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    lists(browser, "no filter", items).await;
    pick(browser, "filter-state", "in_review").await;
    lists(browser, "in review", &items[4..6]).await;
    pick(browser, "filter-state", "").await;
    let confidence = browser
        .find(Locator::Id("filter-confidence"))
        .await
        .unwrap();
    // Every seeded prediction is 0.6 sure.
    confidence.send_keys("0.5").await.unwrap();
    keys(browser, &[Key::Enter]).await;
    lists(browser, "at most 0.5 sure", &[]).await;
    assert_eq!(
        text(browser, "count").await,
        "No items match these filters."
    );
    confidence.clear().await.unwrap();
    confidence.send_keys("0.6").await.unwrap();
    keys(browser, &[Key::Enter]).await;
    lists(browser, "at most 0.6 sure", items).await;

    // The arrow keys walk the grid; Down and Up move a whole row.
    let columns = js(
        browser,
        "const cells = [...document.querySelectorAll('#grid button.cell')];
         const top = Math.round(cells[0].getBoundingClientRect().top);
         return cells.filter((c) => Math.round(c.getBoundingClientRect().top) === top).length",
    )
    .await
    .as_u64()
    .unwrap() as usize;
    assert!((2..6).contains(&columns), "{columns} a row");
    js(
        browser,
        "document.querySelector('#grid button.cell').focus()",
    )
    .await;
    assert_eq!(focused(browser).await, json!(items[0]));
    keys(browser, &[Key::Down]).await;
    assert_eq!(focused(browser).await, json!(items[columns]));
    keys(browser, &[Key::Up, Key::Right, Key::Right]).await;
    assert_eq!(focused(browser).await, json!(items[2]));
    keys(browser, &[Key::Left, Key::Right]).await;
    assert_eq!(focused(browser).await, json!(items[2]));
    // Only the focused cell is in the tab order.
    assert_eq!(
        js(
            browser,
            "return [...document.querySelectorAll('#grid button.cell')].filter((b) => b.tabIndex === 0).length"
        )
        .await,
        json!(1)
    );

    // Enter opens item 2's history: labeled by alice, a human.
    keys(browser, &[Key::Enter]).await;
    until(
        browser,
        "item 2's history",
        "return [document.getElementById('details').checkVisibility(),
                 document.getElementById('details-title').textContent,
                 [...document.querySelectorAll('#labels li')].map((l) => l.dataset.source)]",
        json!([true, "photos/item-2.png", ["human"]]),
    )
    .await;
    let labels = text(browser, "labels").await;
    assert!(labels.contains("dog — human by alice"), "{labels}");
    assert!(text(browser, "summary").await.contains("human by alice"));
    let predictions = text(browser, "predictions").await;
    assert!(
        predictions.contains("model v1: dog 60.0% sure"),
        "{predictions}"
    );
    assert!(
        text(browser, "tasks")
            .await
            .contains("low confidence: labeled")
    );
    until(
        browser,
        "the large image",
        "const i = document.getElementById('details-image');
         return i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:')",
        json!(true),
    )
    .await;
    // Escape closes it and leaves the focus where it was.
    keys(browser, &[Key::Escape]).await;
    until(
        browser,
        "the history closed",
        "return document.getElementById('details').checkVisibility()",
        json!(false),
    )
    .await;
    assert_eq!(focused(browser).await, json!(items[2]));

    // R on item 0 (a machine "cat"): its history and the report form.
    keys(browser, &[Key::Left, Key::Left]).await;
    assert_eq!(focused(browser).await, json!(items[0]));
    press(browser, &['r']).await;
    until(
        browser,
        "the report form",
        "return [document.getElementById('details-title').textContent,
                 document.getElementById('report-form').checkVisibility(),
                 document.activeElement.id,
                 document.getElementById('report-reason').value]",
        json!(["photos/item-0.png", true, "report-reason", ""]),
    )
    .await;
    assert!(text(browser, "labels").await.contains("cat — machine"));
    let reason = "a dog, not a cat";
    let mut typed: Vec<char> = reason.chars().collect();
    typed.push(Key::Enter.into());
    press(browser, &typed).await;
    let (said, by, state) = eventually(
        "the report in the database",
        Duration::from_secs(10),
        || reported(app, items[0]),
    )
    .await;
    assert_eq!(
        (said.as_str(), by.as_str(), state.as_str()),
        (reason, "alice", "in_review")
    );
    until(
        browser,
        "the report on screen",
        &format!(
            "return [document.getElementById('report-form').checkVisibility(),
                     [...document.querySelectorAll('#tasks li')].map((l) => l.dataset.reason),
                     document.querySelector('#grid button[data-item=\"{}\"] .state').textContent]",
            items[0]
        ),
        json!([false, ["low_confidence", "reported"], "in review"]),
    )
    .await;
    assert_eq!(focused(browser).await, json!(items[0]));
    let result = text(browser, "report-result").await;
    assert!(
        result.contains("Sent back to review") && result.contains("machine"),
        "{result}"
    );
    assert!(text(browser, "tasks").await.contains(reason));

    // A reviewer's report of a human label is refused; the page says why.
    keys(browser, &[Key::Right, Key::Right]).await;
    press(browser, &['r']).await;
    until(
        browser,
        "the report form for item 2",
        "return [document.getElementById('details-title').textContent,
                 document.activeElement.id,
                 document.getElementById('report-force-label').checkVisibility()]",
        json!(["photos/item-2.png", "report-reason", true]),
    )
    .await;
    press(browser, &['w', 'r', 'o', 'n', 'g', Key::Enter.into()]).await;
    until(
        browser,
        "the refusal",
        "const r = document.getElementById('report-result');
         return [r.classList.contains('error'), r.textContent.startsWith('Not reported'),
                 r.textContent.includes('force')]",
        json!([true, true, true]),
    )
    .await;
    assert_eq!(reported(app, items[2]).await, None);
    // Escape leaves the form, then the history.
    keys(browser, &[Key::Escape]).await;
    assert_eq!(focused(browser).await, json!(items[2]));
    keys(browser, &[Key::Escape]).await;
    until(
        browser,
        "the history closed again",
        "return document.getElementById('details').checkVisibility()",
        json!(false),
    )
    .await;
}
