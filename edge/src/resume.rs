//! Reading a stream back from `sluice.replies`, on any edge instance: what a WebSocket client
//! that lost its connection gets when it resumes.
//!
//! A stream's id says where its chunks are: the request id, the replies partition its edge
//! owns, and an offset at or before its first chunk (the dispatcher's position when the
//! request was sent: every chunk of it is produced later, so it lies beyond). Any edge reads
//! that partition from that offset with a consumer of its own, keeps the stream's chunks after
//! the client's last sequence number, and stops at the last one. The id is not a secret that
//! grants access: a chunk of another tenant's stream ends the read as "not found".

use std::{fmt, str::FromStr, sync::Arc, time::Duration};

use axum::http::StatusCode;
use rdkafka::{consumer::Consumer, message::Message, Offset, TopicPartitionList};
use sluice_pipelines::kafka::{self, KafkaConsumer};
use sluice_schemas::{Codec, ReplyChunk, ReplyKind};

use crate::{error::ApiError, EdgeState};

/// Where a stream's chunks are on the replies topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamId {
    pub request_id: String,
    pub partition: i32,
    /// An offset at or before the stream's first chunk.
    pub offset: i64,
    /// When the request was sent (Unix milliseconds).
    pub created_ms: i64,
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}.{}",
            self.request_id, self.partition, self.offset, self.created_ms
        )
    }
}

impl FromStr for StreamId {
    type Err = ApiError;

    fn from_str(s: &str) -> Result<Self, ApiError> {
        let bad = || {
            ApiError::invalid("`stream` is not a stream id this API gave out.").with_param("stream")
        };
        let mut parts = s.rsplitn(4, '.');
        let created_ms = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let offset: i64 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let partition: i32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let request_id = parts.next().filter(|r| !r.is_empty()).ok_or_else(bad)?;
        if offset < 0 || partition < 0 {
            return Err(bad());
        }
        Ok(Self {
            request_id: request_id.to_owned(),
            partition,
            offset,
            created_ms,
        })
    }
}

fn not_found(stream: &StreamId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "stream_not_found",
        format!(
            "No stream `{}` of yours is on the replies topic (it may have expired).",
            stream.request_id
        ),
    )
    .with_param("stream")
}

/// Reads one stream's chunks back from the replies topic.
pub struct StreamReader {
    consumer: KafkaConsumer,
    codec: Arc<Codec>,
    stream: StreamId,
    tenant: String,
    /// The last sequence number the client has.
    after_seq: i32,
    /// The longest wait for the next chunk (the edge's reply timeout).
    wait: Duration,
    found: bool,
    finished: bool,
}

impl StreamReader {
    /// Starts reading `stream` for `tenant`, skipping chunks up to `after_seq`.
    pub fn open(
        state: &EdgeState,
        stream: StreamId,
        tenant: &str,
        after_seq: i32,
    ) -> Result<Self, ApiError> {
        if stream.partition >= state.replies_partitions {
            return Err(not_found(&stream));
        }
        let unavailable = |e: &dyn fmt::Display| {
            ApiError::unavailable(format!("cannot read the replies topic: {e}"))
        };
        let consumer = kafka::assigned_consumer(&state.kafka, kafka::FETCH_WAIT_MS)
            .map_err(|e| unavailable(&e))?;
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(
            state.replies.topic(),
            stream.partition,
            Offset::Offset(stream.offset),
        )
        .map_err(|e| unavailable(&e))?;
        consumer.assign(&list).map_err(|e| unavailable(&e))?;
        Ok(Self {
            consumer,
            codec: state.codec.clone(),
            stream,
            tenant: tenant.to_owned(),
            after_seq,
            wait: Duration::from_secs(state.config.reply_timeout_secs),
            found: false,
            finished: false,
        })
    }

    /// The stream's next chunk after the client's, or `None` once its last chunk has been
    /// returned (or the client had it already).
    pub async fn next(&mut self) -> Result<Option<ReplyChunk>, ApiError> {
        if self.finished {
            return Ok(None);
        }
        // Past this time a stream none of whose chunks has been seen cannot start any more.
        let give_up_ms = self
            .stream
            .created_ms
            .saturating_add(i64::try_from(self.wait.as_millis()).unwrap_or(i64::MAX));
        loop {
            let message = match tokio::time::timeout(self.wait, self.consumer.recv()).await {
                Ok(Ok(message)) => message,
                Ok(Err(e)) => {
                    return Err(ApiError::unavailable(format!(
                        "cannot read the replies topic: {e}"
                    )))
                }
                Err(_) if self.found => {
                    return Err(ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "timeout",
                        "The model did not answer in time.",
                    ))
                }
                Err(_) => return Err(not_found(&self.stream)),
            };
            if !self.found
                && message
                    .timestamp()
                    .to_millis()
                    .is_some_and(|t| t > give_up_ms)
            {
                return Err(not_found(&self.stream));
            }
            // A chunk that does not decode is the owning edge's to send to the DLQ.
            let Ok(chunk) = self
                .codec
                .decode::<ReplyChunk>(message.payload().unwrap_or_default())
                .await
            else {
                continue;
            };
            if chunk.request_id != self.stream.request_id {
                continue;
            }
            if chunk.tenant_id != self.tenant {
                self.finished = true;
                return Err(not_found(&self.stream));
            }
            self.found = true;
            let last = chunk.kind != ReplyKind::Delta;
            if chunk.seq <= self.after_seq {
                if last {
                    self.finished = true;
                    return Ok(None);
                }
                continue;
            }
            self.after_seq = chunk.seq;
            self.finished = last;
            return Ok(Some(chunk));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_round_trip_and_refuse_what_we_never_gave_out() {
        let id = StreamId {
            request_id: "chatcmpl-0a1b".into(),
            partition: 2,
            offset: 12345,
            created_ms: 1_700_000_000_000,
        };
        let text = id.to_string();
        assert_eq!(text, "chatcmpl-0a1b.2.12345.1700000000000");
        assert_eq!(text.parse::<StreamId>().unwrap(), id);
        for bad in [
            "", "x", "a.b.c.d", "r.-1.0.0", "r.0.-5.0", ".1.2.3", "r.1.2",
        ] {
            assert!(bad.parse::<StreamId>().is_err(), "{bad}");
        }
    }
}
