//! The stages the kit runs, each with its input record, its effects and its downstream.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use rdkafka::{consumer::StreamConsumer, Message};
use sluice_schemas::{
    ChatMessage, ChatRequest, Codec, Record, ReplyAddress, ReplyChunk, ReplyKind, RoutedRequest,
    RoutingDecision, UsageEvent,
};

use super::{About, Effects, Order, Property, Stall, Subject, World};
use crate::harness::*;

/// Every stage that runs as a consumer group.
pub fn subjects() -> Vec<Arc<dyn Subject>> {
    vec![
        Arc::new(Router::default()),
        Arc::new(Orchestrator::default()),
        Arc::new(Metering),
        Arc::new(Sql {
            stage: "sql.tenant_usage_1m",
            table: "tenant_usage_1m",
            column: "tenant_id",
        }),
        Arc::new(Sql {
            stage: "sql.model_latency_1m",
            table: "model_latency_1m",
            column: "model",
        }),
    ]
}

/// `<key>-<seq>` as (key, seq).
fn parse_id(id: &str) -> Option<(String, u32)> {
    let (key, seq) = id.rsplit_once('-')?;
    Some((key.to_owned(), seq.parse().ok()?))
}

fn chat_request(world: &World, key: &str, seq: u32) -> ChatRequest {
    ChatRequest {
        request_id: format!("{key}-{seq}"),
        tenant_id: "00000000-0000-0000-0000-00000000c0de".into(),
        session_id: key.to_owned(),
        model: "sim-small".into(),
        messages: vec![ChatMessage::text("user", format!("turn {seq}"))],
        max_tokens: Some(1),
        temperature: None,
        stream: false,
        reply_to: ReplyAddress {
            topic: world.topic("replies"),
            partition: 0,
        },
        received_at_ms: sluice_pipelines::now_ms(),
        allowed_models: None,
        key_id: None,
        user_id: None,
        ..Default::default()
    }
}

fn usage(key: &str, seq: u32, at_ms: i64) -> UsageEvent {
    UsageEvent {
        model: key.to_owned(),
        occurred_at_ms: at_ms,
        latency_ms: Some(i64::from(seq)),
        key_id: None,
        user_id: None,
        cached_input_tokens: None,
        trace_id: None,
        outcome: None,
        billable: true,
        ..usage_event(format!("{key}-{seq}"), key)
    }
}

/// A valid frame of a record of another type than the stage reads from `input`.
pub fn foreign(input: &str, world: &World) -> Vec<u8> {
    let codec = &world.kit.codec;
    match input {
        "usage" => codec.encode(&chat_request(world, "foreign", 0)),
        _ => codec.encode(&usage("foreign", 0, 0)),
    }
    .unwrap()
}

/// A topic read from its beginning, accumulating what each poll finds.
struct TopicLog {
    consumer: StreamConsumer,
    seen: Vec<(String, u32)>,
}

/// One [`TopicLog`] per world, so repeated polls read only what is new.
#[derive(Default)]
struct TopicLogs(Mutex<HashMap<String, Arc<tokio::sync::Mutex<TopicLog>>>>);

impl TopicLogs {
    /// Every (key, seq) read so far from `topic`, after reading what is new; `effect` turns a
    /// record into its (key, seq), or `None` for records that are not effects.
    async fn read<T: Record>(
        &self,
        codec: &Codec,
        topic: &str,
        effect: fn(T) -> Option<(String, u32)>,
    ) -> Effects {
        let log = {
            let mut logs = self.0.lock().unwrap();
            logs.entry(topic.to_owned())
                .or_insert_with(|| {
                    Arc::new(tokio::sync::Mutex::new(TopicLog {
                        consumer: topic_reader(topic),
                        seen: Vec::new(),
                    }))
                })
                .clone()
        };
        let mut log = log.lock().await;
        // What is there now: until the topic is quiet for 300 ms, and at most a second.
        let until = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Ok(message)) = tokio::time::timeout_at(
            until.min(tokio::time::Instant::now() + Duration::from_millis(300)),
            log.consumer.recv(),
        )
        .await
        {
            let bytes = message.payload().unwrap_or_default().to_vec();
            if let Some(effect) = codec.decode::<T>(&bytes).await.ok().and_then(effect) {
                log.seen.push(effect);
            }
        }
        Effects::Each(log.seen.clone())
    }
}

/// The router: requests in, routed requests out (one per request, keyed by session).
#[derive(Default)]
struct Router {
    logs: TopicLogs,
}

#[async_trait]
impl Subject for Router {
    fn about(&self) -> About {
        About {
            stage: "router",
            run_arg: "router",
            input: "requests",
            order: Order::PerKey,
            stall: Stall::MissingTopic("routed"),
            in_store: false,
        }
    }
    fn records_per_key(&self, property: Property) -> u32 {
        match property {
            // A lane holds up to 256 batches awaiting the broker before it stops taking
            // records: enough records that it has to.
            Property::Backpressure => 8_000,
            Property::Kill => 500,
            _ => 30,
        }
    }
    fn record(&self, world: &World, key: &str, seq: u32) -> Vec<u8> {
        world
            .kit
            .codec
            .encode(&chat_request(world, key, seq))
            .unwrap()
    }
    async fn effects(&self, world: &World) -> Effects {
        let topic = world.topic("routed");
        self.logs
            .read(&world.kit.codec, &topic, |routed: RoutedRequest| {
                parse_id(&routed.request.request_id)
            })
            .await
    }
}

/// The orchestrator: routed requests in, reply chunks (and usage) out; a request's effect is
/// its last reply chunk.
#[derive(Default)]
struct Orchestrator {
    logs: TopicLogs,
}

