//! The shape of every record on every topic, and how it is put on the wire.
//!
//! # Layout
//! - [`types`]: the Rust mirror of each `schemas/*.avsc` file (one named record per file),
//!   with [`AvroRecord`] tying a type to its compiled-in schema.
//! - [`catalogue`]: the one list of topics: name, key format, cleanup policy, partitioning and
//!   value type. Processors name topics only through it.
//! - [`codec`]: Confluent wire format (magic byte, 4-byte schema id, Avro datum) over a
//!   schema registry. A short, mis-framed or unknown payload is an error value, never a panic.

pub mod catalogue;
pub mod codec;
pub mod types;

pub use catalogue::{Catalogue, Cleanup, KeyFormat, Partitioning, Topic, TopicSpec};
pub use codec::{CodecError, Decoder, Encoder, Registry, split_frame};
pub use types::*;
