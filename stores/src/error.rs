//! The stores' one error type.

/// Whose fault a failure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The caller asked for something invalid or that does not exist: tell them.
    Caller,
    /// A store failed or could not be reached: it may pass.
    External,
    /// The stores are not as Sluice left them (a changed migration, row-level security off, a
    /// row that no longer parses): an operator must look.
    Bug,
}

/// What can go wrong with a store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// PostgreSQL failed or refused.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// ClickHouse failed or refused.
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] ::clickhouse::error::Error),
    /// Redis (the limits' counters) failed or refused.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The caller asked for something invalid (a duplicate name, a value out of range).
    #[error("{0}")]
    Invalid(String),
    /// The caller named something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The stores are not as Sluice expects them.
    #[error("{0}")]
    Corrupt(String),
    /// A store could not be reached, or failed a request (a query sent outside a typed
    /// client): it may pass.
    #[error("{0}")]
    Unavailable(String),
}

/// Result with the stores' [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whose fault it is.
    pub fn fault(&self) -> Fault {
        match self {
            Error::Invalid(_) | Error::NotFound(_) => Fault::Caller,
            Error::Corrupt(_) => Fault::Bug,
            Error::Unavailable(_) => Fault::External,
            Error::Postgres(e) => postgres_fault(e),
            Error::ClickHouse(e) => clickhouse_fault(e),
            Error::Redis(e) => redis_fault(e),
        }
    }

    /// Whether trying again later can help: the store was unreachable, overloaded, shutting
    /// down or timed out, or a transaction lost a race (serialization failure, deadlock).
    pub fn is_retriable(&self) -> bool {
        self.fault() == Fault::External
    }
}

fn postgres_fault(e: &sqlx::Error) -> Fault {
    use sqlx::Error as E;
    match e {
        E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
            Fault::External
        }
        E::Database(db) => match db.code().as_deref() {
            // Connection exceptions, serialization failures and deadlocks, insufficient
            // resources, operator intervention (shutdown), system errors.
            Some(code)
                if ["08", "40", "53", "57", "58"]
                    .iter()
                    .any(|class| code.starts_with(class)) =>
            {
                Fault::External
            }
            // Integrity constraint violations and bad data: what the caller sent.
            Some(code) if code.starts_with("23") || code.starts_with("22") => Fault::Caller,
            _ => Fault::Bug,
        },
        E::RowNotFound => Fault::Caller,
        _ => Fault::Bug,
    }
}

fn clickhouse_fault(e: &::clickhouse::error::Error) -> Fault {
    use ::clickhouse::error::Error as E;
    match e {
        // The server answering with an error is external too: it is how ClickHouse says it is
        // overloaded, out of memory, or missing a table that `sluice setup` creates.
        E::Network(_) | E::TimedOut | E::BadResponse(_) => Fault::External,
        E::RowNotFound => Fault::Caller,
        _ => Fault::Bug,
    }
}

fn redis_fault(e: &redis::RedisError) -> Fault {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        Fault::External
    } else {
        Fault::Bug
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_stores_are_retriable_and_the_callers_mistakes_are_not() {
        assert!(Error::Postgres(sqlx::Error::PoolTimedOut).is_retriable());
        assert!(Error::ClickHouse(::clickhouse::error::Error::TimedOut).is_retriable());
        assert_eq!(Error::Invalid("x".into()).fault(), Fault::Caller);
        assert!(!Error::Invalid("x".into()).is_retriable());
        assert_eq!(Error::Corrupt("x".into()).fault(), Fault::Bug);
        assert_eq!(
            Error::Postgres(sqlx::Error::RowNotFound).fault(),
            Fault::Caller
        );
    }
}
