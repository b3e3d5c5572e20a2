"""rewrite: tracks change on the origin while they are played.

Readers stream tracks through the mount (whole files in various buffer
sizes, some paced like a player, some stopping part way until the file
changes; random ranges on one handle), 30 % with O_DIRECT, 20 % with the
page cache dropped, the rest plain buffered like a player. Meanwhile a
writer changes a few "hot" tracks of a copy of the library, the origin, the
way taggers and sync tools do:
- in place, same size: one pwrite of a region (like metaflac writing into
  padding) or of the whole file, then os.utime to a new distinct mtime;
- by rename: a temp file in the same directory with new content (a region
  replaced, sometimes by more or fewer bytes), then os.replace (beets, rsync);
- now and then a delete, and a recreate a few seconds later.
Every version the writer made is kept (versions.py), so every read is
checked against all of them.

Promises checked, each a failure when broken:
- one version per read: each read's bytes are exactly one version's bytes
  at that offset, and all reads of one handle come from one version (an end
  of file before that version's size counts as wrong too);
- a handle's read fails only with ESTALE (counted), and only on a file that
  changed; an open fails only with ENOENT, and only around a delete;
- freshness: an open that starts more than BOUND after a change still
  binding to the version before it (readers), or a sampled change not seen
  by a new open within BOUND (the freshness checker, which opens the file
  again and again after a change and reports the staleness: how long after
  the change the first open saw the new version);
- at the end (writer stopped, FLACs restored with metaflac, BOUND waited
  out): every file through the mount equals the origin byte for byte,
  the listing agrees with the origin, `flac -t` passes on every FLAC
  through the mount, `musicfs status --json` answers, SIGTERM exits 0 and
  `musicfs verify` on the cache exits 0;
- and that the run tortured at all: some handles saw a change while open,
  some changes were sampled for freshness.

BOUND = FRESHNESS + 1 s. FRESHNESS is FsConfig::default().freshness
(musicfs-fuse/src/lib.rs; `musicfs mount` has no flag for it yet). An open
always reaches the daemon, which (fs/fresh.rs) binds it to the listing entry
or its last check when that is at most FRESHNESS old (stamped before the
origin was asked), else stats the file; a name the listing lacks is listed
again under the same rule. So the daemon's own bound is FRESHNESS, and the
staleness figures (max, median) are expected below it. The extra second is
slack for what lies outside the daemon's clock: the kernel's entry and
attribute TTL (FsConfig::kernel_ttl, 1 s; the attributes a buffered read is
checked against) and a loaded machine between the writer's clock and the
open.

Not exempted: a read racing the writer's own in-place pwrite on the
origin could see a half-written file under one (size, mtime), which no
version check can tell apart (as with `touch -r`, see the runbook). For
MusicFS to serve one, its stat and its origin read would both have to land
inside that pwrite (microseconds, one syscall), so such a failure is far
less likely than a real mix; a read that blends the two sides of one
in-place change says so in its failure line.
"""

import errno
import os
import shutil
import statistics
import subprocess
import threading
import time

from . import common
from .versions import Content, FileVersions, HandleCheck, describe

FRESHNESS = 2.0
BOUND = FRESHNESS + 1.0
# Synthetic mtimes start in 2001: never equal to the "now" a write stamps,
# so the half-written state of an in-place change has a version of its own.
MTIME_BASE_NS = 1_000_000_000 * 1_000_000_000
BUFSIZES = [4096, 7919, 16384, 65536 + 123, 131072, 1 << 20]
REGIONS = [4096, 16384, 65536, 262144]
WHOLE_MAX = 4 * common.MIB      # in-place rewrites of the whole file only up to this size
FIRST_TAGS = 65536              # "tags": the first 64 KiB of a file


