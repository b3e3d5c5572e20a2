"""Real servers and the fault-injecting proxy for scripts (the network-flap
torture run, scripts/bench --remote), driven through the Rust fixtures'
own binaries: `musicfs-servers` (SeaweedFS S3, OpenSSH SFTP, rclone
WebDAV) and `musicfs-proxy`, both from musicfs-test-utils.

Layer: test and benchmark tooling outside the workspace.

Invariants:
- A Servers or Proxy object ends the process it spawned, by that PID
  (closing the server's stdin first, so it stops its own server and
  removes its files), in stop(); callers register stop() for cleanup.
- Every wait on one of these processes has a deadline: a server that does
  not answer is a RuntimeError naming its log, never a hang.
"""

import json
import os
import queue
import socket
import subprocess
import sys
import threading

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tool_bins(build=True):
    """(musicfs-servers, musicfs-proxy): $MUSICFS_SERVERS_BIN and
    $MUSICFS_PROXY_BIN, else target/debug/ of `cargo build -p
    musicfs-test-utils --bins` (run here unless build is False)."""
    servers = os.environ.get("MUSICFS_SERVERS_BIN")
    proxy = os.environ.get("MUSICFS_PROXY_BIN")
    if servers and proxy:
        return os.path.abspath(servers), os.path.abspath(proxy)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    if build:
        # The same invocation as common.musicfs_bin, so the dependencies
        # built for one serve the other.
        print("cargo build -p musicfs-cli -p musicfs-test-utils --bins", file=sys.stderr, flush=True)
        r = subprocess.run(["cargo", "build", "-q", "-p", "musicfs-cli", "-p", "musicfs-test-utils",
                            "--bins"], cwd=REPO)
        if r.returncode != 0:
            sys.exit("cargo build -p musicfs-test-utils --bins failed")
    servers = servers or os.path.join(target, "debug", "musicfs-servers")
    proxy = proxy or os.path.join(target, "debug", "musicfs-proxy")
    for b in (servers, proxy):
        if not os.access(b, os.X_OK):
            sys.exit("%s is missing: cargo build -p musicfs-test-utils --bins" % b)
    return servers, proxy


class Lines:
    """The stdout lines of a process, read by a thread of their own, so a
    wait for the next one can have a deadline."""

    def __init__(self, proc, what, log):
        self.proc, self.what, self.log = proc, what, log
        self.queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.queue.put(line.strip())
        self.queue.put(None)

    def next(self, timeout, what=None):
        """The next line within `timeout` seconds."""
        what = what or self.what
        try:
            line = self.queue.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError("%s did not answer within %.0f s; log %s" % (what, timeout, self.log))
        if line is None:
            raise RuntimeError("%s exited (%s); log %s" % (what, self.proc.poll(), self.log))
        return line


class Servers:
    """`musicfs-servers PROTOCOL --put-tree ...`: one running server.
    `info` is its JSON line (endpoint, keys, url, ssh_config, ...)."""

    def __init__(self, binary, protocol, trees, logdir, timeout=600):
        self.protocol = protocol
        self.log = os.path.join(logdir, "servers-%s.log" % protocol)
        args = [binary, protocol]
        for prefix, d in trees:
            args += ["--put-tree", "%s=%s" % (prefix or ".", d)]
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, bufsize=1)
        self.lines = Lines(self.proc, "musicfs-servers " + protocol, self.log)
        try:
            self.info = json.loads(self.lines.next(timeout))
        except (RuntimeError, ValueError):
            self.stop()
            raise
        if not self.info.get("ready"):
            self.stop()
            raise RuntimeError("musicfs-servers %s: %s" % (protocol, self.info.get("error")))

    @property
    def port(self):
        return self.info["port"]

    def command(self, line, timeout=120):
        """Sends one command; returns the text after 'ok'."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.lines.next(timeout, "musicfs-servers " + line)
        if not answer.startswith("ok"):
            raise RuntimeError("musicfs-servers %s: %s" % (line, answer))
        return answer[2:].strip()

    def stop_server(self):
        self.command("stop")

    def start_server(self):
        self.command("start")

    def ssh_config_via(self, port):
        return self.command("via %d" % port)

    def stop(self):
        """Closes stdin (the server stops itself and removes its files),
        then waits; SIGTERM, then SIGKILL, by PID, if it lingers."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        for sig in (None, "term", "kill"):
            if sig == "term":
                self.proc.terminate()
            elif sig == "kill":
                self.proc.kill()
            try:
                self.proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None


class Proxy:
    """`musicfs-proxy --upstream 127.0.0.1:PORT`: `addr` is where clients
    connect, `ctl(...)` switches it while it runs."""

    def __init__(self, binary, upstream_port, logdir, delay_ms=0, rate=None, tag="proxy"):
        self.log = os.path.join(logdir, "%s.log" % tag)
        args = [binary, "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:%d" % upstream_port,
                "--delay-ms", str(delay_ms), "--control", "127.0.0.1:0"]
        if rate:
            args += ["--rate", str(rate)]
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=err, text=True, bufsize=1)
        self.sock = None
        lines = Lines(self.proc, "musicfs-proxy", self.log)
        try:
            listen = lines.next(30).split()
            control = lines.next(30).split()
        except RuntimeError:
            self.stop()
            raise
        self.addr = listen[1]
        self.port = int(self.addr.rsplit(":", 1)[1])
        host, port = control[1].rsplit(":", 1)
        self.control = (host, int(port))

    def ctl(self, *commands):
        """Sends each command on one control connection; returns the
        answers' text after 'ok'. An 'error' answer raises."""
        if self.sock is None:
            self.sock = socket.create_connection(self.control, timeout=30)
            self.reader = self.sock.makefile("r")
        out = []
        for c in commands:
            self.sock.sendall((c + "\n").encode())
            answer = self.reader.readline().strip()
            if not answer.startswith("ok"):
                raise RuntimeError("musicfs-proxy %r: %s" % (c, answer or "connection closed"))
            out.append(answer[2:].strip())
        return out

    def stats(self):
        """The proxy's counters as a dict of ints (and 'listening')."""
        return dict(kv.split("=", 1) for kv in self.ctl("stats")[0].split())

    def calm(self):
        """Forward everything, no delay, no cap."""
        self.ctl("mode forward", "delay 0", "rate off")

    def stop(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
