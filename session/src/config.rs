use std::time::Duration;

/// session's own settings.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "session")]
pub struct Config {
    /// How long a device has to ack a delivery before it is sent again.
    #[arg(long, env = "DAK_ACK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub ack_timeout: Duration,
    /// How many times an unacked delivery is sent again before it goes to the
    /// offline inbox. 3 means up to 4 sends in all.
    #[arg(long, env = "DAK_DELIVERY_RETRIES", default_value_t = 3)]
    pub retries: u32,
    /// How often the retry loop looks for deliveries past their deadline.
    #[arg(long, env = "DAK_RETRY_SCAN_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub scan_interval: Duration,
    /// How long a claimed retry stays reserved for the instance that claimed it;
    /// if that instance dies, another one takes the delivery after this.
    #[arg(long, env = "DAK_RETRY_LEASE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub retry_lease: Duration,
    /// Timeout of one `POST /internal/v1/send` to a gateway.
    #[arg(long, env = "DAK_GATEWAY_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub gateway_timeout: Duration,
}
