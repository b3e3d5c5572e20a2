"""Every version of every file a torture writer produced, and the check of
what one open handle read against them (used by the `rewrite` run).

Layer: test tooling. The writer registers a version *before* it starts
changing the origin file and marks it done after; readers check each read
(one syscall) as it returns.

Invariants:
- A version's bytes are a piece table over immutable buffers: versions made
  by changing a region share every other byte with their parent, so keeping
  all versions of a run costs only the new bytes.
- A read matches version k when its bytes equal k's bytes at that offset
  (all of them: one read never mixes versions). A handle's candidate set
  starts as every version registered before its open returned and is cut
  down by each read, so reads of one handle that belong to different
  versions leave it empty: a mix across reads.
- An end of file (a read returning no bytes at offset N) is a claim that the
  version has N bytes; an earlier end than the version's size is a
  truncated track, as wrong as a wrong byte.
- Times are time.monotonic(). A version's life on the origin is taken
  generously (from the moment its change began to the moment the change
  that replaced it was done), so only a promise that is surely broken
  counts as a failure.
"""

import bisect
import threading
import time

# A version made of more pieces than this is flattened into one buffer
# (a file changed hundreds of times in small regions).
MAX_PIECES = 256


class Content:
    """Bytes of one version as a piece table: (buffer, start, length) pieces."""

    __slots__ = ("pieces", "offs", "size")

    def __init__(self, pieces):
        self.pieces = [p for p in pieces if p[2] > 0]
        self.offs = []
        pos = 0
        for _, _, n in self.pieces:
            self.offs.append(pos)
            pos += n
        self.size = pos

    @classmethod
    def of(cls, data):
        return cls([(bytes(data), 0, len(data))])

    def span(self, off, n):
        """The pieces covering [off, off+n), clipped to the size."""
        end = min(off + n, self.size)
        out = []
        if off >= end:
            return out
        i = bisect.bisect_right(self.offs, off) - 1
        while off < end:
            buf, start, length = self.pieces[i]
            skip = off - self.offs[i]
            take = min(length - skip, end - off)
            out.append((buf, start + skip, take))
            off += take
            i += 1
        return out

    def slice(self, off, n):
        span = self.span(off, n)
        if len(span) == 1:
            buf, s, k = span[0]
            return buf[s:s + k]
        return b"".join(buf[s:s + k] for buf, s, k in span)

    def key(self, off, n):
        """Equal keys mean equal bytes at [off, off+n) (same buffers), so
        one comparison serves every version sharing them. The buffers live
        as long as the run, so their ids are stable."""
        return tuple((id(buf), s, k) for buf, s, k in self.span(off, n))

    def data(self):
        return self.slice(0, self.size)

    def replace(self, off, old_len, new):
        """A new version: this one with [off, off+old_len) replaced by `new`
        (which may be longer or shorter: a tag that grew moves the audio)."""
        pieces = self.span(0, off) + [(bytes(new), 0, len(new))] + self.span(off + old_len, self.size)
        if len(pieces) > MAX_PIECES:
            return Content.of(b"".join(buf[s:s + k] for buf, s, k in pieces))
        return Content(pieces)


class Version:
    """One state of an origin path: content None means absent (deleted)."""

    __slots__ = ("k", "content", "kind", "begun", "done", "ended", "mtime_ns")

    def __init__(self, k, content, kind, begun, mtime_ns=None):
        self.k = k
        self.content = content
        self.kind = kind        # original, in-place, whole, rename, delete, recreate, restore
        self.begun = begun      # its change began (registered before touching the origin)
        self.done = None        # its change was done
        self.ended = None       # the next change was done
        self.mtime_ns = mtime_ns


