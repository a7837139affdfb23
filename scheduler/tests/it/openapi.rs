//! `/api/v1/openapi.json` against what the API really does: every
//! operation it describes is called on the real services, and each answer's
//! status must be one the description lists for that operation and its
//! body must match the schema given for it, with no field the schema does
//! not name. An operation the scenario never reached fails the test, and so
//! does a handler without a description.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use reqwest::Method;
use serde_json::{Value, json};
use sieve_scheduler::entities::api_token::Role;
use sieve_testkit::{App, with_app};

/// The operations described, as (METHOD, path template).
fn operations(spec: &Value) -> BTreeSet<(String, String)> {
    let mut all = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                all.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    all
}

/// Every object schema without a word on extra fields gets
/// `additionalProperties: false`, so a field the handler sends and the
/// description does not name fails validation. Not where `allOf` composes
/// schemas (a flattened struct): there each part sees the others' fields.
fn strict(components: &mut Value) {
    fn refs_in_all_of(node: &Value, found: &mut BTreeSet<String>) {
        match node {
            Value::Object(map) => {
                if let Some(Value::Array(parts)) = map.get("allOf") {
                    for part in parts {
                        if let Some(Value::String(r)) = part.get("$ref") {
                            found.insert(r.rsplit('/').next().unwrap().to_owned());
                        }
                    }
                }
                map.values().for_each(|v| refs_in_all_of(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| refs_in_all_of(v, found)),
            _ => {}
        }
    }
    fn close(node: &mut Value, inside_all_of: bool) {
        match node {
            Value::Object(map) => {
                if !inside_all_of
                    && map.contains_key("properties")
                    && !map.contains_key("additionalProperties")
                {
                    map.insert("additionalProperties".into(), Value::Bool(false));
                }
                for (key, value) in map.iter_mut() {
                    close(value, key == "allOf");
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| close(v, inside_all_of)),
            _ => {}
        }
    }
    let mut composed = BTreeSet::new();
    refs_in_all_of(components, &mut composed);
    if let Some(schemas) = components["schemas"].as_object_mut() {
        for (name, schema) in schemas.iter_mut() {
            if !composed.contains(name) {
                close(schema, false);
            }
        }
    }
}

struct Api {
    app: App,
    spec: Value,
    components: Value,
    /// (METHOD, template) → statuses seen.
    seen: BTreeMap<(String, String), BTreeSet<u16>>,
}

/// One call: the operation, its path arguments, query, token and body.
struct Call<'a> {
    method: Method,
    template: &'a str,
    args: &'a [&'a str],
    query: &'a str,
    token: Option<&'a str>,
    body: Option<Value>,
}

fn call<'a>(method: Method, template: &'a str, args: &'a [&'a str]) -> Call<'a> {
    Call {
        method,
        template,
        args,
        query: "",
        token: None,
        body: None,
    }
}

impl<'a> Call<'a> {
    fn token(mut self, token: &'a str) -> Self {
        self.token = Some(token);
        self
    }

    fn query(mut self, query: &'a str) -> Self {
        self.query = query;
        self
    }

    fn body(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }
}

