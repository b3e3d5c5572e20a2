//! Fuzz target: the `musicfs mount` config file and the flag parsers.
//!
//! Each input is written as the config file and loaded with
//! `FileConfig::load` (the TOML parse and its typed fields), and, when it is
//! UTF-8, also given to `parse_size` and `parse_origin` as a flag value.
//!
//! Invariants checked: no input panics; every failure is a `UsageError`
//! (exit 2 with a message), never an empty one; a size that parses is at
//! least one byte (a cache of 0 bytes is a usage error, not a setting).

#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used)] // harness: a failed setup is a failed run

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

use musicfs_cli::config::{origins_from_tables, parse_origin, parse_size, size_value, FileConfig};

static FILE: OnceLock<PathBuf> = OnceLock::new();

fn file() -> &'static PathBuf {
    FILE.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("musicfs-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create the fuzz work dir");
        d.join("musicfs.toml")
    })
}

fn check_size(r: Result<u64, musicfs_cli::config::UsageError>) {
    match r {
        Ok(bytes) => assert!(bytes > 0, "a size of 0 bytes was accepted"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

fuzz_target!(init: { file(); }, |data: &[u8]| {
    std::fs::write(file(), data).unwrap();
    match FileConfig::load(file()) {
        Ok(c) => {
            if let Some(s) = &c.cache_size {
                check_size(size_value(s));
            }
            // Origins with the file's own [origin.NAME] tables, as a mount
            // reads them (tables with a url are origins too).
            for o in c.origins.iter().cloned().chain(origins_from_tables(&c.origin)) {
                let _ = parse_origin(&o, &c.origin);
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    if let Ok(text) = std::str::from_utf8(data) {
        check_size(parse_size(text));
        if let Err(e) = parse_origin(text, &BTreeMap::new()) {
            assert!(!e.to_string().is_empty());
        }
    }
});
