"""fd-limit: the daemon under `prlimit --nofile=N:N` (128, then 64) while
64 distinct files are read at once, each held open while it is read.

For each limit: a fresh (cold) cache, one pass of 64 parallel whole-file
reads (ingest: origin files and chunk files open), then warm passes (chunk
files only; one in --short, four in the long form). The daemon's open fds are sampled during the passes.

Failures (always): a wrong byte, a panic, the daemon dying or not exiting
0 on SIGTERM. Failed reads (EMFILE/EIO to the reader) are counted and
reported per limit; `--strict` makes any failed read a failure too (the
daemon should queue rather than fail).
"""

import os
import threading
import time

from . import common


def nofile_limit(pid):
    """The soft RLIMIT_NOFILE of a running process, from /proc/PID/limits."""
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return None


def run(run, lib):
    a = run.args
    limits = [int(x) for x in a.limits.split(",") if x]
    files = [f for f in lib.files if lib.sizes[f] > 0]
    files.sort(key=lambda f: -lib.sizes[f])
    files = files[: a.parallel]
    if len(files) < a.parallel:
        raise common.Fatal("the library has only %d non-empty files, %d wanted; use --library"
                           % (len(files), a.parallel))
    run.figure("parallel", len(files))
    common.log("%d files of %.0f MB in all, read by %d threads at once"
               % (len(files), sum(lib.sizes[f] for f in files) / 1e6, len(files)))
    failed_by = {}
    for limit in limits:
        mp, cache = run.path("mnt-%d" % limit), run.path("cache-%d" % limit)
        root = os.path.join(mp, "lib")
        d = common.Daemon(run, mp, cache, ["lib=" + lib.root], ["--cache-size", "1G"],
                          nofile=limit, tag="nofile-%d" % limit)
        d.start()
        run.runs += 1
        soft = nofile_limit(d.pid)
        if soft != limit:
            raise common.Fatal("the daemon runs with RLIMIT_NOFILE %s, not %d" % (soft, limit))
        peak = [common.proc_fds(d.pid) or 0]
        stop_sampling = threading.Event()

        def sample():
            while not stop_sampling.is_set():
                n = common.proc_fds(d.pid)
                if n is not None:
                    peak[0] = max(peak[0], n)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        per_limit = common.Stats()
        passes = ["cold", "warm"] if a.short else ["cold"] + ["warm%d" % i for i in range(1, 5)]
        for pn, pass_name in enumerate(passes):
            st = common.Stats()
            barrier = threading.Barrier(len(files))

            def reader(k):
                rel = files[k]
                try:
                    barrier.wait(timeout=30)
                except threading.BrokenBarrierError:
                    pass
                # Small reads keep every file open for the whole pass; half
                # bypass the kernel's readahead and page cache.
                common.read_whole(lib, root, rel, st, 32 * 1024, direct=(k + pn) % 2 == 1)

            t = time.monotonic()
            threads = common.reader_threads(len(files), reader)
            stuck = common.join_all(threads, 300)
            secs = time.monotonic() - t
            if stuck:
                raise common.Fatal("%d readers still blocked after 300 s at nofile=%d"
                                   % (len(stuck), limit))
            common.log("nofile=%d %s pass: %d reads, %d failed %s, %d wrong, %.1f s, daemon fds peak %d"
                       % (limit, pass_name, st.reads, st.failed, st.errors or "", st.wrong_reads,
                          secs, peak[0]))
            for e in st.examples[:3]:
                common.log("  " + e)
            per_limit.merge(st)
            run.require_alive(d)
        stop_sampling.set()
        sampler.join()
        run.stats.merge(per_limit)
        failed_by[limit] = per_limit.failed
        run.figure("failed@%d" % limit, per_limit.failed)
        run.figure("peak_fds@%d" % limit, peak[0])
        if per_limit.wrong_reads:
            run.problem("nofile=%d: wrong bytes: %s" % (limit, "; ".join(per_limit.examples[:3])))
        if d.panicked():
            run.problem("nofile=%d: daemon panicked; log %s" % (limit, d.log))
        d.stop_checked(run)
    if a.strict and run.stats.failed:
        run.problem("--strict: %d reads failed (%s)" % (
            run.stats.failed, ", ".join("nofile=%d: %d" % kv for kv in failed_by.items())))