impl Api {
    async fn new(app: App) -> Self {
        let response = app
            .http
            .get(app.url("/api/v1/openapi.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "the description needs no token");
        let spec: Value = response.json().await.unwrap();
        let mut components = spec["components"].clone();
        strict(&mut components);
        Self {
            app,
            spec,
            components,
            seen: BTreeMap::new(),
        }
    }

    /// Make the call, check its answer against the description, and return
    /// the status and the JSON body (`Null` for none or not JSON).
    async fn send(&mut self, call: Call<'_>) -> (u16, Value) {
        let mut path = call.template.to_owned();
        for arg in call.args {
            let open = path
                .find('{')
                .expect("as many arguments as the template has");
            let close = open + path[open..].find('}').unwrap();
            path.replace_range(open..=close, arg);
        }
        assert!(
            !path.contains('{'),
            "{}: an argument is missing",
            call.template
        );
        let mut url = self.app.url(&format!("/api/v1{path}"));
        if !call.query.is_empty() {
            url = format!("{url}?{}", call.query);
        }
        let mut request = self.app.http.request(call.method.clone(), url);
        if let Some(token) = call.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = &call.body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = response.bytes().await.unwrap();
        let what = format!("{} {} → {status}", call.method, call.template);

        let method = call.method.as_str().to_lowercase();
        let operation = &self.spec["paths"][call.template][&method];
        assert!(operation.is_object(), "{what}: not in the description");
        let documented = &operation["responses"][status.to_string()];
        assert!(
            documented.is_object(),
            "{what}: a status the description does not list (body: {})",
            String::from_utf8_lossy(&bytes)
        );
        let body = match (&documented["content"], content_type) {
            (Value::Object(content), Some(content_type)) => {
                let media = content.get(&content_type).unwrap_or_else(|| {
                    panic!(
                        "{what}: content type {content_type} is not one of {:?}",
                        content.keys().collect::<Vec<_>>()
                    )
                });
                if content_type == "application/json" {
                    let body: Value = serde_json::from_slice(&bytes).unwrap();
                    self.validate(&what, &media["schema"], &body);
                    body
                } else {
                    Value::Null
                }
            }
            (Value::Null, _) => {
                assert!(
                    bytes.is_empty(),
                    "{what}: a body where the description gives none"
                );
                Value::Null
            }
            (content, None) => panic!("{what}: no content type, expected one of {content}"),
            (other, _) => panic!("{what}: content described as {other}"),
        };
        self.seen
            .entry((call.method.to_string(), call.template.to_owned()))
            .or_default()
            .insert(status);
        (status, body)
    }

    fn validate(&self, what: &str, schema: &Value, body: &Value) {
        let mut root = json!({ "allOf": [schema], "components": self.components });
        if let Some(map) = root.as_object_mut() {
            map.insert(
                "$schema".into(),
                "https://json-schema.org/draft/2020-12/schema".into(),
            );
        }
        let validator = jsonschema::validator_for(&root)
            .unwrap_or_else(|e| panic!("{what}: the schema does not compile: {e}"));
        let errors: Vec<String> = validator
            .iter_errors(body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{what}: the answer does not match its schema:\n  {}\nbody: {body:#}",
            errors.join("\n  ")
        );
    }
}

#[tokio::test]
async fn every_operation_answers_as_described() {
    with_app(300, |app| async move {
        let admin = app.token("api-admin", Role::Admin).await;
        let seeded = app.seed("openapi-seeded", &["cat", "dog", "bird"], 3).await;
        let mut api = Api::new(app.clone()).await;
        assert_eq!(api.spec["openapi"], "3.1.0");
        let p = seeded.project.name.as_str();
        let a = admin.as_str();

        // Projects and policy.
        let (status, _) = api
            .send(call(Method::GET, "/projects", &[]).token("not-a-token"))
            .await;
        assert_eq!(status, 401);
        let (status, listed) = api.send(call(Method::GET, "/projects", &[]).token(a)).await;
        assert_eq!(status, 200);
        assert!(listed.as_array().unwrap().iter().any(|x| x["name"] == p));
        let body = json!({ "name": "openapi-made", "classes": ["a", "b"], "arch": "small_cnn", "task_kind": "classification" });
        let (status, _) = api
            .send(call(Method::POST, "/projects", &[]).token(a).body(body))
            .await;
        assert_eq!(status, 201);
        let body = json!({ "name": "openapi-made-2", "classes": ["a", "b"], "task_kind": "boxes" });
        let (status, refused) = api
            .send(call(Method::POST, "/projects", &[]).token(a).body(body))
            .await;
        assert_eq!(status, 422);
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(message.contains("classification"), "names the kinds there are: {message}");
        let body = json!({ "name": "openapi-made-2", "classes": [] });
        let (status, _) = api
            .send(call(Method::POST, "/projects", &[]).token(a).body(body))
            .await;
        assert_eq!(status, 422);
        let (status, shown) = api
            .send(call(Method::GET, "/projects/{project}", &[p]).token(a))
            .await;
        assert_eq!((status, shown["total_items"].as_i64()), (200, Some(3)));
        let (status, _) = api
            .send(call(Method::GET, "/projects/{project}", &["no-such"]).token(a))
            .await;
        assert_eq!(status, 404);
        let (status, policy) = api
            .send(call(Method::GET, "/projects/{project}/policy", &[p]).token(a))
            .await;
        assert_eq!(status, 200);
        let version = policy["version"].as_i64().unwrap();
        let patch = json!({ "audit_rate": 0.1, "second_review_confidence": null });
        let (status, changed) = api
            .send(
                call(Method::PATCH, "/projects/{project}/policy", &[p])
                    .token(a)
                    .body(patch),
            )
            .await;
        assert_eq!(
            (status, changed["version"].as_i64()),
            (200, Some(version + 1))
        );
        let (status, _) = api
            .send(
                call(Method::PUT, "/projects/{project}/policy", &[p])
                    .token(a)
                    .body(json!({ "audit_rate": 7 })),
            )
            .await;
        assert_eq!(status, 422);
        let (status, _) = api
            .send(
                call(Method::PUT, "/projects/{project}/policy", &[p])
                    .token(a)
                    .body(json!({ "audit_rate": 0.2 })),
            )
            .await;
        assert_eq!(status, 200);

        // Box settings: a classification project has none; a detection
        // project shows its defaults and takes a change.
        let (status, _) = api
            .send(call(Method::GET, "/projects/{project}/boxes", &[p]).token(a))
            .await;
        assert_eq!(status, 422);
        let body = json!({ "name": "openapi-boxes", "classes": ["tree"], "task_kind": "detection" });
        let (status, _) = api
            .send(call(Method::POST, "/projects", &[]).token(a).body(body))
            .await;
        assert_eq!(status, 201);
        let boxes = "openapi-boxes";
        let (status, shown) = api
            .send(call(Method::GET, "/projects/{project}/boxes", &[boxes]).token(a))
            .await;
        assert_eq!((status, shown["tile_size"].as_u64()), (200, Some(384)));
        let (status, changed) = api
            .send(
                call(Method::PUT, "/projects/{project}/boxes", &[boxes])
                    .token(a)
                    .body(json!({ "tile_size": 256 })),
            )
            .await;
        assert_eq!((status, changed["stored"]["tile_size"].as_u64()), (200, Some(256)));
        let (status, _) = api
            .send(
                call(Method::PUT, "/projects/{project}/boxes", &[boxes])
                    .token(a)
                    .body(json!({ "proposal_threshold": 2.0 })),
            )
            .await;
        assert_eq!(status, 422);
        let (status, changed) = api
            .send(
                call(Method::PATCH, "/projects/{project}/boxes", &[boxes])
                    .token(a)
                    .body(json!({ "tile_size": null })),
            )
            .await;
        assert_eq!((status, changed["tile_size"].as_u64()), (200, Some(384)));

        // Dispatch.
        let (status, control) = api
            .send(call(Method::POST, "/projects/{project}/pause", &[p]).token(a))
            .await;
        assert_eq!((status, control["paused"].as_bool()), (200, Some(true)));
        let (status, resumed) = api
            .send(call(Method::POST, "/projects/{project}/resume", &[p]).token(a))
            .await;
        assert_eq!(
            (status, resumed["control"]["paused"].as_bool()),
            (200, Some(false))
        );
        let (status, _) = api
            .send(call(Method::GET, "/projects/{project}/dispatch", &[p]).token(a))
            .await;
        assert_eq!(status, 200);
        let (status, control) = api
            .send(
                call(Method::PUT, "/projects/{project}/dispatch", &[p])
                    .token(a)
                    .body(json!({ "rate_limit": 5.0, "priority": 3 })),
            )
            .await;
        assert_eq!((status, control["priority"].as_i64()), (200, Some(3)));

        // Review: claim, look, renew, label, undo, skip; release another.
        let (status, claimed) = api
            .send(call(Method::POST, "/projects/{project}/review/next", &[p]).token(a))
            .await;
        assert_eq!(status, 200);
        let task = claimed["task_id"].as_str().unwrap().to_owned();
        let fence = claimed["fencing_token"].clone();
        let t = task.as_str();
        let (status, view) = api
            .send(call(Method::GET, "/review/{task}", &[t]).token(a))
            .await;
        assert_eq!(
            (status, view["fencing_token"].clone()),
            (200, fence.clone())
        );
        let (status, _) = api
            .send(
                call(Method::POST, "/review/{task}/renew", &[t])
                    .token(a)
                    .body(json!({ "fencing_token": fence })),
            )
            .await;
        assert_eq!(status, 200);
        let (status, _) = api
            .send(
                call(Method::POST, "/review/{task}/submit", &[t])
                    .token(a)
                    .body(json!({ "fencing_token": fence, "class": "no-such-class" })),
            )
            .await;
        assert_eq!(status, 422);
        let (status, label) = api
            .send(
                call(Method::POST, "/review/{task}/submit", &[t])
                    .token(a)
                    .body(json!({ "fencing_token": fence, "class": "dog" })),
            )
            .await;
        assert_eq!((status, label["class"].as_str()), (200, Some("dog")));
        let (status, _) = api
            .send(
                call(Method::POST, "/review/{task}/submit", &[t])
                    .token(a)
                    .body(json!({ "fencing_token": -1, "class": "dog" })),
            )
            .await;
        assert_eq!(status, 409);
        let (status, again) = api
            .send(
                call(Method::POST, "/review/{task}/undo", &[t])
                    .token(a)
                    .body(json!({ "fencing_token": fence })),
            )
            .await;
        assert_eq!(status, 200);
        let (status, skipped) = api
            .send(
                call(Method::POST, "/review/{task}/skip", &[t])
                    .token(a)
                    .body(json!({ "fencing_token": again["fencing_token"], "reason": "blurred" })),
            )
            .await;
        assert_eq!((status, skipped["skip_count"].as_i64()), (200, Some(1)));
        let (status, claimed) = api
            .send(call(Method::POST, "/projects/{project}/review/next", &[p]).token(a))
            .await;
        assert_eq!(status, 200);
        let other = claimed["task_id"].as_str().unwrap().to_owned();
        let (status, _) = api
            .send(
                call(Method::POST, "/review/{task}/release", &[&other])
                    .token(a)
                    .body(json!({ "fencing_token": claimed["fencing_token"] })),
            )
            .await;
        assert_eq!(status, 204);
        let (status, _) = api
            .send(
                call(
                    Method::POST,
                    "/projects/{project}/review/next",
                    &["openapi-made"],
                )
                .token(a),
            )
            .await;
        assert_eq!(status, 204, "a project without items has nothing to review");

        // Items: a page, one item's history and image; a human label
        // reported, which only force may reopen.
        let (status, page) = api
            .send(
                call(Method::GET, "/projects/{project}/items", &[p])
                    .token(a)
                    .query("state=in_review&limit=2"),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(page["items"].as_array().unwrap().len(), 2);
        let (status, _) = api
            .send(
                call(Method::GET, "/projects/{project}/items", &[p])
                    .token(a)
                    .query("colour=red"),
            )
            .await;
        assert_eq!(status, 422);
        let item = seeded.tasks[2].item_id.to_string();
        let (status, history) = api
            .send(call(Method::GET, "/items/{item}", &[&item]).token(a))
            .await;
        assert_eq!(
            (status, history["predictions"].as_array().map(Vec::len)),
            (200, Some(1))
        );
        let (status, _) = api
            .send(call(Method::GET, "/items/{item}/image", &[&item]).token(a))
            .await;
        assert_eq!(status, 200);
        let (status, claimed) = api
            .send(call(Method::POST, "/projects/{project}/review/next", &[p]).token(a))
            .await;
        assert_eq!(status, 200);
        let (status, _) = api
            .send(
                call(
                    Method::POST,
                    "/review/{task}/submit",
                    &[claimed["task_id"].as_str().unwrap()],
                )
                .token(a)
                .body(json!({ "fencing_token": claimed["fencing_token"], "class": "cat" })),
            )
            .await;
        assert_eq!(status, 200);
        let labeled_item = claimed["item_id"].as_str().unwrap().to_owned();
        let (status, _) = api
            .send(
                call(Method::POST, "/items/{item}/reopen", &[&labeled_item])
                    .token(a)
                    .body(json!({ "reason": "it is a bird" })),
            )
            .await;
        assert_eq!(status, 409, "a person's label takes force");
        let (status, reopened) = api
            .send(
                call(Method::POST, "/items/{item}/reopen", &[&labeled_item])
                    .token(a)
                    .body(json!({ "reason": "it is a bird", "force": true })),
            )
            .await;
        assert_eq!(
            (status, reopened["reported_source"].as_str()),
            (200, Some("human"))
        );

        // Reviewers' figures: the labels just given are counted.
        let (status, figures) = api
            .send(call(Method::GET, "/projects/{project}/reviewers", &[p]).token(a).query("since=1h"))
            .await;
        assert_eq!(status, 200);
        assert!(figures["reviewers"].as_array().unwrap().iter().any(|r| r["name"] == "api-admin"));
        let (status, _) = api
            .send(call(Method::GET, "/projects/{project}/reviewers", &[p]).token(a).query("since=yesterday-ish"))
            .await;
        assert_eq!(status, 422);

        // Models: a run, its cancel; the versions.
        let (status, _) = api
            .send(
                call(Method::POST, "/projects/{project}/retrain", &[p])
                    .token(a)
                    .body(json!({ "epochs": "many" })),
            )
            .await;
        assert_eq!(status, 422);
        let (status, run) = api
            .send(
                call(Method::POST, "/projects/{project}/retrain", &[p])
                    .token(a)
                    .body(json!({ "epochs": 1 })),
            )
            .await;
        assert_eq!(status, 202, "{run}");
        let (status, _) = api
            .send(call(Method::POST, "/projects/{project}/retrain", &[p]).token(a))
            .await;
        assert_eq!(status, 409, "one run at a time");
        let (status, cancelled) = api
            .send(call(Method::POST, "/projects/{project}/retrain/cancel", &[p]).token(a))
            .await;
        assert_eq!((status, &cancelled["run_id"]), (200, &run["run_id"]));
        let (status, versions) = api
            .send(call(Method::GET, "/projects/{project}/models", &[p]).token(a))
            .await;
        assert_eq!(status, 200);
        let number = versions[0]["version"].as_i64().unwrap().to_string();
        let (status, _) = api
            .send(
                call(
                    Method::GET,
                    "/projects/{project}/models/{version}",
                    &[p, &number],
                )
                .token(a),
            )
            .await;
        assert_eq!(status, 200);
        let (status, _) = api
            .send(
                call(
                    Method::GET,
                    "/projects/{project}/models/{version}",
                    &[p, "99"],
                )
                .token(a),
            )
            .await;
        assert_eq!(status, 404);

        // Export.
        let (status, _) = api
            .send(
                call(Method::GET, "/projects/{project}/export", &[p])
                    .token(a)
                    .query("format=jsonl"),
            )
            .await;
        assert_eq!(status, 200);
        let (status, _) = api
            .send(
                call(Method::GET, "/projects/{project}/export", &[p])
                    .token(a)
                    .query("format=xml"),
            )
            .await;
        assert_eq!(status, 422);

        // Ingest from an empty prefix of the store: it starts, and is listed.
        let (status, run) = api
            .send(
                call(Method::POST, "/projects/{project}/ingest", &[p])
                    .token(a)
                    .body(json!({ "prefix": "store:nothing-here/" })),
            )
            .await;
        assert_eq!(status, 202);
        let (status, _) = api
            .send(
                call(Method::POST, "/projects/{project}/ingest", &[p])
                    .token(a)
                    .body(json!({ "manifest": "/etc/passwd" })),
            )
            .await;
        assert_eq!(status, 422);
        let (status, listed) = api
            .send(call(Method::GET, "/projects/{project}/ingests", &[p]).token(a))
            .await;
        assert_eq!((status, &listed["ingests"][0]["id"]), (200, &run["id"]));
        let id = run["id"].as_str().unwrap().to_owned();
        let (status, _) = api
            .send(call(Method::GET, "/ingests/{ingest}", &[&id]).token(a))
            .await;
        assert_eq!(status, 200);

        // Tokens and the fleet.
        let (status, created) = api
            .send(
                call(Method::POST, "/tokens", &[]).token(a).body(
                    json!({ "name": "openapi-ops", "role": "ops", "expires_in_seconds": 600 }),
                ),
            )
            .await;
        assert_eq!(status, 201);
        let ops = created["token"].as_str().unwrap().to_owned();
        let (status, _) = api
            .send(call(Method::GET, "/tokens", &[]).token(&ops))
            .await;
        assert_eq!(status, 403, "an ops token lists no tokens");
        let (status, _) = api
            .send(call(Method::GET, "/status", &[]).token(&ops))
            .await;
        assert_eq!(status, 200);
        let (status, tokens) = api.send(call(Method::GET, "/tokens", &[]).token(a)).await;
        assert_eq!(status, 200);
        assert!(
            tokens
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["id"] == created["id"])
        );
        let ops_id = created["id"].as_str().unwrap().to_owned();
        let (status, revoked) = api
            .send(call(Method::POST, "/tokens/{token}/revoke", &[&ops_id]).token(a))
            .await;
        assert_eq!((status, revoked["state"].as_str()), (200, Some("revoked")));

        // Nothing described was left out of the scenario, and each
        // operation answered with success at least once.
        let missing: Vec<_> = operations(&api.spec)
            .into_iter()
            .filter(|op| {
                !api.seen
                    .get(op)
                    .is_some_and(|statuses| statuses.iter().any(|s| (200..300).contains(s)))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "never answered with success: {missing:?}"
        );
    })
    .await;
}

/// Every handler of the API carries `#[utoipa::path]`, and the API router
/// registers routes only through `routes!`, which puts each in the
/// description: a route added another way fails here.
#[test]
fn no_route_bypasses_the_description() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/http");
    // Not part of `/api/v1`: health, metrics and the pages.
    let outside = ["healthz", "metrics", "metrics_with_token"];
    let skip_files = ["mod.rs", "extract.rs", "openapi.rs", "review_page.rs"];
    let mut undescribed = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_owned();
        if skip_files.contains(&file.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut described = false;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with("#[utoipa::path(") {
                described = true;
            } else if let Some(rest) = line.strip_prefix("pub async fn ") {
                let name = rest.split('(').next().unwrap();
                if !described && !outside.contains(&name) {
                    undescribed.push(format!("{file}: {name}"));
                }
                described = false;
            }
        }
    }
    assert!(
        undescribed.is_empty(),
        "handlers without #[utoipa::path]: {undescribed:?}"
    );

    let router = std::fs::read_to_string(format!("{dir}/mod.rs")).unwrap();
    let api = router
        .split("pub fn api()")
        .nth(1)
        .and_then(|rest| rest.split("\n}\n").next())
        .expect("http/mod.rs has `pub fn api()`");
    assert!(api.contains(".routes(routes!("));
    assert!(
        !api.contains(".route("),
        "api() registers a route outside routes!"
    );
}
