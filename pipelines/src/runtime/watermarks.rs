//! Event time per partition, as one lane sees it: the highest event time seen, when the last
//! record came, and the watermark last announced. A partition's watermark trails its highest
//! event time by the allowed out-of-orderness; once the partition has been quiet for
//! `idle_after` (and the lane says nothing of it waits), it follows the wall clock instead, so
//! the windows of a quiet partition still close.

use std::{collections::HashMap, time::Instant};

use super::WatermarkSpec;

/// Per-partition event time seen by one lane.
#[derive(Default)]
pub(super) struct EventTime {
    highest: HashMap<i32, i64>,
    last_record: HashMap<i32, Instant>,
    watermark: HashMap<i32, i64>,
}

impl EventTime {
    /// A record of `partition` arrived, with event time `at` if it has one.
    pub fn observe(&mut self, partition: i32, at: Option<i64>) {
        if let Some(at) = at {
            let highest = self.highest.entry(partition).or_insert(at);
            *highest = (*highest).max(at);
        }
        self.last_record.insert(partition, Instant::now());
    }

    /// Every partition whose watermark moved forward since it was last announced, with its new
    /// watermark, in partition order; `now_ms` is the wall clock, which quiet partitions follow
    /// when `idle` is set.
    pub fn advance(&mut self, spec: &WatermarkSpec, idle: bool, now_ms: i64) -> Vec<(i32, i64)> {
        let delay = i64::try_from(spec.max_out_of_orderness.as_millis()).unwrap_or(i64::MAX);
        let mut moved = Vec::new();
        for (partition, highest) in &self.highest {
            let mut watermark = highest.saturating_sub(delay);
            let quiet = self
                .last_record
                .get(partition)
                .is_some_and(|at| at.elapsed() >= spec.idle_after);
            if idle && quiet {
                watermark = watermark.max(now_ms.saturating_sub(delay));
            }
            let previous = self.watermark.get(partition).copied();
            if previous.is_none_or(|p| watermark > p) {
                moved.push((*partition, watermark));
            }
        }
        moved.sort_unstable();
        for (partition, watermark) in &moved {
            self.watermark.insert(*partition, *watermark);
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn spec(idle_after: Duration) -> WatermarkSpec {
        WatermarkSpec {
            max_out_of_orderness: Duration::from_millis(100),
            idle_after,
        }
    }

    #[test]
    fn watermarks_trail_event_time_and_only_move_forward() {
        let mut time = EventTime::default();
        let spec = spec(Duration::from_secs(3600));
        time.observe(1, Some(1_000));
        time.observe(0, Some(5_000));
        time.observe(0, None);
        assert_eq!(time.advance(&spec, true, 0), vec![(0, 4_900), (1, 900)]);
        assert!(time.advance(&spec, true, 0).is_empty(), "nothing moved");
        time.observe(0, Some(3_000));
        assert!(time.advance(&spec, false, 0).is_empty(), "never backwards");
    }

    #[test]
    fn a_quiet_partition_follows_the_clock_only_when_idle_ticks_are_allowed() {
        let mut time = EventTime::default();
        let spec = spec(Duration::ZERO);
        time.observe(0, Some(1_000));
        assert_eq!(time.advance(&spec, false, 60_000), vec![(0, 900)]);
        assert_eq!(time.advance(&spec, true, 60_000), vec![(0, 59_900)]);
    }
}
