//! Fuzz target: `Manifest::decode` over arbitrary bytes, as a damaged index
//! would hand them over.
//!
//! Invariants checked: decoding never panics; whatever decodes re-encodes
//! to exactly the input (the format has one spelling per manifest, so no
//! damaged record can pass for another); lookups on a decoded manifest
//! stay within it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use musicfs_cas::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::decode(data) else {
        return;
    };
    assert_eq!(m.encode(), data, "decoded manifest re-encodes differently");
    let covered = m.covered();
    assert!(covered <= m.version.size, "manifest covers past the file");
    let all = m.chunks_in(0, u64::MAX);
    assert_eq!(all.len(), m.chunks().len());
    for probe in [covered / 2, covered.saturating_sub(1), covered, u64::MAX] {
        for (start, c) in m.chunks_in(probe, 1) {
            assert!(start <= probe && probe < start + u64::from(c.len));
        }
    }
});
