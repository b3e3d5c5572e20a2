"""cache-disk-dead: the cache disk turns read-only mid-run, then writable
again; then a cache disk far smaller than the library.

Phase 1 (read-only flip): the cache dir is a bind mount of a tmpfs (the
tmpfs itself cannot be remounted read-only while sled holds files open for
writing, so the bind mount is swapped for a read-only one, as
musicfs-test-utils/tests/resilience.rs does). Readers run all the time:
first over half the library (cached), then, with the disk read-only, over
everything (the uncached half must come from the origin with no error, the
cached half from the still-readable chunks), then, writable again, over
everything while `musicfs status` must leave DEGRADED by itself.
Phase 2 (tiny disk): an 8 MiB tmpfs under a 1 GiB --cache-size, the whole
library read twice by several readers plus random ranges.

Failures: a wrong byte, a failed read (the promise is "no error"), a panic,
the daemon dying or not exiting 0 on SIGTERM. Whether and how fast the
cache turned degraded and recovered are figures; `--strict` also fails
when no recovery is seen within 30 s of the disk turning writable.
"""

import os
import subprocess
import threading
import time

from . import common


class BindTmpfs:
    """A tmpfs seen through a bind mount. Turning it read-only stacks a
    read-only bind mount of the same tmpfs on top of the view, so the path
    never shows an empty directory in between (unmounting first would);
    turning it writable lazily drops that top mount. Everything is
    unmounted at run cleanup."""

    def __init__(self, run, size):
        self.backing = run.path("tmpfs-backing-%s" % size)
        self.view = run.path("tmpfs-view-%s" % size)
        common.sys_mount(["-t", "tmpfs", "-o", "size=%s" % size, "tmpfs"], self.backing)
        run.undo.append(lambda: common.lazy_umount(self.backing))
        common.sys_mount(["--bind", self.backing], self.view)
        run.undo.append(lambda: common.lazy_umount(self.view))

    def read_only(self):
        common.sys_mount(["--bind", self.backing], self.view)
        common.sys_mount(["-o", "remount,bind,ro"], self.view)

    def writable(self):
        if common.mount_count(self.view) < 2:
            raise common.Fatal("the read-only view of %s is not mounted" % self.view)
        subprocess.run(["umount", "-l", self.view], check=True)


class Readers:
    """Threads reading random whole files and ranges from `pool()` (which
    the phases change) until stopped."""

    def __init__(self, run, lib, root, n):
        self.run, self.lib, self.root = run, lib, root
        self.stats = common.Stats()
        self.stop = threading.Event()
        self.pool = list(lib.files)
        self.threads = common.reader_threads(n, self._read)

    def _read(self, k):
        rng = self.run.child_rng()
        while not self.stop.is_set():
            rel = rng.choice(self.pool)
            if rng.random() < 0.6:
                common.read_whole(self.lib, self.root, rel, self.stats, rng.choice([65536, 131072, 1 << 20]),
                                  direct=rng.random() < 0.5)
            else:
                off, n = common.random_range(rng, self.lib.sizes[rel])
                common.read_range(self.lib, self.root, rel, off, n, self.stats, direct=rng.random() < 0.5)

    def finish(self):
        self.stop.set()
        if common.join_all(self.threads, 120):
            raise common.Fatal("readers still blocked 120 s after being told to stop")
        return self.stats


