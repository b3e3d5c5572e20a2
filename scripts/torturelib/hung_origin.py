"""hung-origin: the origin is a bindfs FUSE mount whose server is stopped
with SIGSTOP, like a dead NAS mount: every call into it blocks.

Before the stop: half the library is read whole (cached) and the whole tree
listed. While stopped (all client reads in child processes with timeouts,
so this script never hangs):
- cached files and the listing must read right within --cached-max (1 s);
- uncached files must fail with EIO within --read-timeout (+2 s), read
  both with O_DIRECT (one request per read) and buffered (the kernel's
  readahead first, then its retry of the single page a reader waits for);
- `musicfs status --json` must report the origin unhealthy within
  --health-timeout + the monitor's 10 s check interval (+2 s);
- SIGTERM, sent while reads hang on the origin, must end the daemon with
  exit 0 (the time it takes is a figure; over 30 s fails).
After SIGCONT: a new mount on the same mountpoint and cache serves every
file right and lists the whole tree.

bindfs is always continued and unmounted, and its PID (which this script
started) ended, in cleanup, even when the run fails.
"""

import errno
import os
import signal
import subprocess
import threading
import time

from . import common

CHECK_INTERVAL = 10.0   # musicfs-cli/src/mount.rs: health.spawn(Duration::from_secs(10))
SLACK = 2.0


