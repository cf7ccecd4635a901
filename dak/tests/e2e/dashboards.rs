//! The Grafana dashboard (`deploy/grafana/dak.json`) and the Prometheus alert
//! rules (`deploy/prometheus/alerts.yaml`) name only metrics dak exports: every
//! metric they use is in `/metrics` of a `dak up` that has just started and
//! handled nothing, so each is there from start-up, at zero, and a rule's
//! `rate()` or `increase()` sees its first event. The process metrics and
//! `dak_build_info` are checked for sane values too.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::support::{metrics_text, repo_path, spawn_dak_up};

const DASHBOARD: &str = "deploy/grafana/dak.json";
const ALERTS: &str = "deploy/prometheus/alerts.yaml";

/// The metric names in a PromQL expression: identifiers that start with
/// `dak_` or `process_`, with a histogram's `_bucket`, `_sum` and `_count`
/// taken off.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        let at_start = i == 0 || !is_ident(bytes[i - 1]);
        let rest = &expr[i..];
        if at_start && (rest.starts_with("dak_") || rest.starts_with("process_")) {
            let len = rest.bytes().take_while(|&b| is_ident(b)).count();
            into.insert(base_name(&rest[..len]).to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
}

fn base_name(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
}

/// Every query of the dashboard: the panels' targets and the template
/// variables' queries. Checks the shape Grafana needs on the way.
fn dashboard_metrics() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo_path(DASHBOARD)).expect("reading the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "dak");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut names = BTreeSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "panel id {} twice",
            panel["id"]
        );
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "{panel}");
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expr");
            let mut own = BTreeSet::new();
            metric_names(expr, &mut own);
            assert!(
                !own.is_empty(),
                "{expr:?} in panel {} names no dak metric",
                panel["title"]
            );
            names.extend(own);
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(query) = variable["definition"].as_str() {
            metric_names(query, &mut names);
        }
    }
    names
}

/// Every rule's expression. Checks each rule has what Alertmanager and the
/// on-call need.
fn alert_metrics() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo_path(ALERTS)).expect("reading the alert rules");
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).expect("the rules are YAML");
    let mut names = BTreeSet::new();
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let alert = rule["alert"].as_str().expect("alert name");
            let expr = rule["expr"].as_str().expect("expr");
            let severity = rule["labels"]["severity"].as_str();
            assert!(
                matches!(severity, Some("warning" | "critical")),
                "{alert}: severity {severity:?}"
            );
            assert!(rule["annotations"]["summary"].as_str().is_some(), "{alert}");
            let mut own = BTreeSet::new();
            metric_names(expr, &mut own);
            assert!(!own.is_empty(), "{alert} names no dak metric");
            names.extend(own);
            alerts += 1;
        }
    }
    assert!(alerts >= 5, "only {alerts} alert rules");
    names
}

/// The metric names of Prometheus text, with a histogram's suffixes taken off.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| base_name(&l[..l.find(['{', ' ']).unwrap_or(l.len())]).to_owned())
        .collect()
}

/// The value of the one series of `name` in Prometheus text.
fn value(text: &str, name: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .unwrap_or_else(|| panic!("no {name} in /metrics"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn metric_names_are_read_from_promql() {
    let mut names = BTreeSet::new();
    metric_names(
        r#"histogram_quantile(0.9, sum by (le) (rate(dak_ack_latency_seconds_bucket{job=~"$job"}[5m]))) / process_open_fds + xdak_not_this"#,
        &mut names,
    );
    let expected: BTreeSet<String> = ["dak_ack_latency_seconds", "process_open_fds"]
        .map(String::from)
        .into();
    assert_eq!(names, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_name_only_metrics_dak_exports_from_start_up() {
    let dashboard = dashboard_metrics();
    let alerts = alert_metrics();
    for name in [
        "dak_messages_accepted_total",
        "dak_ack_latency_seconds",
        "dak_messages_retried_total",
        "dak_messages_offlined_total",
        "dak_messages_stored_total",
        "dak_push_sent_total",
        "dak_consumer_lag",
        "dak_connected_devices",
        "dak_message_age_seconds",
        "dak_push_failures_total",
        "dak_build_info",
        "process_cpu_seconds_total",
    ] {
        assert!(dashboard.contains(name), "the dashboard lacks {name}");
    }
    for name in [
        "dak_consumer_lag",
        "dak_ack_latency_seconds",
        "dak_messages_retried_total",
        "dak_push_failures_total",
        "dak_dead_letters_total",
    ] {
        assert!(alerts.contains(name), "the alert rules lack {name}");
    }

    let data_dir = tempfile::tempdir().unwrap();
    let (_process, _, admin) = spawn_dak_up(data_dir.path(), &[]).await;
    let text = metrics_text(admin).await;

    let exported = exported(&text);
    let missing: Vec<&String> = dashboard
        .union(&alerts)
        .filter(|name| !exported.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "named by the dashboard or the alert rules, but not in /metrics: {missing:?}\n\n{text}"
    );

    let version = format!(
        "dak_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.lines().any(|l| l == version), "no `{version}`");
    // Nothing happened yet: the counters are there at zero.
    assert_eq!(value(&text, "dak_messages_accepted_total"), 0.0);
    assert_eq!(value(&text, "dak_dead_letters_total"), 0.0);
    assert!(value(&text, "process_open_fds") >= 3.0);
    assert!(value(&text, "process_resident_memory_bytes") > 1e6);
    let started = value(&text, "process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started <= now + 1.0 && started > now - 600.0,
        "process_start_time_seconds {started}, now {now}"
    );
}
