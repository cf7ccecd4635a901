//! The web console, tried as a new user would, in headless Chromium: `dak
//! up` with no secret configured, the try-it chat between alice and bob
//! (replay, `sync.done`, typing, the message, its ack, the delivered and
//! read receipts), then the ops page's live counters and a lookup by mid.
//! With a configured secret the page says the chat is off and no token is
//! handed out; `DAK_DEV_CONSOLE` turns it on.

use serde_json::json;

use crate::browser::Browser;
use crate::support::{dak_up_command, eventually, metric, spawn_dak_up, start_dak_up, Client};

#[tokio::test]
async fn a_new_user_chats_in_the_console_and_looks_a_message_up() {
    let started = std::time::Instant::now();
    let data_dir = tempfile::tempdir().unwrap();
    // As a new user runs it: no secret, so dak up makes one up.
    let mut command = dak_up_command(data_dir.path(), &[]);
    command.env_remove("DAK_JWT_SECRET");
    let (_dak, public, admin) = start_dak_up(command).await;
    let browser = Browser::start().await;

    browser.goto(&format!("http://{public}/")).await;
    for (pane, user, peer) in [("#left", "alice", "bob"), ("#right", "bob", "alice")] {
        let name = browser.find(&format!("{pane} .user")).await;
        name.clear().await;
        name.type_text(user).await;
        let to = browser.find(&format!("{pane} .to")).await;
        to.clear().await;
        to.type_text(peer).await;
        browser
            .find(&format!("{pane} .connect"))
            .await
            .click()
            .await;
        browser
            .wait_text(&format!("{pane} .log"), "← sync.done")
            .await;
    }
    let (alice, bob) = ("#left .log", "#right .log");

    // alice types (which sends typing) and sends.
    browser.find("#left .text").await.type_text("hello").await;
    browser.find("#left .send").await.click().await;
    browser.wait_text(bob, "← typing from alice").await;
    let shown = browser.wait_text(bob, "← message from alice: hello").await;
    let accepted = browser.wait_text(alice, "← accepted").await;
    let mid = accepted
        .split("as mid ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("accepted names the mid")
        .to_owned();
    assert!(
        shown.contains(&mid),
        "bob's pane names the mid {mid}: {shown}"
    );
    browser
        .wait_text(
            bob,
            &format!("→ ack {{\"type\":\"ack\",\"mids\":[\"{mid}\"]}}"),
        )
        .await;
    browser
        .wait_text(alice, &format!("← receipt delivered by bob/web for {mid}"))
        .await;

    // bob marks it read; alice gets the read receipt.
    browser.find("#right .read").await.click().await;
    browser
        .wait_text(alice, &format!("← receipt read by bob/web for {mid}"))
        .await;

    // bob leaves, alice writes again, and bob's next connection replays it
    // before sync.done.
    browser.find("#right .connect").await.click().await;
    browser.wait_text(bob, "closed: 1000 bye").await;
    eventually("bob's socket gone from the server", || async move {
        (metric(admin, "dak_connected_devices").await == 1.0).then_some(())
    })
    .await;
    browser
        .find("#left .text")
        .await
        .type_text("still there?")
        .await;
    browser.find("#left .send").await.click().await;
    eventually("the message stored in bob's inbox", || async move {
        (metric(admin, "dak_messages_stored_total").await >= 1.0).then_some(())
    })
    .await;
    browser.find("#right .connect").await.click().await;
    let browser_ref = &browser;
    let after_reconnect = eventually("sync.done after bob reconnected", || async move {
        let log = browser_ref.text(bob).await;
        let (_, after) = log.split_once("closed: ")?;
        let (_, after) = after.split_once("connected as bob")?;
        after.contains("← sync.done").then(|| after.to_owned())
    })
    .await;
    let message = after_reconnect
        .find("← replayed message from alice: still there?")
        .unwrap_or_else(|| {
            panic!("the replay brings the message sent while bob was away:\n{after_reconnect}")
        });
    assert!(
        message < after_reconnect.find("← sync.done").unwrap(),
        "replayed before sync.done:\n{after_reconnect}"
    );

    // The ops page: live counters, every one exported.
    browser.goto(&format!("http://{admin}/")).await;
    let nonzero = |metric: &'static str| {
        let browser = &browser;
        async move {
            let css = format!("tr[data-metric={metric}] .value");
            let value = browser.text(&css).await;
            (!value.is_empty() && value != "…" && value != "0").then_some(value)
        }
    };
    for metric in [
        "dak_messages_accepted_total",
        "dak_messages_delivered_total",
        "dak_messages_acked_total",
        "dak_receipts_total",
        "dak_messages_stored_total",
    ] {
        eventually(&format!("{metric} above 0 on the ops page"), || {
            nonzero(metric)
        })
        .await;
    }
    let counters = browser.text("#counters").await;
    assert!(!counters.contains("missing"), "{counters}");

    // A lookup by mid: each step of alice's first message to bob's device.
    let lookup = browser.find("#mid").await;
    lookup.type_text(&mid).await;
    browser.find("#lookup button").await.click().await;
    browser
        .wait_text(
            "#status",
            &format!("{mid}: alice → bob (direct), accepted 20"),
        )
        .await;
    let status = browser.wait_text("#status table", "read 20").await;
    assert!(status.contains("bob\tweb\tread\t"), "{status}");
    for step in ["delivered 20", "acked 20", "read 20"] {
        assert!(status.contains(step), "{step:?} in:\n{status}");
    }
    // ops/?mid= looks a mid up at once; an unknown one is a 404.
    let unknown = "01JD6Q3R5C8V7B2N4M1K0ZXY9A";
    browser
        .goto(&format!("http://{admin}/?mid={unknown}"))
        .await;
    browser.wait_text("#status", "404 not_found").await;

    // What the renderer makes of a device with no device id yet, and of
    // fields it does not know.
    let sample = json!({
        "mid": mid, "from": "alice",
        "devices": [{"user": "carol", "device": null, "state": "stored", "at": 1733230000123u64,
                     "history": [{"state": "stored", "at": 1733230000123u64}],
                     "attempts": 1}],
        "shard": 3,
    });
    let rendered = browser
        .run(
            "const out = document.getElementById('status'); out.replaceChildren(); \
             renderStatus(arguments[0], out); return out.innerText;",
            json!([sample]),
        )
        .await;
    let rendered = rendered.as_str().expect("text");
    for expected in [
        &format!("{mid}: alice → ?, not yet recorded as accepted"),
        "carol\t(the user's inbox: no device yet)\tstored\t2024-12-03 12:46:40.123 UTC",
        "{\"attempts\":1}",
        "\"shard\": 3",
    ] {
        assert!(rendered.contains(expected), "{expected:?} in:\n{rendered}");
    }
    eprintln!("console test took {:?}", started.elapsed());
}

