//! Records as SQL rows: the columns a record type offers (its Avro schema's scalar fields), the
//! row each record becomes (read straight from its Avro body, see [`Row`]), and Arrow batches
//! built from rows and read back into JSON.

use std::{fmt, marker::PhantomData, sync::Arc};

use apache_avro::{reader::datum::GenericDatumReader, writer::datum::GenericDatumWriter, Schema};
use datafusion::arrow::{
    array::{
        Array, ArrayRef, BooleanBuilder, Float64Array, Float64Builder, Int64Array, Int64Builder,
        RecordBatch, StringArray, StringBuilder,
    },
    compute::cast,
    datatypes::{DataType, Field, Schema as ArrowSchema, SchemaRef},
};
use serde::{
    de::{self, EnumAccess, IgnoredAny, MapAccess, SeqAccess, VariantAccess, Visitor},
    Deserialize, Deserializer, Serialize, Serializer,
};
use sluice_schemas::Record;

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

/// A record field exposed to SQL.
#[derive(Debug, Clone)]
struct Column {
    name: String,
    kind: Kind,
    nullable: bool,
    /// The field's position in the record (and in its [`Row`]).
    position: usize,
}

/// The columns of a record type, in schema order, plus `window_start` and `window_end`.
#[derive(Debug, Clone)]
pub struct Columns {
    fields: Vec<Column>,
    schema: SchemaRef,
}

impl Columns {
    /// The scalar fields of `record` (a record schema); nested fields are not exposed.
    pub fn of(record: &Schema) -> Result<Self> {
        let Schema::Record(record) = record else {
            return Err(Error::Source("a SQL source must be an Avro record".into()));
        };
        let mut fields = Vec::new();
        for (position, field) in record.fields.iter().enumerate() {
            if let Some((kind, nullable)) = kind_of(&field.schema) {
                fields.push(Column {
                    name: field.name.clone(),
                    kind,
                    nullable,
                    position,
                });
            }
        }
        let mut arrow: Vec<Field> = fields
            .iter()
            .map(|c| Field::new(&c.name, data_type(c.kind), c.nullable))
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
            .find(|c| c.name == name && c.kind == Kind::Int)
            .map(|c| c.position)
    }

    /// An Arrow batch of `rows`, each tagged with its window.
    pub fn batch<'a>(
        &self,
        rows: impl Iterator<Item = (&'a [Cell], i64, i64)> + Clone,
    ) -> Result<RecordBatch> {
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.fields.len() + 2);
        for column in &self.fields {
            let cells = rows.clone().map(|(row, _, _)| row.get(column.position));
            arrays.push(match column.kind {
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

/// A record of type `T` as SQL sees it: the value of each field of `T`'s schema in schema
/// order (null for a field that is not a scalar), read straight from the record's Avro body —
/// no `T` is built on the way. Decoded by the runtime like any record (its schema is `T`'s),
/// so records written with an older or newer schema are resolved to `T`'s first.
pub struct Row<T> {
    pub cells: Vec<Cell>,
    _record: PhantomData<fn() -> T>,
}

impl<T: Record> Row<T> {
    /// The row `record` becomes (through its Avro encoding, as if it had been consumed).
    pub fn of(record: &T) -> Result<Self> {
        let body =
            sluice_schemas::codec::encode_body(record).map_err(|e| Error::Row(e.to_string()))?;
        sluice_schemas::codec::decode_body(
            T::schema().map_err(|e| Error::Row(e.to_string()))?,
            &body,
        )
        .map_err(|e| Error::Row(e.to_string()))
    }
}

impl<T> Clone for Row<T> {
    fn clone(&self) -> Self {
        Self {
            cells: self.cells.clone(),
            _record: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Row<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.cells).finish()
    }
}

impl<T: Record> Record for Row<T> {
    const NAME: &'static str = T::NAME;
    const AVSC: &'static str = T::AVSC;
    fn schema() -> sluice_schemas::Result<&'static Schema> {
        T::schema()
    }
    fn canonical() -> sluice_schemas::Result<&'static str> {
        T::canonical()
    }
    fn writer() -> sluice_schemas::Result<&'static GenericDatumWriter<'static>> {
        T::writer()
    }
    fn reader() -> sluice_schemas::Result<&'static GenericDatumReader<'static>> {
        T::reader()
    }
}

/// Rows are read from records, never written as records.
impl<T> Serialize for Row<T> {
    fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom(
            "a SQL row is read from a record, never written as one",
        ))
    }
}

impl<'de, T> Deserialize<'de> for Row<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Vec<Cell>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an Avro record")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut fields: A) -> Result<Vec<Cell>, A::Error> {
                let mut cells = Vec::with_capacity(fields.size_hint().unwrap_or(16));
                while fields.next_key::<FieldName>()?.is_some() {
                    cells.push(fields.next_value::<CellValue>()?.0);
                }
                Ok(cells)
            }
        }
        Ok(Self {
            cells: deserializer.deserialize_map(Fields)?,
            _record: PhantomData,
        })
    }
}

