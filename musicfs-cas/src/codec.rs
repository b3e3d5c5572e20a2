//! A bounds-checked reader for the little-endian records the index keeps
//! (manifests, listings). Every read of bytes from disk goes through it, so
//! a truncated or damaged record is a [`CasError::CorruptRecord`] naming the
//! record kind, never an out-of-bounds panic.

use crate::{CasError, Result};

pub(crate) fn corrupt(what: &'static str, reason: &str) -> CasError {
    CasError::CorruptRecord {
        what,
        reason: reason.to_owned(),
    }
}

pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self {
            bytes,
            pos: 0,
            what,
        }
    }

    pub(crate) fn corrupt(&self, reason: &str) -> CasError {
        corrupt(self.what, reason)
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(self.corrupt("truncated"));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    /// A u32-length-prefixed UTF-8 string.
    pub(crate) fn string(&mut self) -> Result<String> {
        let n = self.u32()? as usize;
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.corrupt("text is not UTF-8"))
    }
}
