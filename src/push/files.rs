//! The inputs of `milepost push`, cut into requests of whole lines.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio::sync::mpsc::Sender;

use crate::domain::Device;

/// One input.
#[derive(Debug, Clone)]
pub enum Source {
    /// A file, with its size on disk (compressed, for `.gz`).
    File {
        /// Where.
        path: PathBuf,
        /// Bytes on disk.
        size: u64,
    },
    /// Standard input.
    Stdin,
}

impl Source {
    /// Bytes on disk, when known.
    pub fn size(&self) -> Option<u64> {
        match self {
            Self::File { size, .. } => Some(*size),
            Self::Stdin => None,
        }
    }

    /// How messages name it.
    pub fn name(&self) -> String {
        match self {
            Self::File { path, .. } => path.display().to_string(),
            Self::Stdin => "<stdin>".to_owned(),
        }
    }
}

/// The inputs named on the command line: files as given, directories as their files
/// in name order (recursively, hidden entries skipped), `-` as standard input.
pub fn expand(paths: &[PathBuf]) -> anyhow::Result<Vec<Source>> {
    let mut out = Vec::new();
    for p in paths {
        if p.as_os_str() == "-" {
            out.push(Source::Stdin);
            continue;
        }
        let meta = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(Source::File {
                path: p.clone(),
                size: meta.len(),
            });
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<Source>) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = e.path();
        let meta = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?;
        if meta.is_dir() {
            walk(&path, out)?;
        } else if meta.is_file() {
            out.push(Source::File {
                path,
                size: meta.len(),
            });
        }
    }
    Ok(())
}

/// Whole lines of one input, one request's worth.
#[derive(Debug)]
pub struct Chunk {
    /// Index of its input.
    pub file: usize,
    /// Number (1-based) in the input of the chunk's first line.
    pub first_line: u64,
    /// The lines, each ending in `\n`.
    pub body: Vec<u8>,
    /// Bytes of the input the chunk covers (compressed ones for `.gz`, so that
    /// progress adds up to the files' sizes), approximately.
    pub raw_len: usize,
    /// The input's last chunk (possibly empty).
    pub last: bool,
    /// Why the input could not be read to its end (with `last`).
    pub read_error: Option<String>,
}

/// Reads every input in order into `tx`; stops early only when the receiver is gone.
pub fn read_all(
    sources: &[Source],
    device: Option<&Device>,
    limit: usize,
    tx: &Sender<Chunk>,
) -> anyhow::Result<()> {
    for (file, source) in sources.iter().enumerate() {
        let (reader, size): (Box<dyn Read>, Option<u64>) = match source {
            Source::File { path, size } => match std::fs::File::open(path) {
                Ok(f) => (Box::new(f), Some(*size)),
                Err(e) => {
                    let c = Chunk {
                        file,
                        first_line: 1,
                        body: Vec::new(),
                        raw_len: *size as usize,
                        last: true,
                        read_error: Some(e.to_string()),
                    };
                    if tx.blocking_send(c).is_err() {
                        return Ok(());
                    }
                    continue;
                }
            },
            Source::Stdin => (Box::new(std::io::stdin().lock()), None),
        };
        if !read_one(file, reader, size, device, limit, tx)? {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads one input; `Ok(false)` when the receiver is gone.
fn read_one(
    file: usize,
    reader: Box<dyn Read>,
    size: Option<u64>,
    device: Option<&Device>,
    limit: usize,
    tx: &Sender<Chunk>,
) -> anyhow::Result<bool> {
    let mut reader = BufReader::with_capacity(256 * 1024, reader);
    // gzip by content, not by name: a buffer file may be compressed without `.gz`.
    let gz = reader
        .fill_buf()
        .map(|b| b.starts_with(&[0x1f, 0x8b]))
        .unwrap_or(false);
    let mut lines: Box<dyn BufRead> = if gz {
        Box::new(BufReader::with_capacity(
            256 * 1024,
            flate2::bufread::MultiGzDecoder::new(reader),
        ))
    } else {
        Box::new(reader)
    };
    let inject = device.map(|d| format!("\"device\":{},", serde_json::json!(d.as_str())));
    let mut line_no = 0u64;
    let mut first_line = 1u64;
    let mut body = Vec::with_capacity(limit.min(64 << 20) + 1024);
    let mut line = Vec::new();
    let mut read_bytes = 0usize;
    let mut reported = 0usize;
    // Progress in input bytes: for gzip the decompressed bytes are scaled down to
    // the file's size by the ratio seen at the end, so report raw bytes and let the
    // last chunk settle the difference.
    let mut emit =
        |body: &mut Vec<u8>, first: u64, read: usize, last: bool, err: Option<String>| {
            let raw = match (size, last) {
                (Some(s), true) => (s as usize).saturating_sub(reported),
                (Some(s), false) if gz => (read / 8).min((s as usize).saturating_sub(reported)),
                _ => read.saturating_sub(reported),
            };
            reported += raw;
            let c = Chunk {
                file,
                first_line: first,
                body: std::mem::take(body),
                raw_len: raw,
                last,
                read_error: err,
            };
            tx.blocking_send(c).is_ok()
        };
    loop {
        line.clear();
        let n = match lines.read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(e) => {
                let why = format!("unreadable after line {line_no}: {e}");
                return Ok(emit(&mut body, first_line, read_bytes, true, Some(why)));
            }
        };
        if n == 0 {
            return Ok(emit(&mut body, first_line, read_bytes, true, None));
        }
        read_bytes += n;
        line_no += 1;
        if !body.is_empty() && body.len() + n + inject.as_ref().map_or(0, String::len) > limit {
            let next_first = line_no;
            if !emit(&mut body, first_line, read_bytes - n, false, None) {
                return Ok(false);
            }
            first_line = next_first;
        }
        match &inject {
            Some(field) if !has_device(&line) => push_with_device(&mut body, &line, field),
            _ => body.extend_from_slice(&line),
        }
        if !body.ends_with(b"\n") {
            body.push(b'\n');
        }
    }
}

/// Whether a JSON object line has a `"device"` key (a `"device"` followed by `:`).
fn has_device(line: &[u8]) -> bool {
    memchr::memmem::find_iter(line, b"\"device\"").any(|i| {
        line[i + 8..]
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b':')
    })
}

/// `line` with `field` (`"device":"…",`) as the object's first member.
fn push_with_device(body: &mut Vec<u8>, line: &[u8], field: &str) {
    let Some(open) = line.iter().position(|b| !b.is_ascii_whitespace()) else {
        body.extend_from_slice(line);
        return;
    };
    if line[open] != b'{' {
        // Not an object: the server says why.
        body.extend_from_slice(line);
        return;
    }
    body.extend_from_slice(&line[..=open]);
    let rest = &line[open + 1..];
    let empty = rest
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'}');
    let field = if empty {
        field.trim_end_matches(',')
    } else {
        field
    };
    body.extend_from_slice(field.as_bytes());
    body.extend_from_slice(rest);
}

