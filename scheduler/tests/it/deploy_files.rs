//! The deployment files parse and agree with the code: `ops/compose.yml`,
//! `ops/k8s/*.yaml`, `ops/grafana/sieve.json`, the Dockerfiles and
//! `docs/operations.md`. No Docker engine or cluster is needed: every check
//! reads files. What they catch: a setting the binaries would refuse (settings
//! deny unknown keys), a command line the CLI would reject, a drain cut short
//! by SIGKILL, a dashboard metric that no code records, a setting missing from
//! the runbook.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;
use serde_yaml_ng::Value;
use sieve_scheduler::cli::Cli;
use sieve_shared::Settings;

const WORKER_FLAGS: [&str; 5] = [
    "--capabilities",
    "--batch-size",
    "--batch-timeout-ms",
    "--listen",
    "--config",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every non-empty YAML document of a file.
fn yaml_documents(relative: &str) -> Vec<Value> {
    let text = read(relative);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{relative} is not YAML: {e}"))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn k8s_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(repo().join("ops/k8s"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .map(|name| format!("ops/k8s/{name}"))
        .collect();
    files.sort();
    files
}

fn k8s_documents() -> Vec<(String, Value)> {
    k8s_files()
        .into_iter()
        .flat_map(|file| {
            yaml_documents(&file)
                .into_iter()
                .map(move |doc| (file.clone(), doc))
        })
        .collect()
}

/// `section -> key -> default` for every setting.
fn settings() -> BTreeMap<String, BTreeMap<String, serde_json::Value>> {
    let value = serde_json::to_value(Settings::default()).unwrap();
    value
        .as_object()
        .unwrap()
        .iter()
        .map(|(section, keys)| {
            let keys = keys
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (section.clone(), keys)
        })
        .collect()
}

fn env_var(section: &str, key: &str) -> String {
    format!("SIEVE_{}__{}", section.to_uppercase(), key.to_uppercase())
}

/// Whether the binaries accept an environment variable that starts with
/// `SIEVE_` (anything else is not theirs to judge).
fn check_env(where_: &str, name: &str) {
    let Some(rest) = name.strip_prefix("SIEVE_") else {
        return;
    };
    if rest == "CONFIG" {
        return;
    }
    let known = settings();
    let ok = rest.split_once("__").is_some_and(|(section, key)| {
        known
            .get(&section.to_lowercase())
            .is_some_and(|keys| keys.contains_key(&key.to_lowercase()))
    });
    assert!(
        ok,
        "{where_}: {name} is not a setting (shared/src/settings.rs)"
    );
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn check_scheduler_args(where_: &str, args: &[String]) {
    let argv = std::iter::once("sieve".to_owned()).chain(args.iter().cloned());
    if let Err(err) = Cli::try_parse_from(argv) {
        panic!("{where_}: `sieve {}` is refused: {err}", args.join(" "));
    }
}

fn check_worker_args(where_: &str, args: &[String]) {
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) => (f, Some(v.to_owned())),
            None => (flag.as_str(), None),
        };
        assert!(
            WORKER_FLAGS.contains(&flag),
            "{where_}: sieve-worker has no flag {flag}"
        );
        let value = inline
            .or_else(|| args.next().cloned())
            .unwrap_or_else(|| panic!("{where_}: {flag} needs a value"));
        if flag == "--capabilities" {
            for cap in value.split(',') {
                assert!(
                    ["prelabel", "train"].contains(&cap.trim()),
                    "{where_}: unknown capability {cap:?}"
                );
            }
        }
    }
}

fn capabilities(args: &[String]) -> Vec<String> {
    args.iter()
        .position(|a| a == "--capabilities")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_else(|| vec!["prelabel".into(), "train".into()])
}

/// Seconds of a Compose duration such as `45s`, `1m` or `1m30s`.
fn compose_seconds(raw: &str) -> u64 {
    let mut total = 0;
    let mut number = String::new();
    for c in raw.chars() {
        if c.is_ascii_digit() {
            number.push(c);
        } else {
            let n: u64 = number.parse().unwrap();
            number.clear();
            total += match c {
                'h' => n * 3600,
                'm' => n * 60,
                's' => n,
                other => panic!("unknown unit {other} in {raw}"),
            };
        }
    }
    assert!(number.is_empty(), "duration {raw} has no unit");
    total
}

