//! Avro encoding and decoding of [`Record`]s, framed in the Confluent wire format, with schema
//! ids from the registry.
//!
//! Encoding always writes the schema compiled into this binary. Decoding looks up the writer's
//! schema by the id in the frame (cached after the first fetch) and, when it differs from ours,
//! resolves the record with Avro's schema-resolution rules, so older and newer producers can be
//! read as long as the registry accepted their schemas as compatible.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use apache_avro::{reader::datum::GenericDatumReader, schema::ResolvedSchema, Schema};

use crate::{registry::RegistryClient, wire, Error, Record, Result};

/// Avro-encodes `value` with its own schema (no framing).
pub fn encode_body<T: Record>(value: &T) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    write_body(value, &mut out)?;
    Ok(out)
}

/// Appends `value`'s Avro encoding to `out`.
fn write_body<T: Record>(value: &T, out: &mut Vec<u8>) -> Result<()> {
    T::writer()?
        .write_ser(out, value)
        .map_err(|e| Error::Encode(format!("{}: {e}", T::NAME)))?;
    Ok(())
}

/// Decodes an Avro body written with `writer_schema` into `T`, resolving against `T`'s schema
/// when the two differ.
pub fn decode_body<T: Record>(writer_schema: &Schema, body: &[u8]) -> Result<T> {
    let same = writer_schema.canonical_form() == T::canonical()?;
    decode_with(writer_schema, same, body)
}

/// Decodes `body`; `same` says whether the writer's schema equals `T`'s (no resolution needed).
fn decode_with<T: Record>(writer_schema: &Schema, same: bool, body: &[u8]) -> Result<T> {
    let reader_schema = T::schema()?;
    let mut input = body;
    if same {
        return T::reader()?
            .read_deser(&mut input)
            .map_err(|e| Error::Decode(format!("{}: {e}", T::NAME)));
    }
    let reader = GenericDatumReader::builder(writer_schema)
        .reader_schema(reader_schema)
        .human_readable(false)
        .build()
        .map_err(|e| Error::Decode(e.to_string()))?;
    let value = reader
        .read_value(&mut input)
        .map_err(|e| Error::Decode(format!("{}: {e}", T::NAME)))?;
    apache_avro::from_value(&value).map_err(|e| Error::Decode(format!("{}: {e}", T::NAME)))
}

/// A writer schema seen in a frame, with its canonical form for comparing with ours.
struct WriterSchema {
    schema: Schema,
    canonical: String,
}

/// Encodes and decodes framed records, registering and looking up schemas in the registry.
pub struct Codec {
    registry: RegistryClient,
    /// Our schema id per record name, filled by [`Codec::register`].
    ids: RwLock<HashMap<&'static str, u32>>,
    /// Writer schemas by id, fetched on first sight.
    writers: RwLock<HashMap<u32, Arc<WriterSchema>>>,
}

impl Codec {
    /// A codec that talks to the registry at `registry`.
    pub fn new(registry: RegistryClient) -> Self {
        Self {
            registry,
            ids: RwLock::new(HashMap::new()),
            writers: RwLock::new(HashMap::new()),
        }
    }

    /// Registers `T`'s schema under its subject (idempotent) and remembers its id for encoding.
    pub async fn register<T: Record>(&self) -> Result<u32> {
        let id = self.registry.register(T::NAME, T::AVSC).await?;
        let schema = T::schema()?.clone();
        let canonical = schema.canonical_form();
        self.ids
            .write()
            .map_err(|_| Error::Bug("codec id lock poisoned".into()))?
            .insert(T::NAME, id);
        self.writers
            .write()
            .map_err(|_| Error::Bug("codec writer lock poisoned".into()))?
            .insert(id, Arc::new(WriterSchema { schema, canonical }));
        Ok(id)
    }

    /// Registers every record type Sluice writes.
    pub async fn register_all(&self) -> Result<()> {
        self.register::<crate::ChatRequest>().await?;
        self.register::<crate::RoutedRequest>().await?;
        self.register::<crate::ReplyChunk>().await?;
        self.register::<crate::UsageEvent>().await?;
        self.register::<crate::DeadLetter>().await?;
        self.register::<crate::WindowResult>().await?;
        self.register::<crate::Notification>().await?;
        self.register::<crate::WorkflowEvent>().await?;
        self.register::<crate::ToolInvocation>().await?;
        self.register::<crate::ToolOutcome>().await?;
        self.register::<crate::Document>().await?;
        Ok(())
    }

    /// Encodes `value` in the wire format. `T` must have been registered.
    pub fn encode<T: Record>(&self, value: &T) -> Result<Vec<u8>> {
        let id = *self
            .ids
            .read()
            .map_err(|_| Error::Bug("codec id lock poisoned".into()))?
            .get(T::NAME)
            .ok_or_else(|| Error::Bug(format!("{} was not registered before encoding", T::NAME)))?;
        let mut out = Vec::with_capacity(256);
        wire::write_header(id, &mut out);
        write_body(value, &mut out)?;
        Ok(out)
    }

    /// Decodes a wire-format record into `T`, fetching the writer's schema if it is new to us.
    pub async fn decode<T: Record>(&self, bytes: &[u8]) -> Result<T> {
        let (id, body) = wire::unframe(bytes)?;
        // Written with our own schema (the common case): no need to compare schemas.
        if self.own_id::<T>() == Some(id) {
            return decode_with(T::schema()?, true, body);
        }
        let writer = self.writer_schema(id).await?;
        decode_with(&writer.schema, writer.canonical == T::canonical()?, body)
    }

    /// The id `T`'s schema was registered under by this codec, if it was.
    fn own_id<T: Record>(&self) -> Option<u32> {
        self.ids.read().ok()?.get(T::NAME).copied()
    }

    async fn writer_schema(&self, id: u32) -> Result<Arc<WriterSchema>> {
        if let Some(found) = self
            .writers
            .read()
            .map_err(|_| Error::Bug("codec writer lock poisoned".into()))?
            .get(&id)
        {
            return Ok(found.clone());
        }
        let text = self.registry.schema_by_id(id).await?;
        let schema = Schema::parse_str(&text)
            .map_err(|e| Error::Decode(format!("registry schema {id} does not parse: {e}")))?;
        // Reject schemas whose named types cannot be resolved before caching them.
        ResolvedSchema::try_from(&schema)
            .map_err(|e| Error::Decode(format!("registry schema {id}: {e}")))?;
        let canonical = schema.canonical_form();
        let entry = Arc::new(WriterSchema { schema, canonical });
        self.writers
            .write()
            .map_err(|_| Error::Bug("codec writer lock poisoned".into()))?
            .insert(id, entry.clone());
        Ok(entry)
    }
}
