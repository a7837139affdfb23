//! Ingest manifests: CSV or JSON Lines files that name images and, where
//! known, their labels.
//!
//! A manifest is read as a stream, one bounded line at a time, so its size
//! does not matter: a line longer than `ingest.max_line_bytes` is skipped
//! (and reported) without being held in memory. The format is checked from
//! the first line before anything is written; after that, a bad row is a
//! [`RowError`] with its line number and the rest goes on.
//!
//! CSV: a header row naming `path` or `key`, optionally `label` and
//! `external_id` (other columns are ignored); fields may be quoted with `"`
//! (`""` for a quote inside), but a quoted field may not span lines.
//! JSON Lines: one object per line, `{"path"|"key": ..., "label": ...,
//! "external_id": ...}`. Blank lines are skipped in both.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Csv,
    JsonLines,
}

/// The manifest as a whole cannot be read: nothing has been written.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a CSV or JSON Lines manifest: {reason}")]
    NotAManifest { path: PathBuf, reason: String },
}

/// What a row points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A file, relative to the manifest's directory (or `--root`).
    Path(String),
    /// An object already in the store.
    Key(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Path(p) => f.write_str(p),
            Target::Key(k) => write!(f, "key {k}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// 1-based line number in the manifest.
    pub line: u64,
    pub target: Target,
    /// A class name, not yet checked against the project.
    pub label: Option<String>,
    pub external_id: Option<String>,
    /// The image's boxes, checked against the project's classes (a row of
    /// a box annotation file: `ingest::annotated`); a manifest has none.
    pub boxes: Option<Vec<sieve_shared::boxes::LabeledBox>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowError {
    pub line: u64,
    pub reason: String,
}

/// Columns of a CSV manifest, by position.
#[derive(Clone, Debug)]
struct CsvColumns {
    count: usize,
    path: Option<usize>,
    key: Option<usize>,
    label: Option<usize>,
    external_id: Option<usize>,
}

enum RawLine {
    Text(String),
    TooLong(u64),
    NotUtf8,
}

pub struct ManifestReader {
    /// A local file, or a stored object's bytes as they arrive.
    reader: Box<dyn BufRead + Send>,
    format: Format,
    columns: Option<CsvColumns>,
    line: u64,
    max_line_bytes: usize,
    /// A JSON Lines manifest's first line is read to detect the format and
    /// is also its first row.
    pending: Option<(u64, String)>,
}

impl ManifestReader {
    /// Open `path` and check its format from the first line.
    pub fn open(path: &Path, max_line_bytes: usize) -> Result<Self, ManifestError> {
        let file = File::open(path).map_err(|source| ManifestError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_reader(path, Box::new(BufReader::new(file)), max_line_bytes)
    }

    /// A manifest read from `reader` (blocking reads: call it off the async
    /// runtime); `path` names it in messages and its extension hints at the
    /// format. The format is checked from the first line.
    pub fn from_reader(
        path: &Path,
        reader: Box<dyn BufRead + Send>,
        max_line_bytes: usize,
    ) -> Result<Self, ManifestError> {
        let io = |source| ManifestError::Io {
            path: path.to_owned(),
            source,
        };
        let not_manifest = |reason: String| ManifestError::NotAManifest {
            path: path.to_owned(),
            reason,
        };
        let mut reader = Self {
            reader,
            format: Format::Csv,
            columns: None,
            line: 0,
            max_line_bytes: max_line_bytes.max(1),
            pending: None,
        };
        let first = match reader.read_line().map_err(io)? {
            None => return Err(not_manifest("the file is empty".into())),
            Some(RawLine::TooLong(len)) => {
                return Err(not_manifest(format!(
                    "the first line is {len} bytes, over the limit of {max_line_bytes} (ingest.max_line_bytes)"
                )));
            }
            Some(RawLine::NotUtf8) => {
                return Err(not_manifest("the first line is not UTF-8 text".into()));
            }
            Some(RawLine::Text(text)) => text,
        };
        let first = first.strip_prefix('\u{feff}').unwrap_or(&first).to_owned();
        if first.contains('\0') {
            return Err(not_manifest("the first line holds binary data".into()));
        }
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let format = match extension.as_deref() {
            Some("csv") => Format::Csv,
            Some("jsonl" | "ndjson") => Format::JsonLines,
            _ if first.trim_start().starts_with('{') => Format::JsonLines,
            _ => Format::Csv,
        };
        reader.format = format;
        match format {
            Format::Csv => {
                reader.columns = Some(csv_header(&first).map_err(not_manifest)?);
            }
            Format::JsonLines => {
                match serde_json::from_str::<serde_json::Value>(&first) {
                    Ok(serde_json::Value::Object(_)) => {}
                    _ => {
                        return Err(not_manifest(
                            "the first line is not a JSON object (JSON Lines) nor a CSV header naming `path` or `key`".into(),
                        ));
                    }
                }
                reader.pending = Some((reader.line, first));
            }
        }
        Ok(reader)
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Up to `limit` rows (good or bad); empty at the end of the manifest.
    pub fn next_batch(&mut self, limit: usize) -> std::io::Result<Vec<Result<Row, RowError>>> {
        let mut batch = Vec::with_capacity(limit.min(4096));
        if let Some((line, text)) = self.pending.take() {
            batch.push(self.parse(line, &text));
        }
        while batch.len() < limit.max(1) {
            let Some(raw) = self.read_line()? else { break };
            let line = self.line;
            match raw {
                RawLine::Text(text) if text.trim().is_empty() => {}
                RawLine::Text(text) => batch.push(self.parse(line, &text)),
                RawLine::TooLong(len) => batch.push(Err(RowError {
                    line,
                    reason: format!(
                        "line is {len} bytes, over the limit of {} (ingest.max_line_bytes)",
                        self.max_line_bytes
                    ),
                })),
                RawLine::NotUtf8 => batch.push(Err(RowError {
                    line,
                    reason: "line is not UTF-8 text".into(),
                })),
            }
        }
        Ok(batch)
    }

    fn parse(&self, line: u64, text: &str) -> Result<Row, RowError> {
        let parsed = match (&self.format, &self.columns) {
            (Format::Csv, Some(columns)) => csv_row(columns, text),
            _ => json_row(text),
        };
        parsed
            .map(|(target, label, external_id)| Row {
                line,
                target,
                label,
                external_id,
                boxes: None,
            })
            .map_err(|reason| RowError { line, reason })
    }

    /// One line, without its line ending; never holds more than
    /// `max_line_bytes` of it.
    fn read_line(&mut self) -> std::io::Result<Option<RawLine>> {
        let mut buf = Vec::new();
        let mut len: u64 = 0;
        let mut too_long = false;
        let mut any = false;
        loop {
            let available = self.reader.fill_buf()?;
            if available.is_empty() {
                break;
            }
            any = true;
            let (take, done) = match available.iter().position(|&b| b == b'\n') {
                Some(pos) => (pos + 1, true),
                None => (available.len(), false),
            };
            let content = if done { take - 1 } else { take };
            len += content as u64;
            if !too_long {
                if buf.len() + content > self.max_line_bytes {
                    too_long = true;
                    buf = Vec::new();
                } else {
                    buf.extend_from_slice(&available[..content]);
                }
            }
            self.reader.consume(take);
            if done {
                break;
            }
        }
        if !any {
            return Ok(None);
        }
        self.line += 1;
        if too_long {
            return Ok(Some(RawLine::TooLong(len)));
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        Ok(Some(match String::from_utf8(buf) {
            Ok(text) => RawLine::Text(text),
            Err(_) => RawLine::NotUtf8,
        }))
    }
}

type Parsed = (Target, Option<String>, Option<String>);

fn csv_header(line: &str) -> Result<CsvColumns, String> {
    let names = split_csv(line)
        .map_err(|e| format!("the first line is not a CSV header ({e})"))?
        .into_iter()
        .map(|n| n.trim().to_ascii_lowercase())
        .collect::<Vec<_>>();
    let find = |name: &str| names.iter().position(|n| n == name);
    let columns = CsvColumns {
        count: names.len(),
        path: find("path"),
        key: find("key"),
        label: find("label"),
        external_id: find("external_id"),
    };
    if columns.path.is_none() && columns.key.is_none() {
        return Err(
            "the first line is neither a CSV header naming a `path` or `key` column nor a JSON object"
                .into(),
        );
    }
    Ok(columns)
}

fn csv_row(columns: &CsvColumns, line: &str) -> Result<Parsed, String> {
    let fields = split_csv(line)?;
    if fields.len() != columns.count {
        return Err(format!(
            "expected {} fields as in the header, found {}",
            columns.count,
            fields.len()
        ));
    }
    let get = |i: Option<usize>| {
        i.map(|i| fields[i].trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    target(get(columns.path), get(columns.key))
        .map(|t| (t, get(columns.label), get(columns.external_id)))
}

#[derive(Deserialize)]
struct JsonRow {
    path: Option<String>,
    key: Option<String>,
    label: Option<String>,
    external_id: Option<serde_json::Value>,
}

fn json_row(line: &str) -> Result<Parsed, String> {
    let row: JsonRow =
        serde_json::from_str(line).map_err(|e| format!("not a valid JSON row: {e}"))?;
    let external_id = match row.external_id {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        Some(other) => {
            return Err(format!(
                "external_id must be a string or a number, not {other}"
            ));
        }
    };
    let clean = |v: Option<String>| v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
    target(clean(row.path), clean(row.key)).map(|t| (t, clean(row.label), external_id))
}

fn target(path: Option<String>, key: Option<String>) -> Result<Target, String> {
    match (path, key) {
        (Some(path), None) => Ok(Target::Path(path)),
        (None, Some(key)) => Ok(Target::Key(key)),
        (Some(_), Some(_)) => Err("a row names both a path and a key; give one".into()),
        (None, None) => Err("a row needs a path or a key".into()),
    }
}

/// One CSV record on one line (RFC 4180 quoting, no embedded newlines).
fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut after_quote = false;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => {
                    quoted = false;
                    after_quote = true;
                }
                c => field.push(c),
            }
            continue;
        }
        match c {
            ',' => {
                fields.push(std::mem::take(&mut field));
                after_quote = false;
            }
            '"' if field.trim().is_empty() && !after_quote => {
                field.clear();
                quoted = true;
            }
            c if after_quote && !c.is_whitespace() => {
                return Err("text after a closing quote".into());
            }
            '"' => return Err("a quote inside an unquoted field".into()),
            c => {
                if !after_quote {
                    field.push(c);
                }
            }
        }
    }
    if quoted {
        return Err("unterminated quoted field (quoted fields may not span lines)".into());
    }
    fields.push(field);
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(name: &str, text: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn splits_quoted_csv_fields() {
        assert_eq!(
            split_csv(r#"a,"b, c","say ""hi""",,"#).expect("csv"),
            vec!["a", "b, c", r#"say "hi""#, "", ""]
        );
        assert!(split_csv(r#""open"#).is_err());
        assert!(split_csv(r#"a"b"#).is_err());
    }

    #[test]
    fn reads_csv_rows_with_line_numbers() {
        let (_dir, path) = manifest(
            "m.csv",
            b"path,label,external_id\r\na.png,cat,1\n\nb.png,,\nbad\n",
        );
        let mut reader = ManifestReader::open(&path, 1024).expect("open");
        let rows = reader.next_batch(10).expect("batch");
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[0],
            Ok(Row {
                line: 2,
                target: Target::Path("a.png".into()),
                label: Some("cat".into()),
                external_id: Some("1".into()),
                boxes: None,
            })
        );
        assert_eq!(rows[1].as_ref().map(|r| r.line), Ok(4));
        assert_eq!(rows[2].as_ref().map_err(|e| e.line), Err(5));
        assert!(reader.next_batch(10).expect("end").is_empty());
    }

    #[test]
    fn detects_json_lines_by_content_and_skips_long_lines() {
        let long = format!("{{\"path\": \"{}\"}}\n", "x".repeat(200));
        let text = format!("{{\"key\": \"k/1\", \"external_id\": 7}}\n{long}{{\"path\": 3}}\n");
        let (_dir, path) = manifest("list.txt", text.as_bytes());
        let mut reader = ManifestReader::open(&path, 100).expect("open");
        assert_eq!(reader.format(), Format::JsonLines);
        let rows = reader.next_batch(10).expect("batch");
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[0].as_ref().map(|r| r.external_id.clone()),
            Ok(Some("7".into()))
        );
        let too_long = rows[1].as_ref().expect_err("too long");
        assert_eq!(too_long.line, 2);
        assert!(
            too_long.reason.contains("over the limit"),
            "{}",
            too_long.reason
        );
        assert_eq!(rows[2].as_ref().map_err(|e| e.line), Err(3));
    }

    #[test]
    fn refuses_files_that_are_not_manifests() {
        for (name, text) in [
            ("a.csv", &b"name,size\nx,1\n"[..]),
            ("a.jsonl", &b"[1, 2]\n"[..]),
            ("a.bin", &b"\x89PNG\r\n\x1a\n\0\0\0"[..]),
            ("a.txt", &b""[..]),
        ] {
            let (_dir, path) = manifest(name, text);
            let err = ManifestReader::open(&path, 1024).err().expect(name);
            assert!(
                matches!(err, ManifestError::NotAManifest { .. }),
                "{name}: {err}"
            );
        }
    }
}
