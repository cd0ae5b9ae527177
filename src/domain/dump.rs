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

/// Which appliance wrote a lake object: its `--node-name` and the instance id of its
/// data directory (random, made once by the database: a new machine reusing a name has
/// another). Every object a node writes carries it (the gzip header's comment, the
/// Parquet footer's key-value metadata, the manifest's fields), so a node can tell
/// its own objects from another node's before it overwrites anything, whatever its
/// database remembers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// `--node-name`: the name in the node's keys.
    pub node: String,
    /// The data directory's instance id (hex).
    pub instance: String,
}

impl NodeIdentity {
    /// Parquet key-value metadata key of the node name.
    pub const PARQUET_NODE: &'static str = "milepost.node";
    /// Parquet key-value metadata key of the instance id.
    pub const PARQUET_INSTANCE: &'static str = "milepost.instance";
    const COMMENT_PREFIX: &'static str = "milepost node=";

    /// The gzip header comment of a NDJSON dump (`milepost node=N instance=I`).
    pub fn gzip_comment(&self) -> String {
        format!(
            "{}{} instance={}",
            Self::COMMENT_PREFIX,
            self.node,
            self.instance
        )
    }

    /// Parses [`NodeIdentity::gzip_comment`]; `None` for any other comment.
    pub fn from_gzip_comment(comment: &str) -> Option<Self> {
        let rest = comment.strip_prefix(Self::COMMENT_PREFIX)?;
        let (node, instance) = rest.split_once(" instance=")?;
        (!node.is_empty() && !instance.is_empty()).then(|| Self {
            node: node.to_owned(),
            instance: instance.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_through_the_gzip_comment_and_nothing_else_parses() {
        let id = NodeIdentity {
            node: "car-1.eu".into(),
            instance: "0123abcd".into(),
        };
        assert_eq!(
            NodeIdentity::from_gzip_comment(&id.gzip_comment()),
            Some(id)
        );
        for other in [
            "",
            "milepost node=",
            "milepost node=a",
            "gzip",
            "milepost node= instance=x",
        ] {
            assert_eq!(NodeIdentity::from_gzip_comment(other), None, "{other}");
        }
    }
}
