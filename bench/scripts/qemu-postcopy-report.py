#!/usr/bin/env python3
"""Writes bench/results/qemu-postcopy.{json,md} from the runs of
bench/scripts/qemu-postcopy.sh (its work directory holds shoal.json,
shoal.out and one qemu-ACCEL-MODE-plain|traced-I.json per QEMU run)."""
import glob
import json
import os
import statistics
import sys

(w, out, mem, mib, stride, repeat, accels, qver, kernel, shoal_cmd) = sys.argv[1:]
mem, mib, stride, repeat = int(mem), int(mib), int(stride), int(repeat)
accels = accels.split()


def load(p):
    try:
        return json.load(open(p))
    except (OSError, ValueError) as e:
        return {"error": f"{os.path.basename(p)}: {e}"}


def quantile(v, q):
    if not v:
        return None
    v = sorted(v)
    return v[min(len(v) - 1, max(0, int(round(q * (len(v) - 1)))))]


def f(x, nd=1):
    if x is None:
        return "n/a"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


# shoal
sm = load(f"{w}/shoal.json")
n0 = sm["nodes"][0]
summary = [l.strip() for l in open(f"{w}/shoal.out") if l.startswith("shoal:")]
shoal = {
    "command": shoal_cmd,
    "summary": summary[-1] if summary else None,
    "faults_remote": n0.get("faults_remote"),
    "remote_fetches": n0.get("remote_fetches"),
    "bytes_fabric_read": n0.get("bytes_fabric_read"),
    "pages_evicted": sm["total"].get("pages_evicted"),
    "fault_remote_us_p50": n0.get("fault_remote_us_p50"),
    "fault_remote_us_p99": n0.get("fault_remote_us_p99"),
    "fault_remote_owner_us_p50": n0.get("fault_remote_owner_us_p50"),
    "fault_remote_fabric_read_us_p50": n0.get("fault_remote_fabric_read_us_p50"),
    "fault_remote_map_us_p50": n0.get("fault_remote_map_us_p50"),
    "fault_remote_rest_us_p50": n0.get("fault_remote_rest_us_p50"),
    "wall_seconds": n0.get("wall_seconds"),
}
sp50 = shoal["fault_remote_us_p50"] or None

# QEMU, one configuration (accelerator, mode) at a time
configs = []
examples = {}
for accel in accels:
    for mode in ("default", "preempt"):
        c = {"accel": accel, "mode": mode}
        for kind in ("plain", "traced"):
            runs = [load(p) for p in sorted(glob.glob(f"{w}/qemu-{accel}-{mode}-{kind}-*.json"))]
            # post-copy happened when the source sent pages after the switch
            # (the whole migration can end between two polls of its status)
            ok = [r for r in runs if "error" not in r and r["source"].get("status") == "completed"
                  and r["source"].get("postcopy_ram_kbytes", 0) > 0]
            errors = [r.get("error", "no page sent in post-copy") for r in runs if r not in ok]
            blk = sum(sum(r["destination"].get("postcopy_vcpu_blocktime_ms", [])) for r in ok)
            tot = sum(r["destination"].get("postcopy_blocktime", 0) for r in ok)
            req = sum(r["source"].get("postcopy_request_count", 0) for r in ok)
            k = {
                "runs": len(runs),
                "runs_ok": len(ok),
                "errors": errors,
                "postcopy_blocktime_ms": tot,
                "postcopy_vcpu_blocktime_ms": blk,
                "postcopy_requests": req,
                "us_per_request": 1000.0 * blk / req if req else None,
                "per_run": [{
                    "postcopy_blocktime_ms": r["destination"].get("postcopy_blocktime"),
                    "postcopy_vcpu_blocktime_ms": r["destination"].get("postcopy_vcpu_blocktime_ms"),
                    "postcopy_request_count": r["source"].get("postcopy_request_count", 0),
                    "normal_pages": r["source"].get("normal_pages"),
                    "duplicate_pages": r["source"].get("duplicate_pages"),
                    "postcopy_ram_kbytes": r["source"].get("postcopy_ram_kbytes"),
                    "precopy_ram_kbytes": r["source"].get("precopy_ram_kbytes", 0),
                    "total_time_ms": r["source"].get("total_time_ms"),
                    "downtime_ms": r["source"].get("downtime_ms"),
                    "destination_passes_in_1s_after": r.get("destination_passes_in_1s_after"),
                    **({"trace": {x: y for x, y in r["trace"].items() if x != "request_us_all"}} if "trace" in r else {}),
                } for r in ok],
            }
            if kind == "traced":
                lat = [x for r in ok for x in r.get("trace", {}).get("request_us_all", [])]
                k["requests_timed"] = len(lat)
                k["request_us_p50"] = quantile(lat, 0.5)
                k["request_us_p90"] = quantile(lat, 0.9)
                k["request_us_p99"] = quantile(lat, 0.99)
                k["request_us_min"] = min(lat) if lat else None
                k["request_us_mean"] = statistics.fmean(lat) if lat else None
                k["request_us_all"] = lat
            c[kind] = k
            if ok and (accel, mode) not in examples and kind == "plain":
                examples[(accel, mode)] = ok[0]
            if ok and "commands" not in c:
                c["commands"] = {"source": ok[0]["source_command"],
                                 "destination": ok[0]["destination_command"],
                                 "monitor": ok[0]["monitor_commands"]}
        t, p = c["traced"], c["plain"]
        c["ratios"] = {
            "traced_p50_over_shoal_p50": t["request_us_p50"] / sp50 if t.get("request_us_p50") and sp50 else None,
            "plain_us_per_request_over_shoal_p50": p["us_per_request"] / sp50 if p["us_per_request"] and sp50 else None,
        }
        configs.append(c)

