//! `FcmSender` against the fake Google: authentication, the message it sends,
//! and what it makes of FCM's answers.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dak_wire::event::Platform;
use push::{FcmSender, Notification, Outcome, Sender};
use serde_json::json;

use crate::fake_fcm::{FakeFcm, Reply, PROJECT};

fn notification(token: &str, mid: &str) -> Notification {
    Notification {
        token: token.into(),
        platform: Platform::Android,
        data: BTreeMap::from(
            [
                ("mid", mid),
                ("from", "alice"),
                ("chat", "direct"),
                ("conversation", "alice"),
                ("ts", "1732380000123"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        ),
        collapse_key: "direct:alice".into(),
        ttl: Duration::from_secs(3600),
    }
}

struct Setup {
    fake: FakeFcm,
    _dir: tempfile::TempDir,
    config: push::Config,
}

async fn setup() -> Setup {
    dak_runtime::telemetry::init_for_tests();
    let fake = FakeFcm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = crate::config(&fake, dir.path());
    Setup {
        fake,
        _dir: dir,
        config,
    }
}

#[tokio::test]
async fn sends_a_data_only_high_priority_message_as_the_service_account() {
    let s = setup().await;
    let sender = FcmSender::new(&s.config).unwrap();

    assert_eq!(
        sender.send(&notification("tok-1", "01JDA")).await,
        Outcome::Sent
    );
    assert_eq!(
        sender.send(&notification("tok-1", "01JDB")).await,
        Outcome::Sent
    );

    let tokens = s.fake.token_requests();
    assert_eq!(
        tokens.len(),
        1,
        "the access token is fetched once and reused"
    );
    assert_eq!(tokens[0].scope, push::fcm::SCOPE);

    let sends = s.fake.sends();
    assert_eq!(sends.len(), 2);
    let first = &sends[0];
    assert_eq!(first.project, PROJECT, "the project of the credentials");
    assert_eq!(first.authorization.as_deref(), Some("Bearer fake-access-1"));
    let m = first.message();
    assert_eq!(m["token"], "tok-1");
    assert_eq!(
        m["data"],
        json!({"mid": "01JDA", "from": "alice", "chat": "direct", "conversation": "alice", "ts": "1732380000123"})
    );
    assert!(m.get("notification").is_none(), "no title or body: {m}");
    assert_eq!(m["android"]["priority"], "high");
    assert_eq!(m["android"]["collapse_key"], "direct:alice");
    assert_eq!(m["android"]["ttl"], "3600s");
    let apns = &m["apns"];
    assert_eq!(apns["headers"]["apns-priority"], "10");
    assert_eq!(apns["headers"]["apns-collapse-id"], "direct:alice");
    let expires: u64 = apns["headers"]["apns-expiration"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now + 3540..=now + 3600).contains(&expires),
        "expires in an hour: {expires} vs now {now}"
    );
    assert_eq!(apns["payload"], json!({"aps": {"content-available": 1}}));
    assert_eq!(
        m["webpush"]["headers"],
        json!({"Urgency": "high", "TTL": "3600"})
    );
    assert_eq!(sends[1].data("mid"), "01JDB");
}

#[tokio::test]
async fn the_project_setting_overrides_the_credentials() {
    let mut s = setup().await;
    s.config.fcm_project_id = Some("other-project".into());
    let sender = FcmSender::new(&s.config).unwrap();
    assert_eq!(
        sender.send(&notification("tok-1", "01JDA")).await,
        Outcome::Sent
    );
    assert_eq!(s.fake.sends()[0].project, "other-project");
}

#[tokio::test]
async fn an_unregistered_token_is_invalid_and_not_retried() {
    let s = setup().await;
    let sender = FcmSender::new(&s.config).unwrap();
    s.fake.unregister("dead-token");
    assert_eq!(
        sender.send(&notification("dead-token", "01JDA")).await,
        Outcome::InvalidToken
    );
    assert_eq!(s.fake.sends().len(), 1);
}

#[tokio::test]
async fn invalid_argument_about_the_token_is_an_invalid_token_and_others_are_rejected() {
    let s = setup().await;
    let sender = FcmSender::new(&s.config).unwrap();
    s.fake
        .reply_next(Reply::status(400).with_body(json!({"error": {
            "code": 400,
            "message": "The registration token is not a valid FCM registration token",
            "status": "INVALID_ARGUMENT"
        }})));
    assert_eq!(
        sender.send(&notification("garbled", "01JDA")).await,
        Outcome::InvalidToken
    );
    s.fake
        .reply_next(Reply::status(400).with_body(json!({"error": {
            "code": 400,
            "message": "Invalid value at 'message.android.ttl'",
            "status": "INVALID_ARGUMENT"
        }})));
    assert_eq!(
        sender.send(&notification("tok-1", "01JDB")).await,
        Outcome::Failed("rejected")
    );
    assert_eq!(s.fake.sends().len(), 2, "refusals are not retried");
}

#[tokio::test]
async fn retry_after_is_honoured_before_the_next_attempt() {
    let s = setup().await;
    let sender = FcmSender::new(&s.config).unwrap();
    s.fake.reply_next(Reply::status(503).retry_after(1));
    assert_eq!(
        sender.send(&notification("tok-1", "01JDA")).await,
        Outcome::Sent
    );
    let sends = s.fake.sends();
    assert_eq!(sends.len(), 2);
    let gap = sends[1].at - sends[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "the retry came {gap:?} after the first attempt, before Retry-After"
    );
    assert_eq!(sends[1].body, sends[0].body, "the same message again");
}

#[tokio::test]
async fn throttling_past_the_last_attempt_fails() {
    let s = setup().await;
    let sender = FcmSender::new(&s.config).unwrap();
    for _ in 0..10 {
        s.fake.reply_next(Reply::status(429));
    }
    assert_eq!(
        sender.send(&notification("tok-1", "01JDA")).await,
        Outcome::Failed("throttled")
    );
    assert_eq!(s.fake.sends().len(), 3, "DAK_PUSH_MAX_ATTEMPTS attempts");
}

#[tokio::test]
async fn server_errors_are_retried_then_fail() {
    let s = setup().await;
    let sender = FcmSender::new(&s.config).unwrap();
    s.fake.reply_next(Reply::status(500));
    s.fake.reply_next(Reply::status(502));
    assert_eq!(
        sender.send(&notification("tok-1", "01JDA")).await,
        Outcome::Sent
    );
    for _ in 0..3 {
        s.fake.reply_next(Reply::status(503));
    }
    assert_eq!(
        sender.send(&notification("tok-1", "01JDB")).await,
        Outcome::Failed("server_error")
    );
    assert_eq!(s.fake.sends().len(), 6);
}

#[tokio::test]
async fn an_unreachable_fcm_fails_after_the_retries() {
    let mut s = setup().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    s.config.fcm_base_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let sender = FcmSender::new(&s.config).unwrap();
    assert_eq!(
        sender.send(&notification("tok-1", "01JDA")).await,
        Outcome::Failed("unreachable")
    );
    assert!(s.fake.sends().is_empty());
}

#[test]
fn credentials_without_a_project_need_the_project_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-project.json");
    let account = json!({
        "type": "service_account",
        "private_key": include_str!("../fixtures/test-only-service-account-key.pem"),
        "client_email": "push@example.iam.gserviceaccount.com",
        "token_uri": "http://127.0.0.1:9/token",
    });
    std::fs::write(&path, account.to_string()).unwrap();
    let mut config = push::Config {
        fcm_credentials: Some(path),
        fcm_project_id: None,
        fcm_base_url: "http://127.0.0.1:9".into(),
        push_ttl: Duration::from_secs(60),
        push_max_attempts: 1,
        push_retry_base: Duration::from_millis(1),
        push_store_wait: Duration::from_secs(1),
    };
    assert!(matches!(
        FcmSender::new(&config),
        Err(push::FcmError::NoProjectId)
    ));
    config.fcm_project_id = Some("p".into());
    assert!(FcmSender::new(&config).is_ok());
    config.fcm_credentials = Some(dir.path().join("missing.json"));
    assert!(matches!(
        FcmSender::new(&config),
        Err(push::FcmError::Credentials { .. })
    ));
}
