//! DuckDB's Arrow results as PostgreSQL rows: each column's type mapped once
//! ([`pg_type`]), each cell encoded in the text or binary format the client asked
//! for.

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use pgwire::api::Type;
use pgwire::api::portal::Format;
use pgwire::api::results::{DataRowEncoder, FieldInfo};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;
use rust_decimal::Decimal;

use crate::store::sql::arrow::array::{Array, ArrayRef, AsArray};
use crate::store::sql::arrow::compute::cast;
use crate::store::sql::arrow::datatypes::{
    DataType, Date32Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Schema,
    Time64MicrosecondType, TimeUnit, TimestampMicrosecondType,
};
use crate::store::sql::arrow::record_batch::RecordBatch;
use crate::store::sql::arrow::util::display::array_value_to_string;

/// The PostgreSQL type a column of `t` is sent as. Integers keep their width
/// (unsigned ones the next signed width up), decimals are `numeric`, timestamps
/// `timestamp` (UTC, as stored), and what PostgreSQL has no plain type for (lists,
/// structs, intervals …) is sent as text in DuckDB's notation.
pub fn pg_type(t: &DataType) -> Type {
    match t {
        DataType::Boolean => Type::BOOL,
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => Type::INT2,
        DataType::Int32 | DataType::UInt16 => Type::INT4,
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => Type::INT8,
        DataType::Float16 | DataType::Float32 => Type::FLOAT4,
        DataType::Float64 => Type::FLOAT8,
        DataType::Decimal128(..) | DataType::Decimal256(..) => Type::NUMERIC,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Type::VARCHAR,
        DataType::Timestamp(_, None) => Type::TIMESTAMP,
        DataType::Timestamp(_, Some(_)) => Type::TIMESTAMPTZ,
        DataType::Date32 | DataType::Date64 => Type::DATE,
        DataType::Time32(_) | DataType::Time64(_) => Type::TIME,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => Type::BYTEA,
        _ => Type::TEXT,
    }
}

/// The row description of `schema`, in `format`.
pub fn fields(schema: &Schema, format: &Format) -> Vec<FieldInfo> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            FieldInfo::new(
                f.name().clone(),
                None,
                None,
                pg_type(f.data_type()),
                format.format_for(i),
            )
        })
        .collect()
}

/// A column cast to the Arrow type its PostgreSQL type is encoded from.
fn canonical(col: &ArrayRef, ty: &Type) -> PgWireResult<ArrayRef> {
    let to = match *ty {
        Type::INT2 => DataType::Int16,
        Type::INT4 => DataType::Int32,
        Type::INT8 => DataType::Int64,
        Type::FLOAT4 => DataType::Float32,
        Type::FLOAT8 => DataType::Float64,
        Type::TIMESTAMP => DataType::Timestamp(TimeUnit::Microsecond, None),
        Type::TIMESTAMPTZ => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        Type::DATE => DataType::Date32,
        Type::TIME => DataType::Time64(TimeUnit::Microsecond),
        _ => return Ok(col.clone()),
    };
    if *col.data_type() == to {
        return Ok(col.clone());
    }
    cast(col, &to).map_err(|e| PgWireError::ApiError(Box::new(e)))
}

/// The rows of `batches`, encoded for `fields` one at a time as the client takes
/// them (the result is not held twice), then an error if one is given.
pub struct Rows {
    batches: std::vec::IntoIter<RecordBatch>,
    /// The current batch's columns, [`canonical`], its next row and its rows.
    current: Option<(Vec<ArrayRef>, usize, usize)>,
    fields: Arc<Vec<FieldInfo>>,
    encoder: DataRowEncoder,
    error: Option<PgWireError>,
}

impl Rows {
    /// The rows of `batches` for `fields`.
    pub fn new(batches: Vec<RecordBatch>, fields: Arc<Vec<FieldInfo>>) -> Self {
        Self {
            batches: batches.into_iter(),
            current: None,
            encoder: DataRowEncoder::new(fields.clone()),
            fields,
            error: None,
        }
    }

    /// No rows, only `error`: a result that failed after rows were sent ends with
    /// an error, as PostgreSQL's do.
    pub fn failed(error: PgWireError, fields: Arc<Vec<FieldInfo>>) -> Self {
        Self {
            error: Some(error),
            ..Self::new(Vec::new(), fields)
        }
    }
}

