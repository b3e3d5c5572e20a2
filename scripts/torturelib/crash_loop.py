"""crash-loop: kill -9 the daemon at a random moment while it serves reads,
again and again; each next `musicfs mount` must clear the dead mount by
itself, and at the end every file equals the origin and `musicfs verify`
is clean.

Promises checked (each a failure when broken): every byte read before a
kill is right; no read fails before the kill; every restart comes up on the
stale mountpoint with no manual fusermount; the final full comparison reads
every file right; SIGTERM ends the last daemon with exit 0; verify exits 0.
The cache holds about half the library by default, so kills also land
during eviction; `musicfs verify` counts evicted chunks but reports only
damage.
Early iterations kill during ingest, later ones mostly during cache hits.
"""

import errno
import os
import threading
import time

from . import common


class KillAwareStats(common.Stats):
    """Failures after `killing` is set are counted apart: they are the kill's."""

    def __init__(self, killing):
        super().__init__()
        self.killing = killing
        self.interrupted = 0

    def fail(self, what, err):
        if self.killing.is_set():
            with self.lock:
                self.interrupted += 1
        else:
            super().fail(what, err)


def run(run, lib):
    a = run.args
    iterations = a.iterations or (5 if a.short else 50)
    cache_size = a.cache_size or "%dM" % max(16, lib.total_bytes() // 2 // common.MIB)
    mp, cache = run.path("mnt"), run.path("cache")
    root = os.path.join(mp, "lib")
    origin = "lib=" + lib.root
    big = lib.biggest()
    run.figure("iterations", iterations)
    run.figure("cache_size", cache_size)
    common.log("library %s: %d files, %.0f MB, big file %.0f MB; cache %s"
               % (lib.root, len(lib.files), lib.total_bytes() / 1e6, lib.sizes[big] / 1e6, cache_size))

    interrupted = 0
    stale_seen = 0
    dirty = 0
    for i in range(iterations):
        if i > 0:
            # The dead mount must still be there for the daemon to clear.
            try:
                os.listdir(mp)
            except OSError as e:
                if e.errno == errno.ENOTCONN:
                    stale_seen += 1
        d = common.Daemon(run, mp, cache, [origin], ["--cache-size", cache_size], tag="crash")
        d.start()
        run.runs += 1
        killing = threading.Event()
        st = KillAwareStats(killing)

        # No new read starts once the kill is decided; those in flight run
        # into it, so "cut off by the kill" counts reads the kill hit.
        def reader(k):
            rng = run.child_rng()
            while not killing.is_set():
                if k == 0:
                    rel, buf = big, rng.choice([64 * 1024, 128 * 1024, common.MIB])
                    common.read_whole(lib, root, rel, st, buf, direct=rng.random() < 0.5)
                elif k == 1:
                    files = list(lib.files)
                    rng.shuffle(files)
                    for rel in files:
                        if killing.is_set():
                            break
                        common.read_whole(lib, root, rel, st, 128 * 1024, direct=rng.random() < 0.5)
                else:
                    rel = rng.choice(lib.files)
                    off, n = common.random_range(rng, lib.sizes[rel])
                    common.read_range(lib, root, rel, off, n, st, direct=rng.random() < 0.5)

        threads = common.reader_threads(3, reader)
        delay = run.rng.uniform(0.05, a.kill_within)
        time.sleep(delay)
        run.require_alive(d)
        # Reads failing from here on were cut off by the kill: expected.
        killing.set()
        d.kill9()
        stuck = common.join_all(threads, 30)
        if stuck:
            raise common.Fatal("%d reader threads still blocked 30 s after kill -9" % len(stuck))
        run.stats.merge(st)
        interrupted += st.interrupted
        if st.wrong_reads:
            run.problem("iteration %d: wrong bytes: %s" % (i, "; ".join(st.examples)))
        if d.panicked():
            run.problem("iteration %d: daemon panicked; log %s" % (i, d.log))
        common.log("iteration %d: killed PID %d after %.2f s; %d reads (%.0f MB), %d cut off by the kill"
                   % (i, d.pid, delay, st.reads, st.bytes / 1e6, st.interrupted))
        if a.verify_each:
            code, report, path = common.verify(run, cache, "after-kill-%02d" % i)
            if code != 0 or not (report or {}).get("clean", False):
                dirty += 1
                common.log("iteration %d: verify after kill not clean (exit %d): %s" % (i, code, path))

    if run.stats.failed:
        run.problem("%d reads failed while the daemon was up: %s"
                    % (run.stats.failed, "; ".join(run.stats.examples[:3])))
    # Last round: mount on the stale mountpoint again, compare everything.
    try:
        os.listdir(mp)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            stale_seen += 1
    d = common.Daemon(run, mp, cache, [origin], ["--cache-size", cache_size], tag="final")
    d.start()
    final = common.Stats()
    for rel in lib.files:
        common.read_whole(lib, root, rel, final, 256 * 1024)
    for p in common.check_tree(lib, root):
        run.problem("final: " + p)
    run.stats.merge(final)
    if final.failed or final.wrong_reads:
        run.problem("final comparison: %d failed, %d wrong: %s"
                    % (final.failed, final.wrong_reads, "; ".join(final.examples[:3])))
    run.require_alive(d)
    st = common.status_json(run, cache)
    d.stop_checked(run)
    code, report, path = common.verify(run, cache, "final")
    run.figure("verify_exit", code)
    if code != 0:
        run.problem("musicfs verify exited %d after the loop: %s" % (code, path))
    if report:
        run.figure("verified_chunks", report.get("chunks_checked"))
    run.figure("stale_mounts_recovered", "%d/%d" % (stale_seen, iterations))
    if stale_seen != iterations:
        # Not a failure: the kernel may have dropped the dead mount already;
        # the promise is that mount comes up by itself, which start() checked.
        common.log("note: only %d of %d kills left a stale mount behind" % (stale_seen, iterations))
    run.figure("interrupted_by_kill", interrupted)
    if a.verify_each:
        run.figure("dirty_verifies_after_kill", dirty)
        if dirty:
            run.problem("%d verify runs right after a kill were not clean" % dirty)
    if st:
        run.figure("final_hit_ratio", round(st.get("hit_ratio") or 0.0, 3))
