"""Shared machinery of the torture runs (scripts/torture).

Layer: test tooling outside the workspace. It drives the real `musicfs`
binary over real FUSE mounts and real audio from ../shared/corpus/make-library,
and checks every byte it reads against the origin's file.

Invariants:
- Everything a run starts (daemons, bindfs, FUSE/tmpfs/bind mounts, temp
  dirs) is registered in its Run and undone in reverse order by
  Run.cleanup(), also on failure or Ctrl-C. Processes are ended by the PID
  this script got from spawning them, never by name.
- The script never blocks forever on a mount: reads that may hang go through
  subprocesses with timeouts (timed_read/timed_walk), and mounts are found
  in /proc/self/mounts, never by stat-ing the mountpoint.
- Byte checks compare against the origin directory, read directly (not
  through any FUSE layer under test), so a wrong byte can only come from
  the mount under test.
"""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _find_make_library():
    """$MUSICFS_MAKE_LIBRARY, else ../shared/corpus/make-library beside the
    checkout, else the machine's /work/shared copy (a clone elsewhere, as CI
    makes, has no ../shared) -- the same search as musicfs-test-utils."""
    env = os.environ.get("MUSICFS_MAKE_LIBRARY")
    if env:
        return env
    beside = os.path.join(os.path.dirname(REPO), "shared", "corpus", "make-library")
    if os.path.exists(beside):
        return beside
    return "/work/shared/corpus/make-library"


MAKE_LIBRARY = _find_make_library()
LOG_ROOT = os.path.join(tempfile.gettempdir(), "musicfs-torture-logs")
MIB = 1 << 20

# The one library every run uses (generated once, then cached): 64 distinct
# tracks for fd-limit, a ~20 MB track for the crash loop, ~100 MB in all so
# a 32 MiB cache must evict.
DEFAULT_LIBRARY = ["--artists", "4", "--albums", "2", "--tracks", "8", "--seconds", "12",
                   "--big", "1", "--big-minutes", "2"]


class Fatal(Exception):
    """A finding that ends the run at once (the daemon died, a mount never came up)."""


