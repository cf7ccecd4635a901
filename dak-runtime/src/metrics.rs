//! The names of dak's metrics, in one place so every service counts the same
//! thing under the same name. Label values are bounded (codes, reasons, topics).
//!
//! Each service registers the counters it moves when it is built (at zero, with
//! every label value it can use), so that `rate()` and the alert rules in
//! `deploy/prometheus/` see them from start-up rather than from the first event.

pub const ACCEPTED: &str = "dak_messages_accepted_total";
pub const DELIVERED: &str = "dak_messages_delivered_total";
pub const ACKED: &str = "dak_messages_acked_total";
pub const FORWARDED_ACKS: &str = "dak_acks_forwarded_total";
pub const RETRIED: &str = "dak_messages_retried_total";
pub const OFFLINED: &str = "dak_messages_offlined_total";
pub const DUPLICATES: &str = "dak_duplicate_sends_total";
pub const ROUTED: &str = "dak_events_routed_total";
pub const REJECTED: &str = "dak_client_errors_total";
pub const DEAD_LETTERS: &str = "dak_dead_letters_total";
pub const ACK_LATENCY: &str = "dak_ack_latency_seconds";
pub const CONNECTED_DEVICES: &str = "dak_connected_devices";
pub const STALLED_SOCKETS: &str = "dak_ws_stalled_sockets_closed_total";
pub const CONSUMER_LAG: &str = "dak_consumer_lag";
pub const INFLIGHT: &str = "dak_inflight_deliveries";
pub const DEDUP_ENTRIES: &str = "dak_dedup_entries";
pub const DEDUP_EVICTED: &str = "dak_dedup_evicted_total";
pub const BUS_WRITE_FAILURES: &str = "dak_bus_write_failures_total";
pub const EPHEMERAL: &str = "dak_ephemeral_delivered_total";
pub const RECEIPTS: &str = "dak_receipts_total";
pub const MESSAGE_AGE: &str = "dak_message_age_seconds";
pub const DEDUP_CONFIRM_FAILURES: &str = "dak_dedup_confirm_failures_total";
pub const JWKS_FETCH_FAILURES: &str = "dak_jwks_fetch_failures_total";
pub const BUILD_INFO: &str = "dak_build_info";
pub const BATCH_SECONDS: &str = "dak_batch_seconds";
pub const BATCH_RECORDS: &str = "dak_batch_records";
pub const STEP_SECONDS: &str = "dak_step_seconds";

/// The steps of the gateways' ingress that [`STEP_SECONDS`] times: the dedup
/// store's reserve, the bus's acknowledgement of the produced message, and the
/// dedup store's confirm. `dak up` has no separate dedup store (its log keeps
/// the outbox ids), so there only `bus_ack` is timed.
pub const INGRESS_STEPS: [&str; 3] = ["dedup_reserve", "bus_ack", "dedup_confirm"];

/// Makes the counter `name` with `labels` appear in `/metrics` at zero.
pub fn register_counter(name: &'static str, labels: &[(&'static str, &'static str)]) {
    ::metrics::counter!(name, labels).increment(0);
}

/// Makes the histogram `name` with `labels` appear in `/metrics`, empty.
pub fn register_histogram(name: &'static str, labels: &[(&'static str, &'static str)]) {
    // A histogram handle is registered when it is taken.
    let _ = ::metrics::histogram!(name, labels);
}

/// What the ingress of both gateways counts: accepted messages, outbox
/// retries, dedup confirmations that failed, and client errors by code.
pub fn register_ingress() {
    register_counter(ACCEPTED, &[]);
    register_counter(DUPLICATES, &[]);
    register_counter(DEDUP_CONFIRM_FAILURES, &[]);
    register_client_errors();
    for step in INGRESS_STEPS {
        register_histogram(STEP_SECONDS, &[("step", step)]);
    }
}

/// [`REJECTED`], one series per error code.
pub fn register_client_errors() {
    for code in dak_wire::ErrorCode::ALL {
        register_counter(REJECTED, &[("code", code.as_str())]);
    }
}

/// Records how long ago the message accepted at `accepted_ms` was accepted, as
/// it passes `stage`: `routed` (message-router took it off `dak.inbound`),
/// `fanned_out` (group-router took it off `dak.group`), `session` (session
/// took it off `dak.deliver`) and `sent` (its gateway wrote it to the socket).
/// The stages show where a slow delivery spends its time. Across machines the
/// figures include the clocks' skew.
pub fn message_age(stage: &'static str, accepted_ms: u64) {
    let age = crate::now_ms().saturating_sub(accepted_ms) as f64 / 1000.0;
    ::metrics::histogram!(MESSAGE_AGE, "stage" => stage).record(age);
}

