use std::time::Duration;

use dak_runtime::config::LimitArgs;

/// ws-gateway's own settings.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "ws-gateway")]
pub struct Config {
    /// How often the gateway pings each socket.
    #[arg(long, env = "DAK_WS_PING_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,
    /// A socket silent for this long (no frame, no pong) is closed as half-open.
    #[arg(long, env = "DAK_WS_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Frames queued for one socket before `/send` reports it `busy`.
    #[arg(long, env = "DAK_WS_SEND_QUEUE", default_value_t = 1024)]
    pub send_queue: usize,
    /// Bytes of frames queued for one socket before `/send` reports it `busy`.
    #[arg(long, env = "DAK_WS_SEND_QUEUE_BYTES", default_value_t = 1024 * 1024)]
    pub send_queue_bytes: usize,
    /// Messages and acks per second one socket may send (burst: twice that);
    /// 0 turns the limit off.
    #[arg(long, env = "DAK_WS_RATE_LIMIT", default_value_t = 200)]
    pub rate_limit: u32,
    /// Client messages one socket may have waiting for Kafka at once; reading
    /// pauses beyond that.
    #[arg(long, env = "DAK_WS_MAX_PENDING", default_value_t = 256)]
    pub max_pending: usize,
    #[command(flatten)]
    pub limits: LimitArgs,
}
