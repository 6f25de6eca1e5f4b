//! A client for the Confluent schema-registry REST API (the subset Sluice needs).

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::{Error, Result};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Talks to a Confluent-compatible registry: Sluice's own, or Confluent's, Redpanda's, Apicurio's.
#[derive(Clone, Debug)]
pub struct RegistryClient {
    base_url: String,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct IdBody {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaBody {
    schema: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error_code: Option<i64>,
    message: Option<String>,
}

impl RegistryClient {
    /// A client for the registry at `base_url` (e.g. `http://127.0.0.1:8081`).
    pub fn new(base_url: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Registry {
                status: 0,
                message: format!("cannot build HTTP client: {e}"),
            })?;
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            http,
        })
    }

    /// Registers `schema` under `subject` and returns its id; registering an existing schema
    /// returns the existing id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32> {
        let url = format!("{}/subjects/{subject}/versions", self.base_url);
        let body: IdBody = self
            .send(self.http.post(url).json(&json!({ "schema": schema })))
            .await?;
        Ok(body.id)
    }

    /// The schema text registered with `id`.
    pub async fn schema_by_id(&self, id: u32) -> Result<String> {
        let url = format!("{}/schemas/ids/{id}", self.base_url);
        let body: SchemaBody = self.send(self.http.get(url)).await?;
        Ok(body.schema)
    }

    async fn send<T: for<'de> Deserialize<'de>>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T> {
        let response = request
            .header(reqwest::header::ACCEPT, CONTENT_TYPE)
            .send()
            .await
            .map_err(|e| Error::Registry {
                status: 0,
                message: format!("registry {} unreachable: {e}", self.base_url),
            })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| Error::Registry {
            status: status.as_u16(),
            message: format!("reading registry response: {e}"),
        })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .ok()
                .map(|b| {
                    format!(
                        "{} (error_code {})",
                        b.message.unwrap_or_default(),
                        b.error_code.unwrap_or_default()
                    )
                })
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(Error::Registry {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::Registry {
            status: status.as_u16(),
            message: format!("unexpected registry response: {e}"),
        })
    }
}
