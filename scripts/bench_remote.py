"""The remote rows of scripts/bench (issue 10): MusicFS against `rclone
mount --vfs-cache-mode full`, `s3fs` (S3) and `sshfs` (SFTP), each reading
the same real servers (SeaweedFS S3 and OpenSSH SFTP, started with
musicfs-servers) through the same musicfs-proxy at several round-trip
times (the proxy's one-way delay is half the RTT; new connections pay the
TCP handshake's round trip too).

Layer: benchmark tooling only; nothing in MusicFS imports it.

Invariants:
- The servers and the proxy are started once per bench and stopped (by
  the PIDs this module spawned) at the end, also on failure; each system's
  mount is stopped the way bench_fs.Mount stops it.
- Every system starts each run from a fresh mount with an empty cache
  directory; "cold" means nothing of the file was read through any mount
  of that system since.
- Every figure checks what it read (the first bytes against the source,
  a whole file's length, find's count), so a broken mount is an error,
  not a fast number.
"""

import os
import shutil
import subprocess
import sys
import time

import bench_fs as B

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torturelib import remote  # noqa: E402

ORIGIN = "lib"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# data


def make_meta_objects(work, n):
    """n small distinct files (about 40 bytes each) in artist/album dirs,
    100 per album, 5 albums per artist: the listing test, made once."""
    d = os.path.join(work, "remote-meta-%d" % n)
    stamp = d + ".complete"
    if not os.path.exists(stamp):
        log("bench: generating %d small files in %s" % (n, d))
        if os.path.exists(d):
            shutil.rmtree(d)
        for i in range(n):
            sub = os.path.join(d, "Artist %04d" % (i // 500), "Album %d - Some Title" % (i // 100 % 5))
            if i % 100 == 0:
                os.makedirs(sub, exist_ok=True)
            with open(os.path.join(sub, "%02d - A track with a realistic title %d.flac" % (i % 100, i)),
                      "wb") as f:
                f.write(b"object %d of the listing benchmark\n" % i)
        open(stamp, "w").close()
    return d


def make_streams(work, big, n):
    """n hard links to the big track (distinct keys on the server, each
    fetched cold on its own) for the 8-player RSS figure."""
    d = os.path.join(work, "remote-streams-%d" % n)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    for i in range(n):
        os.link(big, os.path.join(d, "Stream %02d.flac" % (i + 1)))
    return d


# --------------------------------------------------------------------------
# servers and the systems under test


class Setup:
    """The servers (with lib/, meta/ and streams/ uploaded) and one proxy
    in front of each."""

    def __init__(self, work, protocols, trees, bins):
        """`trees` is {protocol: [(prefix, local dir)]}."""
        self.work = work
        self.servers = {}
        self.proxies = {}
        self.ssh_config = None
        servers_bin, proxy_bin = bins
        logdir = os.path.join(work, "remote-logs")
        os.makedirs(logdir, exist_ok=True)
        try:
            for proto in protocols:
                t = time.monotonic()
                self.servers[proto] = remote.Servers(servers_bin, proto, trees[proto], logdir)
                log("bench: %s server up with the trees uploaded in %.0f s"
                    % (proto, time.monotonic() - t))
                self.proxies[proto] = remote.Proxy(proxy_bin, self.servers[proto].port, logdir,
                                                   tag="proxy-" + proto)
            if "sftp" in self.servers:
                self.ssh_config = self.servers["sftp"].ssh_config_via(self.proxies["sftp"].port)
        except BaseException:
            self.stop()
            raise

    def info(self, proto):
        return self.servers[proto].info

    def set_rtt(self, proto, rtt_ms):
        self.proxies[proto].ctl("mode forward", "rate off", "delay %d" % (rtt_ms // 2))

    def stop(self):
        for p in self.proxies.values():
            p.stop()
        for s in self.servers.values():
            s.stop()


class MusicFsRemote(B.MusicFs):
    lib = ORIGIN

    def __init__(self, work, binary, setup, proto):
        B.MusicFs.__init__(self, None, work, binary)
        self.name = "musicfs"
        self.setup = setup
        self.proto = proto

    def cache_dir(self):
        return os.path.join(self.work, "cache-remote-musicfs")

    def config(self):
        info = self.setup.info(self.proto)
        proxy = self.setup.proxies[self.proto]
        if self.proto == "s3":
            table = 'url = "s3://%s"\nendpoint = "http://%s"\nregion = "%s"\n' % (
                info["bucket"], proxy.addr, info["region"])
        else:
            table = 'url = "sftp://%s@127.0.0.1:%d%s"\nssh_config = "%s"\n' % (
                info["user"], proxy.port, info["root"], self.setup.ssh_config)
        path = os.path.join(self.work, "musicfs-remote.toml")
        with open(path, "w") as f:
            f.write("[origin.%s]\n%s" % (ORIGIN, table))
        return path

    def command(self):
        return [self.binary, "mount", self.mountpoint, "--config", self.config(),
                "--cache-dir", self.cache_dir(), "--cache-size", "50G"]

    def env(self):
        env = dict(os.environ)
        if self.proto == "s3":
            info = self.setup.info("s3")
            env.update(AWS_ACCESS_KEY_ID=info["access_key_id"],
                       AWS_SECRET_ACCESS_KEY=info["secret_access_key"], AWS_REGION=info["region"])
        return env


class RcloneRemote(B.Rclone):
    def __init__(self, work, setup, proto):
        B.Rclone.__init__(self, None, work)
        self.name = "rclone"
        self.setup = setup
        self.proto = proto

    def cache_dir(self):
        return os.path.join(self.work, "cache-remote-rclone")

    def env(self):
        env = dict(os.environ)
        info = self.setup.info(self.proto)
        proxy = self.setup.proxies[self.proto]
        env["RCLONE_CONFIG"] = os.path.join(self.work, "rclone-remote.conf")
        open(env["RCLONE_CONFIG"], "a").close()
        if self.proto == "s3":
            env.update(info["rclone_env"])
            env["RCLONE_CONFIG"] = os.path.join(self.work, "rclone-remote.conf")
            env["RCLONE_CONFIG_%s_ENDPOINT" % info["rclone_remote"].upper()] = "http://" + proxy.addr
        else:
            p = "RCLONE_CONFIG_MUSICFS_SFTP_"
            env.update({p + "TYPE": "sftp", p + "HOST": "127.0.0.1", p + "PORT": str(proxy.port),
                        p + "USER": info["user"], p + "KEY_FILE": info["private_key"],
                        p + "KNOWN_HOSTS_FILE": info["known_hosts"]})
        return env

    def command(self):
        info = self.setup.info(self.proto)
        src = ("%s:%s" % (info["rclone_remote"], info["bucket"]) if self.proto == "s3"
               else "musicfs_sftp:%s" % info["root"])
        # On S3 rclone takes the server's modification time: by default it
        # reads its own mtime from each object's metadata, one HEAD per
        # file, and `ls -lR` over 2,000 objects took 227 s at 100 ms (a
        # trial run). The flag is what an S3 user would set; it only makes
        # the anchor stronger.
        extra = ["--use-server-modtime"] if self.proto == "s3" else []
        return ["rclone", "mount", src, self.mountpoint, "--vfs-cache-mode", "full",
                "--cache-dir", self.cache_dir(), "--read-only", "--log-level", "NOTICE"] + extra


class S3fs(B.Mount):
    name = "s3fs"

    def __init__(self, work, setup):
        B.Mount.__init__(self, None, work)
        self.setup = setup

    def command(self):
        info = self.setup.info("s3")
        pw = os.path.join(self.work, "s3fs-passwd")
        with open(pw, "w") as f:
            f.write("%s:%s\n" % (info["access_key_id"], info["secret_access_key"]))
        os.chmod(pw, 0o600)
        return ["s3fs", info["bucket"], self.mountpoint, "-f", "-o", "ro",
                "-o", "url=http://" + self.setup.proxies["s3"].addr, "-o", "use_path_request_style",
                "-o", "endpoint=" + info["region"], "-o", "passwd_file=" + pw]


class Sshfs(B.Mount):
    name = "sshfs"

    def __init__(self, work, setup):
        B.Mount.__init__(self, None, work)
        self.setup = setup

    def command(self):
        info = self.setup.info("sftp")
        return ["sshfs", "-f", "-F", self.setup.ssh_config, "%s:%s" % (info["host_alias"], info["root"]),
                self.mountpoint, "-o", "ro"]


# --------------------------------------------------------------------------
# the measurements


class RemoteBench:
    """Runs the figures for each protocol and RTT; `results` is
    {proto: {rtt: {figure: {system: summary}}}}."""

    FIGURES = [
        ("ttfb cold", "ms"), ("next track ttfb", "ms"), ("seq cold", "MB/s"), ("seq warm", "MB/s"),
        ("find cold", "s"), ("find warm", "s"), ("ls -lR cold", "s"), ("ls -lR warm", "s"),
        ("8 players cold", "MB/s"), ("8 players RSS", "MB"),
    ]

    def __init__(self, work, binary, runs, protocols, rtts, lib, album, big, meta_dir, n_meta, streams_dir,
                 bins, anchors=True):
        self.work = work
        self.binary = binary
        self.runs = runs
        self.protocols = protocols
        self.rtts = rtts
        self.lib = lib
        self.album = album          # two tracks, relative to lib
        self.big = big              # relative to lib
        self.n_meta = n_meta
        self.streams = sorted(os.listdir(streams_dir)) if streams_dir else []
        self.anchors = anchors      # s3fs / sshfs too (not in the quick form)
        self.results = {}
        # The 8-player figure runs on S3 only (and not in the quick form).
        trees = {p: [("lib", lib), ("meta", meta_dir)]
                 + ([("streams", streams_dir)] if p == "s3" and streams_dir else []) for p in protocols}
        self.setup = Setup(work, protocols, trees, bins)

    def systems(self, proto):
        anchor = S3fs(self.work, self.setup) if proto == "s3" else Sshfs(self.work, self.setup)
        return [MusicFsRemote(self.work, self.binary, self.setup, proto),
                RcloneRemote(self.work, self.setup, proto)] + ([anchor] if self.anchors else [])

    def run(self):
        try:
            for proto in self.protocols:
                for rtt in self.rtts:
                    self.one(proto, rtt)
        finally:
            self.setup.stop()
        return self.results

    def fresh(self, m):
        m.stop()
        m.clear_cache()
        m.start()

    def one(self, proto, rtt):
        log("bench: remote %s at RTT %d ms" % (proto, rtt))
        self.setup.set_rtt(proto, rtt)
        systems = self.systems(proto)
        values = {f: {m.name: [] for m in systems} for f, _ in self.FIGURES}
        rss_systems = systems if proto == "s3" and self.streams else []
        first = [open(os.path.join(self.lib, t), "rb").read(64 * 1024) for t in self.album]
        big_size = os.path.getsize(os.path.join(self.lib, self.big))
        stream_size = big_size
        try:
            for _ in range(self.runs):
                for m in systems:
                    v = values
                    self.fresh(m)
                    root = m.root
                    lib = os.path.join(root, "lib")
                    a, b = (os.path.join(lib, t) for t in self.album)
                    os.stat(a)  # the player browsed to it
                    v["ttfb cold"][m.name].append(self.first(m, a, first[0]) * 1e3)
                    B.read_whole(a)
                    v["next track ttfb"][m.name].append(self.first(m, b, first[1]) * 1e3)
                    big = os.path.join(lib, self.big)
                    v["seq cold"][m.name].append(B.timed_read([big], [big_size]))
                    m.settle()
                    B.evict([big])  # from the mount's page cache: the daemon serves it
                    v["seq warm"][m.name].append(B.timed_read([big], [big_size]))
                    for label, cmd in [("find", "find meta -type f | wc -l"), ("ls -lR", "ls -lR meta | wc -l")]:
                        if label == "ls -lR":
                            self.fresh(m)
                        for state in ("cold", "warm"):
                            t, out = B.timed_shell(cmd, cwd=m.root)
                            n = int(out.strip())
                            if (label == "find" and n != self.n_meta) or n < self.n_meta:
                                raise RuntimeError("%s: `%s` gave %d (%d objects)" % (m.name, cmd, n, self.n_meta))
                            v["%s %s" % (label, state)][m.name].append(t)
                    if m in rss_systems:
                        self.fresh(m)
                        paths = [os.path.join(m.root, "streams", s) for s in self.streams]
                        for p in paths:
                            os.stat(p)
                        with B.Sampler(m.pid) as s:
                            mbps = B.timed_read(paths, [stream_size] * len(paths))
                        v["8 players cold"][m.name].append(mbps)
                        v["8 players RSS"][m.name].append(s.peak()["rss_mb"])
                    log("  %s %d ms %-8s %s" % (proto, rtt, m.name, " ".join(
                        "%s=%.2f" % (f.replace(" ", "_"), v[f][m.name][-1]) for f, _ in self.FIGURES
                        if v[f][m.name])))
        finally:
            for m in systems:
                m.stop()
        out = {}
        for f, unit in self.FIGURES:
            per = {}
            for name, vals in values[f].items():
                if vals:
                    per[name] = dict(B.summary(vals), unit=unit)
            if per:
                out[f] = per
        self.results.setdefault(proto, {})[rtt] = out

    @staticmethod
    def first(m, path, want):
        t, got = B.first_bytes(path)
        if got != want:
            raise RuntimeError("%s: wrong first bytes of %s" % (m.name, path))
        return t


def ratio_cell(per, system, unit):
    """system's median over rclone's, as text."""
    if system not in per or "rclone" not in per or per["rclone"]["median"] == 0:
        return "-"
    return "%.2f" % (per[system]["median"] / per["rclone"]["median"])


def fmt(v, unit):
    if unit in ("MB/s", "MB"):
        return "%.1f" % v
    if unit == "ms":
        return "%.0f" % v
    return "%.2f" % v


def markdown(remote):
    results = remote["figures"]
    out = ["", "Remote origins (%s at RTT %s ms; %d run(s) per figure; track %s, %.0f MB; %d objects): "
           "medians (min-max) through musicfs-proxy; ratios are the median over rclone's from the same "
           "run (for ms and s lower is better, for MB/s higher)." % (
               ", ".join(remote["protocols"]), ", ".join(map(str, remote["rtts_ms"])), remote["runs"],
               remote["track"], remote["track_bytes"] / 1e6, remote["objects"]), ""]
    out.append("| protocol | RTT | figure | unit | musicfs | rclone | s3fs / sshfs | musicfs / rclone "
               "| s3fs or sshfs / rclone |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for proto, per_rtt in results.items():
        anchor = "s3fs" if proto == "s3" else "sshfs"
        for rtt, figs in per_rtt.items():
            for f, per in figs.items():
                unit = next(iter(per.values()))["unit"]
                cells = []
                for s in ("musicfs", "rclone", anchor):
                    r = per.get(s)
                    cells.append("%s (%s-%s)" % (fmt(r["median"], unit), fmt(r["min"], unit),
                                                 fmt(r["max"], unit)) if r else "-")
                out.append("| %s | %s ms | %s | %s | %s | %s | %s |" % (
                    proto, rtt, f, unit, " | ".join(cells), ratio_cell(per, "musicfs", unit),
                    ratio_cell(per, anchor, unit)))
    return "\n".join(out) + "\n"


def tool_bins(build, profile):
    """musicfs-servers and musicfs-proxy, built in `profile` unless given
    by $MUSICFS_SERVERS_BIN / $MUSICFS_PROXY_BIN or build is False."""
    servers = os.environ.get("MUSICFS_SERVERS_BIN")
    proxy = os.environ.get("MUSICFS_PROXY_BIN")
    if servers and proxy:
        return servers, proxy
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(remote.REPO, "target"))
    if build:
        log("bench: cargo build --%s -p musicfs-test-utils --bins" % profile)
        subprocess.run(["cargo", "build", "-q", "--profile", profile, "-p", "musicfs-test-utils", "--bins"],
                       check=True, cwd=remote.REPO)
    d = os.path.join(target, "debug" if profile == "dev" else profile)
    servers = servers or os.path.join(d, "musicfs-servers")
    proxy = proxy or os.path.join(d, "musicfs-proxy")
    for b in (servers, proxy):
        if not os.access(b, os.X_OK):
            sys.exit("bench: %s is missing (cargo build --release -p musicfs-test-utils --bins)" % b)
    return servers, proxy

