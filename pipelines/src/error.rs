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
    /// A store failed.
    #[error(transparent)]
    Store(#[from] sluice_stores::Error),
    /// Metrics could not be registered (a name registered twice: a bug).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The broker and the configuration disagree (a topic missing or refused): fix the setup.
    #[error("config: {0}")]
    Config(String),
    /// The broker stopped answering a read or a delivery that should have ended.
    #[error("the broker stopped answering: {0}")]
    Stalled(String),
    /// A stage gave up on work it could not finish.
    #[error("gave up: {0}")]
    GaveUp(#[source] ProcessError),
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

/// A store failure is retried when a retry can help (the store away, overloaded, a lost race)
/// and is the record's fault otherwise.
impl From<sluice_stores::Error> for ProcessError {
    fn from(e: sluice_stores::Error) -> Self {
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
            Error::Store(inner) => inner.into(),
            Error::GaveUp(inner) => inner,
            other => ProcessError::Retriable(other.to_string()),
        }
    }
}
