//! The web console of `dak up`: plain HTML and JS shipped inside the binary.
//!
//! On the public address:
//! - `GET /`: the "try it" page, two chat panes that connect as two users
//!   over `/v1/ws` and show every frame (replay, `sync.done`, `accepted`,
//!   messages, the acks they send, receipts, typing).
//! - `GET /v1/console`: whether the try-it chat is on, and why not.
//! - `POST /v1/console/token` `{"user":"alice","device":"web"}` →
//!   `{"token":"…"}`: a token for any user, so it exists only when the
//!   try-it chat is on ([`TryIt`]).
//!
//! On the admin address:
//! - `GET /`: the ops page, the main counters of `/metrics`, live, and a
//!   message's status by mid (`GET /v1/messages/{mid}/status`).

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::Html;
use axum::routing::{get, post};
use axum::{Json, Router};
use dak_runtime::config::AuthArgs;
use dak_runtime::http::ApiError;
use dak_wire::{DeviceId, ErrorCode, UserId};
use serde::Deserialize;
use serde_json::{json, Value};

const TRY_IT_PAGE: &str = include_str!("console/index.html");
const OPS_PAGE: &str = include_str!("console/ops.html");

/// How long a console token is valid: one sitting.
const TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

/// Whether the try-it chat may mint tokens. Minting a token for any user
/// on request is an open door, so it is on only where no one has secured
/// the door: `dak up` made up its own secret (no token it did not mint
/// itself can exist), or the operator said so (`DAK_DEV_CONSOLE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TryIt {
    On { secret: String },
    Off { reason: String },
}

impl TryIt {
    /// Decides from the auth settings as `dak up` resolved them: `generated`
    /// says the secret in `auth` is one it made up. A dev console asked for
    /// where dak cannot mint tokens it accepts is a configuration error.
    pub fn decide(auth: &AuthArgs, generated: bool, dev_console: bool) -> Result<TryIt, String> {
        if !generated && !dev_console {
            return Ok(TryIt::Off {
                reason: "dak up runs with a configured token secret or key, so the console \
                         does not hand out tokens. It does when dak up makes up its own secret \
                         (leave DAK_JWT_SECRET unset), or with DAK_DEV_CONSOLE=true on a \
                         development machine."
                    .into(),
            });
        }
        let cannot_mint = if auth.jwt_public_key.is_some() || auth.jwt_jwks_url.is_some() {
            Some("tokens are verified with DAK_JWT_PUBLIC_KEY or DAK_JWT_JWKS_URL")
        } else if !auth.jwt_audience.is_empty() || !auth.jwt_issuer.is_empty() {
            Some("tokens must carry DAK_JWT_AUDIENCE or DAK_JWT_ISSUER")
        } else {
            None
        };
        match (cannot_mint, &auth.jwt_secret) {
            (None, Some(secret)) => Ok(TryIt::On {
                secret: secret.clone(),
            }),
            (why, _) => {
                let why = why.unwrap_or("DAK_JWT_SECRET is not set");
                if dev_console {
                    Err(format!(
                        "DAK_DEV_CONSOLE needs tokens dak can mint with DAK_JWT_SECRET alone, but {why}"
                    ))
                } else {
                    Ok(TryIt::Off {
                        reason: format!("the console cannot mint tokens dak accepts: {why}"),
                    })
                }
            }
        }
    }

    pub fn is_on(&self) -> bool {
        matches!(self, TryIt::On { .. })
    }
}

/// The console's routes on the public address.
pub fn public_router(try_it: TryIt) -> Router {
    let router = Router::new()
        .route("/", get(|| async { Html(TRY_IT_PAGE) }))
        .route("/v1/console", get(status));
    let router = match &try_it {
        TryIt::On { .. } => router.route("/v1/console/token", post(token)),
        TryIt::Off { .. } => router,
    };
    router.with_state(try_it)
}

/// The console's routes on the admin address.
pub fn admin_router() -> Router {
    Router::new().route("/", get(|| async { Html(OPS_PAGE) }))
}

async fn status(State(try_it): State<TryIt>) -> Json<Value> {
    Json(match try_it {
        TryIt::On { .. } => json!({"try_it": {"enabled": true}}),
        TryIt::Off { reason } => json!({"try_it": {"enabled": false, "reason": reason}}),
    })
}

#[derive(Deserialize)]
struct TokenRequest {
    user: String,
    #[serde(default = "default_device")]
    device: String,
}

fn default_device() -> String {
    "web".into()
}

async fn token(
    State(try_it): State<TryIt>,
    request: Result<Json<TokenRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let TryIt::On { secret } = try_it else {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "the try-it chat is off",
        ));
    };
    let Json(request) = request.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let user = UserId::parse(request.user.as_str())
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("user: {}", e.message)))?;
    let device = DeviceId::parse(request.device.as_str())
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("device: {}", e.message)))?;
    let token = dak_runtime::auth::mint(&secret, &user, &device, TOKEN_TTL);
    Ok(Json(json!({"token": token})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(secret: Option<&str>) -> AuthArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            auth: AuthArgs,
        }
        let mut cli = <Cli as clap::Parser>::parse_from(["x"]);
        cli.auth.jwt_secret = secret.map(str::to_owned);
        cli.auth
    }

    #[test]
    fn a_made_up_secret_turns_the_chat_on() {
        assert_eq!(
            TryIt::decide(&auth(Some("s")), true, false),
            Ok(TryIt::On { secret: "s".into() })
        );
    }

    #[test]
    fn a_configured_secret_keeps_it_off_and_says_why() {
        let TryIt::Off { reason } = TryIt::decide(&auth(Some("s")), false, false).unwrap() else {
            panic!("on with a configured secret");
        };
        assert!(reason.contains("DAK_DEV_CONSOLE"), "{reason}");
    }

    #[test]
    fn the_dev_flag_turns_it_on_with_a_configured_secret() {
        assert!(TryIt::decide(&auth(Some("s")), false, true)
            .unwrap()
            .is_on());
    }

    #[test]
    fn the_dev_flag_is_refused_where_dak_cannot_mint_tokens() {
        let mut keyed = auth(None);
        keyed.jwt_public_key = Some("key.pem".into());
        let refused = TryIt::decide(&keyed, false, true).unwrap_err();
        assert!(refused.contains("DAK_JWT_PUBLIC_KEY"), "{refused}");

        let mut audience = auth(Some("s"));
        audience.jwt_audience = vec!["app".into()];
        let refused = TryIt::decide(&audience, false, true).unwrap_err();
        assert!(refused.contains("DAK_JWT_AUDIENCE"), "{refused}");
    }

    #[test]
    fn a_made_up_secret_with_an_audience_rule_keeps_it_off() {
        // Tokens minted without `aud` would fail that rule: a chat that says
        // it is on but cannot connect would only puzzle.
        let mut audience = auth(Some("s"));
        audience.jwt_audience = vec!["app".into()];
        let TryIt::Off { reason } = TryIt::decide(&audience, true, false).unwrap() else {
            panic!("on with an audience rule");
        };
        assert!(reason.contains("DAK_JWT_AUDIENCE"), "{reason}");
    }
}
