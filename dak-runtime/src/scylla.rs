//! Connecting to ScyllaDB for the stores that keep their data there (the
//! inbox, push tokens): a session and the keyspace they share.

use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;

/// Connects to `nodes` and creates `keyspace` if missing, with tablets disabled
/// (counters and lightweight transactions need that) and the given replication
/// factor. Errors are plain text for the caller's own error type.
pub async fn connect(
    nodes: &[String],
    keyspace: &str,
    replication_factor: u32,
) -> Result<Session, String> {
    if nodes.is_empty() {
        return Err("no ScyllaDB node given".into());
    }
    let valid = !keyspace.is_empty()
        && keyspace.len() <= 48
        && keyspace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return Err(format!(
            "keyspace name `{keyspace}` is not 1..48 of A-Z a-z 0-9 _"
        ));
    }
    if replication_factor == 0 {
        return Err("replication factor must be at least 1".into());
    }
    let session = SessionBuilder::new()
        .known_nodes(nodes)
        .build()
        .await
        .map_err(|e| format!("connecting to {}: {e}", nodes.join(",")))?;
    let create = format!(
        "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = \
         {{'class': 'NetworkTopologyStrategy', 'replication_factor': {replication_factor}}}"
    );
    let without_tablets = format!("{create} AND tablets = {{'enabled': false}}");
    match session.query_unpaged(without_tablets, ()).await {
        Ok(_) => Ok(session),
        // A server that predates tablets (ScyllaDB before 6.0) does not know the
        // option, and needs none.
        Err(first) => match session.query_unpaged(create, ()).await {
            Ok(_) => Ok(session),
            Err(second) => Err(format!(
                "creating keyspace {keyspace}: {second} (with tablets disabled: {first})"
            )),
        },
    }
}

/// For the ScyllaDB contract tests: runs `test` with the nodes of
/// `DAK_SCYLLA_NODES` and a fresh keyspace name, then drops the keyspace, even
/// when the test panicked (the panic is passed on). Without `DAK_SCYLLA_NODES`
/// it says that `name` was skipped and returns.
pub async fn with_test_keyspace<F, Fut>(name: &str, test: F)
where
    F: FnOnce(Vec<String>, String) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Some(nodes) = std::env::var("DAK_SCYLLA_NODES")
        .ok()
        .and_then(|list| crate::config::scylla_nodes(&list))
    else {
        eprintln!(
            "skipped {name}: DAK_SCYLLA_NODES is not set; \
             set it to a ScyllaDB cluster (comma-separated host:port) to run it"
        );
        return;
    };
    let keyspace = format!("dak_test_{}", ulid::Ulid::new().to_string().to_lowercase());
    // In a task of its own, so that the keyspace is dropped even when it fails.
    let outcome = tokio::spawn(test(nodes.clone(), keyspace.clone())).await;
    let session = SessionBuilder::new()
        .known_nodes(&nodes)
        .build()
        .await
        .expect("connect to DAK_SCYLLA_NODES");
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
        .await
        .expect("drop the test keyspace");
    if let Err(failed) = outcome {
        std::panic::resume_unwind(failed.into_panic());
    }
}
