//! The push-token contract against ScyllaDB, when `DAK_SCYLLA_NODES` names a
//! cluster (comma-separated `host:port`); skipped, saying so, when it does not.
//! The checks are the ones the SQLite store passes (`tokens::contract`).

use push::scylla::ScyllaTokens;

/// The cluster named by `DAK_SCYLLA_NODES`, if any.
fn scylla_nodes() -> Option<Vec<String>> {
    dak_runtime::config::scylla_nodes(&std::env::var("DAK_SCYLLA_NODES").ok()?)
}

#[tokio::test]
async fn scylla_tokens_keep_the_contract() {
    let Some(nodes) = scylla_nodes() else {
        eprintln!(
            "skipped scylla_tokens_keep_the_contract: DAK_SCYLLA_NODES is not set; \
             set it to a ScyllaDB cluster (comma-separated host:port) to run it"
        );
        return;
    };
    // A keyspace of its own: the checks use fixed user names and count all rows.
    let keyspace = format!("dak_test_{}", ulid::Ulid::new().to_string().to_lowercase());
    let store = ScyllaTokens::connect(&nodes, &keyspace, 1)
        .await
        .expect("connect to DAK_SCYLLA_NODES and create the keyspace");
    // In a task of its own, so that the keyspace is dropped even when it fails.
    let outcome = tokio::spawn(async move {
        crate::tokens::contract(&store).await;
    })
    .await;
    let session = scylla::client::session_builder::SessionBuilder::new()
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
