"""soak: N readers for M minutes reading random files and ranges over a
library larger than the cache (--cache-size 32M by default), so eviction
runs all the time. Every few seconds the daemon's RSS (VmRSS), open fds,
threads and cache use are sampled and printed.

Failures: a wrong byte, a failed read, a panic, the daemon dying or not
exiting 0 on SIGTERM, the cache growing past its limit by more than 25 %.
Whether RSS and fds stay flat is printed as figures (first sample after
warm-up, peak, last, and fds once the readers have stopped); `--strict`
also fails when fds after the readers stop exceed the first sample by more
than 16 (a leak), or RSS at the end exceeds the warm-up sample by over 50 %.
"""

import os
import threading
import time

from . import common


def run(run, lib):
    a = run.args
    readers = a.readers or (4 if a.short else 8)
    duration = a.duration or (60.0 if a.short else 600.0)
    every = a.sample_every or (5.0 if a.short else 15.0)
    cache_size = a.cache_size or "32M"
    mp, cache = run.path("mnt"), run.path("cache")
    root = os.path.join(mp, "lib")
    d = common.Daemon(run, mp, cache, ["lib=" + lib.root], ["--cache-size", cache_size], tag="soak")
    d.start()
    run.runs += 1
    common.log("%d readers for %.0f s over %.0f MB with --cache-size %s"
               % (readers, duration, lib.total_bytes() / 1e6, cache_size))
    run.figure("readers", readers)
    run.figure("duration_s", int(duration))
    run.figure("cache_size", cache_size)
    stop = threading.Event()
    st = common.Stats()

    def reader(k):
        rng = run.child_rng()
        while not stop.is_set():
            rel = rng.choice(lib.files)
            direct = rng.random() < 0.5
            if rng.random() < 0.3:
                common.read_whole(lib, root, rel, st, rng.choice([16384, 131072, 1 << 20]), stop, direct)
            else:
                off, n = common.random_range(rng, lib.sizes[rel])
                common.read_range(lib, root, rel, off, n, st, direct)

    threads = common.reader_threads(readers, reader)
    samples = []
    limit = None
    t0 = time.monotonic()
    print("  %6s %8s %5s %7s %14s %7s %8s %9s" % ("t", "rss_MB", "fds", "threads", "cache_MB/limit",
                                                   "chunks", "reads", "hit"), flush=True)
    while True:
        now = time.monotonic() - t0
        run.require_alive(d)
        rss, fds, thr = common.proc_rss_kb(d.pid), common.proc_fds(d.pid), common.proc_threads(d.pid)
        s = common.status_json(run, cache) or {}
        limit = s.get("cache_limit") or limit
        samples.append((now, rss or 0, fds or 0, thr or 0, s.get("cache_size", 0)))
        print("  %5.0fs %8.1f %5s %7s %6.1f/%-7.1f %7s %8d %8s" % (
            now, (rss or 0) / 1024, fds, thr, s.get("cache_size", 0) / 1e6, (limit or 0) / 1e6,
            s.get("chunks"), st.reads,
            "%.0f%%" % (100 * s["hit_ratio"]) if s.get("hit_ratio") is not None else "-"), flush=True)
        if now >= duration:
            break
        time.sleep(min(every, max(0.0, duration - now)))
    stop.set()
    if common.join_all(threads, 120):
        raise common.Fatal("readers still blocked 120 s after being told to stop")
    time.sleep(2)
    run.require_alive(d)
    fds_idle = common.proc_fds(d.pid)
    final = common.status_json(run, cache) or {}
    run.stats.merge(st)

    # Figures: the first sample after warm-up (a fifth of the run, at least
    # the second sample) is the baseline for "flat".
    warm = next((x for x in samples if x[0] >= duration / 5), samples[min(1, len(samples) - 1)])
    rss = [x[1] for x in samples]
    fds = [x[2] for x in samples]
    peak_cache = max(x[4] for x in samples)
    run.figure("rss_mb_warm/peak/end", "%.0f/%.0f/%.0f" % (warm[1] / 1024, max(rss) / 1024, rss[-1] / 1024))
    run.figure("fds_warm/peak/end/idle", "%d/%d/%d/%s" % (warm[2], max(fds), fds[-1], fds_idle))
    run.figure("threads_peak", max(x[3] for x in samples))
    run.figure("peak_cache_mb", round(peak_cache / 1e6, 1))
    run.figure("hit_ratio", round(final.get("hit_ratio") or 0.0, 3))
    # status counts bytes the ingest fetched as hits; origin_bytes are only
    # reads that went straight to the origin.
    run.figure("direct_origin_mb", round(final.get("origin_bytes", 0) / 1e6))
    if limit and peak_cache > limit * 1.25:
        run.problem("the cache grew to %.1f MB, over its %.1f MB limit" % (peak_cache / 1e6, limit / 1e6))
    if st.failed:
        run.problem("%d reads failed: %s" % (st.failed, "; ".join(st.examples[:3])))
    if st.wrong_reads:
        run.problem("wrong bytes: %s" % "; ".join(st.examples[:3]))
    if d.panicked():
        run.problem("daemon panicked; log %s" % d.log)
    if a.strict:
        if fds_idle is not None and fds_idle > warm[2] + 16:
            run.problem("--strict: %d fds open after the readers stopped, %d at warm-up" % (fds_idle, warm[2]))
        if rss[-1] > warm[1] * 1.5:
            run.problem("--strict: RSS grew from %.0f MB to %.0f MB" % (warm[1] / 1024, rss[-1] / 1024))
    d.stop_checked(run)
