//! ClickHouse, where the facts live: connection settings, the DDL of database `sluice`
//! ([`schema`]), the one writer every ClickHouse write goes through ([`ClickHouse`]) and the
//! read queries ([`usage`], [`analytics`]).
//!
//! Everything here speaks SQL and formats that both ClickHouse 18.16 (the local stack) and
//! current releases accept. Credentials travel in headers, never in the URL.

pub mod analytics;
pub mod schema;
pub mod usage;

use std::sync::Arc;

use ::clickhouse::{Client, RowOwned, RowWrite};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How to reach ClickHouse.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    /// Database holding Sluice's tables.
    pub database: String,
    /// User the sinks and the edge connect as.
    pub user: String,
    /// That user's password (empty for none).
    pub password: String,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8123".into(),
            database: "sluice".into(),
            user: "default".into(),
            password: String::new(),
        }
    }
}

impl ClickHouseConfig {
    /// Every problem with the settings.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            problems.push("clickhouse.url must be an http:// or https:// URL".to_owned());
        }
        if !is_identifier(&self.database) {
            problems.push("clickhouse.database must be a plain identifier".to_owned());
        }
        problems
    }

    /// A client not bound to a database (for creating it). Validation is off: ClickHouse 18.16
    /// lacks the `RowBinaryWithNamesAndTypes` format it needs; rows are plain `RowBinary`.
    fn server_client(&self) -> Client {
        let mut client = Client::default()
            .with_url(&self.url)
            .with_user(&self.user)
            .with_validation(false);
        if !self.password.is_empty() {
            client = client.with_password(&self.password);
        }
        client
    }
}

/// Whether `name` can be a database or table name as it is (letters, digits, `_`).
pub fn is_identifier(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Sluice's database in ClickHouse: the one writer, and the client the read queries use.
/// Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct ClickHouse {
    client: Arc<Client>,
    /// For queries that send a table of their own with them ([`ClickHouse::query_with_table`]),
    /// which the typed client cannot.
    http: reqwest::Client,
    config: Arc<ClickHouseConfig>,
}

impl ClickHouse {
    /// A handle on `config`'s database (connections are made as needed).
    pub fn new(config: &ClickHouseConfig) -> Self {
        Self {
            client: Arc::new(config.server_client().with_database(&config.database)),
            http: reqwest::Client::new(),
            config: Arc::new(config.clone()),
        }
    }

    /// Runs `query` (which ends in `FORMAT JSONEachRow`) with `rows` sent beside it as the
    /// external table `name` of `structure` (`col Type, …`), and returns the answer's rows.
    /// Sending values as a table costs ClickHouse a fraction of parsing them as literals in
    /// the query, and has no size limit.
    pub(crate) async fn query_with_table<In, Out>(
        &self,
        query: &str,
        (name, structure): (&str, &str),
        rows: impl Iterator<Item = In>,
    ) -> Result<Vec<Out>>
    where
        In: Serialize,
        Out: serde::de::DeserializeOwned,
    {
        checked_table(name)?;
        let mut data = Vec::new();
        for row in rows {
            serde_json::to_writer(&mut data, &row)
                .map_err(|e| Error::Corrupt(format!("an external table's row: {e}")))?;
            data.push(b'\n');
        }
        let boundary = format!("sluice-{}", rand::random::<u64>());
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(&data);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let structure_key = format!("{name}_structure");
        let format_key = format!("{name}_format");
        let mut request = self
            .http
            .post(&self.config.url)
            .query(&[
                ("database", self.config.database.as_str()),
                ("query", query),
                (structure_key.as_str(), structure),
                (format_key.as_str(), "JSONEachRow"),
            ])
            .header("X-ClickHouse-User", &self.config.user)
            .header(
                "Content-Type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body);
        if !self.config.password.is_empty() {
            request = request.header("X-ClickHouse-Key", &self.config.password);
        }
        let response = request
            .send()
            .await
            .map_err(|e| Error::Unavailable(format!("ClickHouse: {e}")))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| Error::Unavailable(format!("ClickHouse: {e}")))?;
        if !status.is_success() {
            return Err(Error::Unavailable(format!(
                "ClickHouse answered {status}: {}",
                text.trim()
            )));
        }
        text.lines()
            .filter(|line| !line.is_empty())
            .map(|line| {
                serde_json::from_str(line)
                    .map_err(|e| Error::Corrupt(format!("ClickHouse's answer: {e}")))
            })
            .collect()
    }

    /// The client, bound to the database, for read queries.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Inserts typed rows into `table` in one request (`RowBinary`).
    pub async fn insert_rows<T>(&self, table: &str, rows: &[T]) -> Result<()>
    where
        T: RowOwned + RowWrite,
    {
        checked_table(table)?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut insert = self.client.insert::<T>(table).await?;
        for row in rows {
            insert.write(row).await?;
        }
        insert.end().await?;
        Ok(())
    }

    /// Inserts rows given as JSON objects into `table` in one request (`JSONEachRow`): for rows
    /// whose columns are known only at run time, such as a SQL pipeline's results.
    pub async fn insert_json_rows<'a>(
        &self,
        table: &str,
        rows: impl IntoIterator<Item = &'a serde_json::Map<String, serde_json::Value>>,
    ) -> Result<usize> {
        checked_table(table)?;
        let mut body = Vec::new();
        let mut count = 0;
        for row in rows {
            serde_json::to_writer(&mut body, row)
                .map_err(|e| Error::Invalid(format!("a row for {table} is not JSON: {e}")))?;
            body.push(b'\n');
            count += 1;
        }
        if count == 0 {
            return Ok(0);
        }
        let mut insert = self
            .client
            .insert_formatted_with(format!("INSERT INTO {table} FORMAT JSONEachRow"));
        insert.send(bytes::Bytes::from(body)).await?;
        insert.end().await?;
        Ok(count)
    }
}

fn checked_table(table: &str) -> Result<()> {
    if is_identifier(table) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{table:?} is not a plain ClickHouse table name"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_and_validates() {
        let c: ClickHouseConfig = toml::from_str("url = \"ftp://x\"\ndatabase = \"a-b\"").unwrap();
        assert_eq!(c.validate().len(), 2);
        assert!(ClickHouseConfig::default().validate().is_empty());
    }

    #[tokio::test]
    async fn table_names_are_plain_identifiers() {
        let clickhouse = ClickHouse::new(&ClickHouseConfig::default());
        let rows = [serde_json::Map::new()];
        let refused = clickhouse
            .insert_json_rows("t; DROP TABLE usage_events", &rows)
            .await;
        assert!(matches!(refused, Err(Error::Invalid(_))));
        assert_eq!(clickhouse.insert_json_rows("t", []).await.unwrap(), 0);
    }
}