def wait_status(run, cache, pred, timeout, d):
    """Polls `musicfs status --json` until pred(report); seconds it took or None."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        run.require_alive(d)
        st = common.status_json(run, cache)
        if st is not None and pred(st):
            return time.monotonic() - t
        time.sleep(0.25)
    return None


def phase_read_only(run, lib):
    a = run.args
    step = 5.0 if a.short else 30.0
    fs = BindTmpfs(run, "512m")
    mp = run.path("mnt-ro")
    root = os.path.join(mp, "lib")
    d = common.Daemon(run, mp, fs.view, ["lib=" + lib.root], ["--cache-size", "1G"], tag="ro")
    d.start()
    run.runs += 1
    cycles = 1 if a.short else 3
    files = list(lib.files)
    run.rng.shuffle(files)
    # Group 0 is cached before the first flip; each cycle adds an uncached
    # group, so every read-only spell has ingest writes to fail.
    groups = [files[i::cycles + 1] for i in range(cycles + 1)]
    st = common.Stats()
    for rel in groups[0]:
        common.read_whole(lib, root, rel, st, 1 << 20)
    run.stats.merge(st)
    wait_status(run, fs.view, lambda s: True, 5, d)
    readers = Readers(run, lib, root, a.readers or 3)
    readers.pool = groups[0]
    time.sleep(step / 2)
    to_degraded, to_recover = [], []
    for c in range(cycles):
        common.log("cycle %d: cache disk -> read-only" % c)
        fs.read_only()
        readers.pool = [f for g in groups[: c + 2] for f in g]
        t = wait_status(run, fs.view, lambda s: bool(s.get("degraded")), step * 2, d)
        to_degraded.append(t)
        st = common.status_json(run, fs.view) or {}
        common.log("cycle %d: degraded after %s s: %s" % (c, t, st.get("degraded")))
        time.sleep(step)
        run.require_alive(d)

        common.log("cycle %d: cache disk -> writable" % c)
        fs.writable()
        t = wait_status(run, fs.view, lambda s: not s.get("degraded"), 30, d)
        to_recover.append(t)
        common.log("cycle %d: recovered after %s s" % (c, t))
        if t is None and a.strict:
            run.problem("--strict: cycle %d: still degraded 30 s after the cache disk turned writable" % c)
        time.sleep(step)

    def worst(ts):
        return "never" if any(t is None for t in ts) else "%.1fs" % max(ts)

    run.figure("ro_cycles", cycles)
    run.figure("time_to_degraded", worst(to_degraded))
    run.figure("time_to_recover", worst(to_recover))
    st = readers.finish()
    run.stats.merge(st)
    common.log("phase 1: %d reads, %d failed, %d wrong" % (st.reads, st.failed, st.wrong_reads))
    # After recovery the cold half must be cacheable again: read it all.
    st2 = common.Stats()
    for rel in files:
        common.read_whole(lib, root, rel, st2, 1 << 20)
    run.stats.merge(st2)
    end = common.status_json(run, fs.view) or {}
    run.figure("phase1_cache_mb", round(end.get("cache_size", 0) / 1e6, 1))
    run.require_alive(d)
    d.stop_checked(run)
    # The read-only episode must leave nothing for verify to find (the cache
    # holds the whole library, so nothing was evicted).
    code, _, path = common.verify(run, fs.view, "after-read-only")
    run.figure("verify_exit", code)
    if code != 0:
        run.problem("musicfs verify exited %d after the read-only episode: %s" % (code, path))


def phase_tiny_disk(run, lib):
    a = run.args
    fs = BindTmpfs(run, "8m")
    mp = run.path("mnt-tiny")
    root = os.path.join(mp, "lib")
    d = common.Daemon(run, mp, fs.view, ["lib=" + lib.root], ["--cache-size", "1G"], tag="tiny")
    d.start()
    run.runs += 1
    n = a.readers or 3
    st = common.Stats()
    seen_degraded = [None]

    def reader(k):
        rng = run.child_rng()
        for _ in range(2):
            files = list(lib.files)
            rng.shuffle(files)
            for rel in files[k::n]:
                common.read_whole(lib, root, rel, st, rng.choice([65536, 1 << 20]), direct=rng.random() < 0.5)
                off, ln = common.random_range(rng, lib.sizes[rel])
                common.read_range(lib, root, rel, off, ln, st, direct=rng.random() < 0.5)

    threads = common.reader_threads(n, reader)
    peak = 0
    while any(t.is_alive() for t in threads):
        run.require_alive(d)
        s = common.status_json(run, fs.view)
        if s:
            peak = max(peak, s.get("cache_size", 0))
            if s.get("degraded") and not seen_degraded[0]:
                seen_degraded[0] = s["degraded"]
        time.sleep(0.5)
    run.stats.merge(st)
    common.log("phase 2: %d reads, %d failed, %d wrong; degraded: %s"
               % (st.reads, st.failed, st.wrong_reads, seen_degraded[0]))
    run.figure("tiny_peak_cache_mb", round(peak / 1e6, 1))
    run.figure("tiny_degraded_seen", "yes" if seen_degraded[0] else "no")
    run.require_alive(d)
    d.stop_checked(run)


def run(run, lib):
    phase_read_only(run, lib)
    phase_tiny_disk(run, lib)
    s = run.stats
    if s.failed:
        run.problem("%d reads failed (a dead cache disk must not show): %s"
                    % (s.failed, "; ".join(s.examples[:3])))
    if s.wrong_reads:
        run.problem("wrong bytes: %s" % "; ".join(s.examples[:3]))
