//! A result written batch by batch in the formats that stream: NDJSON, CSV, an
//! Arrow IPC stream, Parquet. Each batch's bytes are taken out as soon as they are
//! written, so a response holds one batch at a time, not the result.

use arrow_ipc::writer::StreamWriter;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde_json::Value;

use super::{csv_field, json_value, null_at, text_value};
use crate::store::sql::arrow::datatypes::SchemaRef;
use crate::store::sql::arrow::record_batch::RecordBatch;

/// What a streamed result is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Streamed {
    /// One JSON object per row.
    Ndjson,
    /// A header row, then the rows.
    Csv,
    /// An Arrow IPC stream.
    Arrow,
    /// A Parquet file (zstd).
    Parquet,
}

/// Writes one result.
pub(super) enum Output {
    Ndjson(Vec<String>),
    Csv,
    Arrow(Box<StreamWriter<Vec<u8>>>),
    Parquet(Box<ArrowWriter<Vec<u8>>>),
}

impl Output {
    /// Starts a result of `schema`; what comes before the rows goes to `out`.
    pub(super) fn start(
        format: Streamed,
        schema: &SchemaRef,
        out: &mut Vec<u8>,
    ) -> Result<Self, String> {
        let names = || schema.fields().iter().map(|f| f.name().clone());
        Ok(match format {
            Streamed::Ndjson => Self::Ndjson(names().collect()),
            Streamed::Csv => {
                let cells: Vec<String> = names().map(|n| csv_field(&n)).collect();
                out.extend_from_slice(cells.join(",").as_bytes());
                out.push(b'\n');
                Self::Csv
            }
            Streamed::Arrow => {
                let mut w = StreamWriter::try_new(Vec::new(), schema).map_err(|e| e.to_string())?;
                out.append(w.get_mut());
                Self::Arrow(Box::new(w))
            }
            Streamed::Parquet => {
                let props = WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::default()))
                    .build();
                let w = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props))
                    .map_err(|e| e.to_string())?;
                Self::Parquet(Box::new(w))
            }
        })
    }

    /// Writes `batch`'s rows to `out` (Parquet: when a row group is full).
    pub(super) fn batch(&mut self, batch: &RecordBatch, out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            Self::Ndjson(names) => {
                for r in 0..batch.num_rows() {
                    let object: serde_json::Map<String, Value> = names
                        .iter()
                        .zip(batch.columns())
                        .map(|(n, c)| (n.clone(), json_value(c, r)))
                        .collect();
                    serde_json::to_writer(&mut *out, &object).map_err(|e| e.to_string())?;
                    out.push(b'\n');
                }
            }
            Self::Csv => {
                for r in 0..batch.num_rows() {
                    let cells: Vec<String> = batch
                        .columns()
                        .iter()
                        .map(|c| {
                            if null_at(c, r) {
                                String::new()
                            } else {
                                csv_field(&text_value(c, r))
                            }
                        })
                        .collect();
                    out.extend_from_slice(cells.join(",").as_bytes());
                    out.push(b'\n');
                }
            }
            Self::Arrow(w) => {
                w.write(batch).map_err(|e| e.to_string())?;
                out.append(w.get_mut());
            }
            Self::Parquet(w) => {
                w.write(batch).map_err(|e| e.to_string())?;
                out.append(w.inner_mut());
            }
        }
        Ok(())
    }

    /// Ends the result: what comes after the rows goes to `out`.
    pub(super) fn finish(self, out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            Self::Ndjson(_) | Self::Csv => {}
            Self::Arrow(mut w) => {
                w.finish().map_err(|e| e.to_string())?;
                out.append(w.get_mut());
            }
            Self::Parquet(w) => {
                out.extend(w.into_inner().map_err(|e| e.to_string())?);
            }
        }
        Ok(())
    }

    /// The record that ends a result cut short by `error`, for a format that has
    /// one (NDJSON: `{"error": …}`); the others end by breaking the connection, so
    /// that no reader takes a short result for a whole one.
    pub(super) fn error_record(&self, error: &str) -> Option<Vec<u8>> {
        match self {
            Self::Ndjson(_) => {
                let mut line = serde_json::to_vec(&serde_json::json!({ "error": error })).ok()?;
                line.push(b'\n');
                Some(line)
            }
            _ => None,
        }
    }
}
