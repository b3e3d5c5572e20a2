//! Server-side handles kept open per file version being read (SFTP).
//!
//! Layer: inside the SFTP origin. Invariants: at most [`KEPT_HANDLES`]
//! handles, least recently used dropped first; a handle belongs to one
//! connection generation and is never handed out for another (a handle of
//! a dead connection is dead).

use std::collections::VecDeque;

use openssh_sftp_client::file::File;

use crate::{FileVersion, OriginPath};

/// Server-side handles kept open for files being read.
const KEPT_HANDLES: usize = 16;

/// Handles opened for versions being read, newest last.
#[derive(Debug, Default)]
pub(super) struct Kept {
    files: VecDeque<(OriginPath, FileVersion, u64, File)>,
}

impl Kept {
    pub(super) fn get(
        &mut self,
        path: &OriginPath,
        version: &FileVersion,
        generation: u64,
    ) -> Option<File> {
        let at = self
            .files
            .iter()
            .position(|(p, v, g, _)| p == path && v == version && *g == generation)?;
        let entry = self.files.remove(at)?;
        let file = entry.3.clone();
        self.files.push_back(entry);
        Some(file)
    }

    pub(super) fn put(
        &mut self,
        path: &OriginPath,
        version: &FileVersion,
        generation: u64,
        file: File,
    ) {
        self.forget(path, version);
        // Handles of an older connection are dead anyway.
        self.files.retain(|(_, _, g, _)| *g == generation);
        while self.files.len() >= KEPT_HANDLES {
            self.files.pop_front();
        }
        self.files
            .push_back((path.clone(), version.clone(), generation, file));
    }

    pub(super) fn forget(&mut self, path: &OriginPath, version: &FileVersion) {
        self.files
            .retain(|(p, v, _, _)| !(p == path && v == version));
    }
}
