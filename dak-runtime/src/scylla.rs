//! Connecting to ScyllaDB or Apache Cassandra for the stores that keep their
//! data there (the inbox, push tokens, groups): a session and the keyspace
//! they share.

use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;

/// How dak creates its keyspace when it is missing. An existing keyspace is
/// used as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyspaceOptions {
    /// `NetworkTopologyStrategy` with this many replicas in every datacenter,
    /// and tablets disabled where the server has them (ScyllaDB 6 and later):
    /// the inbox's counters and the push tokens' lightweight transactions need
    /// that there.
    pub replication_factor: u32,
    /// The whole `WITH …` clause instead (`DAK_SCYLLA_KEYSPACE_WITH`), e.g.
    /// `replication = {'class': 'NetworkTopologyStrategy', 'dc1': 3}`.
    pub with: Option<String>,
}

impl Default for KeyspaceOptions {
    fn default() -> Self {
        Self {
            replication_factor: 1,
            with: None,
        }
    }
}

/// Connects to `nodes` and creates `keyspace` if missing, as `options` say.
/// Works on ScyllaDB and on Apache Cassandra. Errors are plain text for the
/// caller's own error type.
pub async fn connect(
    nodes: &[String],
    keyspace: &str,
    options: &KeyspaceOptions,
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
    if options.replication_factor == 0 {
        return Err("replication factor must be at least 1".into());
    }
    let session = SessionBuilder::new()
        .known_nodes(nodes)
        .build()
        .await
        .map_err(|e| format!("connecting to {}: {e}", nodes.join(",")))?;
    if let Some(with) = &options.with {
        let create = format!("CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH {with}");
        session
            .query_unpaged(create, ())
            .await
            .map_err(|e| format!("creating keyspace {keyspace} WITH {with}: {e}"))?;
        return Ok(session);
    }
    let create = format!(
        "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = \
         {{'class': 'NetworkTopologyStrategy', 'replication_factor': {}}}",
        options.replication_factor
    );
    let without_tablets = format!("{create} AND tablets = {{'enabled': false}}");
    match session.query_unpaged(without_tablets, ()).await {
        Ok(_) => Ok(session),
        // Cassandra, and ScyllaDB before 6.0, do not know the option and need
        // none.
        Err(first) => match session.query_unpaged(create, ()).await {
            Ok(_) => Ok(session),
            Err(second) => Err(format!(
                "creating keyspace {keyspace}: {second} (with tablets disabled: {first})"
            )),
        },
    }
}

/// For the CQL contract tests: runs `test` with the nodes of
/// `DAK_TEST_SCYLLA_NODES` and a fresh keyspace name, then drops the keyspace,
/// even when the test panicked (the panic is passed on). A test run without a
/// CQL server fails here: `scripts/test` starts one.
pub async fn with_test_keyspace<F, Fut>(name: &str, test: F)
where
    F: FnOnce(Vec<String>, String) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let nodes = std::env::var("DAK_TEST_SCYLLA_NODES")
        .ok()
        .and_then(|list| crate::config::scylla_nodes(&list))
        .unwrap_or_else(|| {
            panic!(
                "{name} needs a CQL server: set DAK_TEST_SCYLLA_NODES (host:port[,…]), \
                 or run the tests with scripts/test, which starts one"
            )
        });
    let keyspace = format!("dak_test_{}", ulid::Ulid::new().to_string().to_lowercase());
    // In a task of its own, so that the keyspace is dropped even when it fails.
    let outcome = tokio::spawn(test(nodes.clone(), keyspace.clone())).await;
    let session = SessionBuilder::new()
        .known_nodes(&nodes)
        .build()
        .await
        .expect("connect to DAK_TEST_SCYLLA_NODES");
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
        .await
        .expect("drop the test keyspace");
    if let Err(failed) = outcome {
        std::panic::resume_unwind(failed.into_panic());
    }
}

#[cfg(test)]
mod tests {
    /// A node given as an IPv6 address in brackets is dialled: a listener on
    /// [::1] sees the driver connect (nothing answers it; no CQL server needed).
    #[tokio::test]
    async fn ipv6_nodes_are_dialled() {
        let listener = tokio::net::TcpListener::bind("[::1]:0")
            .await
            .expect("an IPv6 loopback address");
        let node = format!("[::1]:{}", listener.local_addr().unwrap().port());
        let connecting =
            tokio::spawn(async move { super::connect(&[node], "dak", &Default::default()).await });
        let (_socket, peer) =
            tokio::time::timeout(std::time::Duration::from_secs(10), listener.accept())
                .await
                .expect("the driver connected within 10 s")
                .unwrap();
        assert!(peer.is_ipv6(), "{peer}");
        connecting.abort();
    }
}
