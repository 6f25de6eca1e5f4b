//! One key's records keep their order through a stage, while many keys run in parallel lanes.

use std::{collections::HashMap, time::Duration};

use rdkafka::{
    producer::{FutureProducer, FutureRecord},
    ClientConfig, Message,
};
use sluice_schemas::{
    ChatMessage, ChatRequest, Codec, RegistryClient, ReplyAddress, RoutedRequest,
};

use crate::harness::*;

#[tokio::test]
async fn records_of_one_key_leave_the_router_in_the_order_they_came() {
    let sluice = Sluice::start();
    let codec = Codec::new(RegistryClient::new(&sluice.registry_url).unwrap());
    codec.register::<ChatRequest>().await.unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let requests_topic = sluice.topic("requests");
    let sessions = ["alpha", "beta", "gamma", "delta", "epsilon"];
    let per_session = 40;
    let mut deliveries = Vec::new();
    for turn in 0..per_session {
        for session in sessions {
            let request = ChatRequest {
                request_id: format!("{session}-{turn:03}"),
                tenant_id: "ordering".into(),
                session_id: session.into(),
                model: "sim-small".into(),
                messages: vec![ChatMessage::text("user", format!("turn {turn}"))],
                max_tokens: Some(1),
                temperature: None,
                stream: false,
                reply_to: ReplyAddress {
                    topic: sluice.topic("replies"),
                    partition: 0,
                },
                received_at_ms: 0,
                allowed_models: None,
                key_id: None,
                user_id: None,
                ..Default::default()
            };
            let bytes = codec.encode(&request).unwrap();
            let record = FutureRecord::to(&requests_topic)
                .key(session)
                .payload(&bytes);
            deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
    }
    for d in deliveries {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }

    let reader = topic_reader(&sluice.topic("routed"));
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let total = sessions.len() * per_session;
    let mut count = 0;
    while count < total {
        let bytes = find_record(&reader, 30, |m| m.payload().map(<[u8]>::to_vec)).await;
        let routed: RoutedRequest = codec.decode(&bytes).await.unwrap();
        seen.entry(routed.request.session_id.clone())
            .or_default()
            .push(routed.request.request_id);
        count += 1;
    }
    for session in sessions {
        let ids = &seen[session];
        let expected: Vec<String> = (0..per_session)
            .map(|t| format!("{session}-{t:03}"))
            .collect();
        assert_eq!(ids, &expected, "session {session} kept its order");
    }
    // Nothing more trickles in (each record was routed once).
    let extra = tokio::time::timeout(Duration::from_secs(1), reader.recv()).await;
    assert!(extra.is_err(), "no duplicates without a failure");
}
