//! Which offset of each partition may be committed: records are done in any order across
//! lanes, but the commit position only moves past a record once it and every earlier record of
//! its partition are done, and never past what an operator still retains in its state.

use std::collections::{BTreeSet, HashMap};

/// Per-partition bookkeeping of records in flight, shared by a stage's lanes.
#[derive(Default)]
pub(crate) struct OffsetTracker {
    partitions: HashMap<i32, PartitionOffsets>,
}

#[derive(Default)]
struct PartitionOffsets {
    pending: BTreeSet<i64>,
    highest_seen: Option<i64>,
    stored: Option<i64>,
    /// Per lane, the first offset the lane's operator keeps in its state.
    retained: HashMap<usize, i64>,
}

impl PartitionOffsets {
    /// The position (next offset to read) that may be committed now, if it moved forward.
    fn advance(&mut self) -> Option<i64> {
        let done_up_to = match self.pending.first() {
            Some(first) => *first,
            None => self.highest_seen? + 1,
        };
        let position = self.retained.values().copied().fold(done_up_to, i64::min);
        if self.stored.is_some_and(|s| s >= position) {
            return None;
        }
        self.stored = Some(position);
        Some(position)
    }
}

impl OffsetTracker {
    /// A record was read and handed to a lane.
    pub(crate) fn begin(&mut self, partition: i32, offset: i64) {
        let p = self.partitions.entry(partition).or_default();
        p.pending.insert(offset);
        p.highest_seen = Some(p.highest_seen.map_or(offset, |h| h.max(offset)));
    }

    /// Marks `offset` done; returns the new commit position if it moved.
    #[cfg(test)]
    pub(crate) fn complete(&mut self, partition: i32, offset: i64) -> Option<i64> {
        self.finish(0, &[(partition, offset)], None)
            .into_iter()
            .next()
            .map(|(_, position)| position)
    }

    /// Marks `records` done and, when given, replaces what `lane`'s operator retains; returns
    /// every partition whose commit position moved, with its new position.
    pub(crate) fn finish(
        &mut self,
        lane: usize,
        records: &[(i32, i64)],
        retained: Option<&[(i32, i64)]>,
    ) -> Vec<(i32, i64)> {
        let mut touched: BTreeSet<i32> = BTreeSet::new();
        for (partition, offset) in records {
            if let Some(p) = self.partitions.get_mut(partition) {
                p.pending.remove(offset);
                touched.insert(*partition);
            }
        }
        if let Some(retained) = retained {
            for (partition, p) in self.partitions.iter_mut() {
                let now = retained
                    .iter()
                    .find(|(rp, _)| rp == partition)
                    .map(|(_, o)| *o);
                let before = match now {
                    Some(offset) => p.retained.insert(lane, offset),
                    None => p.retained.remove(&lane),
                };
                if before != now {
                    touched.insert(*partition);
                }
            }
        }
        touched
            .into_iter()
            .filter_map(|partition| {
                let p = self.partitions.get_mut(&partition)?;
                p.advance().map(|position| (partition, position))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_stored_in_partition_order() {
        let mut t = OffsetTracker::default();
        for o in 10..14 {
            t.begin(0, o);
        }
        t.begin(1, 5);
        assert_eq!(
            t.complete(0, 11),
            Some(10),
            "10 still pending: position stays at 10"
        );
        assert_eq!(t.complete(0, 10), Some(12));
        assert_eq!(
            t.complete(0, 13),
            None,
            "12 pending: position does not move"
        );
        assert_eq!(t.complete(0, 12), Some(14));
        assert_eq!(t.complete(1, 5), Some(6));
        assert_eq!(t.complete(7, 1), None, "unknown partition");
    }

    #[test]
    fn a_redelivered_lower_offset_never_moves_the_position_back() {
        let mut t = OffsetTracker::default();
        t.begin(0, 20);
        assert_eq!(t.complete(0, 20), Some(21));
        t.begin(0, 15);
        assert_eq!(t.complete(0, 15), None);
    }

    #[test]
    fn retained_offsets_hold_the_position_back_until_released() {
        let mut t = OffsetTracker::default();
        for o in 0..10 {
            t.begin(0, o);
        }
        let done: Vec<(i32, i64)> = (0..10).map(|o| (0, o)).collect();
        // Lane 1 keeps records 4.. in a window; lane 2 keeps 7..
        assert_eq!(t.finish(1, &done[..5], Some(&[(0, 4)])), vec![(0, 4)]);
        assert_eq!(t.finish(2, &done[5..], Some(&[(0, 7)])), vec![]);
        // Lane 1 emits its window: lane 2's hold is now the lowest.
        assert_eq!(t.finish(1, &[], Some(&[])), vec![(0, 7)]);
        assert_eq!(t.finish(2, &[], Some(&[])), vec![(0, 10)]);
    }
}
