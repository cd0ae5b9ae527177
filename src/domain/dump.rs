//! What a daily dump is, independent of where it is stored.

use std::fmt;

/// The file formats a day is dumped in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DumpFormat {
    /// Gzip NDJSON, one reading per line, as the seed's dumper wrote it
    /// (`YYYY-MM-DD.json.gz`); an ingest body.
    Json,
    /// Zstd Parquet in a Hive-partitioned lake (`parquet/date=YYYY-MM-DD/<node>.parquet`).
    Parquet,
}

impl DumpFormat {
    /// Both formats, in the order a run writes them.
    pub const ALL: [DumpFormat; 2] = [DumpFormat::Json, DumpFormat::Parquet];

    /// Name in the manifest and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DumpFormat::Json => "json",
            DumpFormat::Parquet => "parquet",
        }
    }

    /// Parses [`DumpFormat::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "json" => Some(DumpFormat::Json),
            "parquet" => Some(DumpFormat::Parquet),
            _ => None,
        }
    }
}

impl fmt::Display for DumpFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
