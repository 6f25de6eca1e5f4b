//! Configuration shared by every stage: where the broker is and what the topics are called.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How to reach the Kafka-protocol broker and how topics are laid out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub bootstrap: String,
    /// Prefix of every topic name (`sluice` gives `sluice.requests`, ...).
    pub topic_prefix: String,
    /// Partitions per topic when Sluice creates topics. Consumers of a stage scale up to this.
    pub partitions: i32,
    /// Replication factor when Sluice creates topics (1 on one machine, 3 in production).
    pub replication_factor: i32,
    /// Extra librdkafka properties for every client (e.g. `security.protocol`).
    pub client_properties: BTreeMap<String, String>,
    /// How long a stage's consumer may go silent before its group gives its partitions to
    /// the others (a killed instance's work resumes elsewhere after this long).
    pub session_timeout_ms: u32,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap: "127.0.0.1:9092".into(),
            topic_prefix: "sluice".into(),
            partitions: 8,
            replication_factor: 1,
            client_properties: BTreeMap::new(),
            session_timeout_ms: 10_000,
        }
    }
}

impl KafkaConfig {
    /// Every problem with the settings, at once.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.bootstrap.trim().is_empty() {
            problems.push("kafka.bootstrap must name at least one broker".to_owned());
        }
        if self.partitions < 1 {
            problems.push("kafka.partitions must be at least 1".to_owned());
        }
        if self.replication_factor < 1 {
            problems.push("kafka.replication_factor must be at least 1".to_owned());
        }
        if self.session_timeout_ms < 2_000 {
            problems.push("kafka.session_timeout_ms must be at least 2000".to_owned());
        }
        if self
            .topic_prefix
            .contains(|c: char| !(c.is_ascii_alphanumeric() || "._-".contains(c)))
        {
            problems.push(
                "kafka.topic_prefix may hold only letters, digits, '.', '_' and '-'".to_owned(),
            );
        }
        problems
    }

    /// The consumer group of `stage` (`router`, `sql.tenant_usage_1m`, ...): every instance of
    /// the stage joins it. Dashboards and autoscalers select on it.
    pub fn group(&self, stage: &str) -> String {
        format!("{}.{stage}", self.topic_prefix)
    }

    /// The topic names under this config's prefix.
    pub fn topics(&self) -> Topics {
        Topics::with_prefix(&self.topic_prefix)
    }

    /// Where `stage` sits when it reads `input_topic`: its own consumer group, and the DLQ.
    pub fn wiring(&self, stage: &str, input_topic: &str) -> Wiring {
        Wiring::new(stage, &self.group(stage), input_topic, &self.topics().dlq)
    }
}

/// Where a stage sits: its name, its consumer group, the topic it reads and its DLQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wiring {
    /// Stage name for metrics, logs, readiness and DLQ records (`router`, `sql.<name>`, ...).
    pub name: String,
    /// Consumer group; instances of a stage share it and split the partitions.
    pub group: String,
    /// Topic to consume.
    pub input_topic: String,
    /// Where records it cannot process go.
    pub dlq_topic: String,
}

impl Wiring {
    /// A stage `name` in `group`, reading `input_topic`, dead-lettering to `dlq_topic`.
    pub fn new(name: &str, group: &str, input_topic: &str, dlq_topic: &str) -> Self {
        Self {
            name: name.to_owned(),
            group: group.to_owned(),
            input_topic: input_topic.to_owned(),
            dlq_topic: dlq_topic.to_owned(),
        }
    }
}

/// The names of Sluice's topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Chat requests from the edge, keyed by session.
    pub requests: String,
    /// Requests with the router's decision, keyed by session.
    pub routed: String,
    /// Reply chunks, one partition per edge instance.
    pub replies: String,
    /// Billable usage events, keyed by tenant.
    pub usage: String,
    /// Records a stage gave up on.
    pub dlq: String,
    /// What tenants are told through their webhooks, keyed by tenant.
    pub notifications: String,
    /// Workflow runs' step transitions, keyed by run.
    pub workflow_events: String,
    /// Tool calls workflow runs make, keyed by run.
    pub tool_calls: String,
    /// How those tool calls ended, keyed by run.
    pub tool_results: String,
    /// Tenants' documents for their knowledge, in chunks, keyed by tenant and document.
    pub documents: String,
}

impl Topics {
    /// Topic names under `prefix` (`sluice` → `sluice.requests`).
    pub fn with_prefix(prefix: &str) -> Self {
        let name = |suffix: &str| {
            if prefix.is_empty() {
                suffix.to_owned()
            } else {
                format!("{prefix}.{suffix}")
            }
        };
        Self {
            requests: name("requests"),
            routed: name("routed"),
            replies: name("replies"),
            usage: name("usage"),
            dlq: name("dlq"),
            notifications: name("notifications"),
            workflow_events: name("workflow-events"),
            tool_calls: name("tool-calls"),
            tool_results: name("tool-results"),
            documents: name("documents"),
        }
    }

    /// Every topic, for creation.
    pub fn all(&self) -> [&str; 10] {
        [
            &self.requests,
            &self.routed,
            &self.replies,
            &self.usage,
            &self.dlq,
            &self.notifications,
            &self.workflow_events,
            &self.tool_calls,
            &self.tool_results,
            &self.documents,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_from_toml_with_defaults_and_refuses_unknown_fields() {
        let config: KafkaConfig =
            toml::from_str("bootstrap = \"broker:9092\"\npartitions = 4").unwrap();
        assert_eq!(config.bootstrap, "broker:9092");
        assert_eq!(config.partitions, 4);
        assert_eq!(config.topic_prefix, "sluice");
        assert!(config.validate().is_empty());
        assert!(toml::from_str::<KafkaConfig>("bootstrapp = \"x\"").is_err());
    }

    #[test]
    fn validate_reports_every_problem() {
        let config = KafkaConfig {
            bootstrap: " ".into(),
            partitions: 0,
            replication_factor: 0,
            topic_prefix: "a b".into(),
            ..KafkaConfig::default()
        };
        assert_eq!(config.validate().len(), 4);
    }

    #[test]
    fn a_stage_is_wired_to_its_own_group_and_the_dlq() {
        let config = KafkaConfig {
            topic_prefix: "t7".into(),
            ..KafkaConfig::default()
        };
        let wiring = config.wiring("router", "t7.requests");
        assert_eq!(
            wiring,
            Wiring::new("router", "t7.router", "t7.requests", "t7.dlq")
        );
    }

    #[test]
    fn topic_names_follow_the_prefix() {
        let topics = Topics::with_prefix("t42");
        assert_eq!(topics.requests, "t42.requests");
        assert_eq!(topics.dlq, "t42.dlq");
        assert_eq!(Topics::with_prefix("").usage, "usage");
    }
}
