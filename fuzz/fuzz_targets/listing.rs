//! Fuzz target: `Listing::decode` over arbitrary bytes (a cached directory
//! listing read back from a damaged index).
//!
//! Invariants checked: decoding never panics, and whatever decodes
//! re-encodes to exactly the input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use musicfs_cas::Listing;

fuzz_target!(|data: &[u8]| {
    if let Ok(l) = Listing::decode(data) {
        assert_eq!(l.encode(), data, "decoded listing re-encodes differently");
    }
});
