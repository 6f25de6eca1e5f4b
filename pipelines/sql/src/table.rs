//! Records as SQL rows: the columns a record type offers (its Avro schema's scalar fields), the
//! row each record becomes, and Arrow batches built from rows and read back into JSON.

use std::sync::Arc;

use apache_avro::{types::Value, Schema};
use datafusion::arrow::{
    array::{
        Array, ArrayRef, BooleanBuilder, Float64Array, Float64Builder, Int64Array, Int64Builder,
        RecordBatch, StringArray, StringBuilder,
    },
    compute::cast,
    datatypes::{DataType, Field, Schema as ArrowSchema, SchemaRef},
};
use serde::Serialize;

use crate::{Error, Result};

/// A column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Float,
    Text,
    Bool,
}

/// One value of a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
}

/// The columns of a record type, in schema order, plus `window_start` and `window_end`.
#[derive(Debug, Clone)]
pub struct Columns {
    /// (name, kind, nullable) of each record field exposed to SQL.
    fields: Vec<(String, Kind, bool)>,
    schema: SchemaRef,
}

impl Columns {
    /// The scalar fields of `record` (a record schema); nested fields are not exposed.
    pub fn of(record: &Schema) -> Result<Self> {
        let Schema::Record(record) = record else {
            return Err(Error::Source("a SQL source must be an Avro record".into()));
        };
        let mut fields = Vec::new();
        for field in &record.fields {
            if let Some((kind, nullable)) = kind_of(&field.schema) {
                fields.push((field.name.clone(), kind, nullable));
            }
        }
        let mut arrow: Vec<Field> = fields
            .iter()
            .map(|(name, kind, nullable)| Field::new(name, data_type(*kind), *nullable))
            .collect();
        arrow.push(Field::new("window_start", DataType::Int64, false));
        arrow.push(Field::new("window_end", DataType::Int64, false));
        Ok(Self {
            fields,
            schema: Arc::new(ArrowSchema::new(arrow)),
        })
    }

    /// The Arrow schema of the table SQL sees.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Position of the field `name` in a row, if it is an integer column.
    pub fn int_column(&self, name: &str) -> Option<usize> {
        self.fields
            .iter()
            .position(|(n, kind, _)| n == name && *kind == Kind::Int)
    }

    /// The row `record` becomes.
    pub fn row<T: Serialize>(&self, record: &T) -> Result<Vec<Cell>> {
        let value = apache_avro::to_value(record).map_err(|e| Error::Row(e.to_string()))?;
        let Value::Record(values) = value else {
            return Err(Error::Row("record did not serialize as a record".into()));
        };
        let mut row = Vec::with_capacity(self.fields.len());
        let mut values = values.into_iter().peekable();
        for (name, _, _) in &self.fields {
            // Fields come in schema order; skip the ones not exposed.
            let cell = loop {
                match values.next() {
                    Some((n, v)) if &n == name => break cell_of(v),
                    Some(_) => continue,
                    None => break Cell::Null,
                }
            };
            row.push(cell);
        }
        Ok(row)
    }

    /// An Arrow batch of `rows`, each tagged with its window.
    pub fn batch<'a>(
        &self,
        rows: impl Iterator<Item = (&'a [Cell], i64, i64)> + Clone,
    ) -> Result<RecordBatch> {
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.fields.len() + 2);
        for (index, (_, kind, _)) in self.fields.iter().enumerate() {
            let cells = rows.clone().map(|(row, _, _)| row.get(index));
            arrays.push(match kind {
                Kind::Int => {
                    let mut b = Int64Builder::new();
                    for c in cells {
                        b.append_option(match c {
                            Some(Cell::Int(v)) => Some(*v),
                            _ => None,
                        });
                    }
                    Arc::new(b.finish())
                }
                Kind::Float => {
                    let mut b = Float64Builder::new();
                    for c in cells {
                        b.append_option(match c {
                            Some(Cell::Float(v)) => Some(*v),
                            _ => None,
                        });
                    }
                    Arc::new(b.finish())
                }
                Kind::Text => {
                    let mut b = StringBuilder::new();
                    for c in cells {
                        b.append_option(match c {
                            Some(Cell::Text(v)) => Some(v.as_str()),
                            _ => None,
                        });
                    }
                    Arc::new(b.finish())
                }
                Kind::Bool => {
                    let mut b = BooleanBuilder::new();
                    for c in cells {
                        b.append_option(match c {
                            Some(Cell::Bool(v)) => Some(*v),
                            _ => None,
                        });
                    }
                    Arc::new(b.finish())
                }
            });
        }
        arrays.push(Arc::new(Int64Array::from_iter_values(
            rows.clone().map(|(_, start, _)| start),
        )));
        arrays.push(Arc::new(Int64Array::from_iter_values(
            rows.map(|(_, _, end)| end),
        )));
        Ok(RecordBatch::try_new(self.schema(), arrays)?)
    }
}

