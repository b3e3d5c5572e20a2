//! Fuzz target: `Listing::decode` over arbitrary bytes (a cached directory
//! listing read back from a damaged index).
//!
//! Invariants checked: decoding never panics; whatever decodes as the
//! current format (`MFL2`) re-encodes to exactly the input; an old `MFL1`
//! record decodes to a listing without symlinks that survives a round trip
//! in the current format.

#![no_main]

use libfuzzer_sys::fuzz_target;
use musicfs_cas::Listing;
use musicfs_origins::EntryKind;

fuzz_target!(|data: &[u8]| {
    let Ok(l) = Listing::decode(data) else {
        return;
    };
    if data.starts_with(b"MFL2") {
        assert_eq!(l.encode(), data, "decoded listing re-encodes differently");
    } else {
        assert!(
            l.entries.iter().all(|e| e.meta.kind != EntryKind::Symlink),
            "an old listing kept a symlink nothing checked"
        );
        let again = Listing::decode(&l.encode()).expect("a re-encoded old listing decodes");
        assert_eq!(again, l, "an old listing changes in a round trip");
    }
});