/// Awaits `step`, and records how long it took in [`STEP_SECONDS`] under
/// `name`. For the waits on a store, the bus or another service that a batch
/// or a client's message goes through one after another: they show which of
/// them a slow stage is waiting on.
pub async fn timed<T>(name: &'static str, step: impl std::future::Future<Output = T>) -> T {
    let started = tokio::time::Instant::now();
    let out = step.await;
    ::metrics::histogram!(STEP_SECONDS, "step" => name).record(started.elapsed().as_secs_f64());
    out
}

/// Describes every metric named here, and sets [`BUILD_INFO`].
pub(crate) fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        BUILD_INFO,
        "always 1; the `version` label is the version of dak this process runs"
    );
    ::metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    describe_counter!(
        ACCEPTED,
        "messages accepted from clients (durable on the bus)"
    );
    describe_counter!(
        DEDUP_CONFIRM_FAILURES,
        "messages accepted although their dedup entry could not be marked durable (a resend is produced again, under the same mid)"
    );
    describe_counter!(
        DELIVERED,
        "message deliveries written to a device's socket, retries included"
    );
    describe_counter!(ACKED, "deliveries acked by the device while in flight");
    describe_counter!(
        FORWARDED_ACKS,
        "acks for mids not (or no longer) in flight, forwarded to dak.offline so storage drops them"
    );
    describe_counter!(RETRIED, "deliveries sent again after an ack timeout");
    describe_counter!(OFFLINED, "deliveries handed to dak.offline, by reason");
    describe_counter!(
        DUPLICATES,
        "client messages recognised as outbox retries of an earlier send"
    );
    describe_counter!(
        EPHEMERAL,
        "ephemeral messages and typing written to a connected device's socket"
    );
    describe_counter!(
        RECEIPTS,
        "delivered receipts sent back to senders when a device acked (session) or synced (persistence)"
    );
    describe_counter!(
        JWKS_FETCH_FAILURES,
        "failed refreshes of the JWKS (DAK_JWT_JWKS_URL); the keys fetched before stay in use"
    );
    describe_counter!(
        STALLED_SOCKETS,
        "sockets closed because a write to them stayed stuck for the idle timeout"
    );
    describe_counter!(
        DEDUP_EVICTED,
        "(sender, client id) entries dropped before their TTL because the dedup store was at its bound"
    );
    describe_counter!(ROUTED, "events routed by message-router, by kind");
    describe_counter!(
        BUS_WRITE_FAILURES,
        "commits of the embedded log that failed (a full disk, say): their appends were refused"
    );
    describe_counter!(REJECTED, "client input refused, by error code");
    describe_counter!(
        DEAD_LETTERS,
        "records parked in the dead-letter topic, by source topic and consumer group: not a valid event, or failing while the records around them went through"
    );
    describe_histogram!(
        ACK_LATENCY,
        Unit::Seconds,
        "from the first send to the device's ack"
    );
    describe_histogram!(
        MESSAGE_AGE,
        Unit::Seconds,
        "time since the message was accepted, at each stage of its way to a socket"
    );
    describe_histogram!(
        BATCH_SECONDS,
        Unit::Seconds,
        "time a consumer group's handler took over one batch of records, failed attempts included"
    );
    describe_histogram!(
        STEP_SECONDS,
        Unit::Seconds,
        "time one step of handling a batch or a client's message waited on a store, the bus or another service"
    );
    describe_histogram!(
        BATCH_RECORDS,
        Unit::Count,
        "records in each batch a consumer group handled"
    );
    describe_gauge!(
        CONNECTED_DEVICES,
        "WebSocket connections held by this process"
    );
    describe_gauge!(
        CONSUMER_LAG,
        "messages behind the end of the partitions, by consumer group and topic"
    );
    describe_gauge!(
        INFLIGHT,
        "deliveries waiting for an ack, as last seen by the retry loop"
    );
    describe_gauge!(
        DEDUP_ENTRIES,
        "(sender, client id) entries in the SQLite dedup table (bus.db or dedup.db), expired ones not yet deleted included"
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_timed_step_records_how_long_it_waited_under_its_name() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let out = ::metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                timed("bus_ack", tokio::time::sleep(Duration::from_millis(250))).await;
                timed("bus_ack", tokio::time::sleep(Duration::from_millis(50))).await;
                timed("dedup_reserve", async { 7 }).await
            })
        });
        assert_eq!(out, 7, "the step's own result comes back");

        let text = handle.render();
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        };
        assert_eq!(value("dak_step_seconds_count{step=\"bus_ack\"}"), 2.0);
        assert!((value("dak_step_seconds_sum{step=\"bus_ack\"}") - 0.3).abs() < 1e-9);
        assert_eq!(value("dak_step_seconds_count{step=\"dedup_reserve\"}"), 1.0);
        assert_eq!(value("dak_step_seconds_sum{step=\"dedup_reserve\"}"), 0.0);
    }
}