fn default_drain_seconds() -> u64 {
    Settings::default().worker.drain_seconds
}

#[test]
fn compose_has_every_service_with_sound_dependencies() {
    let docs = yaml_documents("ops/compose.yml");
    assert_eq!(docs.len(), 1);
    let compose = &docs[0];
    let services = compose["services"].as_mapping().unwrap();
    let names: BTreeSet<String> = services
        .keys()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    for needed in [
        "postgres",
        "redis",
        "rabbitmq",
        "migrate",
        "scheduler",
        "demo",
    ] {
        assert!(names.contains(needed), "compose has no {needed} service");
    }
    assert!(
        names.iter().any(|n| n.starts_with("worker")),
        "compose has no worker"
    );
    assert!(
        compose["services"]["postgres"]["image"]
            .as_str()
            .unwrap()
            .starts_with("postgres:15")
    );
    assert!(
        compose["services"]["redis"]["image"]
            .as_str()
            .unwrap()
            .starts_with("redis:7")
    );
    assert_eq!(
        compose["services"]["rabbitmq"]["image"].as_str(),
        Some("rabbitmq:3.10-management")
    );
    assert!(strings(&compose["services"]["demo"]["profiles"]).contains(&"demo".to_owned()));
    assert_eq!(
        compose["services"]["scheduler"]["depends_on"]["migrate"]["condition"].as_str(),
        Some("service_completed_successfully")
    );

    for (name, service) in services {
        let name = name.as_str().unwrap();
        let where_ = format!("compose service {name}");
        if let Some(deps) = service["depends_on"].as_mapping() {
            for (dep, how) in deps {
                let dep = dep.as_str().unwrap();
                assert!(names.contains(dep), "{where_} depends on unknown {dep}");
                let condition = how["condition"].as_str().unwrap();
                assert!(
                    [
                        "service_started",
                        "service_healthy",
                        "service_completed_successfully"
                    ]
                    .contains(&condition),
                    "{where_}: condition {condition}"
                );
                if condition == "service_healthy" {
                    let check = &compose["services"][dep]["healthcheck"];
                    assert!(
                        check["test"].is_sequence() && check["disable"].as_bool() != Some(true),
                        "{where_} waits for {dep} to be healthy, but {dep} has no healthcheck"
                    );
                }
            }
        }
        let mut drain = default_drain_seconds();
        if let Some(env) = service["environment"].as_mapping() {
            for (key, value) in env {
                let key = key.as_str().unwrap();
                check_env(&where_, key);
                if key == "SIEVE_WORKER__DRAIN_SECONDS" {
                    drain = value
                        .as_u64()
                        .unwrap_or_else(|| value.as_str().unwrap().parse().unwrap());
                }
            }
        }
        let dockerfile = service["build"]["dockerfile"].as_str().unwrap_or_default();
        let command = strings(&service["command"]);
        // The demo image runs `sieve-tools`, whose command line the tools
        // crate checks against this file (tools/src/main.rs).
        let target = service["build"]["target"].as_str().unwrap_or_default();
        if dockerfile.ends_with("Dockerfile.scheduler") && target != "demo" {
            check_scheduler_args(&where_, &command);
        }
        if dockerfile.ends_with("Dockerfile.worker") {
            check_worker_args(&where_, &command);
            let grace = service["stop_grace_period"]
                .as_str()
                .map_or(10, compose_seconds);
            assert!(
                grace > drain,
                "{where_}: stop_grace_period {grace}s must exceed the drain ({drain}s)"
            );
        }
        if ["scheduler", "demo", "migrate"].contains(&name) || name.starts_with("worker") {
            // The store is a bucket reached over the network: no process
            // shares a directory with another.
            let env = &compose["services"][name]["environment"];
            let url = env["SIEVE_STORE__URL"].as_str().unwrap_or_default();
            assert!(url.starts_with("s3://"), "{where_}: store.url {url:?}");
            assert!(
                env["SIEVE_S3__ENDPOINT"].as_str().is_some(),
                "{where_}: no s3.endpoint"
            );
            assert!(
                service["volumes"].is_null(),
                "{where_} mounts a volume: {:?}",
                service["volumes"]
            );
        }
    }
    assert_eq!(
        compose["services"]["demo"]["environment"]["SIEVE_HTTP__API_URL"].as_str(),
        Some("http://scheduler:8080")
    );
}

