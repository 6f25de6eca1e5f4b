//! Getting replies back to the edge instance that holds the caller's connection.
//!
//! Each edge instance owns one partition of `sluice.replies`, claimed with a PostgreSQL
//! advisory lock held for the life of the process (a crashed instance's lock goes with its
//! connection, and a new instance can take the partition). Requests name that partition in
//! `reply_to`; the orchestrator writes there; this instance reads only that partition, from its
//! end, and hands each chunk to the request waiting for it. So edge instances scale up to the
//! number of replies partitions, with no broadcast and no shared connection directory.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use rdkafka::{consumer::Consumer, message::Message, Offset, TopicPartitionList};
use sluice_pipelines::{kafka::KafkaConsumer, metrics::Metrics, runtime::DeadLetters};
use sluice_schemas::{Codec, ReplyChunk, ReplyKind};
use sluice_stores::postgres::claims::{self, Claim};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::limits::Admission;

/// Chunks buffered per waiting request before the caller counts as too slow.
const WAITER_BUFFER: usize = 1024;

struct Waiter {
    tx: mpsc::Sender<ReplyChunk>,
    next_seq: i32,
}

/// Routes reply chunks from this instance's replies partition to the requests waiting for them.
pub struct ReplyRouter {
    topic: String,
    partition: i32,
    waiters: Mutex<HashMap<String, Waiter>>,
    /// The offset of the next record the dispatcher will read: every chunk of a request sent
    /// after reading it lies at or beyond it (where a resumed stream starts reading).
    position: AtomicI64,
    metrics: Arc<Metrics>,
}

/// A request's reply stream; dropping it stops the routing of its chunks. It holds the
/// request's admission against its caller's limits, settled by the reply's last chunk
/// ([`Subscription::observe`]); dropped before that chunk (the caller went away), it reads the
/// rest of the reply in the background and settles then.
pub struct Subscription {
    pub rx: mpsc::Receiver<ReplyChunk>,
    router: Arc<ReplyRouter>,
    request_id: String,
    admission: Option<Admission>,
    /// The longest wait for a chunk when reading the rest in the background.
    wait: Duration,
}

impl Subscription {
    /// Holds `admission` until the reply's last chunk, waiting at most `wait` for each chunk.
    pub fn hold(&mut self, admission: Option<Admission>, wait: Duration) {
        self.admission = admission;
        self.wait = wait;
    }

    /// The `x-ratelimit-*` headers of the admission held, if any.
    pub fn limit_headers(&self) -> axum::http::HeaderMap {
        self.admission
            .as_ref()
            .map(Admission::headers)
            .unwrap_or_default()
    }

    /// Notes a chunk read from the stream: the last one settles the admission.
    pub fn observe(&mut self, chunk: &ReplyChunk) {
        if chunk.kind != ReplyKind::Delta {
            if let Some(admission) = self.admission.take() {
                admission.settle_by(chunk);
            }
        } else if let Some(admission) = self.admission.as_mut() {
            admission.keep_alive();
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(admission) = self.admission.take() else {
            if let Ok(mut waiters) = self.router.waiters.lock() {
                waiters.remove(&self.request_id);
            }
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // The rest of the reply still comes: read it, so its usage settles the admission.
        let (_, closed) = mpsc::channel(1);
        let mut rx = std::mem::replace(&mut self.rx, closed);
        let (router, request_id, wait) = (self.router.clone(), self.request_id.clone(), self.wait);
        let mut admission = admission;
        runtime.spawn(async move {
            let last = loop {
                match tokio::time::timeout(wait, rx.recv()).await {
                    Ok(Some(chunk)) if chunk.kind == ReplyKind::Delta => admission.keep_alive(),
                    Ok(Some(chunk)) => break Some(chunk),
                    _ => break None,
                }
            };
            if let Ok(mut waiters) = router.waiters.lock() {
                waiters.remove(&request_id);
            }
            // No last chunk in time: the reservation stays spent.
            if let Some(chunk) = last {
                admission.settle_by(&chunk);
            }
        });
    }
}

impl ReplyRouter {
    /// A router for `topic`/`partition`.
    pub fn new(topic: &str, partition: i32, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            topic: topic.to_owned(),
            partition,
            waiters: Mutex::new(HashMap::new()),
            position: AtomicI64::new(0),
            metrics,
        })
    }

    /// The offset of the next record the dispatcher reads.
    pub fn position(&self) -> i64 {
        self.position.load(Ordering::Acquire)
    }

    /// Notes that the dispatcher has read up to `offset` (inclusive).
    fn advance(&self, offset: i64) {
        self.position.fetch_max(offset + 1, Ordering::AcqRel);
    }

    /// The replies topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition this instance reads.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Starts waiting for `request_id`'s chunks. Call before sending the request.
    pub fn subscribe(self: &Arc<Self>, request_id: &str) -> Subscription {
        let (tx, rx) = mpsc::channel(WAITER_BUFFER);
        if let Ok(mut waiters) = self.waiters.lock() {
            waiters.insert(request_id.to_owned(), Waiter { tx, next_seq: 0 });
        }
        Subscription {
            rx,
            router: self.clone(),
            request_id: request_id.to_owned(),
            admission: None,
            wait: Duration::from_secs(120),
        }
    }

