//! Errors of the runtime and of the stages built on it.

/// What went wrong while running a stage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kafka client call failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A record or schema problem.
    #[error(transparent)]
    Schema(#[from] sluice_schemas::Error),
    /// PostgreSQL failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// Configuration is invalid (the operator's fault; fix the config).
    #[error("config: {0}")]
    Config(String),
    /// A caller asked for something that does not exist or is not allowed.
    #[error("{0}")]
    Invalid(String),
}

/// Result with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How processing one record (or one batch) failed, which decides what the runtime does next.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A dependency failed in a way that may pass (network, broker, store): retry with backoff.
    #[error("retriable: {0}")]
    Retriable(String),
    /// The record itself cannot be processed: send it to the DLQ and move on.
    #[error("{0}")]
    Poison(String),
}

impl ProcessError {
    /// Whether trying again can help.
    pub fn is_retriable(&self) -> bool {
        matches!(self, ProcessError::Retriable(_))
    }
}

impl From<sluice_schemas::Error> for ProcessError {
    fn from(e: sluice_schemas::Error) -> Self {
        if e.is_retriable() {
            ProcessError::Retriable(e.to_string())
        } else {
            ProcessError::Poison(e.to_string())
        }
    }
}

impl From<Error> for ProcessError {
    fn from(e: Error) -> Self {
        match e {
            Error::Schema(inner) => inner.into(),
            Error::Invalid(m) => ProcessError::Poison(m),
            other => ProcessError::Retriable(other.to_string()),
        }
    }
}
