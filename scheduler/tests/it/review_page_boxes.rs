//! The review page's box editor, for a detection project, in headless
//! Chromium: boxes drawn, moved, resized, deleted and reclassed with the
//! mouse and the keys, submitted, and read back in pixels of the original
//! image; then the same boxes shown again as a new task's starting boxes,
//! still aligned after a zoom.
//!
//! The pointer is moved and pressed by WebDriver actions, which chromedriver
//! turns into the browser's own (trusted) input events, as a mouse would; no
//! event is made up in the page's script. The image is 640×480 and shown
//! at another size, so every coordinate goes through the page's mapping
//! from screen to image pixels and back.
//!
//! Needs the Debian packages `chromium` and `chromium-driver`
//! (`ops/install-deps.sh` installs them); nothing is downloaded.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Utc;
use fantoccini::actions::{
    InputSource, KeyAction, KeyActions, MOUSE_BUTTON_LEFT, MouseActions, PointerAction,
};
use fantoccini::key::Key;
use fantoccini::{Client, Locator};
use sea_orm::ActiveValue::Set;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::label;
use sieve_scheduler::entities::review_task::{self, TaskReason, TaskState};
use sieve_scheduler::ingest;
use sieve_scheduler::projects::{self, Project};
use sieve_testkit::{App, eventually, with_app};
use uuid::Uuid;

use super::chromium::{Driver, js, press, sign_in, text};

const WIDTH: u32 = 640;
const HEIGHT: u32 = 480;

/// How far (in image pixels) a stored corner may be from what the pointer's
/// screen positions imply: the page keeps corners on whole image pixels.
const TOLERANCE: f64 = 1.0;

/// A box as the test expects it: class name and corners in image pixels.
#[derive(Clone, Copy, Debug)]
struct Expected {
    class: &'static str,
    x_min: f64,
    y_min: f64,
    x_max: f64,
    y_max: f64,
}

/// Where the image is on screen: the overlay's rectangle in CSS pixels of
/// the viewport, and the screen pixels per image pixel.
#[derive(Clone, Copy, Debug)]
struct Screen {
    left: f64,
    top: f64,
    scale_x: f64,
    scale_y: f64,
}

impl Screen {
    async fn of(browser: &Client) -> Self {
        let r = js(
            browser,
            "const r = document.getElementById('overlay').getBoundingClientRect();
             return [r.left, r.top, r.width, r.height]",
        )
        .await;
        let [left, top, width, height] = [0, 1, 2, 3].map(|i| r[i].as_f64().unwrap());
        Self {
            left,
            top,
            scale_x: width / f64::from(WIDTH),
            scale_y: height / f64::from(HEIGHT),
        }
    }

    /// The viewport pixel (whole, as WebDriver moves the pointer) over an
    /// image point.
    fn at(&self, x: f64, y: f64) -> (f64, f64) {
        (
            (self.left + x * self.scale_x).round(),
            (self.top + y * self.scale_y).round(),
        )
    }

    /// The image point under a viewport pixel, as the page computes it:
    /// rounded to a whole image pixel.
    fn image(&self, (x, y): (f64, f64)) -> (f64, f64) {
        (
            ((x - self.left) / self.scale_x).round(),
            ((y - self.top) / self.scale_y).round(),
        )
    }
}

/// A 640×480 PNG with some structure in it.
fn photo(path: &Path) {
    image::RgbImage::from_fn(WIDTH, HEIGHT, |x, y| {
        image::Rgb([
            (x / 3 % 256) as u8,
            (y / 2 % 256) as u8,
            ((x + y) % 97) as u8,
        ])
    })
    .save(path)
    .unwrap();
}

