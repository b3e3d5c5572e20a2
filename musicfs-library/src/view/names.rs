//! Names of the view: every component sanitised, unique per directory.
//!
//! Layer: inside the view (see `view.rs`). Invariants of every name made
//! here: NFC; no `/`, NUL or control character; no leading `.` (so never
//! `.` or `..`, never hidden); no trailing space or dot; never empty (the
//! placeholder instead); at most 255 bytes, cut on a character boundary,
//! a file name keeping its extension.

use std::collections::HashSet;

use unicode_normalization::UnicodeNormalization;

/// The longest name Linux filesystems take.
pub(crate) const NAME_MAX: usize = 255;

/// One path component from free text (a tag), or `placeholder` when
/// nothing is left of it.
pub(crate) fn component(text: &str, placeholder: &str) -> String {
    let mut s: String = text
        .nfc()
        .map(|c| if c == '/' || c.is_control() { '_' } else { c })
        .collect();
    let trimmed = s.trim_end_matches([' ', '.']).len();
    s.truncate(trimmed);
    let lead = s.len() - s.trim_start_matches('.').len();
    if lead > 0 {
        s.replace_range(..lead, &"_".repeat(lead));
    }
    if s.trim().is_empty() {
        return if placeholder.is_empty() {
            "_".to_owned()
        } else {
            component(placeholder, "_")
        };
    }
    cut(&s, NAME_MAX).to_owned()
}

/// A file name: `stem.ext`, the stem cut so that the whole fits.
pub(crate) fn file_name(stem: &str, ext: &str) -> String {
    if ext.is_empty() {
        return cut(stem, NAME_MAX).to_owned();
    }
    let room = NAME_MAX.saturating_sub(ext.len() + 1);
    let stem = cut(stem, room).trim_end_matches([' ', '.']);
    let stem = if stem.is_empty() { "_" } else { stem };
    format!("{stem}.{ext}")
}

/// An extension as shown: lowercase ASCII letters and digits only (else
/// none).
pub(crate) fn extension(name: &[u8]) -> String {
    let Some(dot) = name.iter().rposition(|&b| b == b'.') else {
        return String::new();
    };
    let ext = &name[dot + 1..];
    if ext.is_empty() || ext.len() > 8 || !ext.iter().all(u8::is_ascii_alphanumeric) {
        return String::new();
    }
    String::from_utf8_lossy(ext).to_ascii_lowercase()
}

/// The longest prefix of `s` of at most `max` bytes ending on a character
/// boundary.
pub(crate) fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What two names must differ in: case-folded, NFC.
pub(crate) fn fold(s: &str) -> String {
    s.nfc().flat_map(char::to_lowercase).collect()
}

/// Hands out names unique (after case folding) within one directory.
#[derive(Debug, Default)]
pub(crate) struct Unique {
    taken: HashSet<String>,
}

impl Unique {
    /// `name` itself when free, else `stem (N).ext` with the least N ≥ 2
    /// that is free.
    pub(crate) fn claim(&mut self, stem: &str, ext: &str) -> String {
        let plain = file_name(stem, ext);
        if self.taken.insert(fold(&plain)) {
            return plain;
        }
        let mut n = 2u64;
        loop {
            let suffix = format!(" ({n})");
            let room = NAME_MAX
                .saturating_sub(suffix.len() + if ext.is_empty() { 0 } else { ext.len() + 1 });
            let name = file_name(&format!("{}{suffix}", cut(stem, room)), ext);
            if self.taken.insert(fold(&name)) {
                return name;
            }
            n += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_safe() {
        assert_eq!(component("AC/DC", "x"), "AC_DC");
        assert_eq!(component("a\0b\x07c", "x"), "a_b_c");
        assert_eq!(component("..", "[Unknown]"), "[Unknown]");
        assert_eq!(component(".", "[Unknown]"), "[Unknown]");
        assert_eq!(component(".hidden", "x"), "_hidden");
        assert_eq!(component("...And Justice", "x"), "___And Justice");
        assert_eq!(component("Trailing. . ", "x"), "Trailing");
        assert_eq!(component("   ", "[Unknown Artist]"), "[Unknown Artist]");
        assert_eq!(component("", "[Unknown Album]"), "[Unknown Album]");
        // NFC: a decomposed ö becomes one character.
        assert_eq!(component("Bjo\u{308}rk", "x"), "Bj\u{f6}rk");
    }

    #[test]
    fn long_names_are_cut_on_a_character_boundary_keeping_the_extension() {
        let long = "ö".repeat(300);
        let c = component(&long, "x");
        assert!(c.len() <= NAME_MAX && c.len() >= NAME_MAX - 1);
        assert!(c.chars().all(|ch| ch == 'ö'));
        let f = file_name(&long, "flac");
        assert!(f.len() <= NAME_MAX);
        assert!(f.ends_with(".flac"));
        let mut u = Unique::default();
        let a = u.claim(&long, "flac");
        let b = u.claim(&long, "flac");
        assert_ne!(a, b);
        assert!(b.len() <= NAME_MAX && b.ends_with(" (2).flac"), "{b}");
    }

    #[test]
    fn names_that_differ_only_in_case_get_suffixes_in_order() {
        let mut u = Unique::default();
        assert_eq!(u.claim("Intro", "mp3"), "Intro.mp3");
        assert_eq!(u.claim("intro", "mp3"), "intro (2).mp3");
        assert_eq!(u.claim("INTRO", "mp3"), "INTRO (3).mp3");
        assert_eq!(u.claim("Intro", "flac"), "Intro.flac");
        assert_eq!(u.claim("Album", ""), "Album");
        assert_eq!(u.claim("album", ""), "album (2)");
    }

    #[test]
    fn extensions() {
        assert_eq!(extension(b"a.FLAC"), "flac");
        assert_eq!(extension(b"noext"), "");
        assert_eq!(extension(b"a.fl/ac"), "");
    }
}