#[test]
fn k8s_manifests_are_complete_and_consistent() {
    let docs = k8s_documents();
    assert!(!docs.is_empty());
    let mut by_kind: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for (file, doc) in &docs {
        let api = doc["apiVersion"].as_str();
        let kind = doc["kind"].as_str();
        let name = doc["metadata"]["name"].as_str();
        assert!(
            api.is_some() && kind.is_some() && name.is_some(),
            "{file}: a document lacks apiVersion, kind or metadata.name"
        );
        assert!(
            doc["metadata"]["namespace"].is_null(),
            "{file}: manifests are namespace-free"
        );
        let previous = by_kind
            .entry(kind.unwrap().to_owned())
            .or_default()
            .insert(name.unwrap().to_owned(), doc.clone());
        assert!(
            previous.is_none(),
            "{file}: {} defined twice",
            name.unwrap()
        );
    }
    let empty = BTreeMap::new();
    let of = |kind: &str| by_kind.get(kind).unwrap_or(&empty);

    let config = of("ConfigMap");
    let secrets = of("Secret");
    for (name, map) in config {
        for key in map["data"].as_mapping().unwrap().keys() {
            check_env(&format!("ConfigMap {name}"), key.as_str().unwrap());
        }
    }
    let setting = |key: &str| -> Option<String> {
        config
            .values()
            .find_map(|m| m["data"][key].as_str().map(str::to_owned))
    };
    let drain: u64 = setting("SIEVE_WORKER__DRAIN_SECONDS")
        .map_or(default_drain_seconds(), |v| v.parse().unwrap());
    let store_url = setting("SIEVE_STORE__URL").unwrap();
    assert!(store_url.starts_with("s3://"), "store.url {store_url:?}");
    assert!(setting("SIEVE_S3__ENDPOINT").is_some());
    assert!(
        !of("PersistentVolumeClaim").contains_key("sieve-store"),
        "pods share no store volume"
    );
    let prefix = setting("SIEVE_BROKER__PREFIX").unwrap_or_else(|| "sieve".into());

    let deployments = of("Deployment");
    assert!(deployments.contains_key("sieve-scheduler"));
    for (name, deployment) in deployments {
        let where_ = format!("Deployment {name}");
        let spec = &deployment["spec"];
        let pod = &spec["template"]["spec"];
        let labels = spec["template"]["metadata"]["labels"].as_mapping().unwrap();
        for (k, v) in spec["selector"]["matchLabels"].as_mapping().unwrap() {
            assert_eq!(labels.get(k), Some(v), "{where_}: selector misses the pod");
        }
        assert_eq!(
            pod["enableServiceLinks"].as_bool(),
            Some(false),
            "{where_}: service links add SIEVE_* variables"
        );
        let claims: BTreeMap<String, String> = pod["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|v| {
                let claim = v["persistentVolumeClaim"]["claimName"].as_str()?;
                Some((v["name"].as_str().unwrap().to_owned(), claim.to_owned()))
            })
            .collect();
        for claim in claims.values() {
            assert!(
                of("PersistentVolumeClaim").contains_key(claim),
                "{where_}: no claim {claim}"
            );
        }
        let init = pod["initContainers"].as_sequence().cloned();
        let containers = pod["containers"].as_sequence().unwrap();
        for (container, is_init) in containers
            .iter()
            .map(|c| (c, false))
            .chain(init.iter().flatten().map(|c| (c, true)))
        {
            let where_ = format!("{where_} container {}", container["name"].as_str().unwrap());
            for source in container["envFrom"].as_sequence().unwrap() {
                if let Some(map) = source["configMapRef"]["name"].as_str() {
                    assert!(config.contains_key(map), "{where_}: no ConfigMap {map}");
                }
                if let Some(secret) = source["secretRef"]["name"].as_str() {
                    let secret_doc = secrets
                        .get(secret)
                        .unwrap_or_else(|| panic!("{where_}: no Secret {secret}"));
                    for key in secret_doc["stringData"].as_mapping().unwrap().keys() {
                        check_env(&format!("Secret {secret}"), key.as_str().unwrap());
                    }
                }
            }
            let image = container["image"].as_str().unwrap();
            let args = strings(&container["args"]);
            if image.contains("scheduler") {
                check_scheduler_args(&where_, &args);
            } else {
                assert!(image.contains("worker"), "{where_}: unknown image {image}");
                check_worker_args(&where_, &args);
                let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
                assert!(
                    grace > drain,
                    "{where_}: terminationGracePeriodSeconds {grace} must exceed the drain ({drain}s)"
                );
            }
            assert!(
                container["resources"]["requests"].is_mapping()
                    && container["resources"]["limits"].is_mapping(),
                "{where_}: resources"
            );
            if is_init {
                continue;
            }
            let ports: Vec<&Value> = container["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .flat_map(|p| [&p["name"], &p["containerPort"]])
                .collect();
            for probe in ["readinessProbe", "livenessProbe"] {
                let get = &container[probe]["httpGet"];
                assert_eq!(get["path"].as_str(), Some("/healthz"), "{where_}: {probe}");
                assert!(
                    ports.contains(&&get["port"]),
                    "{where_}: {probe} port is not declared"
                );
            }
            assert!(
                container["volumeMounts"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .all(|m| !claims.contains_key(m["name"].as_str().unwrap())),
                "{where_}: mounts a claim; the object store is {store_url}"
            );
            if image.ends_with("-gpu") {
                assert_eq!(
                    container["resources"]["limits"]["nvidia.com/gpu"].as_u64(),
                    Some(1),
                    "{where_}: one GPU"
                );
                assert!(pod["tolerations"].is_sequence() && pod["nodeSelector"].is_mapping());
            }
        }
    }
    assert!(
        deployments
            .values()
            .any(|d| d["spec"]["template"]["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap()
                .ends_with("-gpu")),
        "no GPU worker Deployment"
    );

    let scaled = of("ScaledObject");
    assert!(!scaled.is_empty(), "no ScaledObject");
    for (name, object) in scaled {
        let where_ = format!("ScaledObject {name}");
        let spec = &object["spec"];
        let target = spec["scaleTargetRef"]["name"].as_str().unwrap();
        let deployment = deployments
            .get(target)
            .unwrap_or_else(|| panic!("{where_}: no Deployment {target}"));
        let caps = capabilities(&strings(
            &deployment["spec"]["template"]["spec"]["containers"][0]["args"],
        ));
        assert!(
            !caps.contains(&"train".to_owned()),
            "{where_}: trainers are not autoscaled on the prelabel queue"
        );
        assert!(spec["minReplicaCount"].as_u64() <= spec["maxReplicaCount"].as_u64());
        let triggers = spec["triggers"].as_sequence().unwrap();
        assert!(!triggers.is_empty());
        for trigger in triggers {
            assert_eq!(trigger["type"].as_str(), Some("rabbitmq"), "{where_}");
            let meta = trigger["metadata"].as_mapping().unwrap();
            assert!(
                meta.values().all(Value::is_string),
                "{where_}: trigger metadata values must be strings"
            );
            assert_eq!(trigger["metadata"]["protocol"].as_str(), Some("http"));
            assert_eq!(
                trigger["metadata"]["queueName"].as_str(),
                Some(format!("{prefix}.prelabel").as_str())
            );
            let auth = trigger["authenticationRef"]["name"].as_str().unwrap();
            let auth = of("TriggerAuthentication")
                .get(auth)
                .unwrap_or_else(|| panic!("{where_}: no TriggerAuthentication {auth}"));
            for target in auth["spec"]["secretTargetRef"].as_sequence().unwrap() {
                let secret = target["name"].as_str().unwrap();
                let key = target["key"].as_str().unwrap();
                assert!(
                    secrets
                        .get(secret)
                        .is_some_and(|s| !s["stringData"][key].is_null()),
                    "{where_}: Secret {secret} has no {key}"
                );
            }
        }
    }

    let budgets = of("PodDisruptionBudget");
    assert!(!budgets.is_empty(), "no PodDisruptionBudget");
    for (name, budget) in budgets {
        let selector = budget["spec"]["selector"]["matchLabels"]
            .as_mapping()
            .unwrap();
        assert!(
            budget["spec"]["minAvailable"].is_null() != budget["spec"]["maxUnavailable"].is_null(),
            "PodDisruptionBudget {name}: one of minAvailable, maxUnavailable"
        );
        assert!(
            deployments.values().any(|d| {
                let labels = &d["spec"]["template"]["metadata"]["labels"];
                selector.iter().all(|(k, v)| &labels[k] == v)
            }),
            "PodDisruptionBudget {name} selects no Deployment"
        );
    }
}

/// Metric names the code records, with `true` for histograms.
fn recorded_metrics() -> BTreeMap<String, bool> {
    let mut found = BTreeMap::new();
    for dir in ["scheduler/src", "worker/src", "shared/src"] {
        let mut stack = vec![repo().join(dir)];
        while let Some(path) = stack.pop() {
            if path.is_dir() {
                stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (macro_, histogram) in [
                ("counter!(\"", false),
                ("gauge!(\"", false),
                ("histogram!(\"", true),
            ] {
                for (at, _) in text.match_indices(macro_) {
                    let rest = &text[at + macro_.len()..];
                    let name = &rest[..rest.find('"').unwrap()];
                    found.insert(name.to_owned(), histogram);
                }
            }
        }
    }
    found
}

fn identifiers(expr: &str) -> impl Iterator<Item = &str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| !t.is_empty())
}

#[test]
fn dashboard_uses_only_recorded_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("ops/grafana/sieve.json")).unwrap();
    let recorded = recorded_metrics();
    assert!(recorded.contains_key("sieve_results_routed_total"));
    let known = |name: &str| -> bool {
        recorded.get(name) == Some(&false)
            || ["", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| recorded.get(base) == Some(&true))
            })
    };
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus datasource variable"
    );
    let mut ids = BTreeSet::new();
    let mut exprs = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "panel ids are unique"
        );
        assert!(panel["gridPos"]["w"].is_u64(), "{title}: gridPos");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            exprs += 1;
            let metrics: Vec<&str> = identifiers(expr)
                .filter(|t| t.starts_with("sieve_") || t.starts_with("rabbitmq_"))
                .collect();
            assert!(!metrics.is_empty(), "{title}: {expr} names no metric");
            for metric in metrics {
                assert!(
                    metric.starts_with("rabbitmq_") || known(metric),
                    "{title}: {metric} is not recorded by the code"
                );
            }
        }
    }
    assert!(exprs >= 10);
}