res = {
    "bench": "qemu-postcopy",
    "host_kernel": kernel,
    "qemu_version": qver,
    "guest_memory_mib": mem,
    "touched_mib": mib,
    "touched_pages": mib * 256,
    "qemu_stride_pages": stride,
    "repeat": repeat,
    "shoal_tcp": shoal,
    "qemu": configs,
}
json.dump(res, open(f"{out}/qemu-postcopy.json", "w"), indent=1)

L = []
L.append("# QEMU post-copy page requests beside shoal's tcp remote fault\n")
L.append(f"Same host, same run of `bench/scripts/qemu-postcopy.sh`: a {mem} MiB guest touching {mib} MiB "
         f"({mib * 256} pages) whose pages another process on this host serves over TCP on 127.0.0.1, "
         f"each fault a userfaultfd fault resolved with `UFFDIO_COPY`. {qver}; host kernel {kernel}; "
         f"QEMU runs {repeat} times per row and kind, pooled.\n")
L.append("Per page: every QEMU page request and every shoal remote fault here brings one 4 KiB page, "
         "so per fault = per page.\n")
L.append("| who | accel | mode | page faults served remotely | p50 µs | p90 µs | p99 µs | mean µs (trace) "
         "| mean µs (blocktime ÷ requests, plain runs) | p50 ÷ shoal p50 | mean (plain) ÷ shoal p50 |")
L.append("|---|---|---|---|---|---|---|---|---|---|---|")
for c in configs:
    t, p, r = c["traced"], c["plain"], c["ratios"]
    L.append(f"| QEMU post-copy | {c['accel']} | {c['mode']} | {t.get('requests_timed', 0)} timed (traced) / "
             f"{p['postcopy_requests']} requests (plain) | **{f(t.get('request_us_p50'))}** | {f(t.get('request_us_p90'))} | "
             f"{f(t.get('request_us_p99'))} | {f(t.get('request_us_mean'))} | {f(p['us_per_request'])} | "
             f"**{f(r['traced_p50_over_shoal_p50'], 2)}** | {f(r['plain_us_per_request_over_shoal_p50'], 2)} |")
L.append(f"| shoal, 2-node pod | kvm | `--fabric tcp` | {shoal['faults_remote']} remote faults | "
         f"**{f(shoal['fault_remote_us_p50'])}** | n/a | {f(shoal['fault_remote_us_p99'])} | n/a | n/a | 1.00 | |")
L.append("")
L.append(f"shoal's remote fault by phase (p50 µs, node 0): owner's answer {f(shoal['fault_remote_owner_us_p50'])}, "
         f"fabric read {f(shoal['fault_remote_fabric_read_us_p50'])}, map {f(shoal['fault_remote_map_us_p50'])}, "
         f"rest {f(shoal['fault_remote_rest_us_p50'])}; {shoal['remote_fetches']} fetches on node 0, "
         f"{shoal['pages_evicted']} pages evicted. `{shoal['summary']}`\n")
