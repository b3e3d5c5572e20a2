"""Helpers for scripts/bench: the file systems under test, their daemons,
and the measurements.

Layer: benchmark tooling only; nothing in MusicFS imports it.

Invariants:
- Every mount this module makes is unmounted by it (`Mount.stop`), and
  only the daemons it started are signalled, by PID.
- A measurement that reads a file checks it got the whole file, so a
  broken mount shows up as an error, not as a fast number.
- "Cold" never uses a global drop_caches unless asked: the origin files a
  test reads are evicted from the page cache with posix_fadvise(DONTNEED),
  which touches nothing else on a shared machine.
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import threading
import time

MiB = 1 << 20


# --------------------------------------------------------------------------
# page cache and mounts


def evict(paths):
    """Drops the clean page-cache pages of each file (origin-side cold)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_all_caches():
    """Global drop_caches (only with --drop-caches: it slows everyone)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mount_dev(mountpoint):
    """The 'major:minor' of the mount at `mountpoint`, or None."""
    mp = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and unescape(fields[4]) == mp:
                return fields[2]
    return None


def unescape(s):
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def read_ahead_kb(mountpoint):
    dev = mount_dev(mountpoint)
    if dev is None:
        return None
    try:
        with open("/sys/class/bdi/%s/read_ahead_kb" % dev) as f:
            return int(f.read())
    except OSError:
        return None


class Mount:
    """One mounted file system under test. `root` is where the library
    appears; `pid` is the daemon (None for native reads)."""

    name = "?"

    def __init__(self, origin, work):
        self.origin = origin
        self.work = work
        self.proc = None
        self.mountpoint = None
        self.log = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    @property
    def root(self):
        return self.mountpoint

    def cache_dir(self):
        return None

    def clear_cache(self):
        d = self.cache_dir()
        if d and os.path.exists(d):
            shutil.rmtree(d)

    def cache_bytes(self):
        return None

    def command(self):
        raise NotImplementedError

    def start(self):
        self.mountpoint = os.path.join(self.work, "mnt-" + self.name)
        os.makedirs(self.mountpoint, exist_ok=True)
        if mount_dev(self.mountpoint):
            subprocess.run(["fusermount3", "-uz", self.mountpoint], check=False)
        if self.cache_dir():
            os.makedirs(self.cache_dir(), exist_ok=True)
        self.log = open(os.path.join(self.work, "%s.log" % self.name), "ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, env=self.env()
        )
        deadline = time.monotonic() + 60
        while not mount_dev(self.mountpoint) or not os.path.exists(self.root):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    "%s exited with %s while mounting; see %s" % (self.name, self.proc.returncode, self.log.name)
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("%s did not mount within 60 s; see %s" % (self.name, self.log.name))
            time.sleep(0.02)
        return self

    def env(self):
        return None

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.unmount()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
        if mount_dev(self.mountpoint):
            subprocess.run(["fusermount3", "-uz", self.mountpoint], check=False)
        self.proc = None
        self.log.close()

    def unmount(self):
        subprocess.run(["fusermount3", "-u", self.mountpoint], check=False, stderr=subprocess.DEVNULL)

    def remount(self):
        self.stop()
        return self.start()

    def settle(self, quiet=0.5, limit=30):
        """Waits until the daemon's cache stops growing (MusicFS stores the
        last chunks of a file read to its end just after the read returns,
        rclone writes its cache file back), so what follows measures a cache
        at rest, not one still being written."""
        if self.cache_bytes() is None:
            return
        deadline = time.monotonic() + limit
        last, since = self.cache_bytes(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.cache_bytes()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        os.sync()


class Native(Mount):
    name = "native"

    def start(self):
        return self

    def stop(self):
        pass

    @property
    def root(self):
        return self.origin


class Bindfs(Mount):
    name = "bindfs"
    options = "ro"

    def command(self):
        return ["bindfs", "-f", "-o", self.options, self.origin, self.mountpoint]


class BindfsKernelCache(Bindfs):
    name = "bindfs-kc"
    options = "ro,kernel_cache"


class Rclone(Mount):
    name = "rclone"

    def cache_dir(self):
        return os.path.join(self.work, "cache-rclone")

    def env(self):
        env = dict(os.environ)
        # No remote is configured: the origin is a local path.
        env["RCLONE_CONFIG"] = os.path.join(self.work, "rclone.conf")
        open(env["RCLONE_CONFIG"], "a").close()
        return env

    def command(self):
        return [
            "rclone", "mount", self.origin, self.mountpoint,
            "--vfs-cache-mode", "full", "--cache-dir", self.cache_dir(),
            "--read-only", "--log-level", "NOTICE",
        ]

    def cache_bytes(self):
        return du(self.cache_dir())


class MusicFs(Mount):
    name = "musicfs"
    lib = "lib"

    def __init__(self, origin, work, binary):
        super().__init__(origin, work)
        self.binary = binary

    @property
    def root(self):
        return os.path.join(self.mountpoint, self.lib)

    def cache_dir(self):
        return os.path.join(self.work, "cache-musicfs")

    def command(self):
        return [
            self.binary, "mount", self.mountpoint, "--origin", "%s=%s" % (self.lib, self.origin),
            "--cache-dir", self.cache_dir(), "--cache-size", "50G",
        ]

    def unmount(self):
        # SIGTERM is the documented way to stop it: unmount, flush, exit 0.
        self.proc.send_signal(signal.SIGTERM)

    def cache_bytes(self):
        return du(os.path.join(self.cache_dir(), "chunks"))


def du(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


# --------------------------------------------------------------------------
# daemon footprint


class Sampler:
    """Polls a daemon's RSS and open fds while a test runs; `peak()` gives
    the maxima. Where the kernel allows, the peak-RSS counter is reset
    first, so VmHWM covers this test alone."""

    def __init__(self, pid, interval=0.02):
        self.pid = pid
        self.interval = interval
        self.rss = 0
        self.fds = 0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.pid:
            try:
                with open("/proc/%d/clear_refs" % self.pid, "w") as f:
                    f.write("5\n")
            except OSError:
                pass
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        self.rss = max(self.rss, int(line.split()[1]) * 1024)
            self.fds = max(self.fds, len(os.listdir("/proc/%d/fd" % self.pid)))
        except OSError:
            pass

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        if self._thread:
            self._stop.set()
            self._thread.join()
            self._sample()
        return False

    def peak(self):
        if not self.pid:
            return None
        return {"rss_mb": round(self.rss / MiB, 1), "fds": self.fds}


# --------------------------------------------------------------------------
# measurements


def read_whole(path, bufsize=MiB):
    """Reads `path` sequentially; returns the bytes read."""
    buf = bytearray(bufsize)
    fd = os.open(path, os.O_RDONLY)
    total = 0
    try:
        while True:
            n = os.readv(fd, [buf])
            if n == 0:
                return total
            total += n
    finally:
        os.close(fd)


def timed_read(paths, expect):
    """Reads every path at once (one thread each); returns MB/s over the
    wall time of the slowest, after checking each was read whole."""
    got = [None] * len(paths)
    errors = []
    barrier = threading.Barrier(len(paths) + 1)

    def one(i, p):
        barrier.wait()
        try:
            got[i] = read_whole(p)
        except OSError as e:
            errors.append("%s: %s" % (p, e))

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(paths)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError("read failed: " + "; ".join(errors))
    for p, n, e in zip(paths, got, expect):
        if n != e:
            raise RuntimeError("%s: read %s bytes, expected %s" % (p, n, e))
    return sum(got) / 1e6 / elapsed


def first_bytes(path, n=64 * 1024):
    """Seconds from open() to the first `n` bytes read, and those bytes."""
    buf = bytearray(n)
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        got = 0
        view = memoryview(buf)
        while got < n:
            r = os.readv(fd, [view[got:]])
            if r == 0:
                break
            got += r
        t = time.perf_counter() - start
    finally:
        os.close(fd)
    return t, bytes(buf[:got])


def fio_randread(path, io_size, invalidate=True):
    """Random 4 KiB reads with fio (psync, one job, queue depth 1, each
    block at most once). With `invalidate` the file's page cache is dropped
    at the start (fio's default), so on a FUSE mount every read reaches the
    daemon. Returns reads per second."""
    size = os.path.getsize(path)
    out = subprocess.run(
        [
            "fio", "--name=randread", "--filename=" + path, "--readonly", "--rw=randread",
            "--bs=4k", "--ioengine=psync", "--size=%d" % size, "--io_size=%d" % io_size,
            "--invalidate=%d" % invalidate, "--output-format=json",
        ],
        check=True, capture_output=True, text=True,
    )
    text = out.stdout[out.stdout.index("{"):]
    job = json.loads(text)["jobs"][0]
    if job.get("error"):
        raise RuntimeError("fio failed on %s: error %s" % (path, job["error"]))
    return job["read"]["iops"]


def timed_shell(cmd, cwd=None):
    """Wall seconds of a shell pipeline, and its stdout."""
    start = time.perf_counter()
    out = subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True, cwd=cwd)
    return time.perf_counter() - start, out.stdout


def summary(values):
    """Median and spread of several runs."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": [round(v, 4) for v in values],
    }