/// `body` gzip-compressed at the fastest level (NDJSON readings shrink ~10×
/// even so, and the sender's core is often a device's small one).
pub fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 6),
        flate2::Compression::fast(),
    );
    enc.write_all(body).expect("writing to memory");
    enc.finish().expect("writing to memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_added_only_where_none_is_named() {
        let field = "\"device\":\"truck-1\",";
        let add = |l: &str| {
            let mut b = Vec::new();
            if has_device(l.as_bytes()) {
                b.extend_from_slice(l.as_bytes());
            } else {
                push_with_device(&mut b, l.as_bytes(), field);
            }
            String::from_utf8(b).unwrap()
        };
        assert_eq!(
            add("{\"sensor\":\"speed\",\"value\":1}\n"),
            "{\"device\":\"truck-1\",\"sensor\":\"speed\",\"value\":1}\n"
        );
        assert_eq!(
            add(" { \"device\" : \"car\", \"value\":1}"),
            " { \"device\" : \"car\", \"value\":1}"
        );
        // A value that merely says "device" is not a key.
        assert_eq!(
            add("{\"sensor\":\"device\"}"),
            "{\"device\":\"truck-1\",\"sensor\":\"device\"}"
        );
        assert_eq!(add("{}"), "{\"device\":\"truck-1\"}");
        assert_eq!(add("[1]"), "[1]");
        assert_eq!(add(""), "");
    }

    #[test]
    fn requests_hold_whole_lines_and_know_where_they_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.ndjson");
        let text: String = (1..=10).map(|i| format!("line {i:02}\n")).collect();
        std::fs::write(&path, &text).unwrap();
        let sources = expand(&[path]).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(100);
        // 8 bytes a line: three lines a request.
        read_all(&sources, None, 24, &tx).unwrap();
        drop(tx);
        let mut chunks = Vec::new();
        while let Ok(c) = rx.try_recv() {
            chunks.push(c);
        }
        let firsts: Vec<u64> = chunks.iter().map(|c| c.first_line).collect();
        assert_eq!(firsts, [1, 4, 7, 10]);
        assert!(
            chunks
                .iter()
                .map(|c| c.last)
                .eq([false, false, false, true])
        );
        let all: Vec<u8> = chunks.iter().flat_map(|c| c.body.clone()).collect();
        assert_eq!(String::from_utf8(all).unwrap(), text);
        assert_eq!(chunks.iter().map(|c| c.raw_len).sum::<usize>(), text.len());
    }
}
