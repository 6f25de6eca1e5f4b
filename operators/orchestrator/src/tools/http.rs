//! The HTTP tool: calls an endpoint a tenant configures (its `tools` row, kind `http`) with a
//! call's arguments, and returns the JSON it answers.
//!
//! Arguments map onto the request: `{name}` in the URL is replaced by that argument
//! (percent-encoded); the rest go as query parameters for `GET` and `DELETE` and as a JSON body
//! otherwise. `result_pointer` (a JSON Pointer) picks the part of the answer the model sees.
//! A write (any method but `GET`) carries the call's `Idempotency-Key`, the same on every
//! attempt. Failures are judged for [`Resilience`](super::resilience::Resilience): no answer,
//! 408, 425, 429 and 5xx are worth retrying; any other refusal is not.

use std::collections::BTreeMap;

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use sluice_pipelines::egress::{self, Refusal};

use super::resilience::Failure;

/// An HTTP tool's settings (the `config` of its `tools` row).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpToolConfig {
    /// The endpoint; `{name}` stands for the argument `name`.
    pub url: String,
    /// `GET`, `POST`, `PUT`, `PATCH` or `DELETE`.
    #[serde(default = "default_method")]
    pub method: String,
    /// The environment variable holding a bearer token for the endpoint (never the token); its
    /// name must start with `SLUICE_TOOL_SECRET_`, so a tool cannot send the server's other
    /// secrets to its endpoint.
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    /// Further headers sent as they are.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The part of the answer to return, as a JSON Pointer (`/data/order`); the whole answer
    /// if unset.
    #[serde(default)]
    pub result_pointer: Option<String>,
}

/// What the name of a tool's token variable starts with.
pub const TOKEN_VARIABLE_PREFIX: &str = "SLUICE_TOOL_SECRET_";

/// The largest answer read from an endpoint.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

fn default_method() -> String {
    "POST".to_owned()
}

/// Which addresses an HTTP tool may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reach {
    /// Public addresses only (the default): a tenant's endpoint that resolves to an address in
    /// the platform's own network ([`egress::is_private`]) is refused, so a tool cannot be
    /// pointed at Sluice's own network.
    #[default]
    Public,
    /// Any address: for deployments whose tools live on a private network, and for tests.
    Any,
}

/// An HTTP tool, checked and ready to call.
#[derive(Debug, Clone)]
pub struct HttpTool {
    config: HttpToolConfig,
    method: Method,
    reach: Reach,
}

impl HttpTool {
    /// Checks `config`: a known method and an `http(s)` URL.
    pub fn new(config: HttpToolConfig) -> Result<Self, String> {
        let method = match config.method.to_ascii_uppercase().as_str() {
            "GET" => Method::GET,
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            "DELETE" => Method::DELETE,
            other => return Err(format!("unsupported HTTP method {other:?}")),
        };
        if !(config.url.starts_with("http://") || config.url.starts_with("https://")) {
            return Err(format!("the URL {:?} is not http(s)", config.url));
        }
        if let Some(var) = &config.bearer_token_env {
            if !var.starts_with(TOKEN_VARIABLE_PREFIX) || var.len() == TOKEN_VARIABLE_PREFIX.len() {
                return Err(format!(
                    "the token variable {var:?} must be named {TOKEN_VARIABLE_PREFIX}<something>"
                ));
            }
        }
        Ok(Self {
            config,
            method,
            reach: Reach::default(),
        })
    }

    /// The tool, allowed to reach `reach`.
    pub fn reaching(mut self, reach: Reach) -> Self {
        self.reach = reach;
        self
    }