class Bindfs:
    def __init__(self, run, src, dst):
        self.dst = dst
        self.log = os.path.join(run.logdir, "bindfs.log")
        self.stopped = False
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(["bindfs", "-f", src, dst], stdout=f, stderr=f,
                                         stdin=subprocess.DEVNULL)
        run.undo.append(self.cleanup)
        t = time.monotonic()
        while not common.is_mounted(dst):
            if self.proc.poll() is not None or time.monotonic() - t > 15:
                raise common.Fatal("bindfs did not mount %s: %s" % (dst, common.tail(self.log)))
            time.sleep(0.05)

    def stop(self):
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stopped = True

    def cont(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.stopped = False

    def cleanup(self):
        self.cont()
        common.fuse_unmount(self.dst)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run(run, lib):
    a = run.args
    rt, ht = a.read_timeout, a.health_timeout
    origin_mp = run.path("origin", "lib")
    mp, cache = run.path("mnt"), run.path("cache")
    root = os.path.join(mp, "lib")
    bfs = Bindfs(run, lib.root, origin_mp)
    extra = ["--cache-size", "1G", "--read-timeout", str(rt), "--health-timeout", str(ht)]
    d = common.Daemon(run, mp, cache, ["lib=" + origin_mp], extra, tag="hung")
    d.start()
    run.runs += 1
    healthy = wait_origin(run, cache, "healthy", ht + CHECK_INTERVAL + SLACK, d)
    if healthy is None:
        raise common.Fatal("the origin never showed healthy before the stop")

    files = [f for f in lib.files]
    run.rng.shuffle(files)
    warm = files[: len(files) // 2]
    cold = [f for f in files[len(files) // 2:] if lib.sizes[f] > 0]
    n_cold = 4 if a.short else 8
    cold, term_cold = cold[:n_cold], cold[n_cold:n_cold + 2]
    st = common.Stats()
    for rel in warm:
        common.read_whole(lib, root, rel, st, 1 << 20)
    for p in common.check_tree(lib, root):
        run.problem("before the stop: " + p)
    run.stats.merge(st)
    if st.failed or st.wrong_reads:
        raise common.Fatal("reads before the stop went wrong: %s" % "; ".join(st.examples[:3]))
    settle(run, cache, d)

    common.log("SIGSTOP bindfs PID %d" % bfs.proc.pid)
    t0 = time.monotonic()
    bfs.stop()
    try:
        # Status polling runs beside the reads, from the moment of the stop.
        unhealthy_after = [None]

        def poll_health():
            unhealthy_after[0] = wait_origin(run, cache, "unhealthy", ht + CHECK_INTERVAL + SLACK + 5, d, t0)

        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()

        # Uncached reads, all at once: each must end in EIO within the read timeout.
        eio = [None] * len(cold)

        def cold_read(k):
            eio[k] = common.timed_read(os.path.join(root, cold[k]), rt * 4 + 10, direct=k % 2 == 0)

        ts = common.reader_threads(len(cold), cold_read)
        # Cached reads and the listing, while the uncached ones hang.
        # Every file read before the stop, 16 at a time (a cached read must
        # not queue behind the hung ones, nor behind each other).
        results = [None] * len(warm)
        todo = list(range(len(warm)))
        lock = threading.Lock()

        def cached_read(_):
            while True:
                with lock:
                    if not todo:
                        return
                    k = todo.pop()
                results[k] = common.timed_read(os.path.join(root, warm[k]), max(15, rt * 5),
                                               direct=k % 2 == 0)

        common.join_all(common.reader_threads(16, cached_read), max(15, rt * 5) * len(warm) + 30)
        cached_max = 0.0
        not_cached = 0
        for rel, r in zip(warm, results):
            if r is None:
                r = ("timeout", None, 0, 0.0)
            status, digest, size, secs = r
            cached_max = max(cached_max, secs)
            not_cached += check_cached(run, lib, rel, status, digest, size, secs)
        if not_cached:
            run.problem("%d of %d files read whole before the stop did not read while the origin "
                        "hangs (not fully cached)" % (not_cached, len(warm)))
        status, n, secs = common.timed_walk(root, max(10, rt * 4))
        run.figure("listing_s", round(secs, 3))
        if status != "ok":
            run.problem("listing while the origin hangs: %s after %.1f s" % (
                status if status == "timeout" else errno.errorcode.get(n, n), secs))
        elif secs > a.cached_max:
            run.problem("listing took %.2f s while the origin hangs (limit %.1f s)" % (secs, a.cached_max))
        cached_max = max(cached_max, secs)
        run.figure("cached_max_s", round(cached_max, 3))
        run.figure("cached_ok", "%d/%d" % (len(warm) - not_cached, len(warm)))
        common.join_all(ts, rt * 4 + 20)
        eio = [r or ("timeout", None, 0, float(rt * 4 + 20)) for r in eio]
        worst = {"direct": 0.0, "buffered": 0.0}
        for k, (rel, r) in enumerate(zip(cold, eio)):
            status, code, _, secs = r
            how = "direct" if k % 2 == 0 else "buffered"
            worst[how] = max(worst[how], secs)
            if status == "err" and code == errno.EIO:
                run.stats.fail(rel, OSError(errno.EIO, "EIO (expected)"))
                if secs > rt + SLACK:
                    run.problem("uncached %s (%s read): EIO after %.1f s (--read-timeout %d)"
                                % (rel, how, secs, rt))
            elif status == "ok":
                # Cannot happen with the origin stopped, unless it was cached.
                run.problem("uncached %s read while the origin is stopped (%s)" % (
                    rel, "right" if code == lib.digest(rel) else "WRONG bytes"))
            else:
                run.problem("uncached %s: %s after %.1f s, expected EIO within %d s" % (
                    rel, "no answer" if status == "timeout" else errno.errorcode.get(code, code), secs, rt))
        run.figure("time_to_eio_direct_s", round(worst["direct"], 2))
        run.figure("time_to_eio_buffered_s", round(worst["buffered"], 2))
        run.figure("uncached_eio", "%d/%d" % (sum(1 for r in eio if r[0] == "err" and r[1] == errno.EIO),
                                              len(cold)))
        poller.join()
        if unhealthy_after[0] is None:
            run.problem("status never reported the origin unhealthy within %.0f s" %
                        (ht + CHECK_INTERVAL + SLACK + 5))
            run.figure("time_to_unhealthy_s", "never")
        else:
            run.figure("time_to_unhealthy_s", round(unhealthy_after[0], 1))
            if unhealthy_after[0] > ht + CHECK_INTERVAL + SLACK:
                run.problem("status reported the origin unhealthy only after %.1f s "
                            "(--health-timeout %d + %d s interval)" % (unhealthy_after[0], ht, CHECK_INTERVAL))
        run.require_alive(d)
        if d.panicked():
            run.problem("daemon panicked while the origin hung; log %s" % d.log)
        # SIGTERM with reads stuck on the hung origin in flight.
        pending = common.reader_threads(len(term_cold), lambda k: common.timed_read(
            os.path.join(root, term_cold[k]), 60, direct=k % 2 == 0))
        time.sleep(0.5)
        secs = d.stop_checked(run, timeout=30)
        if common.join_all(pending, 60):
            run.problem("reads in flight at SIGTERM still hang 60 s later")
        run.figure("sigterm_exit_s", round(secs, 2) if secs is not None else "n/a")
        common.log("SIGTERM ended the daemon in %s s" % (None if secs is None else round(secs, 2)))
    finally:
        bfs.cont()
        common.log("SIGCONT bindfs")

    # The origin is back: a new mount serves everything right.
    common.fuse_unmount(mp)
    d2 = common.Daemon(run, mp, cache, ["lib=" + origin_mp], extra, tag="after")
    d2.start()
    run.runs += 1
    st = common.Stats()
    for rel in lib.files:
        common.read_whole(lib, root, rel, st, 1 << 20)
    for p in common.check_tree(lib, root):
        run.problem("after SIGCONT: " + p)
    run.stats.merge(st)
    if st.failed or st.wrong_reads:
        run.problem("after SIGCONT: %d failed, %d wrong: %s"
                    % (st.failed, st.wrong_reads, "; ".join(st.examples[:3])))
    back = wait_origin(run, cache, "healthy", ht + CHECK_INTERVAL + SLACK, d2)
    run.figure("healthy_again", "yes" if back is not None else "no")
    if back is None:
        run.problem("the origin did not show healthy again after SIGCONT")
    run.require_alive(d2)
    d2.stop_checked(run)


def check_cached(run, lib, rel, status, digest, size, secs):
    """Records one read of a file read before the stop; 1 if it failed."""
    run.stats.latency(secs, "cached read " + rel)
    if status == "ok" and digest == lib.digest(rel):
        run.stats.ok(size)
        if secs > run.args.cached_max:
            run.problem("cached %s took %.2f s while the origin hangs (limit %.1f s)"
                        % (rel, secs, run.args.cached_max))
        return 0
    if status == "ok":
        run.stats.wrong(rel + " (cached, origin hung)", size, max(1, abs(size - lib.sizes[rel])))
        run.problem("cached %s: WRONG bytes while the origin hangs" % rel)
        return 0
    run.stats.fail(rel, OSError(digest or 0, status))
    common.log("cached %s: %s after %.1f s while the origin hangs" % (
        rel, "no answer" if status == "timeout" else errno.errorcode.get(digest, digest), secs))
    return 1


def wait_origin(run, cache, state, timeout, d, since=None):
    """Seconds (from `since`, default now) until status shows origin 'lib'
    in `state`; None if it did not within `timeout`."""
    t0 = since if since is not None else time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not d.alive():
            return None
        st = common.status_json(run, cache, timeout=5)
        for o in (st or {}).get("origins", []):
            if o.get("name") == "lib" and o.get("state") == state:
                return time.monotonic() - t0
        time.sleep(0.25)
    return None


def settle(run, cache, d, quiet=1.0, limit=20):
    """Waits until the cache stops growing (background chunk writes done)."""
    last, since, t = None, time.monotonic(), time.monotonic()
    while time.monotonic() - t < limit:
        run.require_alive(d)
        st = common.status_json(run, cache) or {}
        cur = (st.get("chunks"), st.get("cache_size"))
        if cur != last:
            last, since = cur, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.2)