impl Iterator for Rows {
    type Item = PgWireResult<DataRow>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((columns, row, rows)) = &mut self.current
                && *row < *rows
            {
                let r = *row;
                *row += 1;
                for (col, field) in columns.iter().zip(self.fields.iter()) {
                    if let Err(e) = cell(&mut self.encoder, col, r, field.datatype()) {
                        return Some(Err(e));
                    }
                }
                return Some(Ok(self.encoder.take_row()));
            }
            let Some(batch) = self.batches.next() else {
                return self.error.take().map(Err);
            };
            let columns = batch
                .columns()
                .iter()
                .zip(self.fields.iter())
                .map(|(c, f)| canonical(c, f.datatype()))
                .collect::<PgWireResult<Vec<_>>>();
            match columns {
                Ok(columns) => self.current = Some((columns, 0, batch.num_rows())),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// One cell of `col` (already [`canonical`]).
fn cell(enc: &mut DataRowEncoder, col: &ArrayRef, row: usize, ty: &Type) -> PgWireResult<()> {
    if *col.data_type() == DataType::Null || col.is_null(row) {
        return enc.encode_field(&None::<i32>);
    }
    match *ty {
        Type::BOOL => enc.encode_field(&col.as_boolean().value(row)),
        Type::INT2 => enc.encode_field(&col.as_primitive::<Int16Type>().value(row)),
        Type::INT4 => enc.encode_field(&col.as_primitive::<Int32Type>().value(row)),
        Type::INT8 => enc.encode_field(&col.as_primitive::<Int64Type>().value(row)),
        Type::FLOAT4 => enc.encode_field(&col.as_primitive::<Float32Type>().value(row)),
        Type::FLOAT8 => enc.encode_field(&col.as_primitive::<Float64Type>().value(row)),
        Type::NUMERIC => enc.encode_field(&decimal(col, row)?),
        Type::TIMESTAMP => {
            let us = col.as_primitive::<TimestampMicrosecondType>().value(row);
            enc.encode_field(&micros(us)?.naive_utc())
        }
        Type::TIMESTAMPTZ => {
            let us = col.as_primitive::<TimestampMicrosecondType>().value(row);
            enc.encode_field(&micros(us)?)
        }
        Type::DATE => {
            let days = col.as_primitive::<Date32Type>().value(row);
            let date = NaiveDate::from_num_days_from_ce_opt(days + 719_163)
                .ok_or_else(|| out_of_range("date"))?;
            enc.encode_field(&date)
        }
        Type::TIME => {
            let us = col.as_primitive::<Time64MicrosecondType>().value(row);
            let time = NaiveTime::from_num_seconds_from_midnight_opt(
                (us / 1_000_000) as u32,
                (us % 1_000_000) as u32 * 1_000,
            )
            .ok_or_else(|| out_of_range("time"))?;
            enc.encode_field(&time)
        }
        Type::BYTEA => {
            let bytes = match col.data_type() {
                DataType::LargeBinary => col.as_binary::<i64>().value(row).to_vec(),
                DataType::BinaryView => col.as_binary_view().value(row).to_vec(),
                _ => col.as_binary::<i32>().value(row).to_vec(),
            };
            enc.encode_field(&bytes)
        }
        _ => enc.encode_field(&text(col, row)),
    }
}

/// A cell as DuckDB writes it (strings as they are).
fn text(col: &ArrayRef, row: usize) -> String {
    match col.data_type() {
        DataType::Utf8 => col.as_string::<i32>().value(row).to_owned(),
        DataType::LargeUtf8 => col.as_string::<i64>().value(row).to_owned(),
        DataType::Utf8View => col.as_string_view().value(row).to_owned(),
        _ => array_value_to_string(col, row).unwrap_or_default(),
    }
}

fn micros(us: i64) -> PgWireResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| out_of_range("timestamp"))
}

/// A decimal cell: exact up to 28 digits (PostgreSQL's `numeric` holds more;
/// DuckDB's `HUGEINT` sums rarely need them).
fn decimal(col: &ArrayRef, row: usize) -> PgWireResult<Decimal> {
    let text = array_value_to_string(col, row).map_err(|e| PgWireError::ApiError(Box::new(e)))?;
    text.parse::<Decimal>()
        .map_err(|_| out_of_range(&format!("numeric {text}")))
}

fn out_of_range(what: &str) -> PgWireError {
    PgWireError::UserError(Box::new(pgwire::error::ErrorInfo::new(
        "ERROR".into(),
        "22003".into(),
        format!("{what} is out of the range the PostgreSQL protocol can carry here"),
    )))
}
