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
