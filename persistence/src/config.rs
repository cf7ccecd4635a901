use std::time::Duration;

/// persistence's own settings.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "persistence")]
pub struct Config {
    /// How long an undelivered message is kept for its device.
    #[arg(long, env = "DAK_INBOX_TTL", default_value = "30days", value_parser = humantime::parse_duration)]
    pub inbox_ttl: Duration,
    /// How long a drop is remembered, so that a late `store` of the same mid (an
    /// ack that overtook the hand-over to offline) is not kept.
    #[arg(long, env = "DAK_TOMBSTONE_TTL", default_value = "1day", value_parser = humantime::parse_duration)]
    pub tombstone_ttl: Duration,
    /// How often expired messages are deleted.
    #[arg(long, env = "DAK_EXPIRY_INTERVAL", default_value = "1min", value_parser = humantime::parse_duration)]
    pub expiry_interval: Duration,
    /// How long the status of a message is kept, counted from when it was sent.
    /// A read receipt for a message older than this is refused.
    #[arg(long, env = "DAK_STATUS_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub status_retention: Duration,
}