L.append("## How the QEMU latency is derived\n")
L.append("- **Trace (p50, p90, p99, mean):** the destination runs with QEMU's trace log (`-trace "
         "postcopy_page_req_add -trace postcopy_page_req_del ... -D FILE -msg timestamp=on`, microsecond "
         "timestamps). For every page requested from the source: from `postcopy_page_req_add` (QEMU's fault "
         "thread has read the userfaultfd fault and records the request just before sending it over the "
         "return path) to `postcopy_page_req_del` (the page has arrived and been placed with `UFFDIO_COPY`, "
         "which wakes the vCPU). Both fire once per requested page, so this tracing costs little (the "
         "blocktime events fire for every page placed, 16k a run: tracing them doubled the migration time "
         "and inflated every latency in a trial). Not in it: the fault's delivery to the fault thread "
         "(shoal's figure starts at its handler reading the fault too).")
L.append("- **Blocktime ÷ requests (plain runs, no tracing):** the destination's `postcopy vcpu blocktime` "
         "(ms, summed over the runs) ÷ the source's `postcopy request count` (summed). QEMU 7.2 keeps "
         "blocktime in whole milliseconds per fault (`qemu_clock_get_ms`), so one fault of 0.3 ms counts "
         "0 or 1; only the sum over many faults means anything. It also keeps one faulting address per "
         "vCPU: a second fault of the same vCPU before the first page arrives (seen here under kvm, in a "
         "trial with the blocktime events traced) replaces the first, so blocktime can undercount. With one "
         "vCPU `postcopy blocktime` (all vCPUs blocked) equals the vCPU's.")
L.append("- The source sends every page anyway (the background push), and after a request it continues "
         "from the requested page; so only the pages the guest touches before the push reaches them are "
         "requested: a few to a few dozen a run, hence the repeats.")
L.append("- Unlimited `max-postcopy-bandwidth` (QEMU's default). Found while writing this script (not re-measured "
         "by each run): with `max-postcopy-bandwidth 1048576` QEMU 7.2 answers requests only when its rate "
         "limit's 100 ms window reopens: 202 requests in one kvm run had a p50 of 99.9 ms, and the source's "
         "trace showed its migration thread woken as urgent (`migration_rate_limit_post urgent: 1`) again and "
         "again without sending the queued page (its iteration returns early while the rate limit holds).")
L.append("- The md's `$W` is the script's temporary work directory (removed at the end).\n")
L.append("## QEMU's own counters, per run\n")
L.append("| accel | mode | kind | postcopy blocktime ms | vCPU blocktime ms | postcopy requests | pages normal / zero "
         "| postcopy ram KiB | total ms | downtime ms |")
L.append("|---|---|---|---|---|---|---|---|---|---|")
for c in configs:
    for kind in ("plain", "traced"):
        k = c[kind]
        for pr in k["per_run"]:
            L.append(f"| {c['accel']} | {c['mode']} | {kind} | {f(pr['postcopy_blocktime_ms'])} | "
                     f"{f(pr['postcopy_vcpu_blocktime_ms'])} | {f(pr['postcopy_request_count'])} | "
                     f"{f(pr['normal_pages'])} / {f(pr['duplicate_pages'])} | {f(pr['postcopy_ram_kbytes'])} | "
                     f"{f(pr['total_time_ms'])} | {f(pr['downtime_ms'])} |")
        for e in k["errors"]:
            L.append(f"| {c['accel']} | {c['mode']} | {kind} | failed: {e[:200]} | | | | | | |")
L.append("")
L.append("## Commands\n")
L.append("```sh")
L.append(f"bench/scripts/qemu-postcopy.sh --memory {mem} --mib {mib} --stride {stride} "
         f"--accel \"{' '.join(accels)}\" --repeat {repeat}")
L.append("# shoal")
L.append(shoal_cmd)
for c in configs:
    if "commands" in c:
        L.append(f"# QEMU {c['accel']} {c['mode']}: source, destination, then on their monitors (QMP human-monitor-command)")
        L.append(c["commands"]["source"])
        L.append(c["commands"]["destination"])
        for m in c["commands"]["monitor"]:
            L.append("#   " + m)
L.append("```\n")
for (accel, mode), r in list(examples.items())[:1]:
    L.append(f"`info migrate` after one plain {accel} {mode} run, source then destination:\n")
    L.append("```")
    L.append(r["source_info_migrate"])
    L.append("---")
    L.append(r["destination_info_migrate"])
    L.append("```\n")
text = "\n".join(L).replace(w, "$W")  # the script's work directory, gone now
open(f"{out}/qemu-postcopy.md", "w").write(text + "\n")
print(f"wrote {out}/qemu-postcopy.json and {out}/qemu-postcopy.md")