/// `(FROM line, stage lines)` of each stage.
fn stages(dockerfile: &str) -> Vec<(String, Vec<String>)> {
    let mut stages: Vec<(String, Vec<String>)> = Vec::new();
    for line in read(dockerfile).lines().map(str::trim) {
        if line.starts_with("FROM ") {
            stages.push((line.to_owned(), Vec::new()));
        } else if let Some((_, lines)) = stages.last_mut() {
            lines.push(line.to_owned());
        }
    }
    stages
}

#[test]
fn dockerfiles_build_on_the_pinned_toolchain_and_run_unprivileged() {
    for (file, final_stage, runtimes) in [
        ("ops/Dockerfile.scheduler", "scheduler", vec!["runtime"]),
        ("ops/Dockerfile.worker", "cpu", vec!["cpu", "gpu", "cuda"]),
    ] {
        let text = read(file);
        assert!(
            text.contains("rust:1.95"),
            "{file}: builds on the pinned toolchain"
        );
        assert!(text.contains("--mount=type=cache"), "{file}: cache mounts");
        let stages = stages(file);
        assert!(
            stages
                .last()
                .unwrap()
                .0
                .ends_with(&format!(" AS {final_stage}")),
            "{file}: the default target is {final_stage}"
        );
        for runtime in runtimes {
            let (_, lines) = stages
                .iter()
                .find(|(from, _)| from.ends_with(&format!(" AS {runtime}")))
                .unwrap_or_else(|| panic!("{file}: no stage {runtime}"));
            let user = lines.iter().rev().find(|l| l.starts_with("USER ")).unwrap();
            assert!(
                !user.contains("root") && !user.starts_with("USER 0"),
                "{file} {runtime}: runs as {user}"
            );
            assert!(
                lines.iter().any(|l| l.starts_with("HEALTHCHECK ")),
                "{file} {runtime}: HEALTHCHECK"
            );
            for line in lines
                .iter()
                .filter(|l| l.starts_with("ENV ") || l.starts_with("SIEVE_"))
            {
                for word in line.split_whitespace() {
                    if let Some((key, _)) = word.split_once('=') {
                        check_env(file, key);
                    }
                }
            }
        }
    }
    let worker = read("ops/Dockerfile.worker");
    assert!(worker.contains("--no-default-features --features cuda"));
    // The GPU image the manifests run builds with what CI checks compiles.
    assert!(worker.contains("--no-default-features --features wgpu"));
    assert!(
        read("ops/k8s/worker-gpu.yaml").contains("worker:0.1.0-gpu"),
        "worker-gpu.yaml runs the gpu image"
    );
}

