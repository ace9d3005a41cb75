#!/usr/bin/env python3
"""One QEMU post-copy migration on this host, for bench/scripts/qemu-postcopy.sh.

Starts a source QEMU running the boot-sector guest (qemu-postcopy-guest.S),
a destination QEMU with -incoming tcp:127.0.0.1:PORT, turns post-copy on on
both (and postcopy-blocktime on the destination), migrates, switches to
post-copy at once, waits for both sides to finish and prints one JSON object:
both sides' `info migrate`, the values parsed from it, and, from the
destination's trace log, the time of every page request from the fault
thread recording it (postcopy_page_req_add) to the page being placed
(postcopy_page_req_del, after UFFDIO_COPY).

Talks to each QEMU over QMP on a unix socket; every wait is bounded.
"""
import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time


class Monitor:
    """QEMU's QMP socket, used to run human monitor commands (the same text
    as `info migrate` on a terminal, without the terminal's line editing)."""

    def __init__(self, path, deadline):
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.time() > deadline:
                    raise RuntimeError(f"no monitor at {path}")
                time.sleep(0.1)
        self.s.settimeout(30)
        self.f = self.s.makefile("rb")
        self.reply()  # the greeting
        self.s.sendall(b'{"execute": "qmp_capabilities"}\n')
        self.reply()

    def reply(self):
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError("monitor closed")
            msg = json.loads(line)
            if "event" not in msg:  # events come in between: not ours
                return msg

    def cmd(self, line):
        req = {"execute": "human-monitor-command", "arguments": {"command-line": line}}
        self.s.sendall(json.dumps(req).encode() + b"\n")
        msg = self.reply()
        if "error" in msg:
            raise RuntimeError(f"`{line}`: {msg['error']}")
        return msg.get("return", "").replace("\r", "").strip()

    def quit(self):
        try:
            self.s.sendall(b'{"execute": "quit"}\n')
        except OSError:
            pass


def parse_info_migrate(text):
    """The numbers of `info migrate` this QEMU prints, by name."""
    v = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Za-z][A-Za-z -]*?):\s*(.*)$", line)
        if not m:
            continue
        key, val = m.group(1).strip().lower(), m.group(2).strip()
        if key == "postcopy vcpu blocktime":
            v["postcopy_vcpu_blocktime_ms"] = [int(x) for x in re.findall(r"\d+", val)]
        elif key == "migration status":
            v["status"] = val
        else:
            n = re.match(r"^(-?\d+(?:\.\d+)?)\s*(\S*)", val)
            if n:
                name = re.sub(r"[^a-z0-9]+", "_", key).strip("_")
                unit = n.group(2)
                if unit:
                    name += "_" + re.sub(r"[^a-z0-9]+", "_", unit.lower()).strip("_")
                num = float(n.group(1))
                v[name] = int(num) if num.is_integer() else num
    return v


def quantile(sorted_vals, q):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def parse_trace(path):
    """Page-request times from the destination's trace log (log backend,
    -msg timestamp=on, microseconds): for every page requested from the
    source, from postcopy_page_req_add (the fault thread has read the
    userfaultfd fault and records the request just before sending it) to
    postcopy_page_req_del (the page has been placed with UFFDIO_COPY,
    which wakes whoever faulted on it). Both fire once per requested page,
    so tracing them costs little, unlike the blocktime events, which fire
    for every page placed."""
    line_re = re.compile(r"^(\d+)@(\d+)\.(\d+):(\w+) (.*)$")
    ptr_re = re.compile(r"req (0x[0-9a-f]+|\(nil\))")
    open_reqs = {}  # page -> time its request was recorded (s)
    lat_us = []
    faults = 0
    with open(path, errors="replace") as f:
        for line in f:
            m = line_re.match(line.strip())
            if not m:
                continue
            t = int(m.group(2)) + int(m.group(3)) / 1e6
            ev, rest = m.group(4), m.group(5)
            if ev == "postcopy_ram_fault_thread_request":
                faults += 1
            elif ev in ("postcopy_page_req_add", "postcopy_page_req_del"):
                p = ptr_re.search(rest)
                if not p:
                    continue
                if ev == "postcopy_page_req_add":
                    open_reqs.setdefault(p.group(1), t)
                elif p.group(1) in open_reqs:
                    lat_us.append((t - open_reqs.pop(p.group(1))) * 1e6)
    lat_us.sort()
    return {
        "faults_read_by_fault_thread": faults,
        "requests_timed": len(lat_us),
        "requests_never_resolved": len(open_reqs),
        "request_us_p50": quantile(lat_us, 0.5),
        "request_us_p90": quantile(lat_us, 0.9),
        "request_us_p99": quantile(lat_us, 0.99),
        "request_us_min": lat_us[0] if lat_us else None,
        "request_us_max": lat_us[-1] if lat_us else None,
        "request_us_mean": statistics.fmean(lat_us) if lat_us else None,
        "request_us_all": [round(x, 1) for x in lat_us],
    }