async fn detection_project(app: &App, name: &str) -> Project {
    let ml = app.token("ml", Role::Ml).await;
    let (status, body) = app
        .post(
            "/api/v1/projects",
            &ml,
            json!({ "name": name, "classes": ["tree", "car"], "task_kind": "detection" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    projects::get(app.db(), name).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reviewer_draws_moves_resizes_and_deletes_boxes_in_chromium() {
    with_app(300, |app| async move {
        let project = detection_project(&app, "orchard").await;
        let dir = tempfile::tempdir().unwrap();
        photo(&dir.path().join("rows.png"));
        ingest::ingest_folder(&app.ctx, &project, dir.path(), false)
            .await
            .unwrap();
        let task = review_task::Entity::find()
            .filter(review_task::Column::ProjectId.eq(project.id.as_uuid()))
            .one(app.db())
            .await
            .unwrap()
            .expect("a detection image goes to people at once");
        let token = app.token("robin", Role::Reviewer).await;

        let driver = Driver::start();
        let browser = driver.browser().await;
        let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(session(
            &app, &browser, &token, &task,
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

/// Press the left button at `from` (viewport pixels), move through the
/// middle to `to`, let go.
async fn drag(browser: &Client, from: (f64, f64), to: (f64, f64)) {
    let middle = (
        ((from.0 + to.0) / 2.0).round(),
        ((from.1 + to.1) / 2.0).round(),
    );
    let step = Some(Duration::from_millis(80));
    let mouse = MouseActions::new("mouse".into())
        .then(PointerAction::MoveTo {
            duration: None,
            x: from.0,
            y: from.1,
        })
        .then(PointerAction::Down {
            button: MOUSE_BUTTON_LEFT,
        })
        .then(PointerAction::MoveTo {
            duration: step,
            x: middle.0,
            y: middle.1,
        })
        .then(PointerAction::MoveTo {
            duration: step,
            x: to.0,
            y: to.1,
        })
        .then(PointerAction::Up {
            button: MOUSE_BUTTON_LEFT,
        });
    browser.perform_actions(mouse).await.unwrap();
}

async fn click(browser: &Client, at: (f64, f64)) {
    let mouse = MouseActions::new("mouse".into())
        .then(PointerAction::MoveTo {
            duration: None,
            x: at.0,
            y: at.1,
        })
        .then(PointerAction::Down {
            button: MOUSE_BUTTON_LEFT,
        })
        .then(PointerAction::Up {
            button: MOUSE_BUTTON_LEFT,
        });
    browser.perform_actions(mouse).await.unwrap();
}

/// `key` pressed while `modifier` is held.
async fn chord(browser: &Client, modifier: Key, key: Key) {
    let keys = KeyActions::new("keyboard".into())
        .then(KeyAction::Down {
            value: modifier.into(),
        })
        .then(KeyAction::Down { value: key.into() })
        .then(KeyAction::Up { value: key.into() })
        .then(KeyAction::Up {
            value: modifier.into(),
        });
    browser.perform_actions(keys).await.unwrap();
}

/// The page's list of boxes is `expected`, with `selected` selected.
async fn assert_listed(browser: &Client, expected: &[Expected], selected: Option<usize>) {
    let listed = js(
        browser,
        "return [...document.querySelectorAll('#box-list button')]
            .map((b) => ({ class: b.querySelector('.name').textContent,
                           corners: b.querySelector('.coords').textContent,
                           selected: b.classList.contains('selected') }))",
    )
    .await;
    let listed = listed.as_array().unwrap();
    let boxes: Vec<Value> = listed
        .iter()
        .map(|b| {
            let corners: Vec<f64> = b["corners"]
                .as_str()
                .unwrap()
                .split(", ")
                .map(|v| v.parse().unwrap())
                .collect();
            json!({ "class": b["class"], "x_min": corners[0], "y_min": corners[1],
                    "x_max": corners[2], "y_max": corners[3] })
        })
        .collect();
    assert_near(&Value::Array(boxes), expected);
    let on = listed.iter().position(|b| b["selected"] == json!(true));
    assert_eq!(on, selected, "the selected box of {listed:?}");
}

/// Wait until the editor shows a detection task with its image loaded and
/// `count` boxes.
async fn editor_shows(browser: &Client, count: usize) {
    let start = Instant::now();
    loop {
        let state = js(
            browser,
            "const i = document.getElementById('image');
             return [document.getElementById('task').checkVisibility(),
                     document.getElementById('figure').classList.contains('boxes'),
                     i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:'),
                     document.getElementById('overlay').getBoundingClientRect().width > 0,
                     document.querySelectorAll('#box-list li').length]",
        )
        .await;
        if state == json!([true, true, true, true, count]) {
            return;
        }
        let status = text(browser, "status").await;
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the page does not show the box editor with {count} boxes: {state} (status: {status:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The boxes of `task`'s label, as the task view gives them (class names).
async fn stored_boxes(app: &App, token: &str, task: Uuid) -> Option<Value> {
    let (status, view) = app.get(&format!("/api/v1/review/{task}"), token).await;
    assert_eq!(status, 200, "{view}");
    let boxes = view["label"]["boxes"].clone();
    (!boxes.is_null()).then_some(boxes)
}

fn assert_near(stored: &Value, expected: &[Expected]) {
    let stored = stored.as_array().unwrap();
    assert_eq!(stored.len(), expected.len(), "{stored:?}");
    for (got, want) in stored.iter().zip(expected) {
        assert_eq!(got["class"], want.class, "{got} vs {want:?}");
        for (corner, value) in [
            ("x_min", want.x_min),
            ("y_min", want.y_min),
            ("x_max", want.x_max),
            ("y_max", want.y_max),
        ] {
            let stored = got[corner].as_f64().unwrap();
            assert!(
                (stored - value).abs() <= TOLERANCE,
                "{corner} is {stored}, the pointer implies {value}: {got} vs {want:?}"
            );
        }
    }
}

/// Every box's rectangle on screen against its corners in image pixels.
async fn assert_aligned(browser: &Client, expected: &[Expected]) {
    let screen = Screen::of(browser).await;
    let rects = js(
        browser,
        "return [...document.querySelectorAll('#overlay rect.box')]
            .sort((a, b) => a.dataset.index - b.dataset.index)
            .map((r) => { const b = r.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; })",
    )
    .await;
    let rects = rects.as_array().unwrap();
    assert_eq!(rects.len(), expected.len());
    for (rect, want) in rects.iter().zip(expected) {
        let want_screen = [
            screen.left + want.x_min * screen.scale_x,
            screen.top + want.y_min * screen.scale_y,
            screen.left + want.x_max * screen.scale_x,
            screen.top + want.y_max * screen.scale_y,
        ];
        for (got, want_px) in rect.as_array().unwrap().iter().zip(want_screen) {
            // Within a screen pixel (the box's geometry: the stroke is not
            // part of an SVG element's bounding box).
            let got = got.as_f64().unwrap();
            assert!(
                (got - want_px).abs() <= 1.0,
                "{rect} vs {want_screen:?} for {want:?} ({screen:?})"
            );
        }
    }
}

async fn session(app: &App, browser: &Client, token: &str, task: &review_task::Model) {
    sign_in(
        browser,
        &app.url("/review?project=orchard"),
        "orchard",
        token,
    )
    .await;
    editor_shows(browser, 0).await;

    // The editor instead of the class picker: the classes with their keys,
    // no model proposal, the editor's own keys.
    assert_eq!(
        js(
            browser,
            "return ['proposal', 'keys', 'box-keys', 'zoom', 'box-panel']
                .map((id) => document.getElementById(id).checkVisibility())"
        )
        .await,
        json!([false, false, true, true, true])
    );
    assert_eq!(
        js(
            browser,
            "return [...document.querySelectorAll('#classes button')].map((b) => b.textContent)"
        )
        .await,
        json!(["1tree", "2car"])
    );
    assert!(text(browser, "accept").await.contains("nothing to box"));

    // The image is shown at another size than its own.
    let screen = Screen::of(browser).await;
    assert!(
        (screen.scale_x - 1.0).abs() > 0.05,
        "the image should be scaled on screen: {screen:?}"
    );
    assert!((screen.scale_x - screen.scale_y).abs() < 0.01, "{screen:?}");

    // Draw A and B (the first class, tree) on the bare image.
    let span = |class, from: (f64, f64), to: (f64, f64)| {
        let (a, b) = (screen.image(from), screen.image(to));
        Expected {
            class,
            x_min: a.0.min(b.0),
            y_min: a.1.min(b.1),
            x_max: a.0.max(b.0),
            y_max: a.1.max(b.1),
        }
    };
    let (a_from, a_to) = (screen.at(60.0, 50.0), screen.at(260.0, 200.0));
    drag(browser, a_from, a_to).await;
    let mut a = span("tree", a_from, a_to);
    let (b_from, b_to) = (screen.at(420.0, 160.0), screen.at(300.0, 60.0));
    drag(browser, b_from, b_to).await;
    let b = span("tree", b_from, b_to);
    // A box drawn from any corner; the new one is selected.
    assert_listed(browser, &[a, b], Some(1)).await;

    // Esc selects none; 2 makes new boxes cars; C is one.
    press(browser, &[Key::Escape.into(), '2']).await;
    assert!(text(browser, "new-class").await.contains("car"));
    let (c_from, c_to) = (screen.at(380.0, 260.0), screen.at(560.0, 420.0));
    drag(browser, c_from, c_to).await;
    let mut c = span("car", c_from, c_to);

    // A click selects B, Delete removes it.
    click(
        browser,
        screen.at((b.x_min + b.x_max) / 2.0, (b.y_min + b.y_max) / 2.0),
    )
    .await;
    assert_listed(browser, &[a, b, c], Some(1)).await;
    press(browser, &[Key::Delete.into()]).await;
    assert_listed(browser, &[a, c], None).await;

    // A dragged by its body moves (and is selected); Shift+→ moves it 10
    // image pixels more; 2 makes it a car.
    let grab = screen.at((a.x_min + a.x_max) / 2.0, (a.y_min + a.y_max) / 2.0);
    let to = (grab.0 + 90.0, grab.1 + 70.0);
    drag(browser, grab, to).await;
    let (dx, dy) = (
        ((to.0 - grab.0) / screen.scale_x).round(),
        ((to.1 - grab.1) / screen.scale_y).round(),
    );
    a.x_min += dx + 10.0;
    a.x_max += dx + 10.0;
    a.y_min += dy;
    a.y_max += dy;
    a.class = "car";
    chord(browser, Key::Shift, Key::Right).await;
    press(browser, &['2']).await;
    assert_listed(browser, &[a, c], Some(0)).await;

    // C: selected by a click, its bottom-right corner dragged out, then
    // Alt+↑ takes a pixel off its height, and 1 makes it a tree.
    click(
        browser,
        screen.at((c.x_min + c.x_max) / 2.0, (c.y_min + c.y_max) / 2.0),
    )
    .await;
    let corner = screen.at(c.x_max, c.y_max);
    let pulled = screen.at(610.0, 470.0);
    drag(browser, corner, pulled).await;
    (c.x_max, c.y_max) = screen.image(pulled);
    c.y_max -= 1.0;
    c.class = "tree";
    chord(browser, Key::Alt, Key::Up).await;
    press(browser, &['1']).await;
    assert_listed(browser, &[a, c], Some(1)).await;
    assert_aligned(browser, &[a, c]).await;

    // Enter submits both boxes.
    assert!(text(browser, "accept").await.contains("2 boxes"));
    press(browser, &[Key::Enter.into()]).await;
    let stored = eventually("the boxes stored", Duration::from_secs(10), || {
        stored_boxes(app, token, task.id)
    })
    .await;
    assert_near(&stored, &[a, c]);
    let row = label::Entity::find()
        .filter(label::Column::ReviewTaskId.eq(task.id))
        .one(app.db())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.class_index, None);
    assert_eq!(row.reviewer.as_deref(), Some("robin"));
    let indexes: Vec<_> = row
        .boxes
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["class"].clone())
        .collect();
    assert_eq!(indexes, [json!(1), json!(0)], "car, tree by index");
    eventually("the empty queue", Duration::from_secs(10), || async {
        js(
            browser,
            "return document.getElementById('empty').checkVisibility()",
        )
        .await
        .as_bool()
        .unwrap()
        .then_some(())
    })
    .await;
    assert!(text(browser, "status").await.contains("with 2 boxes"));

    // The item back in review (a new task): its boxes are where the editor
    // starts, drawn where they were, and still aligned when zoomed in.
    let now = Utc::now().fixed_offset();
    review_task::Entity::insert(review_task::ActiveModel {
        id: Set(Uuid::now_v7()),
        project_id: Set(task.project_id),
        item_id: Set(task.item_id),
        prediction_id: Set(None),
        reason: Set(TaskReason::Seed),
        priority: Set(1.0),
        state: Set(TaskState::Open),
        lease_holder: Set(None),
        lease_expires_at: Set(None),
        fencing_token: Set(0),
        created_at: Set(now),
        updated_at: Set(now),
        closed_at: Set(None),
    })
    .exec_without_returning(app.db())
    .await
    .unwrap();
    browser
        .find(Locator::Id("check-again"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    editor_shows(browser, 2).await;
    // Stored as submitted: whole pixels, so exactly what the page showed.
    let [first, second] = [0, 1].map(|i| {
        let b = &stored[i];
        Expected {
            class: if i == 0 { "car" } else { "tree" },
            x_min: b["x_min"].as_f64().unwrap(),
            y_min: b["y_min"].as_f64().unwrap(),
            x_max: b["x_max"].as_f64().unwrap(),
            y_max: b["y_max"].as_f64().unwrap(),
        }
    });
    assert_listed(browser, &[first, second], None).await;
    assert_aligned(browser, &[first, second]).await;
    let before = Screen::of(browser).await;
    press(browser, &['+']).await;
    let after = Screen::of(browser).await;
    assert!(
        (after.scale_x / before.scale_x - 1.25).abs() < 0.01,
        "+ zooms in by a quarter: {before:?} then {after:?}"
    );
    assert_aligned(browser, &[first, second]).await;
}