/// Prometheus scrapes the scheduler where `/metrics` needs no token: the
/// port of `SIEVE_HTTP__METRICS_BIND`, declared on the container (on the API
/// port it would get 401, and with `metrics_bind` set, 404).
#[test]
fn the_scheduler_is_scraped_on_its_metrics_bind() {
    let docs = k8s_documents();
    let bind = docs
        .iter()
        .find(|(_, d)| d["kind"] == "ConfigMap")
        .and_then(|(_, d)| d["data"]["SIEVE_HTTP__METRICS_BIND"].as_str())
        .expect("the ConfigMap sets SIEVE_HTTP__METRICS_BIND");
    let port: u64 = bind.rsplit_once(':').unwrap().1.parse().unwrap();
    let (_, scheduler) = docs
        .iter()
        .find(|(_, d)| d["kind"] == "Deployment" && d["metadata"]["name"] == "sieve-scheduler")
        .unwrap();
    let pod = &scheduler["spec"]["template"];
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"].as_str(),
        Some(port.to_string().as_str()),
        "the scrape port is http.metrics_bind's"
    );
    let ports = &pod["spec"]["containers"][0]["ports"];
    assert!(
        ports
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p["containerPort"].as_u64() == Some(port)),
        "the container declares port {port}"
    );
}