def serial_dots(path):
    try:
        with open(path, "rb") as f:
            return f.read().count(b".")
    except OSError:
        return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qemu-root", required=True, help="the unpacked QEMU (…/qemu, with usr/bin, usr/share)")
    ap.add_argument("--image", required=True)
    ap.add_argument("--memory-mib", type=int, default=64)
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--port", type=int, default=4444)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--trace", action="store_true", help="time every vCPU fault from the destination's trace log")
    ap.add_argument("--postcopy-bandwidth", type=int, default=0,
                    help="max-postcopy-bandwidth in bytes/s (0: QEMU's default, unlimited)")
    ap.add_argument("--preempt", action="store_true",
                    help="postcopy-preempt on both sides: requested pages on a channel of their own")
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()

    deadline = time.time() + a.timeout
    q = a.qemu_root
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{q}/usr/lib/x86_64-linux-gnu:{q}/lib/x86_64-linux-gnu"
    env["QEMU_MODULE_DIR"] = f"{q}/usr/lib/x86_64-linux-gnu/qemu"
    os.makedirs(a.workdir, exist_ok=True)
    w = a.workdir

    def qemu_cmd(name, extra):
        return [f"{q}/usr/bin/qemu-system-x86_64",
                "-L", f"{q}/usr/share/qemu", "-L", f"{q}/usr/share/seabios",
                "-accel", a.accel, "-m", f"{a.memory_mib}M", "-smp", "1",
                "-nodefaults", "-display", "none", "-vga", "none", "-no-reboot",
                "-drive", f"file={a.image},format=raw,if=ide,file.locking=off",
                "-serial", f"file:{w}/{name}-serial.log",
                "-qmp", f"unix:{w}/{name}.mon,server=on,wait=off"] + extra

    for name in ("src", "dst"):
        for suffix in ("-serial.log", ".mon", "-trace.log"):
            try:
                os.unlink(f"{w}/{name}{suffix}")
            except FileNotFoundError:
                pass

    result = {"accel": a.accel, "memory_mib": a.memory_mib, "traced": a.trace, "preempt": a.preempt,
              "postcopy_bandwidth": a.postcopy_bandwidth}
    procs = []
    try:
        src_cmd = qemu_cmd("src", [])
        trace = []
        if a.trace:
            for ev in ("postcopy_ram_fault_thread_request", "postcopy_page_req_add", "postcopy_page_req_del"):
                trace += ["-trace", ev]
            trace += ["-D", f"{w}/dst-trace.log", "-msg", "timestamp=on"]
        dst_cmd = qemu_cmd("dst", ["-incoming", f"tcp:127.0.0.1:{a.port}"] + trace)
        result["source_command"] = " ".join(src_cmd)
        result["destination_command"] = " ".join(dst_cmd)

        src_err = open(f"{w}/src-stderr.log", "w")
        dst_err = open(f"{w}/dst-stderr.log", "w")
        procs.append(subprocess.Popen(src_cmd, env=env, stdout=src_err, stderr=subprocess.STDOUT))
        src = Monitor(f"{w}/src.mon", deadline)
        # the guest has started and made a few passes over its memory
        while serial_dots(f"{w}/src-serial.log") < 2:
            if procs[0].poll() is not None:
                raise RuntimeError(f"source QEMU exited with {procs[0].returncode}")
            if time.time() > deadline:
                raise RuntimeError("the guest printed nothing on the source: "
                                   + open(f"{w}/src-serial.log", "rb").read()[:200].decode(errors="replace"))
            time.sleep(0.05)
        result["source_passes_before"] = 16 * serial_dots(f"{w}/src-serial.log")

        procs.append(subprocess.Popen(dst_cmd, env=env, stdout=dst_err, stderr=subprocess.STDOUT))
        dst = Monitor(f"{w}/dst.mon", deadline)
        setup = [
            (dst, "migrate_set_capability postcopy-ram on"),
            (dst, "migrate_set_capability postcopy-blocktime on"),
            (src, "migrate_set_capability postcopy-ram on"),
        ]
        if a.preempt:
            setup += [(dst, "migrate_set_capability postcopy-preempt on"),
                      (src, "migrate_set_capability postcopy-preempt on")]
        if a.postcopy_bandwidth:
            setup.append((src, f"migrate_set_parameter max-postcopy-bandwidth {a.postcopy_bandwidth}"))
        result["monitor_commands"] = []
        for mon, line in setup:
            out = mon.cmd(line)
            result["monitor_commands"].append(("dst: " if mon is dst else "src: ") + line)
            if out:
                raise RuntimeError(f"`{line}`: {out}")
        t0 = time.time()
        for line in (f"migrate -d tcp:127.0.0.1:{a.port}", "migrate_start_postcopy"):
            out = src.cmd(line)
            result["monitor_commands"].append("src: " + line)
            if out:
                raise RuntimeError(f"`{line}`: {out}")

        # wait for the source, then the destination, to say completed
        src_info = dst_info = ""
        seen_postcopy = False
        while True:
            src_info = src.cmd("info migrate")
            st = parse_info_migrate(src_info).get("status", "")
            seen_postcopy |= st == "postcopy-active"
            if st in ("completed", "failed", "cancelled"):
                break
            if time.time() > deadline:
                raise RuntimeError(f"migration not finished after {a.timeout} s:\n{src_info}")
            time.sleep(0.01)
        result["source_finished_s"] = round(time.time() - t0, 3)
        while True:
            dst_info = dst.cmd("info migrate")
            st = parse_info_migrate(dst_info).get("status", "")
            if st in ("completed", "failed"):
                break
            if time.time() > deadline:
                raise RuntimeError(f"destination not finished after {a.timeout} s:\n{dst_info}")
            time.sleep(0.05)
        result["seen_postcopy_active"] = seen_postcopy
        # the guest keeps running on the destination
        d0 = serial_dots(f"{w}/dst-serial.log")
        time.sleep(1.0)
        d1 = serial_dots(f"{w}/dst-serial.log")
        result["destination_passes_in_1s_after"] = 16 * (d1 - d0)
        result["destination_status"] = dst.cmd("info status")
        result["source_status"] = src.cmd("info status")
        result["source_info_migrate"] = src_info
        result["destination_info_migrate"] = dst_info
        result["source"] = parse_info_migrate(src_info)
        result["destination"] = parse_info_migrate(dst_info)
        for mon in (dst, src):
            mon.quit()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if a.trace:
            result["trace"] = parse_trace(f"{w}/dst-trace.log")
    except Exception as e:  # report what stopped it, with both QEMUs' output
        result["error"] = str(e)
        for name in ("src", "dst"):
            try:
                result[f"{name}_stderr"] = open(f"{w}/{name}-stderr.log").read()[-2000:]
            except OSError:
                pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    json.dump(result, sys.stdout, indent=1)
    print()
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
