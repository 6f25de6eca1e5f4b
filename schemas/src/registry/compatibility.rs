//! Compatibility levels and the check a new schema must pass before it is registered.

use std::{fmt, str::FromStr};

use apache_avro::{schema_compatibility::SchemaCompatibility, Schema};

/// The registry's compatibility levels, with Confluent's names and meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompatibilityLevel {
    /// Anything may be registered.
    None,
    /// The new schema can read data written with the latest one (the default).
    #[default]
    Backward,
    /// ... with every earlier one.
    BackwardTransitive,
    /// Data written with the new schema can be read with the latest one.
    Forward,
    /// ... with every earlier one.
    ForwardTransitive,
    /// Both backward and forward against the latest.
    Full,
    /// Both against every earlier one.
    FullTransitive,
}

impl CompatibilityLevel {
    /// Confluent's name for the level.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Backward => "BACKWARD",
            Self::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Self::Forward => "FORWARD",
            Self::ForwardTransitive => "FORWARD_TRANSITIVE",
            Self::Full => "FULL",
            Self::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    /// Whether the check runs against every earlier version rather than the latest only.
    pub fn is_transitive(self) -> bool {
        matches!(
            self,
            Self::BackwardTransitive | Self::ForwardTransitive | Self::FullTransitive
        )
    }

    /// Checks `candidate` against `existing` (oldest first). Returns the reasons it is
    /// incompatible; empty means it may be registered.
    pub fn check(self, candidate: &Schema, existing: &[Schema]) -> Vec<String> {
        let against: &[Schema] = if self.is_transitive() {
            existing
        } else {
            existing.last().map(std::slice::from_ref).unwrap_or(&[])
        };
        let (backward, forward) = match self {
            Self::None => return Vec::new(),
            Self::Backward | Self::BackwardTransitive => (true, false),
            Self::Forward | Self::ForwardTransitive => (false, true),
            Self::Full | Self::FullTransitive => (true, true),
        };
        let mut problems = Vec::new();
        for old in against {
            if backward {
                if let Err(e) = SchemaCompatibility::can_read(old, candidate) {
                    problems.push(format!(
                        "new schema cannot read data written with an existing one: {e}"
                    ));
                }
            }
            if forward {
                if let Err(e) = SchemaCompatibility::can_read(candidate, old) {
                    problems.push(format!(
                        "an existing schema cannot read data written with the new one: {e}"
                    ));
                }
            }
        }
        problems
    }
}

impl fmt::Display for CompatibilityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CompatibilityLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "NONE" => Self::None,
            "BACKWARD" => Self::Backward,
            "BACKWARD_TRANSITIVE" => Self::BackwardTransitive,
            "FORWARD" => Self::Forward,
            "FORWARD_TRANSITIVE" => Self::ForwardTransitive,
            "FULL" => Self::Full,
            "FULL_TRANSITIVE" => Self::FullTransitive,
            other => return Err(format!("unknown compatibility level {other:?}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"R","fields":[{fields}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn backward_allows_a_new_field_with_default_and_refuses_one_without() {
        let v1 = schema(r#"{"name":"a","type":"string"}"#);
        let with_default =
            schema(r#"{"name":"a","type":"string"},{"name":"b","type":"long","default":0}"#);
        let without_default = schema(r#"{"name":"a","type":"string"},{"name":"b","type":"long"}"#);
        let level = CompatibilityLevel::Backward;
        assert!(level
            .check(&with_default, std::slice::from_ref(&v1))
            .is_empty());
        assert!(!level
            .check(&without_default, std::slice::from_ref(&v1))
            .is_empty());
        assert!(CompatibilityLevel::None
            .check(&without_default, &[v1])
            .is_empty());
    }

    #[test]
    fn forward_refuses_removing_a_field_without_default() {
        let v1 = schema(r#"{"name":"a","type":"string"},{"name":"b","type":"long"}"#);
        let v2 = schema(r#"{"name":"a","type":"string"}"#);
        assert!(CompatibilityLevel::Backward
            .check(&v2, std::slice::from_ref(&v1))
            .is_empty());
        assert!(!CompatibilityLevel::Forward
            .check(&v2, std::slice::from_ref(&v1))
            .is_empty());
        assert!(!CompatibilityLevel::Full.check(&v2, &[v1]).is_empty());
    }

    #[test]
    fn transitive_checks_every_version() {
        let v1 = schema(r#"{"name":"a","type":"string"}"#);
        let v2 = schema(r#"{"name":"a","type":"string"},{"name":"b","type":"long","default":0}"#);
        // v3 drops a and adds c without default: cannot read v2 data or v1 data.
        let v3 = schema(r#"{"name":"b","type":"long","default":0},{"name":"c","type":"int"}"#);
        assert!(!CompatibilityLevel::BackwardTransitive
            .check(&v3, &[v1, v2])
            .is_empty());
    }

    #[test]
    fn levels_parse_case_insensitively() {
        assert_eq!(
            "full_transitive".parse(),
            Ok(CompatibilityLevel::FullTransitive)
        );
        assert!("sideways".parse::<CompatibilityLevel>().is_err());
    }
}