#[test]
fn the_runbook_documents_every_setting_with_its_default() {
    let doc = read("docs/operations.md");
    for (section, keys) in settings() {
        for (key, default) in keys {
            let name = format!("`{section}.{key}`");
            let line = doc
                .lines()
                .find(|l| l.starts_with(&format!("| {name} |")))
                .unwrap_or_else(|| panic!("docs/operations.md has no table row for {name}"));
            let env = env_var(&section, &key);
            assert!(line.contains(&env), "{name}: its row lacks {env}");
            let expected: Vec<String> = match &default {
                serde_json::Value::String(s) => vec![s.clone()],
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                    .collect(),
                serde_json::Value::Null => vec![],
                other => vec![other.to_string()],
            };
            for part in expected {
                assert!(
                    line.contains(&part),
                    "{name}: its row lacks the default {part}"
                );
            }
        }
    }
}

/// Command lines in ```sh blocks of the runbooks must be ones the binaries
/// accept: planned commands belong in prose, marked as planned.
#[test]
fn documented_commands_exist() {
    for file in ["docs/operations.md", "ops/k8s/README.md"] {
        let mut in_sh = false;
        let mut checked = 0;
        for line in read(file).lines() {
            let trimmed = line.trim();
            if trimmed.starts_with("```") {
                in_sh = trimmed == "```sh";
                continue;
            }
            if !in_sh {
                continue;
            }
            let command = trimmed.split(" #").next().unwrap().trim();
            let words: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
            match words.first().map(String::as_str) {
                Some("sieve") => check_scheduler_args(file, &words[1..]),
                Some("sieve-worker") => check_worker_args(file, &words[1..]),
                _ => continue,
            }
            checked += 1;
        }
        if file == "docs/operations.md" {
            assert!(checked >= 5, "{file}: only {checked} commands checked");
        }
    }
}