class FileVersions:
    """All versions of one path, oldest first; the writer's lock and the
    condition readers wait on for "this file changed"."""

    def __init__(self, rel, data):
        self.rel = rel
        self.cond = threading.Condition()
        v = Version(0, Content.of(data), "original", float("-inf"))
        v.done = float("-inf")
        self.versions = [v]

    def count(self):
        with self.cond:
            return len(self.versions)

    def current(self):
        with self.cond:
            return self.versions[-1]

    def begin(self, content, kind, mtime_ns=None):
        with self.cond:
            v = Version(len(self.versions), content, kind, time.monotonic(), mtime_ns)
            self.versions.append(v)
            return v

    def finish(self, v):
        with self.cond:
            v.done = time.monotonic()
            if v.k > 0:
                self.versions[v.k - 1].ended = v.done
            self.cond.notify_all()
            return v.done

    def snapshot(self):
        with self.cond:
            return list(self.versions)

    def wait_change(self, seen, timeout):
        """Waits until a version past `seen` versions is done; True if one is."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (len(self.versions) > seen and self.versions[seen].done is not None):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def allowed(self, k, t_open0, t_open1, bound):
        """Whether an open during [t_open0, t_open1] may bind to version k:
        k was on the origin at some moment within `bound` before the open."""
        with self.cond:
            v = self.versions[k]
            return v.begun <= t_open1 and (v.ended is None or v.ended >= t_open0 - bound)

    def replaced_for(self, k, t):
        """Seconds before `t` that version k was replaced (None if current)."""
        with self.cond:
            v = self.versions[k]
            return None if v.ended is None else t - v.ended


def matching(versions, cands, off, data):
    """The versions among `cands` whose bytes at `off` are exactly `data`."""
    groups = {}
    n = len(data)
    for k in cands:
        c = versions[k].content
        if c is None or off + n > c.size:
            continue
        groups.setdefault(c.key(off, n), []).append(k)
    out = set()
    for ks in groups.values():
        if versions[ks[0]].content.slice(off, n) == data:
            out.update(ks)
    return out


def is_blend(old, new, off, data):
    """Whether every byte of `data` is old's or new's byte at its position:
    what a mix of the two sides of one in-place change looks like."""
    if old is None or new is None or old.size != new.size or off + len(data) > old.size:
        return False
    a, b = old.slice(off, len(data)), new.slice(off, len(data))
    step = 4096
    for i in range(0, len(data), step):
        d = data[i:i + step]
        if d == a[i:i + step] or d == b[i:i + step]:
            continue
        if any(x != y and x != z for x, y, z in zip(d, a[i:i + step], b[i:i + step])):
            return False
    return True


def describe(versions, off, data, block=4096, most=8):
    """Which versions each 4 KiB block of a read belongs to, as runs:
    '[0,8192) v3-v5; [8192,8500) v0' -- a mix shows as a change of versions
    at a block boundary; 'none' is a block no version has."""
    runs = []
    pos = off
    end = off + len(data)
    while pos < end:
        nxt = min(end, (pos // block + 1) * block)
        piece = data[pos - off:nxt - off]
        ks = [v.k for v in versions if v.content is not None and pos + len(piece) <= v.content.size
              and v.content.slice(pos, len(piece)) == piece]
        label = "none" if not ks else ("v%d" % ks[0] if len(ks) == 1 else "v%d..v%d(%d)" % (ks[0], ks[-1], len(ks)))
        if runs and runs[-1][2] == label:
            runs[-1][1] = nxt
        else:
            runs.append([pos, nxt, label])
        pos = nxt
    out = "; ".join("[%d,%d) %s" % tuple(r) for r in runs[:most])
    if len(runs) > most:
        out += "; ... %d runs" % len(runs)
    return out


class HandleCheck:
    """What one open handle read, checked read by read.

    `verdict` is None while every read fits one version; otherwise a
    one-line description of the broken promise (and the handle is done)."""

    def __init__(self, fv, t_open0, t_open1, bound):
        self.fv = fv
        self.t0, self.t1, self.bound = t_open0, t_open1, bound
        self.versions = fv.snapshot()
        # Versions whose change began after the open returned cannot be the
        # one it bound to.
        self.cands = {v.k for v in self.versions if v.content is not None}
        self.nreads = 0
        self.nbytes = 0
        self.verdict = None
        self.bad = None         # (offset, bytes) of the read that broke it

    def _refresh(self):
        # Later versions are needed only to say what a wrong read was.
        self.versions = self.fv.snapshot()

    def read(self, off, data):
        """Checks one read; returns False once the handle broke a promise."""
        if self.verdict:
            return False
        self.nreads += 1
        self.nbytes += len(data)
        if not data:
            ok = {k for k in self.cands if self.versions[k].content.size <= off}
            if ok:
                self.cands = ok
                return True
            sizes = sorted({self.versions[k].content.size for k in self.cands})
            self.bad = (off, data)
            self.verdict = "end of file at %d, but the handle's version(s) %s have %s bytes (truncated)" % (
                off, sorted(self.cands)[:6], sizes[:6])
            return False
        ok = matching(self.versions, self.cands, off, data)
        if ok:
            self.cands = ok
            return True
        self._refresh()
        self.bad = (off, data)
        every = matching(self.versions, range(len(self.versions)), off, data)
        if not every:
            self.verdict = "read %d+%d matches no version (mixed or wrong bytes); the handle was at version(s) %s" % (
                off, len(data), sorted(self.cands)[:6])
            change = self._blend_of(off, data)
            if change is not None:
                self.verdict += (
                    "; every byte is v%d's or v%d's (that in-place change was made while this handle could bind "
                    "to it: a mix by MusicFS or the kernel's page cache, or, far less likely, a read that raced "
                    "the writer's own pwrite on the origin)" % (change - 1, change))
        else:
            self.verdict = "read %d+%d is version(s) %s, earlier reads of the same handle were version(s) %s (mixed across reads)" % (
                off, len(data), sorted(every)[:6], sorted(self.cands)[:6])
        return False

    def _blend_of(self, off, data):
        for v in self.versions:
            if v.kind not in ("in-place", "whole") or v.done is None:
                continue
            if not (self.t0 <= v.done + self.bound and self.t1 >= v.begun):
                continue
            if is_blend(self.versions[v.k - 1].content, v.content, off, data):
                return v.k
        return None

    def stale(self):
        """None, or why the version this handle read was already replaced
        more than the bound before its open (checked once it read bytes)."""
        if self.nbytes == 0 or self.verdict:
            return None
        if any(self.fv.allowed(k, self.t0, self.t1, self.bound) for k in self.cands):
            return None
        k = max(self.cands)
        return "an open read version %d, replaced %.2f s before the open (bound %.1f s)" % (
            k, self.fv.replaced_for(k, self.t0) or 0.0, self.bound)

    def version_range(self):
        return (min(self.cands), max(self.cands)) if self.cands else (None, None)
