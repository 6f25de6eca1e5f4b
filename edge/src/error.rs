//! The edge's errors: [`ApiError`], the one place a failure becomes an HTTP response, in
//! OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`), and [`Error`],
//! what can stop the edge itself.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

/// What can stop the edge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker or the runtime failed (the replies topic missing, say).
    #[error(transparent)]
    Runtime(#[from] sluice_pipelines::Error),
    /// A store failed.
    #[error(transparent)]
    Store(#[from] sluice_stores::Error),
    /// A Kafka client call failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Every replies partition is held by another edge instance.
    #[error("all {partitions} partitions of {topic} are held by other edge instances; add partitions to run more")]
    NoFreeRepliesPartition { topic: String, partitions: i32 },
    /// The edge lost the PostgreSQL connection that held its replies partition: another
    /// instance may own the partition now, so this one must not serve on.
    #[error("lost the claim on replies partition {partition} (its PostgreSQL connection dropped); stopping so a fresh instance claims one")]
    LostRepliesClaim { partition: i32 },
    /// Serving HTTP failed.
    #[error("serving HTTP: {0}")]
    Serve(#[source] std::io::Error),
}

/// Result with the edge's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error answered to an API caller.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
    /// Ask the client not to reuse the connection (the request body was left unread).
    pub close_connection: bool,
    /// Seconds after which the client may try again (`Retry-After`).
    pub retry_after_secs: Option<u64>,
    /// More headers to send (the `x-ratelimit-*` of a 429); boxed, as most errors have none.
    pub headers: Option<Box<axum::http::HeaderMap>>,
}

impl ApiError {
    /// An error with `status`, OpenAI `code` and `message`.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: Some(code.to_owned()),
            close_connection: false,
            retry_after_secs: None,
            headers: None,
        }
    }

    /// Sends `headers` with the error.
    pub fn with_headers(mut self, headers: axum::http::HeaderMap) -> Self {
        self.headers.get_or_insert_default().extend(headers);
        self
    }

    /// Tells the client to try again after `seconds` (`Retry-After`).
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_secs = Some(seconds);
        self
    }

    /// Marks the response `Connection: close`: the body was not read, so the connection cannot
    /// carry another request.
    pub fn closing(mut self) -> Self {
        self.close_connection = true;
        self
    }

    /// Names the request parameter at fault.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// 400: the request is malformed.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 401: no key or a wrong one.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_api_key", message)
    }

    /// 503: a dependency is down; try again.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            message,
        )
    }

    /// 500 for a failure of ours; details go to the log, not to the caller.
    pub fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(error = %error, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "The server had an error while processing your request.",
        )
    }

    /// OpenAI's `type` for the status.
    pub fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "invalid_request_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// A query string that does not parse: 400 saying why. Handlers take
/// `Result<Query<T>, QueryRejection>` and answer with `?`.
impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        Self::invalid(format!("Invalid query: {}", rejection.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(headers) = self.headers {
            response.headers_mut().extend(*headers);
        }
        if self.close_connection {
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        if let Some(seconds) = self.retry_after_secs {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(seconds),
            );
        }
        response
    }
}

/// Result with [`ApiError`].
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_shape() {
        let e = ApiError::new(StatusCode::NOT_FOUND, "model_not_found", "nope").with_param("model");
        let body = e.body();
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(ApiError::unauthorized("x").kind(), "authentication_error");
        assert_eq!(ApiError::unavailable("x").kind(), "server_error");
    }
}
