//! What can go wrong with a streaming SQL pipeline.

use datafusion::{arrow::error::ArrowError, error::DataFusionError};

/// A streaming SQL error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pipeline's definition is wrong: the configuration's fault, found at start-up.
    #[error("SQL pipeline {pipeline}: {problem}")]
    Definition { pipeline: String, problem: String },
    /// The SQL engine refused a pipeline's query, or failed on a window's rows.
    #[error("SQL pipeline {pipeline}: {source}")]
    Query {
        pipeline: String,
        #[source]
        source: DataFusionError,
    },
    /// The window clause of a query cannot be read.
    #[error("{0}")]
    Window(String),
    /// The source's record type cannot be read as SQL rows.
    #[error("{0}")]
    Source(String),
    /// A record could not become a row, or a result row could not be read.
    #[error("{0}")]
    Row(String),
    /// Arrow could not build or convert a batch.
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
