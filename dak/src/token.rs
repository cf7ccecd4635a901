//! `dak token`: mints a client JWT for development and tests.

use std::time::Duration;

use dak_runtime::auth;
use dak_wire::{DeviceId, UserId};

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The user the token speaks for (`sub`).
    #[arg(long)]
    pub user: String,
    /// The device (`device` claim).
    #[arg(long, default_value = "default")]
    pub device: String,
    /// How long the token is valid.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// The HS256 secret the server verifies with.
    #[arg(long, env = "DAK_JWT_SECRET", hide_env_values = true)]
    pub secret: String,
}

pub fn mint(args: &TokenArgs) -> anyhow::Result<String> {
    let user =
        UserId::parse(args.user.as_str()).map_err(|e| anyhow::anyhow!("--user: {}", e.message))?;
    let device = DeviceId::parse(args.device.as_str())
        .map_err(|e| anyhow::anyhow!("--device: {}", e.message))?;
    Ok(auth::mint(&args.secret, &user, &device, args.ttl))
}
