//! The error every store returns, whatever its engine.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(::redis::RedisError),
    #[error("sqlite: {0}")]
    Sqlite(rusqlite::Error),
    /// The transaction a call was part of did not commit; with group commit
    /// every call of that transaction gets the same error.
    #[error("sqlite transaction: {0}")]
    Transaction(String),
    /// The thread that owns the store's connection is gone.
    #[error("store closed")]
    Closed,
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

crate::from_cause!(
    ::redis::RedisError => StoreError::Redis,
    rusqlite::Error => StoreError::Sqlite,
);

pub type StoreResult<T> = Result<T, StoreError>;