#[tokio::test]
async fn with_a_configured_secret_the_console_is_off_and_says_why() {
    let data_dir = tempfile::tempdir().unwrap();
    let (_dak, public, _) = spawn_dak_up(data_dir.path(), &[]).await;

    let token = reqwest::Client::new()
        .post(format!("http://{public}/v1/console/token"))
        .json(&json!({"user": "mallory"}))
        .send()
        .await
        .unwrap();
    assert_eq!(token.status().as_u16(), 404, "no token endpoint");

    let browser = Browser::start().await;
    browser.goto(&format!("http://{public}/")).await;
    let why = browser.wait_text("#off", "The try-it chat is off.").await;
    assert!(why.contains("DAK_DEV_CONSOLE=true"), "{why}");
    assert!(!browser.find("#left .connect").await.enabled().await);
    assert!(!browser.find("#right .connect").await.enabled().await);
}

#[tokio::test]
async fn the_dev_flag_turns_the_console_on_with_a_configured_secret() {
    let data_dir = tempfile::tempdir().unwrap();
    let (_dak, public, _) = spawn_dak_up(data_dir.path(), &[("DAK_DEV_CONSOLE", "true")]).await;

    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{public}/v1/console/token"))
        .json(&json!({"user": "alice", "device": "web"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = answer["token"].as_str().expect("a token");
    // A token dak accepts: it opens a socket, which syncs.
    Client::connect(public, token).await;
}