class Failures:
    """Broken promises by kind, with the first examples, also written to
    failures.log in the run's log dir."""

    def __init__(self, run):
        self.run = run
        self.lock = threading.Lock()
        self.by_kind = {}
        self.path = os.path.join(run.logdir, "failures.log")

    def add(self, kind, msg):
        line = "%s %s: %s" % (time.strftime("%H:%M:%S"), kind, msg)
        with self.lock:
            n = self.by_kind.setdefault(kind, [0, []])
            n[0] += 1
            if len(n[1]) < 3:
                n[1].append(msg)
                common.log("FAILURE " + kind + ": " + msg)
            with open(self.path, "a") as f:
                f.write(line + "\n")

    def report(self):
        for kind, (n, ex) in self.by_kind.items():
            self.run.problem("%d x %s; first: %s" % (n, kind, " | ".join(ex)))

    def count(self):
        with self.lock:
            return sum(n for n, _ in self.by_kind.values())


class Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = {}

    def add(self, key, n=1):
        with self.lock:
            self.c[key] = self.c.get(key, 0) + n

    def get(self, key):
        with self.lock:
            return self.c.get(key, 0)


class Writer:
    """Changes hot tracks on the origin; the only writer there."""

    def __init__(self, run, origin, files, hot, counters, log_path):
        self.origin = origin
        self.files = files
        self.hot = hot
        self.rng = run.child_rng()
        self.counters = counters
        self.serial = 0
        self.log = open(log_path, "a")
        self.deleted_at = {}    # rel -> (time, when to recreate)
        self.on_change = []     # callbacks (rel, k, t_done)
        self.t_start = time.monotonic()

    def close(self):
        self.log.close()

    def mtime(self):
        self.serial += 1
        return MTIME_BASE_NS + self.serial * 1_000_000_007

    def _note(self, fv, v, extra=""):
        t = fv.finish(v)
        self.counters.add("changes")
        self.counters.add("change_" + v.kind)
        size = "absent" if v.content is None else "%d B" % v.content.size
        self.log.write("%+.3f (began %+.3f) %s v%d %s %s%s\n" % (
            t - self.t_start, v.begun - self.t_start, fv.rel, v.k, v.kind, size, extra))
        self.log.flush()
        for cb in self.on_change:
            cb(fv.rel, v.k, t)
        return t

    def region(self, size):
        n = min(size, self.rng.choice(REGIONS))
        if self.rng.random() < 0.5:
            hi = max(0, min(size, FIRST_TAGS) - n)
        else:
            hi = size - n
        return self.rng.randrange(0, hi + 1), n

    def step(self):
        """One change of a random hot track."""
        now = time.monotonic()
        for rel, (_, due) in list(self.deleted_at.items()):
            if now >= due:
                del self.deleted_at[rel]
                return self.recreate(self.files[rel])
        rel = self.rng.choice(self.hot)
        if rel in self.deleted_at:
            return None
        fv = self.files[rel]
        size = fv.current().content.size
        r = self.rng.random()
        if r < 0.40:
            return self.in_place(fv, whole=False)
        if r < 0.50 and size <= WHOLE_MAX:
            return self.in_place(fv, whole=True)
        if r < 0.92 or len(self.deleted_at) >= 2:
            return self.rename(fv)
        return self.delete(fv)

    def path(self, rel):
        return os.path.join(self.origin, rel)

    def in_place(self, fv, whole):
        cur = fv.current().content
        if whole:
            off, new = 0, self.rng.randbytes(cur.size)
        else:
            off, n = self.region(cur.size)
            new = self.rng.randbytes(n)
        mtime = self.mtime()
        v = fv.begin(cur.replace(off, len(new), new), "whole" if whole else "in-place", mtime)
        fd = os.open(self.path(fv.rel), os.O_WRONLY)
        try:
            # One write: the file is half-written for as short as possible.
            if os.pwrite(fd, new, off) != len(new):
                raise common.Fatal("short pwrite on the origin (%s)" % fv.rel)
        finally:
            os.close(fd)
        os.utime(self.path(fv.rel), ns=(mtime, mtime))
        return self._note(fv, v, " @%d+%d" % (off, len(new)))

    def _replace_with(self, fv, content, kind, data=None):
        """Writes `content` to a temp file beside the track, then renames it
        over the track."""
        path = self.path(fv.rel)
        tmp = os.path.join(os.path.dirname(path), ".%s.%d.tmp" % (os.path.basename(path), self.serial))
        mtime = self.mtime()
        v = fv.begin(content, kind, mtime)
        with open(tmp, "wb") as f:
            f.write(data if data is not None else content.data())
        os.utime(tmp, ns=(mtime, mtime))
        os.replace(tmp, path)
        return self._note(fv, v)

    def rename(self, fv):
        cur = fv.current().content
        off, n = self.region(cur.size)
        if self.rng.random() < 0.5:
            new_n = n
        else:
            # A tag that grew or shrank: every later byte moves.
            new_n = max(0, n + self.rng.choice([-8192, -1000, 777, 4096, 65536]))
        return self._replace_with(fv, cur.replace(off, n, self.rng.randbytes(new_n)), "rename")

    def delete(self, fv):
        v = fv.begin(None, "delete")
        os.unlink(self.path(fv.rel))
        self.deleted_at[fv.rel] = (time.monotonic(), time.monotonic() + self.rng.uniform(1.0, 4.0))
        return self._note(fv, v)

    def recreate(self, fv):
        last = next(v.content for v in reversed(fv.snapshot()) if v.content is not None)
        if self.rng.random() < 0.3:
            content = fv.snapshot()[0].content        # restored from a backup
        else:
            off, n = self.region(last.size)
            content = last.replace(off, n, self.rng.randbytes(n))
        return self._replace_with(fv, content, "recreate")

    def restore(self, workdir):
        """After the writer phase: every FLAC that changed becomes a valid
        FLAC again (its original, re-tagged by metaflac in a temp copy, then
        renamed over it, as beets does); deleted files come back. Returns
        the time the last change was done."""
        t = time.monotonic()
        for rel in list(self.deleted_at):
            del self.deleted_at[rel]
            t = self.recreate(self.files[rel])
        for rel in self.hot:
            fv = self.files[rel]
            if not rel.endswith(".flac") or fv.count() == 1:
                continue
            tmp = os.path.join(workdir, "restore.flac")
            with open(tmp, "wb") as f:
                f.write(fv.snapshot()[0].content.data())
            r = subprocess.run(["metaflac", "--set-tag=COMMENT=musicfs torture rewrite %d" % self.serial, tmp],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise common.Fatal("metaflac failed on a copy of %s: %s" % (rel, r.stderr.strip()))
            with open(tmp, "rb") as f:
                data = f.read()
            os.unlink(tmp)
            t = self._replace_with(fv, Content.of(data), "restore", data)
        return t


class Run:
    """The reader, freshness-checker and final-check side of one rewrite run."""

    def __init__(self, run, lib, root, origin):
        self.run = run
        self.lib = lib
        self.root = root
        self.origin = origin
        self.stop = threading.Event()
        self.stats = common.Stats()
        self.failures = Failures(run)
        self.counters = Counters()
        self.files = {}
        for rel in lib.files:
            self.files[rel] = FileVersions(rel, lib.data(rel))
        # Freshness samples: (seconds, kind of change).
        self.staleness = []
        self.offer = None
        self.offer_lock = threading.Lock()
        self.offered = threading.Event()

    # ---------------------------------------------------------- sessions

    def open_ok_enoent(self, fv, t0, t1):
        """ENOENT on open is right when the file was absent within the bound."""
        return any(v.content is None and fv.allowed(v.k, t0, t1, BOUND) for v in fv.snapshot())

    def session(self, rel, io, mode, rng, bufsize=None, hold_for=4.0, stats=None):
        """One open of MOUNT/rel, read as `mode` says; every read checked.
        Returns (outcome, HandleCheck or None, open start): outcome is
        'enoent', 'estale', 'done', 'stopped' or 'failed'."""
        stats = stats or self.stats
        fv = self.files[rel]
        path = os.path.join(self.root, rel)
        t0 = time.monotonic()
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if io == "direct" else 0))
        except OSError as e:
            t1 = time.monotonic()
            if e.errno == errno.ENOENT and self.open_ok_enoent(fv, t0, t1):
                self.counters.add("enoent_opens")
                return "enoent", None, t0
            if e.errno == errno.ENOENT:
                # The file is on the origin and has been for longer than the bound.
                self.failures.add("freshness: ENOENT for a file on the origin", "%s (%s, open at %+.2f s)" % (
                    rel, io, t0 - self.t_start))
            else:
                self.failures.add("open failed", "%s (%s): %s" % (rel, io, e))
            self.counters.add("broken_" + io)
            stats.fail("open " + rel, e)
            return "failed", None, t0
        t1 = time.monotonic()
        stats.latency(t1 - t0, "open " + rel)
        h = HandleCheck(fv, t0, t1, BOUND)
        seen = len(h.versions)
        outcome = "done"
        try:
            if io == "dropped":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if mode == "ranges":
                outcome = self._ranges(fd, h, rel, rng, stats)
            else:
                outcome = self._stream(fd, h, fv, rel, rng, mode, bufsize, hold_for, seen, stats)
        except OSError as e:
            if e.errno == errno.ESTALE:
                outcome = "estale"
                self.counters.add("estale")
                stats.fail(rel, e)
                if fv.count() == 1:
                    self.failures.add("ESTALE on an unchanged file", "%s (%s, %s)" % (rel, io, mode))
            else:
                outcome = "failed"
                stats.fail(rel, e)
                self.failures.add("read failed", "%s (%s, %s) after %d reads: %s" % (rel, io, mode, h.nreads, e))
        finally:
            try:
                if io == "dropped":
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        if fv.count() > seen:
            # A change began while this handle was open.
            self.counters.add("across_change")
            self.counters.add("across_change_" + outcome)
        if h.verdict:
            off, data = h.bad
            best = max(h.cands) if h.cands else len(h.versions) - 1
            c = h.versions[best].content
            wrong = common.diff_bytes(c.slice(off, len(data)) if c else b"", data) or 1
            stats.wrong(rel, len(data), wrong)
            self.counters.add("broken_" + io)
            self.failures.add("one version per read", "%s (%s, %s, open at %+.2f s, read %d): %s; by block: %s" % (
                rel, io, mode, t0 - self.t_start, h.nreads, h.verdict, describe(fv.snapshot(), off, data)))
            return "failed", h, t0
        why = h.stale()
        if why:
            self.failures.add("stale open", "%s (%s, %s): %s" % (rel, io, mode, why))
            self.counters.add("broken_" + io)
            return "failed", h, t0
        if outcome in ("done", "stopped"):
            stats.ok(h.nbytes)
        return outcome, h, t0

    def _stream(self, fd, h, fv, rel, rng, mode, bufsize, hold_for, seen, stats):
        # Some readers play at a pace (their handles live longer); never
        # the freshness checker or the final check, which pass a bufsize.
        pace = mode == "stream" and bufsize is None and rng.random() < 0.3
        bufsize = bufsize or rng.choice(BUFSIZES)
        hold_at = None
        if mode == "hold":
            size = h.versions[-1].content.size if h.versions[-1].content else 0
            hold_at = min(size // 2, rng.choice([256 * 1024, common.MIB, 2 * common.MIB]))
        off = 0
        while True:
            if self.stop.is_set() and mode != "final":
                return "stopped"
            t = time.monotonic()
            b = os.read(fd, bufsize)
            stats.latency(time.monotonic() - t, "read %s@%d" % (rel, off))
            if not h.read(off, b) or not b:
                return "done"
            off += len(b)
            if hold_at is not None and off >= hold_at:
                hold_at = None
                # The case: part of a track read, then it changes.
                if fv.wait_change(seen, hold_for):
                    self.counters.add("held_across_change")
            if pace:
                time.sleep(rng.uniform(0.005, 0.02))

    def _ranges(self, fd, h, rel, rng, stats):
        for _ in range(rng.randint(1, 6)):
            if self.stop.is_set():
                return "stopped"
            size = max((h.versions[k].content.size for k in h.cands), default=0)
            length = rng.choice([4096, 10000, 65536, 200_000, common.MIB])
            off = rng.randrange(0, size + 1) if size else 0
            if rng.random() < 0.5:
                off -= off % 4096
            t = time.monotonic()
            b = os.pread(fd, length, off)
            stats.latency(time.monotonic() - t, "pread %s@%d+%d" % (rel, off, length))
            if not h.read(off, b):
                break
        return "done"

    def reader(self, k, hot, cold):
        rng = self.run.child_rng()
        while not self.stop.is_set():
            rel = rng.choice(hot) if (rng.random() < 0.75 or not cold) else rng.choice(cold)
            io = rng.choices(["direct", "dropped", "buffered"], [0.3, 0.2, 0.5])[0]
            mode = rng.choices(["stream", "hold", "ranges"], [0.45, 0.2, 0.35])[0]
            self.session(rel, io, mode, rng)

    # --------------------------------------------------------- freshness

    def offer_change(self, rel, k, t_done):
        with self.offer_lock:
            if self.offer is None:
                self.offer = (rel, k, t_done)
                self.offered.set()

    def checker(self):
        rng = self.run.child_rng()
        while not self.stop.is_set():
            if not self.offered.wait(0.5):
                continue
            with self.offer_lock:
                change, self.offer = self.offer, None
                self.offered.clear()
            if change is not None:
                self.measure(*change, rng=rng)
            # Let a few changes pass, so samples spread over the run.
            self.stop.wait(rng.uniform(0.0, 1.0))
            with self.offer_lock:
                self.offer = None
                self.offered.clear()

    def measure(self, rel, k, t_done, rng):
        """Opens `rel` again and again until an open sees version k or later
        (or its absence); records how long after the change that open began."""
        fv = self.files[rel]
        kind = fv.snapshot()[k].kind
        io = "buffered"
        while not self.stop.is_set():
            io = "direct" if io == "buffered" else "buffered"
            before = fv.count()
            outcome, h, t_open = self.session(rel, io, "stream", rng, bufsize=1 << 20)
            age = t_open - t_done
            if outcome == "failed":
                return
            if outcome == "enoent":
                new = any(v.content is None and v.k >= k for v in fv.snapshot())
            elif outcome == "estale":
                if fv.count() > before:
                    continue        # changed again under this read: no verdict
                new = False
            elif outcome == "done":
                # New when its bytes are those of version k or a later one
                # (a recreate may restore an old version's bytes).
                new = h.version_range()[1] is not None and h.version_range()[1] >= k
            else:
                return
            if new:
                self.staleness.append((max(0.0, age), kind))
                return
            if age > FRESHNESS:
                self.counters.add("stale_past_freshness")
            if age > BOUND:
                self.failures.add("freshness", "%s: a new open %.2f s after a %s change (v%d) still got %s" % (
                    rel, age, kind, k, "ESTALE" if outcome == "estale" else "the old version %s" % (
                        h.version_range(),)))
                return
            self.stop.wait(0.05)

    # ------------------------------------------------------------- final

    def final_check(self, d, cache):
        run = self.run
        origin_files = sorted(os.path.relpath(os.path.join(dp, n), self.origin)
                              for dp, _, names in os.walk(self.origin) for n in names)
        if origin_files != sorted(self.lib.files):
            raise common.Fatal("torture bookkeeping: the origin holds %d files, the library %d"
                               % (len(origin_files), len(self.lib.files)))
        for rel in origin_files:
            with open(os.path.join(self.origin, rel), "rb") as f:
                if f.read() != self.files[rel].current().content.data():
                    raise common.Fatal("torture bookkeeping: the writer's last version of %s "
                                       "is not what the origin holds" % rel)
        st = common.Stats()
        bad = 0
        rng = run.child_rng()
        for i, rel in enumerate(origin_files):
            io = ["direct", "buffered", "dropped"][i % 3]
            outcome, h, _ = self.session(rel, io, "final", rng, bufsize=1 << 20, stats=st)
            cur = self.files[rel].count() - 1
            if outcome != "done" or h is None or cur not in h.cands:
                bad += 1
                self.failures.add("after the bound", "%s (%s): %s, versions %s, origin is v%d" % (
                    rel, io, outcome, sorted(h.cands)[:6] if h else None, cur))
        self.stats.merge(st)
        run.figure("final_files", "%d/%d" % (len(origin_files) - bad, len(origin_files)))

        # The listing, as `ls -lR` shows it, agrees with the origin.
        t = time.monotonic()
        diff = None
        while True:
            diff = tree_diff(self.origin, self.root)
            if not diff or time.monotonic() - t > 10:
                break
            time.sleep(0.2)
        run.figure("listing_agrees_s", round(time.monotonic() - t, 1) if not diff else "never")
        if diff:
            run.problem("10 s after the final checks the listing through the mount still differs "
                        "from the origin: %s" % diff)

        flacs = [rel for rel in origin_files if rel.endswith(".flac")]
        ok = 0
        for rel in flacs:
            r = subprocess.run(["flac", "-t", "-s", os.path.join(self.root, rel)],
                               capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                ok += 1
            else:
                self.failures.add("flac -t", "%s: %s" % (rel, r.stderr.strip()[-200:]))
        run.figure("flac_t", "%d/%d" % (ok, len(flacs)))

        if common.status_json(run, cache) is None:
            run.problem("`musicfs status --json` failed after the run")
        run.require_alive(d)
        d.stop_checked(run)
        code, report, path = common.verify(run, cache, "final")
        run.figure("verify", code)
        if code != 0:
            run.problem("musicfs verify exited %s: %s (%s)" % (code, (report or {}).get("summary", report), path))


def tree_diff(origin, mounted):
    """'' when the tree under `mounted` has the same names, kinds and sizes
    as `origin`, else a short description of the difference."""
    def walk(top):
        out = set()
        for dp, subdirs, names in os.walk(top, onerror=lambda e: (_ for _ in ()).throw(e)):
            rel = os.path.relpath(dp, top)
            for n in subdirs:
                out.add((os.path.normpath(os.path.join(rel, n)), None))
            for n in names:
                p = os.path.join(dp, n)
                out.add((os.path.normpath(os.path.join(rel, n)), os.lstat(p).st_size))
        return out
    a, b = walk(origin), walk(mounted)
    if a == b:
        return ""
    return "missing %s, unexpected %s" % (sorted(a - b)[:4], sorted(b - a)[:4])


def pick_hot(run, lib, n):
    """The biggest track (the issue's case) and n-1 other non-empty files,
    FLACs first, then MP3s and the rest."""
    big = lib.biggest()
    others = [f for f in lib.files if f != big and lib.sizes[f] > 0]
    run.rng.shuffle(others)
    others.sort(key=lambda f: (0 if f.endswith(".flac") else 1 if f.endswith(".mp3") else 2))
    flacs = [f for f in others if f.endswith(".flac")]
    rest = [f for f in others if not f.endswith(".flac")]
    n_rest = max(1, (n - 1) // 3)
    return [big] + flacs[: n - 1 - n_rest] + rest[:n_rest]


def run(run, lib):
    a = run.args
    short = a.short
    readers = a.readers or (4 if short else 6)
    duration = a.duration or (40.0 if short else 240.0)
    n_hot = 6 if short else 10
    origin = os.path.join(run.path("origin"), "lib")
    shutil.copytree(lib.root, origin, copy_function=shutil.copy2)
    mp, cache = run.path("mnt"), run.path("cache")
    root = os.path.join(mp, "lib")
    d = common.Daemon(run, mp, cache, ["lib=" + origin], ["--cache-size", a.cache_size or "1G"], tag="rewrite")
    d.start()
    run.runs += 1
    hot = pick_hot(run, lib, n_hot)
    cold = [f for f in lib.files if f not in hot]
    r = Run(run, lib, root, origin)
    r.t_start = time.monotonic()
    writer = Writer(run, origin, r.files, hot, r.counters, os.path.join(run.logdir, "writer.log"))
    writer.on_change.append(r.offer_change)
    writer.t_start = r.t_start
    common.log("%d readers for %.0f s; the writer changes %d tracks (%s); freshness bound %.1f s"
               % (readers, duration, len(hot), ", ".join(os.path.basename(h)[:24] for h in hot), BOUND))
    run.figure("readers", readers)
    run.figure("duration_s", int(duration))
    run.figure("bound_s", BOUND)

    writer_error = []

    def write_loop():
        try:
            while not r.stop.is_set():
                r.stop.wait(writer.rng.uniform(0.15, 0.5))
                if not r.stop.is_set():
                    writer.step()
        except Exception as e:  # surfaces in the main thread
            writer_error.append(e)
            r.stop.set()

    threads = common.reader_threads(readers, r.reader, hot, cold)
    checker = threading.Thread(target=r.checker, daemon=True)
    checker.start()
    wt = threading.Thread(target=write_loop, daemon=True)
    wt.start()
    t0 = time.monotonic()
    every = 10.0 if short else 30.0
    try:
        while not r.stop.is_set():
            elapsed = time.monotonic() - t0
            run.require_alive(d)
            common.log("%4.0fs changes=%d handles=%d across_change=%d estale=%d freshness_samples=%d failures=%d"
                       % (elapsed, r.counters.get("changes"), r.stats.reads,
                          r.counters.get("across_change"), r.counters.get("estale"),
                          len(r.staleness), r.failures.count()))
            if elapsed >= duration:
                break
            r.stop.wait(min(every, duration - elapsed))
    finally:
        r.stop.set()
        wt.join(60)
        stuck = common.join_all(threads + [checker], 120)
    if writer_error:
        raise common.Fatal("the writer failed: %r" % writer_error[0])
    if stuck:
        raise common.Fatal("%d reader threads still blocked 120 s after being told to stop" % len(stuck))
    run.require_alive(d)

    t_last = writer.restore(run.work)
    writer.close()
    wait = t_last + BOUND - time.monotonic()
    common.log("writer stopped (FLACs restored); waiting out the bound (%.1f s), then checking every file" % max(0, wait))
    if wait > 0:
        time.sleep(wait)  # the promise under test is a time bound
    r.final_check(d, cache)

    c = r.counters
    run.stats.merge(r.stats)
    run.figure("changes", "%d(in-place=%d,whole=%d,rename=%d,delete=%d,recreate=%d,restore=%d)" % (
        c.get("changes"), c.get("change_in-place"), c.get("change_whole"), c.get("change_rename"),
        c.get("change_delete"), c.get("change_recreate"), c.get("change_restore")))
    run.figure("across_change", "%d(estale=%d,completed=%d,held=%d)" % (
        c.get("across_change"), c.get("across_change_estale"), c.get("across_change_done"),
        c.get("held_across_change")))
    run.figure("broken_by_io", "direct:%d,dropped:%d,buffered:%d" % (
        c.get("broken_direct"), c.get("broken_dropped"), c.get("broken_buffered")))
    run.figure("estale", c.get("estale"))
    run.figure("enoent_opens", c.get("enoent_opens"))
    secs = sorted(s for s, _ in r.staleness)
    run.figure("staleness_n", len(secs))
    if secs:
        run.figure("staleness_median_s", round(statistics.median(secs), 2))
        run.figure("staleness_max_s", round(secs[-1], 2))
        worst = max(r.staleness)
        run.figure("staleness_worst_kind", worst[1])
    run.figure("stale_opens_past_freshness", c.get("stale_past_freshness"))
    r.failures.report()
    if c.get("across_change") == 0:
        run.problem("no handle was open while its file changed: the run tested nothing (longer --duration?)")
    if len(secs) < 3:
        run.problem("only %d changes were sampled for freshness (at least 3 wanted)" % len(secs))
