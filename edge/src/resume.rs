//! Reading a stream back from `sluice.replies`, on any edge instance: what a WebSocket client
//! that lost its connection gets when it resumes.
//!
//! A stream's id says where its chunks are: the request id, the replies partition its edge
//! owns, and an offset at or before its first chunk (the dispatcher's position when the
//! request was sent: every chunk of it is produced later, so it lies beyond), and it is signed
//! (HMAC-SHA256 with a key derived from the access-token signing keys every edge shares), so a
//! client cannot point a read anywhere else. Any edge reads that partition from that offset with
//! a consumer of its own, keeps the stream's chunks after the client's last sequence number, and
//! stops at the last one. The id grants no access: a chunk of another tenant's stream ends the
//! read as "not found".

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::http::StatusCode;
use hmac::{Mac, SimpleHmac};
use rdkafka::{consumer::Consumer, message::Message, Offset, TopicPartitionList};
use sha2::Sha256;
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

impl StreamId {
    /// Parses the unsigned form (`Display`'s).
    fn parse_unsigned(s: &str) -> Option<Self> {
        let mut parts = s.rsplitn(4, '.');
        let created_ms = parts.next()?.parse().ok()?;
        let offset: i64 = parts.next()?.parse().ok()?;
        let partition: i32 = parts.next()?.parse().ok()?;
        let request_id = parts.next().filter(|r| !r.is_empty())?;
        (offset >= 0 && partition >= 0).then(|| Self {
            request_id: request_id.to_owned(),
            partition,
            offset,
            created_ms,
        })
    }
}

/// Signs stream ids and checks them: every edge derives the same keys from the access-token
/// signing keys in PostgreSQL, so any edge accepts any edge's ids.
pub struct StreamSigner {
    /// Newest first: the first signs, all verify.
    keys: Vec<Vec<u8>>,
}

/// Hex digits of the signature kept in an id (128 bits).
const SIGNATURE_HEX: usize = 32;

type HmacSha256 = SimpleHmac<Sha256>;

impl StreamSigner {
    /// A signer from the access-token signing secrets, newest first.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a [u8]>) -> Self {
        // A key of its own for each secret: a stream id's signature is never a token's.
        let keys = secrets
            .into_iter()
            .filter_map(|secret| Self::mac(secret, "sluice stream ids"))
            .map(|mac| mac.finalize().into_bytes().to_vec())
            .collect();
        Self { keys }
    }

    fn mac(key: &[u8], text: &str) -> Option<HmacSha256> {
        let mut mac = HmacSha256::new_from_slice(key).ok()?;
        mac.update(text.as_bytes());
        Some(mac)
    }

    /// `id` with its signature: what clients are given.
    pub fn sign(&self, id: &StreamId) -> String {
        let text = id.to_string();
        let signature = self
            .keys
            .first()
            .and_then(|key| Self::mac(key, &text))
            .map(|mac| hex::encode(mac.finalize().into_bytes()))
            .unwrap_or_default();
        format!(
            "{text}.{}",
            signature.get(..SIGNATURE_HEX).unwrap_or_default()
        )
    }

    /// The id a client gave back, if it is one this Sluice signed.
    pub fn verify(&self, given: &str) -> Result<StreamId, ApiError> {
        let bad = || {
            ApiError::invalid("`stream` is not a stream id this API gave out.").with_param("stream")
        };
        let (text, signature) = given.rsplit_once('.').ok_or_else(bad)?;
        let signature = hex::decode(signature).map_err(|_| bad())?;
        if signature.len() * 2 != SIGNATURE_HEX {
            return Err(bad());
        }
        let genuine = self.keys.iter().any(|key| {
            Self::mac(key, text).is_some_and(|mac| mac.verify_truncated_left(&signature).is_ok())
        });
        if !genuine {
            return Err(bad());
        }
        StreamId::parse_unsigned(text).ok_or_else(bad)
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

/// What a resumed stream's consumer fetches ahead (KiB): it reads one stream, not the topic.
const RESUME_PREFETCH_KIB: &str = "1024";

/// Reads one stream's chunks back from the replies topic.
pub struct StreamReader {
    consumer: KafkaConsumer,
    /// One of the edge's places for resumed streams (`edge.websocket.max_resumes`).
    _place: tokio::sync::OwnedSemaphorePermit,
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
        let place = state.resumes.clone().try_acquire_owned().map_err(|_| {
            ApiError::unavailable("This edge is resuming as many streams as it can; retry shortly.")
                .retry_after(1)
        })?;
        let consumer = kafka::assigned_consumer_with(
            &state.kafka,
            kafka::FETCH_WAIT_MS,
            &[("queued.max.messages.kbytes", RESUME_PREFETCH_KIB)],
        )
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
            _place: place,
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
        // Other requests' chunks do not count: this stream's next one is due within the wait.
        let deadline = Instant::now() + self.wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = match tokio::time::timeout(left, self.consumer.recv()).await {
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
    fn stream_ids_round_trip_signed_and_refuse_what_we_never_gave_out() {
        let id = StreamId {
            request_id: "chatcmpl-0a1b".into(),
            partition: 2,
            offset: 12345,
            created_ms: 1_700_000_000_000,
        };
        assert_eq!(id.to_string(), "chatcmpl-0a1b.2.12345.1700000000000");
        let older: &[u8] = b"an older secret";
        let signer = StreamSigner::new([&b"a secret"[..], older]);
        let signed = signer.sign(&id);
        assert_eq!(signer.verify(&signed).unwrap(), id);
        // Another edge, with the keys from the same store, accepts it; after the key rotates
        // (a newer one signs), it still does.
        let rotated = StreamSigner::new([&b"a newer secret"[..], b"a secret"]);
        assert_eq!(rotated.verify(&signed).unwrap(), id);
        // Anything else is refused: unsigned, altered, or signed with another key.
        let other = StreamSigner::new([&b"not ours"[..]]);
        let moved = signed.replacen(".12345.", ".0.", 1);
        for bad in [
            "",
            "x",
            "chatcmpl-0a1b.2.12345.1700000000000",
            moved.as_str(),
            &other.sign(&id),
            &format!("{signed}0"),
        ] {
            assert!(signer.verify(bad).is_err(), "{bad}");
        }
    }
}