#[async_trait]
impl Subject for Orchestrator {
    fn about(&self) -> About {
        About {
            stage: "orchestrator",
            run_arg: "orchestrator",
            input: "routed",
            order: Order::PerKey,
            stall: Stall::SlowModel,
            in_store: false,
        }
    }
    fn records_per_key(&self, property: Property) -> u32 {
        match property {
            Property::Backpressure => 12,
            _ => 30,
        }
    }
    fn env(&self, _world: &World, property: Property) -> Vec<(String, String)> {
        match property {
            // A model that takes 1.2 s to answer, and room for 4 requests at once: the key's
            // requests queue behind its slow calls, the stage is full, and each wait for room
            // outlasts the second after which a stage pauses its partitions.
            Property::Backpressure => vec![
                (
                    "SLUICE_ORCHESTRATOR__SIM__FIRST_TOKEN_MS".into(),
                    "1200".into(),
                ),
                (
                    "SLUICE_STAGES__ORCHESTRATOR_MAX_IN_FLIGHT".into(),
                    "4".into(),
                ),
            ],
            _ => Vec::new(),
        }
    }
    fn record(&self, world: &World, key: &str, seq: u32) -> Vec<u8> {
        let routed = RoutedRequest {
            request: chat_request(world, key, seq),
            decision: RoutingDecision {
                model: "sim-small".into(),
                provider: "sim".into(),
                upstream_model: "sim-small".into(),
                base_url: None,
                api_key_env: None,
                reason: "conformance".into(),
                decided_at_ms: sluice_pipelines::now_ms(),
            },
        };
        world.kit.codec.encode(&routed).unwrap()
    }
    async fn effects(&self, world: &World) -> Effects {
        let topic = world.topic("replies");
        self.logs
            .read(&world.kit.codec, &topic, |chunk: ReplyChunk| {
                (chunk.kind == ReplyKind::Done)
                    .then(|| parse_id(&chunk.request_id))
                    .flatten()
            })
            .await
    }
}

/// The metering sink: usage events in, rows of `usage_events` (counted as stored).
struct Metering;

#[async_trait]
impl Subject for Metering {
    fn about(&self) -> About {
        About {
            stage: "metering",
            run_arg: "metering",
            input: "usage",
            order: Order::NotApplicable("rows in a store"),
            stall: Stall::StoreDown,
            in_store: true,
        }
    }
    fn record(&self, world: &World, key: &str, seq: u32) -> Vec<u8> {
        let event = usage(key, seq, sluice_pipelines::now_ms());
        world.kit.codec.encode(&event).unwrap()
    }
    async fn effects(&self, world: &World) -> Effects {
        // Rows as stored, not through FINAL: the sink's own skipping of ids it already wrote
        // is what is checked, not the table's merging of duplicates.
        let rows: Vec<(String, u64)> = clickhouse()
            .query(
                "SELECT request_id, count() FROM usage_events \
                 WHERE tenant_id LIKE ? GROUP BY request_id",
            )
            .bind(format!("{}-k%", world.prefix))
            .fetch_all()
            .await
            .unwrap_or_default();
        let mut seen = Vec::new();
        for (id, count) in rows {
            if let Some(effect) = parse_id(&id) {
                seen.extend(std::iter::repeat_n(effect, count as usize));
            }
        }
        Effects::Each(seen)
    }
}

/// A streaming SQL pipeline: usage events in, per-minute rows of its table, each row counting
/// the records it aggregates (`records`, read through `FINAL`). Keys are tenants and models.
struct Sql {
    stage: &'static str,
    table: &'static str,
    /// The group column keyed by the kit's keys.
    column: &'static str,
}

#[async_trait]
impl Subject for Sql {
    fn about(&self) -> About {
        About {
            stage: self.stage,
            run_arg: "sql",
            input: "usage",
            order: Order::NotApplicable("aggregates per window"),
            stall: Stall::StoreDown,
            in_store: true,
        }
    }
    fn records_per_key(&self, property: Property) -> u32 {
        match property {
            // Three minutes of event time: the first window closes (and cannot be written)
            // while a backlog is still waiting.
            Property::Backpressure => 6_000,
            _ => 30,
        }
    }
    fn env(&self, _world: &World, property: Property) -> Vec<(String, String)> {
        match property {
            // Windows keep a partial state per group and batch folded in: one key's three
            // windows hold a handful of rows, past this limit once the first cannot be written.
            Property::Backpressure => vec![
                ("SLUICE_SQL__MAX_HELD_ROWS".into(), "2".into()),
                ("SLUICE_SQL__LANES".into(), "1".into()),
            ],
            _ => Vec::new(),
        }
    }
    fn record(&self, world: &World, key: &str, seq: u32) -> Vec<u8> {
        // From a whole minute ten minutes before the world began, 30 ms apart: windows close
        // when the partition idles (or, for long runs, as event time moves on).
        let base = (world.created_ms / 60_000 - 10) * 60_000;
        let event = usage(key, seq, base + i64::from(seq) * 30);
        world.kit.codec.encode(&event).unwrap()
    }
    async fn effects(&self, world: &World) -> Effects {
        let sql = format!(
            "SELECT {column}, toUInt64(sum(records)) FROM {table} FINAL \
             WHERE {column} LIKE ? GROUP BY {column}",
            column = self.column,
            table = self.table
        );
        let rows: Vec<(String, u64)> = clickhouse()
            .query(&sql)
            .bind(format!("{}-k%", world.prefix))
            .fetch_all()
            .await
            .unwrap_or_default();
        Effects::Counted(rows.into_iter().collect())
    }
}
