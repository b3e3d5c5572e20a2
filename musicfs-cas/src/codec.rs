//! The little-endian record format the index keeps (manifests, listings):
//! writers, and a bounds-checked reader. Every read of bytes from disk goes through it, so
//! a truncated or damaged record is a [`CasError::CorruptRecord`] naming the
//! record kind, never an out-of-bounds panic.

use crate::{CasError, Result};

pub(crate) fn corrupt(what: &'static str, reason: &str) -> CasError {
    CasError::CorruptRecord {
        what,
        reason: reason.to_owned(),
    }
}

/// A u32-length-prefixed UTF-8 string.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

/// u32-length-prefixed bytes (a name, which on Linux need not be UTF-8).
pub(crate) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// An optional mtime: a flag byte, then the value when present.
pub(crate) fn put_opt_i64(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        Some(t) => {
            out.push(1);
            out.extend_from_slice(&t.to_le_bytes());
        }
        None => out.push(0),
    }
}

/// An optional string: a flag byte, then the string when present.
pub(crate) fn put_opt_str(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        Some(t) => {
            out.push(1);
            put_str(out, t);
        }
        None => out.push(0),
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

    /// What [`put_opt_i64`] wrote.
    pub(crate) fn opt_i64(&mut self) -> Result<Option<i64>> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u64()? as i64)),
            _ => Err(self.corrupt("bad mtime flag")),
        }
    }

    /// What [`put_opt_str`] wrote.
    pub(crate) fn opt_string(&mut self) -> Result<Option<String>> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.string()?)),
            _ => Err(self.corrupt("bad etag flag")),
        }
    }

    /// What [`put_str`] wrote.
    pub(crate) fn string(&mut self) -> Result<String> {
        let raw = self.bytes()?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.corrupt("text is not UTF-8"))
    }

    /// What [`put_bytes`] wrote.
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}
