"""Helpers for integration tests: launch real mdvm processes on /dev/kvm,
talk QMP to them, and check guest memory dumps."""
import json
import os
import socket
import subprocess
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MDVM = os.path.join(ROOT, "build", "mdvm")
GUEST = os.path.join(ROOT, "guest", "mdvm-guest.elf")
PAGE = 4096
BANNER = "mdvm-guest: ready"


class QMPError(Exception):
    def __init__(self, err):
        super().__init__("%s: %s" % (err.get("class"), err.get("desc")))
        self.cls = err.get("class")
        self.desc = err.get("desc")


class QMP:
    """Minimal QMP client over the control socket (the test's own, so that
    the server is checked against an independent implementation)."""

    def __init__(self, path, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        self.greeting = self.recv()
        assert "QMP" in self.greeting, self.greeting

    def negotiate(self):
        self.cmd("qmp_capabilities")
        return self

    def recv(self):
        dec = json.JSONDecoder()
        while True:
            text = self.buf.decode("utf-8", "replace").lstrip()
            if text:
                try:
                    obj, end = dec.raw_decode(text)
                    self.buf = text[end:].encode()
                    return obj
                except ValueError:
                    pass
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk

    def send_raw(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def reply(self):
        """Next non-event message; events are kept in self.events."""
        while True:
            msg = self.recv()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def execute(self, name, **args):
        req = {"execute": name}
        if args:
            req["arguments"] = {k.replace("_", "-") if k not in ("filename", "val", "size") else k: v
                                for k, v in args.items()}
        self.send_raw(json.dumps(req))
        return self.reply()

    def cmd(self, name, **args):
        r = self.execute(name, **args)
        if "error" in r:
            raise QMPError(r["error"])
        return r["return"]

    def wait_event(self, name, timeout=30):
        deadline = time.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            if time.time() > deadline:
                raise TimeoutError("no %s event" % name)
            self.sock.settimeout(max(0.1, deadline - time.time()))
            msg = self.recv()
            if "event" in msg:
                self.events.append(msg)

    def close(self):
        self.sock.close()


class VM:
    """One mdvm process running the test guest."""

    def __init__(self, tmp, cmdline="idle", memory="64M", cpus=1, extra=(), name="vm"):
        self.tmp = str(tmp)
        self.sock = os.path.join(self.tmp, name + ".sock")
        self.console = os.path.join(self.tmp, name + ".console")
        self.stderr_path = os.path.join(self.tmp, name + ".stderr")
        self.args = [MDVM, "run", "--kernel", GUEST, "--memory", memory, "--cpus", str(cpus),
                     "--control", self.sock, "--console", "file:" + self.console]
        if cmdline is not None:
            self.args += ["--cmdline", cmdline]
        self.args += list(extra)
        self.proc = None
        self.qmp = None

    def start(self, wait_banner=True):
        self.errf = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.errf)
        deadline = time.time() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError("mdvm exited %d: %s" % (self.proc.returncode, self.stderr()))
            if time.time() > deadline:
                raise TimeoutError("control socket did not appear")
            time.sleep(0.02)
        while True:
            try:
                self.qmp = QMP(self.sock).negotiate()
                break
            except ConnectionRefusedError:
                # The socket file exists from bind() on, but accepts
                # connections only after listen().
                if time.time() > deadline:
                    raise
                time.sleep(0.01)
        if wait_banner:
            self.wait_console(BANNER)
        return self

    def stderr(self):
        try:
            with open(self.stderr_path) as f:
                return f.read()
        except OSError:
            return ""

    def console_text(self):
        try:
            with open(self.console, errors="replace") as f:
                return f.read().replace("\r\n", "\n")
        except OSError:
            return ""

    def wait_console(self, text, timeout=30, start=0):
        deadline = time.time() + timeout
        while True:
            c = self.console_text()
            if text in c[start:]:
                return c
            if self.proc.poll() is not None and text not in self.console_text()[start:]:
                raise AssertionError("mdvm exited (%d) before %r appeared; console:\n%s\nstderr:\n%s"
                                     % (self.proc.returncode, text, c[-2000:], self.stderr()))
            if time.time() > deadline:
                raise TimeoutError("%r not on the console after %ss; console:\n%s"
                                   % (text, timeout, c[-2000:]))
            time.sleep(0.02)

    def guest(self, command, timeout=20000):
        """Run a test-guest command through the test device; returns (status, text)."""
        r = self.qmp.cmd("guest-command", command=command, timeout=timeout)
        return r["status"], r["response"]

    def pmemsave(self, gpa, size):
        path = os.path.join(self.tmp, "dump-%x-%x.bin" % (gpa, size))
        self.qmp.cmd("pmemsave", val=gpa, size=size, filename=path)
        with open(path, "rb") as f:
            data = f.read()
        os.unlink(path)
        assert len(data) == size
        return data

    def wait_exit(self, timeout=30):
        return self.proc.wait(timeout)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            try:
                self.qmp.cmd("quit")
            except Exception:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.qmp:
            self.qmp.close()
        if getattr(self, "errf", None):
            self.errf.close()


def run_mdvm(*args, timeout=60):
    """Run `mdvm ARGS` to completion; returns CompletedProcess (text)."""
    return subprocess.run([MDVM] + list(args), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


def wait_migration(vm, timeout=60):
    """query-migrate of a source once its migration ended (completed,
    failed or cancelled)."""
    deadline = time.time() + timeout
    while True:
        r = vm.qmp.cmd("query-migrate")
        if r.get("status") in ("completed", "failed", "cancelled"):
            return r
        assert time.time() < deadline, "migration did not finish: %r" % r
        time.sleep(0.02)


def walk_bytes(dump):
    """The walk counter byte of every page in a dump."""
    return [dump[i] for i in range(0, len(dump), PAGE)]


def check_walk_consistent(dump):
    """QEMU migration-test rule: after an interrupted sweep, every page holds
    v+1 for a prefix and v for the rest (mod 256). Returns (v, boundary)."""
    b = walk_bytes(dump)
    assert b, "empty dump"
    first = b[0]
    boundary = len(b)
    for i, x in enumerate(b):
        if x != first:
            boundary = i
            break
    for i in range(boundary, len(b)):
        assert b[i] == (first - 1) & 0xff, (
            "walk inconsistency at page %d: prefix value %d, then %d at page %d, %d at page %d"
            % (i, first, b[boundary], boundary, b[i], i))
    return first, boundary


def fill_pattern(pfn, gen):
    """The 64-bit word the guest's `fill` writes (docs/test-guest.md)."""
    m = (1 << 64) - 1
    return ((pfn * 0x9E3779B97F4A7C15) & m) ^ ((gen * 0xD1B54A32D192ED03) & m) ^ 0x6d6476
