//! Fuzz target: `ChunkRecord::decode`, the index's per-chunk record (size
//! and last access), over arbitrary bytes.
//!
//! Invariants checked: decoding never panics; exactly the 16-byte records
//! decode, and they re-encode to the input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use musicfs_cas::index::ChunkRecord;

fuzz_target!(|data: &[u8]| {
    match ChunkRecord::decode(data) {
        Ok(r) => assert_eq!(&r.encode()[..], data),
        Err(_) => assert_ne!(data.len(), 16, "a 16-byte record was refused"),
    }
});