/// A field's name, read past (fields come in schema order).
struct FieldName;

impl<'de> Deserialize<'de> for FieldName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = FieldName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<FieldName, E> {
                Ok(FieldName)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<FieldName, E> {
                Ok(FieldName)
            }
        }
        deserializer.deserialize_identifier(Name)
    }
}

/// One field's value as a [`Cell`]; values that are not scalars are read past as nulls.
struct CellValue(Cell);

impl<'de> Deserialize<'de> for CellValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CellVisitor).map(CellValue)
    }
}

struct CellVisitor;

impl<'de> Visitor<'de> for CellVisitor {
    type Value = Cell;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an Avro value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Cell, E> {
        Ok(Cell::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Cell, E> {
        Ok(Cell::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Cell, E> {
        Ok(i64::try_from(v).map_or(Cell::Null, Cell::Int))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Cell, E> {
        Ok(Cell::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Cell, E> {
        Ok(Cell::Text(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Cell, E> {
        Ok(Cell::Text(v))
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Cell, E> {
        Ok(Cell::Null)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Cell, E> {
        Ok(Cell::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Cell, E> {
        Ok(Cell::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, inner: D) -> Result<Cell, D::Error> {
        inner.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Cell, A::Error> {
        while items.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Cell::Null)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Cell, A::Error> {
        while entries.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Cell::Null)
    }
    fn visit_enum<A: EnumAccess<'de>>(self, value: A) -> Result<Cell, A::Error> {
        let (symbol, variant) = value.variant::<String>()?;
        variant.unit_variant()?;
        Ok(Cell::Text(symbol))
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
            key_id: None,
            user_id: None,
            cached_input_tokens: None,
            trace_id: None,
            outcome: None,
            billable: true,
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
                "key_id",
                "user_id",
                "cached_input_tokens",
                "trace_id",
                "outcome",
                "billable",
                "window_start",
                "window_end"
            ]
        );
        let row = Row::of(&event()).unwrap().cells;
        assert_eq!(row[2], Cell::Text("t".into()));
        assert_eq!(row[5], Cell::Int(3));
        assert_eq!(row[8], Cell::Int(40));
        assert_eq!(columns.int_column("occurred_at_ms"), Some(7));
        let mut unmeasured = event();
        unmeasured.latency_ms = None;
        assert_eq!(Row::of(&unmeasured).unwrap().cells[8], Cell::Null);

        let batch = columns
            .batch([(row.as_slice(), 0, 60_000)].into_iter())
            .unwrap();
        let json = json_rows(&batch).unwrap();
        assert_eq!(json[0]["tenant_id"], "t");
        assert_eq!(json[0]["latency_ms"], 40);
        assert_eq!(json[0]["window_end"], 60_000);
    }

    #[test]
    fn rows_of_records_written_with_another_schema_are_read_in_ours() {
        // An older writer: no latency_ms (ours defaults it to null), and a field we do not
        // know, with nested values, that is read past.
        let writer = Schema::parse_str(
            r#"{"type": "record", "name": "UsageEvent", "namespace": "sluice.v1", "fields": [
                {"name": "event_id", "type": "string"},
                {"name": "request_id", "type": "string"},
                {"name": "tags", "type": {"type": "array", "items": "string"}},
                {"name": "tenant_id", "type": "string"},
                {"name": "model", "type": "string"},
                {"name": "provider", "type": "string"},
                {"name": "input_tokens", "type": "long"},
                {"name": "output_tokens", "type": "long"},
                {"name": "occurred_at_ms", "type": "long"}
            ]}"#,
        )
        .unwrap();
        use apache_avro::types::Value;
        let text = |s: &str| Value::String(s.into());
        let record = Value::Record(vec![
            ("event_id".into(), text("r:0")),
            ("request_id".into(), text("r")),
            ("tags".into(), Value::Array(vec![text("x"), text("y")])),
            ("tenant_id".into(), text("t")),
            ("model".into(), text("m")),
            ("provider".into(), text("p")),
            ("input_tokens".into(), Value::Long(3)),
            ("output_tokens".into(), Value::Long(5)),
            ("occurred_at_ms".into(), Value::Long(1_000)),
        ]);
        let body = GenericDatumWriter::builder(&writer)
            .build()
            .unwrap()
            .write_value_to_vec(record)
            .unwrap();
        let row: Row<UsageEvent> = sluice_schemas::codec::decode_body(&writer, &body).unwrap();
        assert_eq!(row.cells.len(), 15);
        assert_eq!(row.cells[2], Cell::Text("t".into()));
        assert_eq!(row.cells[7], Cell::Int(1_000));
        assert_eq!(row.cells[8], Cell::Null);
        assert_eq!(row.cells[13], Cell::Null, "no outcome: it succeeded");
        assert_eq!(
            row.cells[14],
            Cell::Bool(true),
            "billable unless said otherwise"
        );
    }
}
