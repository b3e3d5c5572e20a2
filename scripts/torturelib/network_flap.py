"""network-flap: the library on a real S3 server (SeaweedFS, started with
musicfs-servers) reached through musicfs-proxy, while the network flaps.

The mount reads `s3://music/lib` through the proxy with a small
--read-timeout (--flap-read-timeout, 5 s). Half the library is read whole
first (cached) and the cache left to settle. Then four players stream whole
files sequentially, every byte checked against the source, while the
proxy cycles at random through blackhole periods (connections stall, new
ones are accepted and never answered), resets (every open connection reset,
new ones refused for a moment), slow periods (one-way delay 50-150 ms, so
a 100-300 ms round trip, and a cap of 128 KiB/s to 1 MiB/s) and calm
periods (a 2 MiB/s link), for --duration seconds (short 40, long 120).
The players prefer files not read yet, so uncached reads keep meeting
the faults.

PASS needs:
- zero wrong bytes, also in the reads that failed part-way;
- every read of a cached file right (a failed one is a problem);
- no uncached read failing with ENOENT (the file exists; the network is
  what failed); failed uncached reads are counted and reported only;
- nothing hangs the mount: no single open or read call takes longer than
  twice the read timeout plus HANG_SLACK (a buffered read may wait for
  the kernel's readahead request and then its own, each bounded by the
  read timeout), and no player is blocked past the flapping by more than
  4 x the read timeout plus a minute;
- the daemon alive throughout, without a panic, and exiting 0 on SIGTERM;
- recovery by itself: once the proxy is calm again, every file reads right
  and the tree lists right within RECOVERY_LIMIT seconds, and `musicfs
  status --json` reports the origin healthy within the health timeout plus
  the monitor's check interval.
Figures: cached and uncached reads (ok/total), the periods of each kind,
proxy resets, the slowest cached read, recovery_s and healthy_after_s.
"""

import errno
import os
import threading
import time

from . import common, hung_origin, remote

RECOVERY_LIMIT = 90.0
# Between the faults the link is modest rather than loopback-fast, so the
# cold files are not all fetched in the first calm seconds.
CALM_RATE = 2 << 20
HEALTH_TIMEOUT = 2
HANG_SLACK = 10.0


