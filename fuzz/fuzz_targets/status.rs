//! Fuzz target: what `musicfs status`, `doctor` and `verify` read from a
//! cache directory they did not write themselves: `mount.json` (the mount's
//! record of itself), the PID in `musicfs.lock`, and the JSON answer on the
//! status socket.
//!
//! Each input becomes all three at once: it is written to `mount.json` and
//! to the lock file (which this process holds, so `lock::holder` reads the
//! PID), and a socket server thread answers `status::query` with it. Then
//! `read_mount_info`, `offline_report` and `query` run on the directory.
//!
//! Invariants checked: nothing panics; damage gives `None` (no mount
//! record, no answer), not an error the user cannot act on.

#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used)] // harness: a failed setup is a failed run

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use musicfs_cli::lock::CacheLock;
use musicfs_cli::status;

struct Env {
    dir: PathBuf,
    _lock: CacheLock,
}

static ENV: OnceLock<Env> = OnceLock::new();
/// What the socket server answers: the current input.
static ANSWER: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fn env() -> &'static Env {
    ENV.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("musicfs-fuzz-status-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the fuzz work dir");
        let lock = CacheLock::acquire(&dir).expect("take the cache lock");
        let listener =
            UnixListener::bind(dir.join(status::SOCKET)).expect("bind the status socket");
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let answer = ANSWER.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let _ = conn.write_all(&answer);
            }
        });
        Env { dir, _lock: lock }
    })
}

fuzz_target!(init: { env(); }, |data: &[u8]| {
    let env = env();
    std::fs::write(env.dir.join(status::MOUNT_INFO), data).unwrap();
    std::fs::write(env.dir.join(CacheLock::FILE_NAME), data).unwrap();
    *ANSWER.lock().unwrap_or_else(|e| e.into_inner()) = data.to_vec();
    let _ = status::read_mount_info(&env.dir);
    let offline = status::offline_report(&env.dir);
    assert!(!offline.running);
    let _ = status::query(&env.dir);
});