fn kind_of(schema: &Schema) -> Option<(Kind, bool)> {
    match schema {
        Schema::Long
        | Schema::Int
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::Date
        | Schema::TimeMillis
        | Schema::TimeMicros => Some((Kind::Int, false)),
        Schema::Float | Schema::Double => Some((Kind::Float, false)),
        Schema::String | Schema::Uuid(_) | Schema::Enum(_) => Some((Kind::Text, false)),
        Schema::Boolean => Some((Kind::Bool, false)),
        Schema::Union(union) => {
            let variants = union.variants();
            let others: Vec<&Schema> = variants.iter().filter(|s| **s != Schema::Null).collect();
            match others.as_slice() {
                [only] if variants.len() == 2 => kind_of(only).map(|(kind, _)| (kind, true)),
                _ => None,
            }
        }
        _ => None,
    }
}

fn data_type(kind: Kind) -> DataType {
    match kind {
        Kind::Int => DataType::Int64,
        Kind::Float => DataType::Float64,
        Kind::Text => DataType::Utf8,
        Kind::Bool => DataType::Boolean,
    }
}

fn cell_of(value: Value) -> Cell {
    match value {
        Value::Null => Cell::Null,
        Value::Long(v)
        | Value::TimestampMillis(v)
        | Value::TimestampMicros(v)
        | Value::TimeMicros(v) => Cell::Int(v),
        Value::Int(v) | Value::Date(v) | Value::TimeMillis(v) => Cell::Int(i64::from(v)),
        Value::Double(v) => Cell::Float(v),
        Value::Float(v) => Cell::Float(f64::from(v)),
        Value::String(v) | Value::Enum(_, v) => Cell::Text(v),
        Value::Uuid(v) => Cell::Text(v.to_string()),
        Value::Boolean(v) => Cell::Bool(v),
        Value::Union(_, inner) => cell_of(*inner),
        _ => Cell::Null,
    }
}

/// The rows of `batch` as JSON objects: integers as numbers, floats as numbers, the rest as
/// text.
pub fn json_rows(batch: &RecordBatch) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let mut rows = vec![serde_json::Map::new(); batch.num_rows()];
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let name = field.name();
        let data_type = column.data_type();
        if data_type.is_integer() {
            let ints = cast(column, &DataType::Int64)?;
            let ints = ints
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or_else(|| Error::Row("an integer column did not cast".into()))?;
            for (row, out) in rows.iter_mut().enumerate() {
                out.insert(
                    name.clone(),
                    match ints.is_null(row) {
                        true => serde_json::Value::Null,
                        false => ints.value(row).into(),
                    },
                );
            }
        } else if data_type.is_floating() || data_type.is_numeric() {
            let floats = cast(column, &DataType::Float64)?;
            let floats = floats
                .as_any()
                .downcast_ref::<Float64Array>()
                .ok_or_else(|| Error::Row("a float column did not cast".into()))?;
            for (row, out) in rows.iter_mut().enumerate() {
                let value = match floats.is_null(row) {
                    true => serde_json::Value::Null,
                    false => serde_json::Number::from_f64(floats.value(row))
                        .map_or(serde_json::Value::Null, serde_json::Value::Number),
                };
                out.insert(name.clone(), value);
            }
        } else {
            let texts = cast(column, &DataType::Utf8)?;
            let texts = texts
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| Error::Row("a column did not cast to text".into()))?;
            for (row, out) in rows.iter_mut().enumerate() {
                out.insert(
                    name.clone(),
                    match texts.is_null(row) {
                        true => serde_json::Value::Null,
                        false => texts.value(row).into(),
                    },
                );
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::{Record, UsageEvent};

    fn event() -> UsageEvent {
        UsageEvent {
            event_id: "r:0".into(),
            request_id: "r".into(),
            tenant_id: "t".into(),
            model: "sim-small".into(),
            provider: "sim".into(),
            input_tokens: 3,
            output_tokens: 5,
            occurred_at_ms: 1_000,
            latency_ms: Some(40),
        }
    }

    #[test]
    fn usage_events_become_rows_with_every_scalar_field() {
        let columns = Columns::of(UsageEvent::schema().unwrap()).unwrap();
        let names: Vec<String> = columns
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(
            names,
            [
                "event_id",
                "request_id",
                "tenant_id",
                "model",
                "provider",
                "input_tokens",
                "output_tokens",
                "occurred_at_ms",
                "latency_ms",
                "window_start",
                "window_end"
            ]
        );
        let row = columns.row(&event()).unwrap();
        assert_eq!(row[5], Cell::Int(3));
        assert_eq!(row[8], Cell::Int(40));
        assert_eq!(columns.int_column("occurred_at_ms"), Some(7));
        let mut unmeasured = event();
        unmeasured.latency_ms = None;
        assert_eq!(columns.row(&unmeasured).unwrap()[8], Cell::Null);

        let batch = columns
            .batch([(row.as_slice(), 0, 60_000)].into_iter())
            .unwrap();
        let json = json_rows(&batch).unwrap();
        assert_eq!(json[0]["tenant_id"], "t");
        assert_eq!(json[0]["latency_ms"], 40);
        assert_eq!(json[0]["window_end"], 60_000);
    }
}
