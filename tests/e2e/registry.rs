//! The schema registry speaks Confluent's API: register, look up, versions, compatibility and
//! config, refusing incompatible changes; Confluent's own client library works against it, and
//! what it writes Sluice reads (wire format round trip).

use apache_avro::types::Value as Avro;
use serde_json::{json, Value};
use sluice_schemas::{Codec, Record, RegistryClient, ReplyChunk, ReplyKind, UsageEvent};

use crate::harness::*;

async fn call(method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    let client = http();
    let mut request = match method {
        "POST" => client.post(url),
        "PUT" => client.put(url),
        _ => client.get(url),
    };
    if let Some(body) = body {
        request = request
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn record(fields: Value) -> String {
    json!({"type": "record", "name": "Thing", "namespace": "test", "fields": fields}).to_string()
}

#[tokio::test]
async fn registry_versions_schemas_and_refuses_incompatible_changes() {
    let sluice = Sluice::start();
    let base = &sluice.registry_url;
    let subject = unique("test.Thing-");
    let v1 = record(json!([{"name": "a", "type": "string"}]));
    let v2 = record(
        json!([{"name": "a", "type": "string"}, {"name": "b", "type": "long", "default": 0}]),
    );
    let breaking = record(json!([{"name": "a", "type": "string"}, {"name": "c", "type": "int"}]));

    let (status, r1) = call(
        "POST",
        &format!("{base}/subjects/{subject}/versions"),
        Some(json!({"schema": v1})),
    )
    .await;
    assert_eq!(status, 200, "{r1}");
    let id1 = r1["id"].as_i64().unwrap();
    // Registering the same schema again returns the same id.
    let (_, again) = call(
        "POST",
        &format!("{base}/subjects/{subject}/versions"),
        Some(json!({"schema": v1})),
    )
    .await;
    assert_eq!(again["id"].as_i64(), Some(id1));

    let (status, check) = call(
        "POST",
        &format!("{base}/compatibility/subjects/{subject}/versions/latest"),
        Some(json!({"schema": breaking})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(check["is_compatible"], false);
    let (status, refused) = call(
        "POST",
        &format!("{base}/subjects/{subject}/versions"),
        Some(json!({"schema": breaking})),
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error_code"], 409);

    let (status, r2) = call(
        "POST",
        &format!("{base}/subjects/{subject}/versions"),
        Some(json!({"schema": v2})),
    )
    .await;
    assert_eq!(status, 200, "{r2}");
    let id2 = r2["id"].as_i64().unwrap();
    assert_ne!(id1, id2);

    let (_, versions) = call("GET", &format!("{base}/subjects/{subject}/versions"), None).await;
    assert_eq!(versions, json!([1, 2]));
    let (_, latest) = call(
        "GET",
        &format!("{base}/subjects/{subject}/versions/latest"),
        None,
    )
    .await;
    assert_eq!(latest["version"], 2);
    assert_eq!(latest["id"].as_i64(), Some(id2));
    let (_, by_id) = call("GET", &format!("{base}/schemas/ids/{id1}"), None).await;
    let stored: Value = serde_json::from_str(by_id["schema"].as_str().unwrap()).unwrap();
    assert_eq!(stored["fields"][0]["name"], "a");
    let (_, lookup) = call(
        "POST",
        &format!("{base}/subjects/{subject}"),
        Some(json!({"schema": v2})),
    )
    .await;
    assert_eq!(lookup["version"], 2);

    // Per-subject NONE lets the breaking change through.
    let (status, _) = call(
        "PUT",
        &format!("{base}/config/{subject}"),
        Some(json!({"compatibility": "NONE"})),
    )
    .await;
    assert_eq!(status, 200);
    let (_, config) = call("GET", &format!("{base}/config/{subject}"), None).await;
    assert_eq!(config["compatibilityLevel"], "NONE");
    let (status, _) = call(
        "POST",
        &format!("{base}/subjects/{subject}/versions"),
        Some(json!({"schema": breaking})),
    )
    .await;
    assert_eq!(status, 200);
    let (_, global) = call("GET", &format!("{base}/config"), None).await;
    assert!(global["compatibilityLevel"].is_string());

    // Errors in Confluent's shape.
    let (status, missing) = call(
        "GET",
        &format!("{base}/subjects/{}/versions", unique("nope-")),
        None,
    )
    .await;
    assert_eq!((status, missing["error_code"].as_i64()), (404, Some(40401)));
    let (status, missing) = call("GET", &format!("{base}/schemas/ids/999999999"), None).await;
    assert_eq!((status, missing["error_code"].as_i64()), (404, Some(40403)));
    let (status, invalid) = call(
        "POST",
        &format!("{base}/subjects/{subject}/versions"),
        Some(json!({"schema": "{\"type\": \"recordz\"}"})),
    )
    .await;
    assert_eq!((status, invalid["error_code"].as_i64()), (422, Some(42201)));
}

#[tokio::test]
async fn confluent_client_writes_what_sluice_reads_and_back() {
    use schema_registry_converter::{
        async_impl::{
            avro::{AvroDecoder, AvroEncoder},
            schema_registry::SrSettings,
        },
        schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema},
    };
    let sluice = Sluice::start();
    let settings = SrSettings::new(sluice.registry_url.clone());
    let encoder = AvroEncoder::new(settings.clone());
    let strategy = SubjectNameStrategy::RecordNameStrategyWithSchema(SuppliedSchema::new(
        Some(UsageEvent::NAME.to_owned()),
        SchemaType::Avro,
        UsageEvent::AVSC.to_owned(),
    ));
    let fields = vec![
        ("event_id", Avro::String("req-9:0".into())),
        ("request_id", Avro::String("req-9".into())),
        ("tenant_id", Avro::String("tenant-x".into())),
        ("model", Avro::String("sim-small".into())),
        ("provider", Avro::String("sim".into())),
        ("input_tokens", Avro::Long(11)),
        ("output_tokens", Avro::Long(22)),
        ("occurred_at_ms", Avro::TimestampMillis(1_700_000_000_000)),
        ("billable", Avro::Boolean(true)),
    ];
    let bytes = encoder
        .encode(fields, strategy)
        .await
        .expect("Confluent client encodes");
    assert_eq!(bytes[0], 0, "magic byte");

    // Sluice's codec decodes what the Confluent client wrote...
    let codec = Codec::new(RegistryClient::new(&sluice.registry_url).unwrap());
    let event: UsageEvent = codec.decode(&bytes).await.unwrap();
    assert_eq!(event.event_id, "req-9:0");
    assert_eq!(event.output_tokens, 22);
    assert_eq!(event.occurred_at_ms, 1_700_000_000_000);

    // ...and the Confluent client decodes what Sluice wrote.
    codec.register::<UsageEvent>().await.unwrap();
    let ours = codec.encode(&event).unwrap();
    let decoder = AvroDecoder::new(settings);
    let decoded = decoder
        .decode(Some(&ours))
        .await
        .expect("Confluent client decodes");
    match decoded.value {
        Avro::Record(fields) => {
            assert!(
                fields.contains(&("input_tokens".to_owned(), Avro::Long(11))),
                "{fields:?}"
            );
        }
        other => panic!("not a record: {other:?}"),
    }
}

/// Registers `avsc` minus the fields named in `drop` under a fresh subject and frames `value`
/// (written with that older schema).
async fn written_with_older_schema(
    sluice: &Sluice,
    avsc: &str,
    drop: &[&str],
    value: Avro,
) -> Vec<u8> {
    let mut old: Value = serde_json::from_str(avsc).unwrap();
    old["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|f| !drop.contains(&f["name"].as_str().unwrap()));
    let text = old.to_string();
    let client = RegistryClient::new(&sluice.registry_url).unwrap();
    let id = client.register(&unique("test.Old-"), &text).await.unwrap();
    let schema = apache_avro::Schema::parse_str(&text).unwrap();
    #[allow(deprecated)]
    let body = apache_avro::to_avro_datum(&schema, value).unwrap();
    sluice_schemas::wire::frame(id, &body)
}

#[tokio::test]
async fn records_written_with_an_older_schema_decode_with_defaults() {
    let sluice = Sluice::start();
    let codec = Codec::new(RegistryClient::new(&sluice.registry_url).unwrap());
    // An older ReplyChunk without `delta`, `error_status`, `cached_input_tokens` and
    // `tool_calls`: all have defaults now.
    let framed = written_with_older_schema(
        &sluice,
        ReplyChunk::AVSC,
        &["delta", "error_status", "cached_input_tokens", "tool_calls"],
        Avro::Record(vec![
            ("request_id".into(), Avro::String("r".into())),
            ("tenant_id".into(), Avro::String("t".into())),
            ("seq".into(), Avro::Int(4)),
            ("kind".into(), Avro::Enum(1, "DONE".into())),
            ("model".into(), Avro::String("m".into())),
            (
                "finish_reason".into(),
                Avro::Union(1, Box::new(Avro::String("stop".into()))),
            ),
            ("input_tokens".into(), Avro::Long(5)),
            ("output_tokens".into(), Avro::Long(6)),
            ("error_code".into(), Avro::Union(0, Box::new(Avro::Null))),
            ("error_message".into(), Avro::Union(0, Box::new(Avro::Null))),
        ]),
    )
    .await;
    let chunk: ReplyChunk = codec.decode(&framed).await.unwrap();
    assert_eq!(chunk.seq, 4);
    assert_eq!(chunk.kind, ReplyKind::Done);
    assert_eq!(chunk.delta, "", "filled from the default");
    assert_eq!(chunk.error_status, 0, "filled from the default");
    assert_eq!(chunk.cached_input_tokens, 0, "filled from the default");
    assert!(chunk.tool_calls.is_empty(), "filled from the default");
    assert_eq!(chunk.finish_reason.as_deref(), Some("stop"));

    // A usage event from before `latency_ms` (and who called, cached tokens and the trace)
    // existed reads as "not measured" and "not known".
    let framed = written_with_older_schema(
        &sluice,
        UsageEvent::AVSC,
        &[
            "latency_ms",
            "key_id",
            "user_id",
            "cached_input_tokens",
            "trace_id",
            "outcome",
            "billable",
        ],
        Avro::Record(vec![
            ("event_id".into(), Avro::String("e".into())),
            ("request_id".into(), Avro::String("r".into())),
            ("tenant_id".into(), Avro::String("t".into())),
            ("model".into(), Avro::String("m".into())),
            ("provider".into(), Avro::String("sim".into())),
            ("input_tokens".into(), Avro::Long(1)),
            ("output_tokens".into(), Avro::Long(2)),
            ("occurred_at_ms".into(), Avro::TimestampMillis(3)),
        ]),
    )
    .await;
    let event: UsageEvent = codec.decode(&framed).await.unwrap();
    assert_eq!((event.output_tokens, event.latency_ms), (2, None));
    assert_eq!((event.key_id, event.trace_id), (None, None));
    assert!(
        event.billable,
        "a call from before `billable` existed was billed"
    );
    assert_eq!(event.outcome, None);

    // A field with no default cannot be invented: such a record fails to decode (and a stage
    // sends it to the DLQ) rather than being read wrongly.
    let framed = written_with_older_schema(
        &sluice,
        UsageEvent::AVSC,
        &["provider"],
        Avro::Record(vec![
            ("event_id".into(), Avro::String("e".into())),
            ("request_id".into(), Avro::String("r".into())),
            ("tenant_id".into(), Avro::String("t".into())),
            ("model".into(), Avro::String("m".into())),
            ("input_tokens".into(), Avro::Long(1)),
            ("output_tokens".into(), Avro::Long(2)),
            ("occurred_at_ms".into(), Avro::TimestampMillis(3)),
            ("latency_ms".into(), Avro::Union(0, Box::new(Avro::Null))),
            ("key_id".into(), Avro::Union(0, Box::new(Avro::Null))),
            ("user_id".into(), Avro::Union(0, Box::new(Avro::Null))),
            (
                "cached_input_tokens".into(),
                Avro::Union(0, Box::new(Avro::Null)),
            ),
            ("trace_id".into(), Avro::Union(0, Box::new(Avro::Null))),
            ("outcome".into(), Avro::Union(0, Box::new(Avro::Null))),
            ("billable".into(), Avro::Boolean(true)),
        ]),
    )
    .await;
    assert!(codec.decode::<UsageEvent>(&framed).await.is_err());
}
