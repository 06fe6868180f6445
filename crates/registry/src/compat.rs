//! Compatibility rules, decided by apache-avro's schema resolution check.
//!
//! BACKWARD: the new schema can read data written with the old one (consumers upgrade first).
//! FORWARD: the old schema can read data written with the new one. FULL: both. The
//! `_TRANSITIVE` variants check against every earlier version, the others only the latest.

use std::{fmt, str::FromStr};

use apache_avro::{
    Schema,
    schema_compatibility::{Compatibility, SchemaCompatibility},
};

/// A subject's compatibility level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl Level {
    /// The platform default, as Confluent's.
    pub const DEFAULT: Level = Level::Backward;

    fn transitive(self) -> bool {
        matches!(
            self,
            Level::BackwardTransitive | Level::ForwardTransitive | Level::FullTransitive
        )
    }
    fn backward(self) -> bool {
        matches!(
            self,
            Level::Backward | Level::BackwardTransitive | Level::Full | Level::FullTransitive
        )
    }
    fn forward(self) -> bool {
        matches!(
            self,
            Level::Forward | Level::ForwardTransitive | Level::Full | Level::FullTransitive
        )
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::None => "NONE",
            Level::Backward => "BACKWARD",
            Level::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Level::Forward => "FORWARD",
            Level::ForwardTransitive => "FORWARD_TRANSITIVE",
            Level::Full => "FULL",
            Level::FullTransitive => "FULL_TRANSITIVE",
        })
    }
}

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "NONE" => Level::None,
            "BACKWARD" => Level::Backward,
            "BACKWARD_TRANSITIVE" => Level::BackwardTransitive,
            "FORWARD" => Level::Forward,
            "FORWARD_TRANSITIVE" => Level::ForwardTransitive,
            "FULL" => Level::Full,
            "FULL_TRANSITIVE" => Level::FullTransitive,
            other => return Err(format!("unknown compatibility level {other:?}")),
        })
    }
}

fn can_read(writer: &Schema, reader: &Schema) -> Result<(), String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => Ok(()),
        Ok(Compatibility::Partial) => Err("the schemas resolve only partially".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Checks `new` against `existing` (oldest first) under `level`; the error lists why not.
pub fn check(level: Level, new: &Schema, existing: &[Schema]) -> Result<(), Vec<String>> {
    let targets: Vec<(usize, &Schema)> = if level.transitive() {
        existing.iter().enumerate().collect()
    } else {
        existing
            .iter()
            .enumerate()
            .next_back()
            .into_iter()
            .collect()
    };
    let mut problems = Vec::new();
    for (i, old) in targets {
        if level.backward()
            && let Err(e) = can_read(old, new)
        {
            problems.push(format!("new schema cannot read version {}: {e}", i + 1));
        }
        if level.forward()
            && let Err(e) = can_read(new, old)
        {
            problems.push(format!("version {} cannot read the new schema: {e}", i + 1));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"R","fields":[{fields}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn adding_a_field_with_a_default_is_backward_compatible() {
        let v1 = s(r#"{"name":"a","type":"long"}"#);
        let v2 = s(r#"{"name":"a","type":"long"},{"name":"b","type":"string","default":""}"#);
        assert!(check(Level::Backward, &v2, std::slice::from_ref(&v1)).is_ok());
        assert!(check(Level::Full, &v2, &[v1]).is_ok());
    }

    #[test]
    fn adding_a_field_without_a_default_is_not() {
        let v1 = s(r#"{"name":"a","type":"long"}"#);
        let v2 = s(r#"{"name":"a","type":"long"},{"name":"b","type":"string"}"#);
        assert!(check(Level::Backward, &v2, std::slice::from_ref(&v1)).is_err());
        assert!(check(Level::Forward, &v2, std::slice::from_ref(&v1)).is_ok());
        assert!(check(Level::None, &v2, &[v1]).is_ok());
    }

    #[test]
    fn changing_a_type_incompatibly_is_refused() {
        let v1 = s(r#"{"name":"a","type":"long"}"#);
        let v2 = s(r#"{"name":"a","type":"string"}"#);
        assert!(check(Level::Backward, &v2, &[v1]).is_err());
    }

    #[test]
    fn transitive_checks_every_version() {
        let v1 = s(r#"{"name":"a","type":"long"}"#);
        let v2 =
            s(r#"{"name":"a","type":"long","default":0},{"name":"b","type":"long","default":0}"#);
        let v3 = s(r#"{"name":"b","type":"long"}"#);
        // v3 reads v2 (b present) but not v1 (no b, no default).
        assert!(check(Level::Backward, &v3, &[v1.clone(), v2.clone()]).is_ok());
        assert!(check(Level::BackwardTransitive, &v3, &[v1, v2]).is_err());
    }

    #[test]
    fn levels_round_trip_as_text() {
        for l in ["NONE", "BACKWARD", "FORWARD_TRANSITIVE", "FULL"] {
            assert_eq!(l.parse::<Level>().unwrap().to_string(), l);
        }
        assert!("SIDEWAYS".parse::<Level>().is_err());
    }
}
