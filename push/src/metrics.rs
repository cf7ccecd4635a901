//! The names of push's metrics. Label values are bounded: the `reason` of a
//! failure is one of `invalid_token`, `rejected`, `unreachable`, `throttled`,
//! `server_error`; the `reason` of a skip is `connected`, `no_token` or
//! `receipt`.

pub const SENT: &str = "dak_push_sent_total";
pub const FAILURES: &str = "dak_push_failures_total";
pub const SKIPPED: &str = "dak_push_skipped_total";
pub const TOKENS_REMOVED: &str = "dak_push_tokens_removed_total";
pub const BEFORE_STORED: &str = "dak_push_before_stored_total";

pub(crate) fn describe() {
    use ::metrics::describe_counter;
    describe_counter!(
        SENT,
        "notifications accepted by FCM (or logged, without credentials)"
    );
    describe_counter!(FAILURES, "notifications not sent, by reason");
    describe_counter!(
        SKIPPED,
        "offline messages not pushed to a device, by reason (connected, no_token)"
    );
    describe_counter!(
        TOKENS_REMOVED,
        "push tokens removed because FCM reported them invalid"
    );
    describe_counter!(
        BEFORE_STORED,
        "notifications sent before persistence had stored their message, after DAK_PUSH_STORE_WAIT"
    );
    use dak_runtime::metrics::register_counter;
    register_counter(SENT, &[]);
    register_counter(BEFORE_STORED, &[]);
    register_counter(TOKENS_REMOVED, &[]);
    for reason in [
        "invalid_token",
        "rejected",
        "unreachable",
        "throttled",
        "server_error",
    ] {
        register_counter(FAILURES, &[("reason", reason)]);
    }
    for reason in ["connected", "no_token", "receipt"] {
        register_counter(SKIPPED, &[("reason", reason)]);
    }
}