    /// Makes one attempt at a call with `arguments` (a JSON object). The endpoint's host is
    /// resolved for the attempt and the request goes to the addresses checked
    /// ([`sluice_pipelines::egress`]), without redirects.
    pub async fn call(&self, arguments: &Value, idempotency_key: &str) -> Result<Value, Failure> {
        let empty = Map::new();
        let arguments = match arguments {
            Value::Object(fields) => fields,
            Value::Null => &empty,
            _ => {
                return Err(Failure::Permanent(
                    "the arguments are not a JSON object".into(),
                ))
            }
        };
        let (url, rest) = fill_url(&self.config.url, arguments);
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| Failure::Permanent(format!("{url} is not a URL: {e}")))?;
        let http = egress::pinned_client(
            &parsed,
            self.reach == Reach::Any,
            reqwest::Client::builder().tcp_nodelay(true),
        )
        .await
        .map_err(|refusal| match refusal {
            Refusal::Unresolvable => Failure::Retriable(format!("{url}: {refusal}")),
            other => Failure::Permanent(format!("{url}: {other}")),
        })?;
        let mut request = http.request(self.method.clone(), &url);
        if matches!(self.method, Method::GET | Method::DELETE) {
            let query: Vec<(String, String)> = rest
                .iter()
                .map(|(name, value)| (name.clone(), scalar_text(value)))
                .collect();
            request = request.query(&query);
        } else {
            request = request.json(&Value::Object(rest));
        }
        if self.method != Method::GET {
            request = request.header("Idempotency-Key", idempotency_key);
        }
        for (name, value) in &self.config.headers {
            request = request.header(name, value);
        }
        if let Some(var) = &self.config.bearer_token_env {
            let token = std::env::var(var).map_err(|_| {
                Failure::Permanent(format!(
                    "the token variable {var} is not set on this server"
                ))
            })?;
            request = request.bearer_auth(token);
        }
        let mut response = request.send().await.map_err(|e| {
            if e.is_builder() {
                Failure::Permanent(format!("{url}: {e}"))
            } else {
                Failure::Retriable(format!("{url}: {e}"))
            }
        })?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(piece) = response
            .chunk()
            .await
            .map_err(|e| Failure::Retriable(format!("{url}: reading the answer: {e}")))?
        {
            if body.len() + piece.len() > MAX_ANSWER_BYTES {
                return Err(Failure::Permanent(format!(
                    "{url} answered with more than {MAX_ANSWER_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&piece);
        }
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            let text: String = text.chars().take(500).collect();
            let message = format!("{url} answered {status}: {text}");
            return Err(match status.as_u16() {
                408 | 425 | 429 | 500..=599 => Failure::Retriable(message),
                _ => Failure::Permanent(message),
            });
        }
        if body.is_empty() {
            return Ok(Value::Null);
        }
        let answer: Value = serde_json::from_slice(&body)
            .map_err(|e| Failure::Permanent(format!("{url} answered with no JSON: {e}")))?;
        match &self.config.result_pointer {
            None => Ok(answer),
            Some(pointer) => answer.pointer(pointer).cloned().ok_or_else(|| {
                Failure::Permanent(format!("the answer of {url} has nothing at {pointer}"))
            }),
        }
    }
}

/// `template` with each `{name}` replaced by argument `name` (percent-encoded), and the
/// arguments it did not use.
fn fill_url(template: &str, arguments: &Map<String, Value>) -> (String, Map<String, Value>) {
    let mut url = template.to_owned();
    let mut rest = Map::new();
    for (name, value) in arguments {
        let placeholder = format!("{{{name}}}");
        if url.contains(&placeholder) {
            url = url.replace(&placeholder, &percent_encode(&scalar_text(value)));
        } else {
            rest.insert(name.clone(), value.clone());
        }
    }
    (url, rest)
}

/// A value as text in a URL: a string as it is, anything else as JSON.
fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tool_cannot_reach_a_private_address_unless_allowed() {
        let tool = HttpTool::new(HttpToolConfig {
            url: "http://localhost:1/x".into(),
            method: "POST".into(),
            bearer_token_env: None,
            headers: BTreeMap::new(),
            result_pointer: None,
        })
        .unwrap();
        let refused = tool.call(&Value::Null, "k").await;
        assert!(
            matches!(&refused, Err(Failure::Permanent(m)) if m.contains("may not use")),
            "{refused:?}"
        );
        // Allowed, it is tried (and nobody listens there).
        let tried = tool.reaching(Reach::Any).call(&Value::Null, "k").await;
        assert!(matches!(tried, Err(Failure::Retriable(_))), "{tried:?}");
    }

    #[test]
    fn arguments_fill_the_url_and_the_rest_is_left() {
        let arguments = serde_json::json!({"order_id": "A/1 b", "n": 2, "verbose": true});
        let (url, rest) = fill_url(
            "http://127.0.0.1:1/orders/{order_id}?n={n}",
            arguments.as_object().unwrap(),
        );
        assert_eq!(url, "http://127.0.0.1:1/orders/A%2F1%20b?n=2");
        assert_eq!(Value::Object(rest), serde_json::json!({"verbose": true}));
        let bad = |method: &str, url: &str| {
            HttpTool::new(HttpToolConfig {
                url: url.into(),
                method: method.into(),
                bearer_token_env: None,
                headers: BTreeMap::new(),
                result_pointer: None,
            })
            .is_err()
        };
        assert!(bad("TRACE", "http://x/"));
        let secret = |var: &str| {
            HttpTool::new(HttpToolConfig {
                url: "https://x/".into(),
                method: "POST".into(),
                bearer_token_env: Some(var.into()),
                headers: BTreeMap::new(),
                result_pointer: None,
            })
            .is_ok()
        };
        assert!(!secret("DATABASE_URL"), "only variables meant for tools");
        assert!(!secret("SLUICE_TOOL_SECRET_"));
        assert!(secret("SLUICE_TOOL_SECRET_ACME_CRM"));
        assert!(bad("GET", "file:///etc/passwd"));
        assert!(!bad("get", "https://x/"));
    }
}
