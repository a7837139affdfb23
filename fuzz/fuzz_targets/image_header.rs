//! The image checks that guard ingest and the worker, on arbitrary bytes:
//! the header check (format, dimensions, pixel limit) must never panic, and
//! an image it accepts under a small pixel limit must decode within that
//! limit (what the worker does next), so a header cannot lie its way past
//! the decompression-bomb check.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sieve_scheduler::ingest::header_dimensions;

const MAX_PIXELS: u64 = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Ok((width, height)) = header_dimensions(data, MAX_PIXELS) else {
        return;
    };
    assert!(width > 0 && height > 0);
    assert!(u64::from(width) * u64::from(height) <= MAX_PIXELS);
    if let Ok(decoded) = image::load_from_memory(data) {
        assert_eq!(
            (decoded.width(), decoded.height()),
            (width, height),
            "the decoder agrees with the header check"
        );
    }
});
