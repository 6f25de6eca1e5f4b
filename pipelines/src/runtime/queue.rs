//! A lane's queue: the consume loop hands a lane every record it has ready for it as one chunk,
//! and the lane takes them off one by one or in batches. The queue is bounded in records, not
//! chunks (the stage's `lane_capacity`), so a burst costs one hand-off and one wake-up instead
//! of one per record, while a slow lane still stops the consumer at the same depth.

use std::{collections::VecDeque, sync::Arc};

use rdkafka::message::OwnedMessage;
use tokio::sync::{mpsc, Semaphore, TryAcquireError};

/// Creates a lane's queue holding up to `capacity` records.
pub(super) fn lane_queue(capacity: usize) -> (LaneSender, LaneReceiver) {
    // A chunk takes one permit per record, at most u32::MAX at once.
    let most = Semaphore::MAX_PERMITS.min(u32::MAX as usize);
    let capacity = capacity.clamp(1, most);
    let (tx, rx) = mpsc::unbounded_channel();
    let room = Arc::new(Semaphore::new(capacity));
    (
        LaneSender {
            tx,
            room: room.clone(),
            capacity,
        },
        LaneReceiver {
            rx,
            room,
            carry: VecDeque::new(),
        },
    )
}

/// The lane is gone: its records cannot be handed over.
#[derive(Debug)]
pub(super) struct Closed;

/// The consume loop's end of a lane's queue.
pub(super) struct LaneSender {
    tx: mpsc::UnboundedSender<Vec<OwnedMessage>>,
    /// One permit per record the queue has room for.
    room: Arc<Semaphore>,
    capacity: usize,
}

impl LaneSender {
    /// The longest chunk the queue takes at once (longer ones are handed over in parts).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Hands over `chunk` (at most [`capacity`](Self::capacity) records) if there is room for
    /// all of it now; gives it back if not.
    pub fn try_send(&self, chunk: Vec<OwnedMessage>) -> Result<(), TrySend<Vec<OwnedMessage>>> {
        match self.room.try_acquire_many(permits(chunk.len())) {
            Ok(permit) => {
                permit.forget();
                self.tx.send(chunk).map_err(|_| TrySend::Closed)
            }
            Err(TryAcquireError::NoPermits) => Err(TrySend::Full(chunk)),
            Err(TryAcquireError::Closed) => Err(TrySend::Closed),
        }
    }

    /// Hands over `chunk` (at most [`capacity`](Self::capacity) records), waiting for room.
    /// Cancel-safe: dropped while waiting, nothing was handed over.
    pub async fn send(&self, chunk: Vec<OwnedMessage>) -> Result<(), Closed> {
        let permit = self
            .room
            .acquire_many(permits(chunk.len()))
            .await
            .map_err(|_| Closed)?;
        permit.forget();
        self.tx.send(chunk).map_err(|_| Closed)
    }
}

/// Why [`LaneSender::try_send`] did not hand a chunk over.
pub(super) enum TrySend<T> {
    /// No room now; the chunk comes back.
    Full(T),
    /// The lane is gone.
    Closed,
}

fn permits(records: usize) -> u32 {
    u32::try_from(records).unwrap_or(u32::MAX)
}

/// The lane's end of its queue.
pub(super) struct LaneReceiver {
    rx: mpsc::UnboundedReceiver<Vec<OwnedMessage>>,
    room: Arc<Semaphore>,
    /// Records of a chunk already taken off the channel, not yet handed to the lane.
    carry: VecDeque<OwnedMessage>,
}

impl LaneReceiver {
    /// The next record, waiting for one; `None` once the consume loop is gone and the queue is
    /// empty. Cancel-safe.
    pub async fn recv(&mut self) -> Option<OwnedMessage> {
        if self.carry.is_empty() {
            let chunk = self.rx.recv().await?;
            self.carry.extend(chunk);
        }
        self.take_one()
    }

    /// The next record if one is queued, without waiting; `Err(Closed)` once the consume loop
    /// is gone and the queue is empty.
    pub fn try_recv(&mut self) -> Result<Option<OwnedMessage>, Closed> {
        if self.carry.is_empty() {
            match self.rx.try_recv() {
                Ok(chunk) => self.carry.extend(chunk),
                Err(mpsc::error::TryRecvError::Empty) => return Ok(None),
                Err(mpsc::error::TryRecvError::Disconnected) => return Err(Closed),
            }
        }
        Ok(self.take_one())
    }

    /// Whether no record waits.
    pub fn is_empty(&self) -> bool {
        self.carry.is_empty() && self.rx.is_empty()
    }

    fn take_one(&mut self) -> Option<OwnedMessage> {
        let message = self.carry.pop_front()?;
        self.room.add_permits(1);
        Some(message)
    }
}

impl Drop for LaneReceiver {
    fn drop(&mut self) {
        // A consume loop waiting for room learns that the lane is gone.
        self.room.close();
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::{message::Message, Timestamp};

    use super::*;

    fn record(offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            None,
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    }

    fn offsets(receiver: &mut LaneReceiver) -> Vec<i64> {
        let mut seen = Vec::new();
        while let Ok(Some(message)) = receiver.try_recv() {
            seen.push(message.offset());
        }
        seen
    }

    #[tokio::test]
    async fn chunks_arrive_in_order_and_room_is_counted_in_records() {
        let (tx, mut rx) = lane_queue(4);
        assert!(tx.try_send(vec![record(0), record(1), record(2)]).is_ok());
        // One record of room left: a chunk of two must wait.
        let Err(TrySend::Full(back)) = tx.try_send(vec![record(3), record(4)]) else {
            panic!("a chunk larger than the room left was taken");
        };
        assert_eq!(back.len(), 2);
        assert_eq!(rx.recv().await.map(|m| m.offset()), Some(0));
        assert!(tx.try_send(back).is_ok());
        assert!(!rx.is_empty());
        assert_eq!(offsets(&mut rx), vec![1, 2, 3, 4]);
        assert!(rx.is_empty());
    }

    #[tokio::test]
    async fn a_waiting_sender_learns_the_lane_is_gone() {
        let (tx, rx) = lane_queue(1);
        assert!(tx.try_send(vec![record(0)]).is_ok());
        let waiting = tx.send(vec![record(1)]);
        drop(rx);
        assert!(waiting.await.is_err());
    }

    #[tokio::test]
    async fn the_receiver_sees_the_end_once_drained() {
        let (tx, mut rx) = lane_queue(8);
        assert!(tx.try_send(vec![record(0)]).is_ok());
        drop(tx);
        assert_eq!(rx.try_recv().ok().flatten().map(|m| m.offset()), Some(0));
        assert!(rx.try_recv().is_err());
        assert!(rx.recv().await.is_none());
    }
}