def run(run, lib):
    a = run.args
    rt = a.flap_read_timeout
    duration = a.duration or (40.0 if a.short else 120.0)
    players = a.readers or 4
    servers_bin, proxy_bin = remote.tool_bins()

    common.log("starting SeaweedFS (S3) and uploading the library (%.0f MB)" % (lib.total_bytes() / 1e6))
    t = time.monotonic()
    try:
        srv = remote.Servers(servers_bin, "s3", [("lib", lib.root)], run.logdir)
        run.undo.append(srv.stop)
        run.figure("upload_s", round(time.monotonic() - t, 1))
        proxy = remote.Proxy(proxy_bin, srv.port, run.logdir)
        run.undo.append(proxy.stop)
    except RuntimeError as e:
        raise common.Fatal(str(e))
    info = srv.info

    cfg = os.path.join(run.work, "musicfs.toml")
    with open(cfg, "w") as f:
        # One attempt may take at most 3 s, so a stalled connection is given
        # up and retried on a fresh one inside the read timeout.
        f.write('[origin.lib]\nurl = "s3://%s/lib"\nendpoint = "http://%s"\nregion = "%s"\n'
                'timeout = 3\n' % (info["bucket"], proxy.addr, info["region"]))
    env = {"AWS_ACCESS_KEY_ID": info["access_key_id"], "AWS_SECRET_ACCESS_KEY": info["secret_access_key"],
           "AWS_REGION": info["region"]}
    mp, cache = run.path("mnt"), run.path("cache")
    root = os.path.join(mp, "lib")
    extra = ["--config", cfg, "--cache-size", "1G", "--read-timeout", str(rt),
             "--health-timeout", str(HEALTH_TIMEOUT)]
    d = common.Daemon(run, mp, cache, [], extra, tag="flap", env=env)
    d.start()
    run.runs += 1
    health_wait = HEALTH_TIMEOUT + hung_origin.CHECK_INTERVAL + hung_origin.SLACK
    if hung_origin.wait_origin(run, cache, "healthy", health_wait, d) is None:
        raise common.Fatal("the S3 origin never showed healthy before the flapping")

    files = list(lib.files)
    run.rng.shuffle(files)
    warm = set(files[: len(files) // 2])
    st = common.Stats()
    for rel in sorted(warm):
        common.read_whole(lib, root, rel, st, 1 << 20)
    for p in common.check_tree(lib, root):
        run.problem("before the flapping: " + p)
    run.stats.merge(st)
    if st.failed or st.wrong_reads:
        raise common.Fatal("reads before the flapping went wrong: %s" % "; ".join(st.examples[:3]))
    hung_origin.settle(run, cache, d)
    common.log("%d of %d files cached (%.0f MB); %d players for %.0f s of flapping, --read-timeout %d"
               % (len(warm), len(files), sum(lib.sizes[f] for f in warm) / 1e6, players, duration, rt))

    # Players prefer files never read yet, so uncached reads keep meeting
    # the outages instead of the whole library being cached in the first
    # calm seconds; a cold file that failed goes back to the pool, one read
    # whole moves to `fetched` (served from the cache from then on).
    cached, uncached, fetched_st = common.Stats(), common.Stats(), common.Stats()
    cold_pool = [f for f in files if f not in warm]
    fetched = []
    lock = threading.Lock()
    stop = threading.Event()

    def player(k):
        rng = run.child_rng()
        bufsize = [65536, 131072, 262144, 1 << 20][k % 4]
        while not stop.is_set():
            with lock:
                if cold_pool and rng.random() < 0.5:
                    rel, kind = cold_pool.pop(rng.randrange(len(cold_pool))), "cold"
                else:
                    rel = rng.choice(sorted(warm) + fetched)
                    kind = "cached" if rel in warm else "fetched"
            st = {"cold": uncached, "cached": cached, "fetched": fetched_st}[kind]
            ok = common.read_whole(lib, root, rel, st, bufsize, stop)
            if kind == "cold":
                with lock:
                    (fetched if ok and not stop.is_set() else cold_pool).append(rel)

    proxy.ctl("rate %d" % CALM_RATE)
    threads = common.reader_threads(players, player)
    phases = flap(run, proxy, d, duration)
    proxy.calm()
    calm_at = time.monotonic()
    common.log("flapping over; proxy calm")
    stop.set()
    stuck = common.join_all(threads, 4 * rt + 60)
    if stuck:
        run.problem("%d players still blocked %.0f s after the flapping ended"
                    % (len(stuck), 4 * rt + 60))
    run.figure("phases", ",".join("%s:%d" % kv for kv in phases.items()))
    run.figure("proxy_resets", proxy.stats().get("resets", "?"))
    run.figure("fetched_during_flap", "%d/%d" % (len(fetched), len(files) - len(warm)))
    judge_players(run, cached, uncached, fetched_st)
    run.require_alive(d)

    recovered = recover(run, lib, root, calm_at)
    healthy = hung_origin.wait_origin(run, cache, "healthy", health_wait, d)
    run.figure("healthy_after_s", round(healthy, 1) if healthy is not None else "never")
    if healthy is None:
        run.problem("status did not report the origin healthy within %.0f s of the network calming "
                    "(after the recovery reads)" % health_wait)
    if recovered:
        for p in common.check_tree(lib, root):
            run.problem("after the flapping: " + p)
    run.require_alive(d)
    if d.panicked():
        run.problem("daemon panicked; log %s" % d.log)
    d.stop_checked(run)


def flap(run, proxy, d, duration):
    """Cycles the proxy through blackhole, reset, slow and calm periods for
    `duration` seconds; returns how many periods of each kind ran."""
    rng = run.child_rng()
    phases = {"blackhole": 0, "reset": 0, "slow": 0, "calm": 0}
    kinds = list(phases)
    last = None
    end = time.monotonic() + duration
    while time.monotonic() < end:
        if not d.alive():
            return phases
        kind = rng.choice([k for k in kinds if k != last])
        last = kind
        phases[kind] += 1
        left = end - time.monotonic()
        if kind == "blackhole":
            secs = min(left, rng.uniform(3, 8))
            common.log("blackhole for %.1f s" % secs)
            proxy.ctl("mode blackhole")
            time.sleep(secs)
            proxy.ctl("mode forward")
        elif kind == "reset":
            secs = min(left, rng.uniform(2, 5))
            common.log("resets for %.1f s" % secs)
            t = time.monotonic()
            while time.monotonic() - t < secs:
                proxy.ctl("reset")
                if rng.random() < 0.5:
                    proxy.ctl("mode refuse")
                    time.sleep(rng.uniform(0.2, 1.0))
                    proxy.ctl("mode forward")
                time.sleep(rng.uniform(0.2, 0.8))
        elif kind == "slow":
            secs = min(left, rng.uniform(4, 8))
            delay = rng.randint(50, 150)
            rate = rng.choice([128 << 10, 512 << 10, 1 << 20])
            common.log("slow for %.1f s: RTT %d ms, %d KiB/s" % (secs, 2 * delay, rate >> 10))
            proxy.ctl("delay %d" % delay, "rate %d" % rate)
            time.sleep(secs)
            proxy.ctl("delay 0")
        else:
            secs = min(left, rng.uniform(2, 5))
            common.log("calm for %.1f s (%d KiB/s)" % (secs, CALM_RATE >> 10))
            time.sleep(secs)
        proxy.ctl("rate %d" % CALM_RATE)
    return phases


def judge_players(run, cached, uncached, fetched):
    """Merges the players' figures into the run; failed reads of files
    cached before the flapping or read whole during it, and ENOENT, are
    problems; other uncached failures are figures."""
    for s in (cached, uncached, fetched):
        run.stats.merge(s)
    for name, s in (("cached", cached), ("uncached", uncached), ("fetched", fetched)):
        run.figure(name + "_ok", "%d/%d" % (s.reads - s.failed - s.wrong_reads, s.reads))
    run.figure("cached_max_latency_s", round(max(cached.max_latency, fetched.max_latency), 3))
    # One buffered read may wait for two FUSE requests (the kernel's
    # readahead, then its retry of the page asked for), each bounded by the
    # read timeout; a longer wait is a hang.
    run.figure("uncached_max_latency_s", round(uncached.max_latency, 3))
    limit = 2 * run.args.flap_read_timeout + HANG_SLACK
    for name, s in (("cached", cached), ("uncached", uncached), ("fetched", fetched)):
        if s.max_latency > limit:
            run.problem("a %s read call took %.1f s (%s), over twice the read timeout + %.0f s"
                        % (name, s.max_latency, s.slowest, HANG_SLACK))
    if cached.reads == 0 or uncached.reads == 0:
        run.problem("the players read %d cached and %d uncached files; both kinds are needed"
                    % (cached.reads, uncached.reads))
    if cached.failed:
        run.problem("%d reads of cached files failed while the network flapped: %s"
                    % (cached.failed, "; ".join(cached.examples[:3])))
    if fetched.failed:
        run.problem("%d reads of files already read whole during the flapping failed: %s"
                    % (fetched.failed, "; ".join(fetched.examples[:3])))
    if uncached.errors.get("ENOENT"):
        run.problem("%d uncached reads failed with ENOENT while the network flapped (the file exists)"
                    % uncached.errors["ENOENT"])
    for s in (cached, uncached, fetched):
        if s.wrong_reads:
            run.problem("WRONG BYTES while the network flapped: %s"
                        % "; ".join(e for e in s.examples if e.startswith("WRONG"))[:3])
    if uncached.failed:
        common.log("uncached reads failed during outages (expected): %s"
                   % ", ".join("%s:%d" % kv for kv in sorted(uncached.errors.items())))


def recover(run, lib, root, calm_at):
    """Reads every file again until each has read right once, within
    RECOVERY_LIMIT seconds of the network calming; True if all did. The
    reads run in a thread, so a hung mount cannot hang this script."""
    todo = list(lib.files)
    st = common.Stats()
    last_err = {}

    def passes():
        while todo and time.monotonic() - calm_at < RECOVERY_LIMIT:
            for rel in list(todo):
                one = common.Stats()
                if common.read_whole(lib, root, rel, one, 1 << 20):
                    todo.remove(rel)
                elif one.examples:
                    last_err[rel] = one.examples[0]
                st.merge(one)
            if todo:
                time.sleep(0.5)

    t = threading.Thread(target=passes, daemon=True)
    t.start()
    t.join(RECOVERY_LIMIT + 60)
    secs = time.monotonic() - calm_at
    run.stats.merge(st)
    if st.wrong_reads:
        run.problem("WRONG BYTES after the network calmed: %s" % "; ".join(st.examples[:3]))
    if t.is_alive():
        run.problem("recovery reads still blocked %.0f s after the network calmed" % secs)
        run.figure("recovery_s", "hung")
        return False
    if todo:
        run.problem("%d files still did not read right %.0f s after the network calmed: %s"
                    % (len(todo), RECOVERY_LIMIT, "; ".join(last_err.get(r, r) for r in todo[:3])))
        run.figure("recovery_s", "never")
        return False
    run.figure("recovery_s", round(secs, 1))
    common.log("every file read right %.1f s after the network calmed" % secs)
    return True
