//! Tag reading of real files: the corpus generator's FLAC and MP3, and
//! M4A, Ogg Vorbis and Opus made with ffmpeg.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::*;
use crate::lazy::RangeSource;

struct FileSource(Vec<u8>);

impl RangeSource for FileSource {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&mut self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        Ok(self.0[offset as usize..(offset + len) as usize].to_vec())
    }
}

fn read(path: &Path) -> Result<(TrackTags, ReadStats)> {
    let bytes = std::fs::read(path).unwrap();
    read_tags(
        FileSource(bytes),
        path.file_name().unwrap().as_encoded_bytes(),
    )
}

fn make_library() -> PathBuf {
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/make-library");
    if beside.is_file() {
        beside
    } else {
        PathBuf::from("/work/shared/corpus/make-library")
    }
}

/// A few real files, made once per test run.
fn corpus() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("musicfs-library-tags-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        run(Command::new(make_library()).arg(&dir).args([
            "--artists",
            "1",
            "--albums",
            "1",
            "--tracks",
            "3",
            "--seconds",
            "2",
        ]));
        let wav = dir.join("tone.wav");
        run(Command::new("sox")
            .args(["-n", "-r", "44100", "-c", "2"])
            .arg(&wav)
            .args(["synth", "2", "sine", "440"]));
        let meta = [
            "-metadata",
            "title=Moov Song",
            "-metadata",
            "artist=Enc Artist",
            "-metadata",
            "album=Enc Album",
            "-metadata",
            "album_artist=Enc Band",
            "-metadata",
            "track=4/9",
            "-metadata",
            "disc=2/2",
            "-metadata",
            "date=2011-04-01",
        ];
        for (name, args) in [
            ("end.m4a", &["-c:a", "aac"][..]),
            ("fast.m4a", &["-c:a", "aac", "-movflags", "+faststart"][..]),
            ("v.ogg", &["-c:a", "libvorbis"][..]),
            ("o.opus", &["-c:a", "libopus"][..]),
        ] {
            run(Command::new("ffmpeg")
                .args(["-v", "error", "-y", "-i"])
                .arg(&wav)
                .args(meta)
                .args(args)
                .arg(dir.join(name)));
        }
        dir
    })
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .expect("run a corpus tool or encoder (scripts/setup installs sox, flac, lame, ffmpeg)");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn find(ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![corpus().to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Bytes a tag reader cannot avoid: FLAC metadata blocks, ID3v2 + ID3v1.
fn tag_bytes(bytes: &[u8]) -> u64 {
    if bytes.starts_with(b"fLaC") {
        let mut pos = 4usize;
        while pos + 4 <= bytes.len() {
            let last = bytes[pos] & 0x80 != 0;
            let len = u32::from_be_bytes([0, bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]);
            pos += 4 + len as usize;
            if last {
                break;
            }
        }
        return pos as u64;
    }
    if bytes.starts_with(b"ID3") {
        let size = bytes[6..10]
            .iter()
            .fold(0u64, |a, b| (a << 7) | u64::from(b & 0x7f));
        return 10 + size + 128;
    }
    0
}

#[test]
fn flac_and_mp3_from_the_corpus_read_within_the_budget() {
    let files: Vec<PathBuf> = find("flac").into_iter().chain(find("mp3")).collect();
    assert!(files.len() >= 6, "{files:?}");
    for f in files {
        let (t, stats) = read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
        // Files are "NN - Title.ext" in "<Year> - <Album>" folders.
        let (num, title) = stem.split_once(" - ").unwrap();
        assert_eq!(t.title.as_deref(), Some(title), "{}", f.display());
        assert_eq!(t.track, Some(num.parse().unwrap()), "{}", f.display());
        let folder = f
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let (year, album) = folder.split_once(" - ").unwrap();
        assert_eq!(t.album.as_deref(), Some(album));
        assert_eq!(t.year, Some(year.parse().unwrap()));
        assert!(t.artist.is_some());
        let bytes = std::fs::read(&f).unwrap();
        let budget = tag_bytes(&bytes) + (64 << 10);
        assert!(
            stats.fetched_bytes <= budget,
            "{}: fetched {} > {budget}",
            f.display(),
            stats.fetched_bytes
        );
    }
}

#[test]
fn m4a_ogg_and_opus_read() {
    for name in ["end.m4a", "fast.m4a", "v.ogg", "o.opus"] {
        let path = corpus().join(name);
        let (t, stats) = read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.title.as_deref(), Some("Moov Song"), "{name}");
        assert_eq!(t.album.as_deref(), Some("Enc Album"), "{name}");
        assert_eq!(t.artist.as_deref(), Some("Enc Artist"), "{name}");
        assert_eq!(t.album_artist.as_deref(), Some("Enc Band"), "{name}");
        assert_eq!(t.track, Some(4), "{name}");
        assert_eq!(t.disc, Some(2), "{name}");
        assert_eq!(t.year, Some(2011), "{name}");
        let size = std::fs::metadata(&path).unwrap().len();
        eprintln!(
            "{name}: {size} bytes, fetched {} in {} requests",
            stats.fetched_bytes, stats.requests
        );
    }
}

#[test]
fn a_big_cover_picture_is_not_fetched() {
    let flac = find("flac").remove(0);
    let dir = tempfile::tempdir().unwrap();
    let with_art = dir.path().join("art.flac");
    std::fs::copy(&flac, &with_art).unwrap();
    let jpg = dir.path().join("cover.jpg");
    let mut art = vec![0xff, 0xd8, 0xff, 0xe0];
    art.extend((0..400_000u32).map(|i| (i % 253) as u8));
    std::fs::write(&jpg, art).unwrap();
    run(Command::new("metaflac")
        .arg(format!(
            "--import-picture-from=3|image/jpeg||600x600x24|{}",
            jpg.display()
        ))
        .arg(&with_art));
    let (t, stats) = read(&with_art).unwrap();
    assert!(t.title.is_some());
    assert!(
        stats.fetched_bytes < 200_000,
        "fetched {} of a file with a 400 KB picture",
        stats.fetched_bytes
    );
}

#[test]
fn garbage_and_truncated_files_are_errors_not_panics() {
    for bytes in [
        Vec::new(),
        vec![0u8; 10],
        b"fLaC".to_vec(),
        b"ID3\x04\x00\x00\x7f\x7f\x7f\x7f".to_vec(),
        (0..100_000u32).map(|i| (i * 31 % 256) as u8).collect(),
    ] {
        assert!(read_tags(FileSource(bytes), b"x.flac").is_err());
    }
    let flac = std::fs::read(&find("flac")[0]).unwrap();
    for cut in [5usize, 40, 200, 1000] {
        let _ = read_tags(FileSource(flac[..cut].to_vec()), b"x.flac");
    }
}

#[test]
fn audio_names() {
    assert!(is_audio_name(b"a.FLAC"));
    assert!(is_audio_name(b"x y.opus"));
    assert!(!is_audio_name(b"cover.jpg"));
    assert!(!is_audio_name(b"flac"));
}
