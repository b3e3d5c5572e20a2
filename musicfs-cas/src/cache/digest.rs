//! The whole-file check of a first download.
//!
//! Layer: inside the cache (see `cache.rs`), at the end of an ingest.
//! Chunk hashes prove that cached bytes are the bytes that were downloaded;
//! they cannot prove that the download was right. Where the origin states
//! a digest of the whole content of the version ([`Origin::whole_digest`],
//! an S3 single-part upload's MD5 ETag), an ingest that caches the file to
//! its end checks it before the file counts as cached. Invariants:
//! - A manifest that covers the whole file is stored only after the check
//!   passed: a crash before then leaves the manifest one chunk short, and
//!   the next open fetches that chunk and checks again.
//! - On a mismatch nothing of the download stays referenced: the open
//!   file's manifest and buffers are dropped, and so is its stored
//!   manifest; its readers get [`CasError::OriginCorrupt`] from then on,
//!   and the next open downloads the file again. Its chunks are left to
//!   eviction.
//! - The MD5 runs over the bytes in file order as the ingest appends them,
//!   from offset 0. An ingest that resumed a manifest from an earlier open
//!   (or skipped bytes) hashes the stored chunks instead, each read
//!   verified against its name; when one cannot be read the file is left
//!   unchecked and not complete.
//!
//! [`Origin::whole_digest`]: musicfs_origins::Origin::whole_digest

use std::fmt;

use md5::{Digest, Md5};
use musicfs_origins::WholeDigest;
use parking_lot::Mutex;
use tracing::{debug, warn};

use crate::manifest::Manifest;
use crate::CasError;

use super::*;

/// The digest an open file's download must have, and the running hash.
pub(super) struct WholeCheck {
    expected: WholeDigest,
    /// MD5 of the bytes appended so far from offset 0, and their end;
    /// `None` once the stream did not start at 0 or skipped bytes.
    running: Mutex<Option<(Md5, u64)>>,
}

impl fmt::Debug for WholeCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WholeCheck")
            .field("expected", &self.expected)
            .field("hashed", &self.running.lock().as_ref().map(|(_, n)| *n))
            .finish()
    }
}

/// What the check of a fully ingested file found.
#[derive(Debug)]
pub(super) enum Verdict {
    Match,
    Mismatch(WholeDigest),
    /// A stored chunk could not be read to hash it.
    Unchecked(CasError),
}

impl WholeCheck {
    /// `from_start`: the ingest begins at offset 0 (nothing cached yet).
    pub(super) fn new(expected: WholeDigest, from_start: bool) -> Self {
        Self {
            expected,
            running: Mutex::new(from_start.then(|| (Md5::new(), 0))),
        }
    }

    /// The ingest appended `data` at `from`.
    pub(super) fn feed(&self, from: u64, data: &[u8]) {
        let mut running = self.running.lock();
        match running.as_mut() {
            Some((md5, end)) if *end == from => {
                md5.update(data);
                *end += data.len() as u64;
            }
            _ => *running = None,
        }
    }

    /// Checks the whole file, whose chunks are all in `manifest`.
    pub(super) async fn verdict(&self, manifest: &Manifest, cache: &CacheInner) -> Verdict {
        let size = manifest.version.size;
        let hashed = self.running.lock().take();
        let md5 = match hashed {
            Some((md5, end)) if end == size => md5,
            _ => match hash_chunks(manifest, cache).await {
                Ok(md5) => md5,
                Err(e) => return Verdict::Unchecked(e),
            },
        };
        let got = match self.expected {
            WholeDigest::Md5(_) => WholeDigest::Md5(md5.finalize().into()),
        };
        if got == self.expected {
            Verdict::Match
        } else {
            Verdict::Mismatch(got)
        }
    }
}

/// MD5 of the file from its stored chunks, each verified against its name.
async fn hash_chunks(manifest: &Manifest, cache: &CacheInner) -> crate::Result<Md5> {
    let mut md5 = Md5::new();
    for chunk in manifest.chunks() {
        md5.update(&cache.store.get(chunk.id).await?);
    }
    Ok(md5)
}

/// The ingest has cached the whole file: check it against the origin's
/// digest, then store the complete manifest (`land` held it back) or drop
/// the download. True when the file counts as cached.
pub(super) async fn finish(file: &OpenFile, cache: &CacheInner) -> bool {
    let Some(check) = &file.whole else {
        return true;
    };
    let manifest = file.state.lock().manifest.clone();
    if !manifest.is_complete() {
        // Went stale meanwhile: nothing to check, nothing to store.
        return false;
    }
    match check.verdict(&manifest, cache).await {
        Verdict::Match => {
            let stale = file.state.lock().stale;
            if !stale {
                if let Err(e) =
                    cache
                        .store
                        .index()
                        .put_manifest(file.origin.id(), &file.path, &manifest)
                {
                    debug!(error = %e, "could not persist the manifest");
                }
            }
            !stale
        }
        Verdict::Mismatch(got) => {
            file.go_corrupt(cache, check.expected, got);
            false
        }
        Verdict::Unchecked(e) => {
            debug!(path = %file.path, error = %e, "cannot read the cached file back to check its digest; it stays uncached past its last chunk for now");
            false
        }
    }
}

impl OpenFile {
    /// The download of this version does not match the digest the origin
    /// states: drop everything of it (see the module docs).
    pub(super) fn go_corrupt(&self, cache: &CacheInner, expected: WholeDigest, got: WholeDigest) {
        let mut st = self.state.lock();
        st.stale = true;
        st.corrupt = Some((expected, got));
        st.manifest = Manifest::new(self.version.clone());
        st.cut.clear();
        st.cut_len = 0;
        st.tail.clear();
        drop(st);
        self.recent.lock().clear();
        cache.drop_manifest(self.origin.id(), &self.path, &self.version);
        warn!(origin = %self.origin.id(), path = %self.path, %expected, %got, "the downloaded file does not match the origin's checksum; nothing of it was cached, its readers get EIO, the next open downloads it again");
        self.progress.send_modify(|v| *v += 1);
    }

    /// The error readers of a file whose download failed its check get.
    pub(super) fn corrupt_error(&self, (expected, got): (WholeDigest, WholeDigest)) -> CasError {
        CasError::OriginCorrupt {
            origin: self.origin.id().clone(),
            path: self.path.to_string(),
            expected,
            got,
        }
    }
}