def log(msg):
    print("  [%s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


# ------------------------------------------------------------------ binary

def musicfs_bin():
    """MUSICFS_BIN, or target/debug/musicfs freshly built with cargo."""
    env = os.environ.get("MUSICFS_BIN")
    if env:
        if not os.access(env, os.X_OK):
            sys.exit("torture: MUSICFS_BIN=%s is not an executable" % env)
        return os.path.abspath(env)
    # One invocation for both packages: cargo unifies features per
    # invocation, so building them apart would build every dependency twice.
    print("torture: cargo build -p musicfs-cli -p musicfs-test-utils --bins", flush=True)
    r = subprocess.run(["cargo", "build", "-p", "musicfs-cli", "-p", "musicfs-test-utils", "--bins"],
                       cwd=REPO)
    if r.returncode != 0:
        sys.exit("torture: cargo build -p musicfs-cli failed")
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    return os.path.join(target, "debug", "musicfs")


def need_tools(tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit("torture: missing tools: %s (as root: apt-get install -y %s)"
                 % (" ".join(missing), " ".join(sorted(set(TOOL_PACKAGES.get(t, t) for t in missing)))))


TOOL_PACKAGES = {"fusermount3": "fuse3", "prlimit": "util-linux", "mount": "mount",
                 "umount": "mount", "bindfs": "bindfs", "sox": "sox", "flac": "flac",
                 "lame": "lame", "id3v2": "id3v2", "metaflac": "flac"}


# ----------------------------------------------------------------- library

def make_library(args):
    """The root of the library `make-library DIR *args` makes; generated once
    per (args, generator) into $TMPDIR/musicfs-fixtures and reused after, like
    the Rust fixtures. Treat it as read-only."""
    if not os.path.exists(MAKE_LIBRARY):
        sys.exit("torture: make-library not found at %s (set MUSICFS_MAKE_LIBRARY)" % MAKE_LIBRARY)
    with open(MAKE_LIBRARY, "rb") as f:
        key = hashlib.sha256(f.read() + b"\0" + "\0".join(args).encode()).hexdigest()[:16]
    base = os.path.join(tempfile.gettempdir(), "musicfs-fixtures")
    dest = os.path.join(base, "torture-lib-" + key)
    if os.path.isdir(dest):
        return dest
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-torture-lib-%s-" % key, dir=base)
    print("torture: generating library (make-library %s), once" % " ".join(args), flush=True)
    t = time.monotonic()
    r = subprocess.run([MAKE_LIBRARY, tmp] + list(args), stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit("torture: make-library failed: %s (it needs: apt-get install -y sox flac lame id3v2)"
                 % r.stderr.strip())
    try:
        os.rename(tmp, dest)
    except OSError:
        # Another process renamed its copy first.
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(dest):
            raise
    print("torture: library ready in %.0f s at %s" % (time.monotonic() - t, dest), flush=True)
    return dest


class Library:
    """An origin directory and its regular files (relative paths, sorted),
    read directly for comparisons; contents are memoised (a library is
    ~100 MB)."""

    def __init__(self, root):
        self.root = root
        self.files = []
        self.dirs = []
        for d, subdirs, names in os.walk(root):
            subdirs.sort()
            rel = os.path.relpath(d, root)
            if rel != ".":
                self.dirs.append(rel)
            for n in sorted(names):
                p = os.path.join(d, n)
                if os.path.isfile(p) and not os.path.islink(p):
                    self.files.append(os.path.relpath(p, root))
        self.files.sort()
        self.sizes = {f: os.path.getsize(os.path.join(root, f)) for f in self.files}
        self._data = {}
        self._lock = threading.Lock()
        if not self.files:
            sys.exit("torture: library %s has no files" % root)

    def data(self, rel):
        with self._lock:
            d = self._data.get(rel)
        if d is None:
            with open(os.path.join(self.root, rel), "rb") as f:
                d = f.read()
            with self._lock:
                self._data[rel] = d
        return d

    def digest(self, rel):
        return hashlib.sha256(self.data(rel)).hexdigest()

    def total_bytes(self):
        return sum(self.sizes.values())

    def biggest(self):
        return max(self.files, key=lambda f: self.sizes[f])

    def tree(self):
        """What a listing of the whole tree shows: dirs and files with sizes."""
        return sorted([(d, None) for d in self.dirs] + [(f, self.sizes[f]) for f in self.files])


def diff_bytes(expected, got):
    """How many bytes of `got` are wrong: differing positions plus length mismatch."""
    if expected == got:
        return 0
    n = min(len(expected), len(got))
    wrong = abs(len(expected) - len(got))
    step = 1 << 16
    for i in range(0, n, step):
        a, b = expected[i:i + step], got[i:i + step]
        if a != b:
            wrong += sum(1 for x, y in zip(a, b) if x != y)
    return wrong


# ------------------------------------------------------------------ figures

class Stats:
    """Thread-safe read figures. A 'read' is one file-level operation (a whole
    file or one range); latency is the longest single open/read syscall."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reads = 0
        self.failed = 0
        self.wrong_reads = 0
        self.wrong_bytes = 0
        self.bytes = 0
        self.max_latency = 0.0
        self.slowest = None     # what the slowest syscall was on, and when
        self.errors = {}        # errno name -> count
        self.examples = []      # first few failures/wrong reads, for the report

    def latency(self, secs, what=None):
        if secs > self.max_latency:
            with self.lock:
                if secs > self.max_latency:
                    self.max_latency = secs
                    self.slowest = "%s at %s" % (what or "?", time.strftime("%H:%M:%S"))

    def ok(self, nbytes):
        with self.lock:
            self.reads += 1
            self.bytes += nbytes

    def fail(self, what, err):
        name = errno.errorcode.get(getattr(err, "errno", None) or 0, type(err).__name__)
        with self.lock:
            self.reads += 1
            self.failed += 1
            self.errors[name] = self.errors.get(name, 0) + 1
            if len(self.examples) < 8:
                self.examples.append("failed %s: %s" % (what, err))

    def wrong(self, what, nbytes, wrong):
        with self.lock:
            self.reads += 1
            self.bytes += nbytes
            self.wrong_reads += 1
            self.wrong_bytes += wrong
            if len(self.examples) < 8:
                self.examples.append("WRONG BYTES %s: %d of %d bytes differ" % (what, wrong, nbytes))

    def merge(self, other):
        with self.lock:
            self.reads += other.reads
            self.failed += other.failed
            self.wrong_reads += other.wrong_reads
            self.wrong_bytes += other.wrong_bytes
            self.bytes += other.bytes
            if other.max_latency > self.max_latency:
                self.max_latency, self.slowest = other.max_latency, other.slowest
            for k, v in other.errors.items():
                self.errors[k] = self.errors.get(k, 0) + v
            self.examples.extend(other.examples[: max(0, 8 - len(self.examples))])


def _open(path, direct):
    return os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))


def _close(fd, direct):
    """Closes `fd`, first dropping its pages from the kernel's page cache
    (the mount keeps it across opens), so the next read of the same bytes
    reaches the daemon instead of being answered by the kernel."""
    try:
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_whole(lib, mount_root, rel, stats, bufsize=128 * 1024, stop=None, direct=False):
    """Reads MOUNT/rel sequentially in `bufsize` pieces, each checked against
    the origin; records the outcome in `stats`. Returns False on error.
    `direct` opens with O_DIRECT: every read goes to the daemon as asked,
    with no kernel readahead or page cache in between."""
    expected = lib.data(rel)
    path = os.path.join(mount_root, rel)
    got = bytearray()
    try:
        t = time.monotonic()
        fd = _open(path, direct)
        stats.latency(time.monotonic() - t, "open " + rel)
        try:
            while True:
                if stop is not None and stop.is_set():
                    break
                t = time.monotonic()
                b = os.read(fd, bufsize)
                stats.latency(time.monotonic() - t, "read %s@%d" % (rel, len(got)))
                if not b:
                    break
                got += b
        finally:
            _close(fd, direct)
    except OSError as e:
        # Bytes that came before the error must still be right.
        bad = diff_bytes(expected[:len(got)], bytes(got))
        if bad:
            stats.wrong("%s (before %s)" % (rel, e), len(got), bad)
        else:
            stats.fail(rel, e)
        return False
    if stop is not None and stop.is_set() and len(got) < len(expected):
        bad = diff_bytes(expected[:len(got)], bytes(got))
        if bad:
            stats.wrong(rel + " (partial)", len(got), bad)
        return True
    bad = diff_bytes(expected, bytes(got))
    if bad:
        stats.wrong(rel, len(got), bad)
        return False
    stats.ok(len(got))
    return True


def read_range(lib, mount_root, rel, offset, length, stats, direct=False):
    """One pread of MOUNT/rel at [offset, offset+length), checked."""
    expected = lib.data(rel)[offset:offset + length]
    try:
        t = time.monotonic()
        fd = _open(os.path.join(mount_root, rel), direct)
        try:
            got = b""
            # A FUSE read may return less than asked; loop like a player does.
            while len(got) < length:
                b = os.pread(fd, length - len(got), offset + len(got))
                if not b:
                    break
                got += b
        finally:
            _close(fd, direct)
        stats.latency(time.monotonic() - t, "pread %s@%d+%d" % (rel, offset, length))
    except OSError as e:
        stats.fail("%s@%d+%d" % (rel, offset, length), e)
        return False
    bad = diff_bytes(expected, got)
    if bad:
        stats.wrong("%s@%d+%d" % (rel, offset, length), len(got), bad)
        return False
    stats.ok(len(got))
    return True


def random_range(rng, size):
    if size == 0:
        return 0, 0
    length = min(size, rng.choice([4096, 65536, 200_000, MIB, 3 * MIB]))
    return rng.randrange(0, size - length + 1), length


def check_tree(lib, mount_root):
    """Differences between the listing under MOUNT and the origin's."""
    seen = []
    for d, subdirs, names in os.walk(mount_root, onerror=lambda e: (_ for _ in ()).throw(e)):
        subdirs.sort()
        rel = os.path.relpath(d, mount_root)
        if rel != ".":
            seen.append((rel, None))
        for n in names:
            p = os.path.join(d, n)
            seen.append((os.path.relpath(p, mount_root), os.lstat(p).st_size))
    seen.sort()
    want = lib.tree()
    if seen == want:
        return []
    missing = sorted(set(want) - set(seen))[:5]
    extra = sorted(set(seen) - set(want))[:5]
    return ["listing differs: missing %s, unexpected %s" % (missing, extra)]


# ---- reads that may hang, in a child process the parent can always kill

_CHILD_READ = r"""
import hashlib, os, sys, time
t = time.monotonic()
try:
    fd = os.open(sys.argv[1], os.O_RDONLY | (os.O_DIRECT if sys.argv[2] == "direct" else 0))
    h = hashlib.sha256(); n = 0
    while True:
        b = os.read(fd, 1 << 17)
        if not b: break
        h.update(b); n += len(b)
    os.close(fd)
    print("ok", h.hexdigest(), n, time.monotonic() - t)
except OSError as e:
    print("err", e.errno, 0, time.monotonic() - t)
"""

_CHILD_WALK = r"""
import os, sys, time
t = time.monotonic(); n = 0
try:
    for d, subdirs, names in os.walk(sys.argv[1], onerror=lambda e: (_ for _ in ()).throw(e)):
        for x in subdirs + names:
            os.lstat(os.path.join(d, x)); n += 1
    print("ok", n, time.monotonic() - t)
except OSError as e:
    print("err", e.errno, time.monotonic() - t)
"""


def _child(code, args, timeout):
    t = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", code] + list(args), stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        try:
            p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # stuck in the kernel; it dies when the mount goes away
        return None, time.monotonic() - t
    return out.split(), time.monotonic() - t


def timed_read(path, timeout, direct=False):
    """Reads a whole file in a child process (with O_DIRECT if `direct`):
    ('ok', sha256, size, secs), ('err', errno, 0, secs) or ('timeout', None, 0, secs)."""
    out, wall = _child(_CHILD_READ, [path, "direct" if direct else "buffered"], timeout)
    if not out:
        return "timeout", None, 0, wall
    if out[0] == "ok":
        return "ok", out[1], int(out[2]), float(out[3])
    return "err", int(out[1]), 0, float(out[3])


def timed_walk(path, timeout):
    """Lists and lstat()s a whole tree in a child: (status, entries|errno, secs)."""
    out, wall = _child(_CHILD_WALK, [path], timeout)
    if not out:
        return "timeout", None, wall
    return out[0], int(out[1]), float(out[2])


# --------------------------------------------------------------- processes

def proc_rss_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def proc_fds(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return None


def proc_threads(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def mounted_paths():
    """Mountpoints from /proc/self/mounts (octal escapes decoded); never
    touches a mountpoint, which may hang."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1:
                out.append(fields[1].encode().decode("unicode_escape").encode("latin-1").decode())
    return out


def is_mounted(path):
    return os.path.abspath(path) in mounted_paths()


def mount_count(path):
    return mounted_paths().count(os.path.abspath(path))


def fuse_unmount(path):
    """fusermount3 -u, then -uz; repeated while stacked mounts remain."""
    for _ in range(8):
        if not is_mounted(path):
            return
        r = subprocess.run(["fusermount3", "-u", path], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-uz", path], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)


def sys_mount(args, target):
    r = subprocess.run(["mount"] + args + [target], capture_output=True, text=True)
    if r.returncode != 0:
        raise Fatal("mount %s %s failed: %s (the torture runs need root)"
                    % (" ".join(args), target, r.stderr.strip()))


def lazy_umount(path):
    while is_mounted(path):
        if subprocess.run(["umount", "-l", path], stderr=subprocess.DEVNULL).returncode != 0:
            break


class Daemon:
    """One `musicfs mount` process; stdout and stderr go to files in the
    run's log dir (stderr is scanned for panics)."""

    def __init__(self, run, mountpoint, cache_dir, origins, extra=(), nofile=None, tag="daemon", env=None):
        self.run = run
        # Added to this process's environment (e.g. an S3 origin's keys).
        self.env = dict(os.environ, **env) if env else None
        self.mountpoint = mountpoint
        self.cache_dir = cache_dir
        self.n = len([d for d in run.daemons]) + 1
        self.log = os.path.join(run.logdir, "%s-%02d.log" % (tag, self.n))
        self.out = self.log[:-4] + ".out"
        cmd = [run.bin, "mount", mountpoint, "--cache-dir", cache_dir]
        for o in origins:
            cmd += ["--origin", o]
        cmd += list(extra)
        if nofile is not None:
            cmd = ["prlimit", "--nofile=%d:%d" % (nofile, nofile), "--"] + cmd
        self.cmd = cmd
        self.proc = None
        self.exit = None
        run.daemons.append(self)

    def start(self, timeout=60):
        with open(self.log, "ab") as err, open(self.out, "ab") as out:
            err.write(("$ %s\n" % " ".join(self.cmd)).encode())
            err.flush()
            # prlimit execs the command, so this PID is the daemon's.
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.out, "rb") as f:
                if b"mounted at" in f.read():
                    return self
            if self.proc.poll() is not None:
                self.exit = self.proc.returncode
                raise Fatal("musicfs mount exited %s before mounting: %s"
                            % (self.exit, tail(self.log)))
            time.sleep(0.05)
        raise Fatal("musicfs mount did not come up within %d s (%s)" % (timeout, self.log))

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout):
        try:
            self.exit = self.proc.wait(timeout=timeout)
            return self.exit
        except subprocess.TimeoutExpired:
            return None

    def kill9(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.exit = self.proc.wait(timeout=30)

    def term(self, timeout=20):
        """SIGTERM; (exit code or None if it outlived `timeout`, seconds)."""
        t = time.monotonic()
        os.kill(self.proc.pid, signal.SIGTERM)
        code = self.wait(timeout)
        return code, time.monotonic() - t

    def panicked(self):
        try:
            with open(self.log, "rb") as f:
                return b"panicked" in f.read()
        except OSError:
            return False

    def stop_checked(self, res, timeout=20):
        """SIGTERM and record a non-zero exit or a hang as problems."""
        if not self.alive():
            res.problem("daemon PID %d died unexpectedly (exit %s); log %s"
                        % (self.pid, self.proc.returncode, self.log))
            return None
        code, secs = self.term(timeout)
        if code is None:
            res.problem("daemon PID %d did not exit within %d s of SIGTERM" % (self.pid, timeout))
            self.proc.kill()
            self.proc.wait()
        elif code != 0:
            res.problem("daemon exited %d after SIGTERM; log %s" % (code, self.log))
        return secs

    def cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            except ProcessLookupError:
                pass
        fuse_unmount(self.mountpoint)


def tail(path, n=6):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").strip().splitlines()
        return " | ".join(lines[-n:])
    except OSError:
        return "(no log)"


def status_json(run, cache_dir, timeout=10):
    """`musicfs status --cache-dir DIR --json`, parsed; None if it failed."""
    try:
        r = subprocess.run([run.bin, "status", "--cache-dir", cache_dir, "--json"],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if r.returncode != 0:
        return None
    try:
        return json.loads(r.stdout)
    except ValueError:
        return None


def verify(run, cache_dir, tag):
    """`musicfs verify --cache-dir DIR --json`: (exit code, parsed report, log path)."""
    path = os.path.join(run.logdir, "verify-%s.json" % tag)
    r = subprocess.run([run.bin, "verify", "--cache-dir", cache_dir, "--json"],
                       capture_output=True, text=True, timeout=600)
    with open(path, "w") as f:
        f.write(r.stdout + "\n--- stderr\n" + r.stderr)
    try:
        report = json.loads(r.stdout)
    except ValueError:
        report = None
    return r.returncode, report, path


# --------------------------------------------------------------------- run

class Run:
    """One torture run: its work dir, what it started, its figures and the
    problems that make it fail."""

    def __init__(self, name, bin_path, args):
        self.name = name
        self.bin = bin_path
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = tempfile.mkdtemp(prefix="musicfs-torture-%s-" % name)
        self.logdir = os.path.join(self.work, "logs")
        os.makedirs(self.logdir)
        self.daemons = []
        self.undo = []          # callables, run in reverse at cleanup
        self.stats = Stats()
        self.figures = {}       # run-specific figures, in insertion order
        self.problems = []
        self.runs = 0
        self.started = time.monotonic()
        self.kept_logs = None

    def path(self, *parts):
        p = os.path.join(self.work, *parts)
        os.makedirs(p, exist_ok=True)
        return p

    def child_rng(self):
        """A generator for one reader thread, seeded from the run's seed."""
        return random.Random(self.rng.random())

    def problem(self, msg):
        log("PROBLEM: " + msg)
        self.problems.append(msg)

    def figure(self, key, value):
        self.figures[key] = value

    def check_daemons(self):
        """Panics in any daemon's stderr are problems."""
        for d in self.daemons:
            if d.panicked():
                msg = "daemon PID %s panicked; log %s" % (d.pid if d.proc else "?", d.log)
                if msg not in self.problems:
                    self.problem(msg)

    def require_alive(self, d):
        if not d.alive():
            raise Fatal("daemon PID %d died unexpectedly (exit %s); log %s: %s"
                        % (d.pid, d.proc.returncode, d.log, tail(d.log)))

    def cleanup(self):
        for d in reversed(self.daemons):
            try:
                d.cleanup()
            except Exception as e:  # keep cleaning whatever fails
                print("torture: cleanup of daemon %s: %s" % (d.pid if d.proc else "?", e), file=sys.stderr)
        for fn in reversed(self.undo):
            try:
                fn()
            except Exception as e:
                print("torture: cleanup: %s" % e, file=sys.stderr)
        if self.failed() or self.args.keep:
            self.kept_logs = os.path.join(LOG_ROOT, "%s-%s-%d" % (
                self.name, time.strftime("%Y%m%d-%H%M%S"), os.getpid()))
            os.makedirs(LOG_ROOT, exist_ok=True)
            shutil.copytree(self.logdir, self.kept_logs)
        # Only remove the work dir when nothing is mounted under it anymore.
        busy = [m for m in mounted_paths() if m.startswith(self.work + "/")]
        if busy:
            print("torture: NOT removing %s: still mounted: %s" % (self.work, busy), file=sys.stderr)
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    def failed(self):
        s = self.stats
        return bool(self.problems or s.wrong_reads)

    def summary(self):
        s = self.stats
        parts = ["runs=%d" % self.runs, "reads=%d" % s.reads, "failed=%d" % s.failed,
                 "wrong_bytes=%d" % s.wrong_bytes, "wrong_reads=%d" % s.wrong_reads,
                 "read=%.0fMB" % (s.bytes / 1e6), "max_latency=%.3fs" % s.max_latency]
        if s.errors:
            parts.append("errors=" + ",".join("%s:%d" % kv for kv in sorted(s.errors.items())))
        for k, v in self.figures.items():
            parts.append("%s=%s" % (k, ("%.3f" % v) if isinstance(v, float) else v))
        parts.append("time=%.0fs" % (time.monotonic() - self.started))
        parts.append("seed=%d" % self.args.seed)
        verdict = "FAIL" if self.failed() else "PASS"
        line = "torture %s: %s %s" % (self.name, verdict, " ".join(parts))
        if self.kept_logs:
            line += " logs=%s" % self.kept_logs
        return line


def reader_threads(n, target, *args):
    ts = [threading.Thread(target=target, args=(i,) + args, daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    return ts


def join_all(threads, timeout):
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [t for t in threads if t.is_alive()]