    /// Hands `chunk` to its request. Chunks seen before (a redelivery upstream) are dropped;
    /// a request whose buffer is full loses its stream (it ends without DONE, and the caller
    /// gets an error) rather than growing memory without bound.
    pub fn dispatch(&self, chunk: ReplyChunk) {
        let Ok(mut waiters) = self.waiters.lock() else {
            return;
        };
        let Some(waiter) = waiters.get_mut(&chunk.request_id) else {
            self.metrics.orphan_replies.inc();
            return;
        };
        if chunk.seq < waiter.next_seq {
            return;
        }
        waiter.next_seq = chunk.seq + 1;
        let request_id = chunk.request_id.clone();
        if let Err(e) = waiter.tx.try_send(chunk) {
            if matches!(e, mpsc::error::TrySendError::Full(_)) {
                tracing::warn!(%request_id, "caller is not reading its reply; dropping its stream");
            }
            waiters.remove(&request_id);
        }
    }
}

/// Claims a free partition of `topic` (of `partitions`) for this instance, returning it and the
/// claim (keep it for as long as the instance runs).
pub async fn claim_partition(
    pool: &PgPool,
    topic: &str,
    partitions: i32,
) -> crate::Result<(i32, Claim)> {
    let names: Vec<String> = (0..partitions)
        .map(|partition| format!("sluice-replies:{topic}:{partition}"))
        .collect();
    let claim = claims::claim_first_free(pool, &names)
        .await?
        .ok_or_else(|| crate::Error::NoFreeRepliesPartition {
            topic: topic.to_owned(),
            partitions,
        })?;
    let partition = i32::try_from(claim.index).unwrap_or(i32::MAX);
    Ok((partition, claim))
}

/// Positions `consumer` at the current end of the router's partition (replies for requests
/// made before this instance started are not ours).
pub fn assign_at_end(consumer: &KafkaConsumer, router: &ReplyRouter) -> crate::Result<()> {
    let (_, high) =
        consumer.fetch_watermarks(router.topic(), router.partition(), Duration::from_secs(10))?;
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(router.topic(), router.partition(), Offset::Offset(high))?;
    consumer.assign(&list)?;
    router.advance(high - 1);
    Ok(())
}

/// Reads the partition and dispatches chunks until `cancel` fires. Chunks that do not decode go
/// to the DLQ.
pub async fn run_dispatcher(
    router: Arc<ReplyRouter>,
    consumer: KafkaConsumer,
    codec: Arc<Codec>,
    dead_letters: DeadLetters,
    cancel: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => return,
            m = consumer.recv() => m,
        };
        let message = match message {
            Ok(m) => m.detach(),
            Err(e) => {
                tracing::warn!(error = %e, "replies consumer failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        router.advance(message.offset());
        match codec
            .decode::<ReplyChunk>(message.payload().unwrap_or_default())
            .await
        {
            Ok(chunk) => router.dispatch(chunk),
            Err(e) => {
                dead_letters
                    .send(&message, &format!("undecodable reply: {e}"), &cancel)
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::ReplyKind;

    fn chunk(request_id: &str, seq: i32) -> ReplyChunk {
        let request = crate::test_support::request(request_id);
        ReplyChunk::new(&request, "m", seq, ReplyKind::Delta)
    }

    #[tokio::test]
    async fn chunks_reach_their_request_once_and_in_order() {
        let router = ReplyRouter::new("r", 0, Arc::new(Metrics::new().unwrap()));
        let mut a = router.subscribe("a");
        let mut b = router.subscribe("b");
        router.dispatch(chunk("a", 0));
        router.dispatch(chunk("b", 0));
        router.dispatch(chunk("a", 1));
        router.dispatch(chunk("a", 0)); // redelivered
        router.dispatch(chunk("a", 1)); // redelivered
        router.dispatch(chunk("nobody", 0));
        assert_eq!(a.rx.recv().await.unwrap().seq, 0);
        assert_eq!(a.rx.recv().await.unwrap().seq, 1);
        assert!(a.rx.try_recv().is_err());
        assert_eq!(b.rx.recv().await.unwrap().request_id, "b");
        drop(a);
        router.dispatch(chunk("a", 2));
        assert!(router.waiters.lock().unwrap().get("a").is_none());
    }

    #[tokio::test]
    async fn a_caller_that_stops_reading_loses_its_stream_not_our_memory() {
        let router = ReplyRouter::new("r", 0, Arc::new(Metrics::new().unwrap()));
        let mut slow = router.subscribe("slow");
        for seq in 0..(WAITER_BUFFER as i32 + 10) {
            router.dispatch(chunk("slow", seq));
        }
        let mut received = 0;
        while slow.rx.recv().await.is_some() {
            received += 1;
        }
        assert_eq!(received, WAITER_BUFFER);
    }
}
