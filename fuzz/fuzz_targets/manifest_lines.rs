//! Ingest manifests (CSV or JSON Lines) from arbitrary bytes, through the
//! real streaming reader. The first byte picks the file extension (which
//! steers format detection) and the line-length limit; the rest is the
//! manifest. Reading must never panic, every row must come back as a row or
//! an error with a line number in range, and a row's target is never empty.

#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use sieve_scheduler::manifest::{ManifestReader, Target};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let extension = ["csv", "jsonl", "txt", "ndjson"][usize::from(selector & 3)];
    let max_line_bytes = [16, 64, 4096, 1 << 20][usize::from((selector >> 2) & 3)];
    let path = std::env::temp_dir().join(format!(
        "sieve-fuzz-manifest-{}.{extension}",
        std::process::id()
    ));
    let mut file = std::fs::File::create(&path).expect("temp file");
    file.write_all(body).expect("write");
    drop(file);

    let lines = body.split(|&b| b == b'\n').count() as u64;
    if let Ok(mut reader) = ManifestReader::open(&path, max_line_bytes) {
        let mut last = 0;
        loop {
            let batch = reader.next_batch(7).expect("reading a local file");
            if batch.is_empty() {
                break;
            }
            for row in batch {
                let line = match row {
                    Ok(row) => {
                        let (Target::Path(target) | Target::Key(target)) = &row.target;
                        assert!(!target.is_empty() && target.trim() == target, "{row:?}");
                        if let Some(label) = &row.label {
                            assert!(!label.is_empty() && label.trim() == label, "{row:?}");
                        }
                        row.line
                    }
                    Err(err) => {
                        assert!(!err.reason.is_empty());
                        err.line
                    }
                };
                assert!(line >= 1 && line <= lines, "line {line} of {lines}");
                assert!(line > last, "rows in order");
                last = line;
            }
        }
    }
    let _ = std::fs::remove_file(&path);
});
