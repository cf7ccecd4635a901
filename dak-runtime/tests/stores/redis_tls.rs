//! Redis over TLS (`rediss://`): the stores keep their contracts through a
//! redis-server of the test's own that serves TLS only, with a certificate
//! from a CA made for the test; a server the CA did not sign is refused, and a
//! client certificate is shown to a server that asks for one.

use dak_runtime::redis::{RedisUrl, Target};

use crate::servers::{self, free_port, Pki, Server};

/// A TLS-only redis-server with a certificate `pki` signed; `client_auth`:
/// whether it requires client certificates. Returns its `rediss://` URL.
fn tls_server(pki: &Pki, dir: &std::path::Path, client_auth: bool) -> (Server, String) {
    let (cert, key) = pki.issue("server");
    let port = free_port().to_string();
    let server = servers::start(
        dir,
        &[
            "--port",
            "0",
            "--tls-port",
            &port,
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
            "--tls-ca-cert-file",
            pki.ca().to_str().unwrap(),
            "--tls-auth-clients",
            if client_auth { "yes" } else { "no" },
            "--save",
            "",
            "--appendonly",
            "yes",
        ],
    );
    (server, format!("rediss://127.0.0.1:{port}"))
}

fn target(url: &str, pki: &Pki) -> Target {
    Target {
        urls: vec![RedisUrl(url.to_owned())],
        ca_cert: Some(pki.ca()),
        ..Target::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_keep_their_contracts_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (_server, url) = tls_server(&pki, dir.path(), false);
    let conn = servers::connect(&target(&url, &pki)).await;
    crate::presence::redis_suites(conn.clone()).await;
    crate::dedup::redis_suites(conn.clone()).await;
    assert_eq!(dak_runtime::redis::ping(&conn).await, Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_certificate_no_trusted_ca_signed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (_server, url) = tls_server(&pki, dir.path(), false);
    // The server answers to a client that trusts its CA...
    servers::connect(&target(&url, &pki)).await;
    // ...and not to one with the system's CAs, nor one trusting another CA.
    let refused = dak_runtime::redis::connect(&url).await;
    assert!(refused.is_err(), "connected without trusting the CA");
    let other = tempfile::tempdir().unwrap();
    let other_pki = Pki::new(other.path());
    let refused = dak_runtime::redis::connect_to(&target(&url, &other_pki)).await;
    assert!(refused.is_err(), "connected trusting another CA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_shown_to_a_server_that_asks() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (_server, url) = tls_server(&pki, dir.path(), true);
    let with_cert = Target {
        client_cert: Some(pki.issue("client")),
        ..target(&url, &pki)
    };
    let mut conn = servers::connect(&with_cert).await;
    let _: () = redis::cmd("SET")
        .arg(format!("{}:tls", crate::unique_prefix()))
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let refused = dak_runtime::redis::connect_to(&target(&url, &pki)).await;
    assert!(refused.is_err(), "connected without a client certificate");
}
