//! The push-token contract against ScyllaDB, when `DAK_SCYLLA_NODES` names a
//! cluster (comma-separated `host:port`); skipped, saying so, when it does not.
//! The checks are the ones the SQLite store passes (`tokens::contract`).

use push::scylla::ScyllaTokens;

#[tokio::test]
async fn scylla_tokens_keep_the_contract() {
    dak_runtime::scylla::with_test_keyspace(
        "scylla_tokens_keep_the_contract",
        |nodes, keyspace| async move {
            let store = ScyllaTokens::connect(&nodes, &keyspace, &Default::default())
                .await
                .expect("connect to DAK_TEST_SCYLLA_NODES and create the keyspace");
            crate::tokens::contract(&store).await;
        },
    )
    .await;
}
