#!/usr/bin/env python3
"""Writes bench/results/qemu-postcopy.{json,md} from the runs of
bench/scripts/qemu-postcopy.sh: its work directory holds shoal-N.json and
shoal-N.out (N = 1, 2, 3) and one qemu-ACCEL-MODE-ROUND.json per QEMU run."""
import glob
import json
import os
import statistics
import sys

(w, out, mem, mib, stride, repeat, accels, qver, kernel, shoal_cmd, load_before, load_after) = sys.argv[1:]
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


def cdf_svg(configs, shoal_p50, path):
    """Cumulative distribution of QEMU's page-request times, one line per
    configuration, log time axis; shoal's remote-fault p50 as a vertical line."""
    import math
    W_, H_, L_, R_, T_, B_ = 760, 400, 60, 200, 30, 50
    lo, hi = 10.0, 200000.0
    x = lambda us: L_ + (math.log10(max(lo, min(hi, us))) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (W_ - L_ - R_)
    y = lambda frac: T_ + (1 - frac) * (H_ - T_ - B_)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W_}" height="{H_}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W_}" height="{H_}" fill="white"/>',
         f'<text x="{L_}" y="18" font-size="14">QEMU post-copy page requests (cumulative) vs shoal tcp remote fault p50</text>']
    for e in range(1, 6):
        us = 10.0 ** e
        if lo <= us <= hi:
            o.append(f'<line x1="{x(us):.1f}" y1="{T_}" x2="{x(us):.1f}" y2="{H_ - B_}" stroke="#ddd"/>')
            label = f"{us / 1000:g} ms" if us >= 1000 else f"{us:g} µs"
            o.append(f'<text x="{x(us):.1f}" y="{H_ - B_ + 16}" text-anchor="middle">{label}</text>')
    for frac in (0, 0.25, 0.5, 0.75, 1):
        o.append(f'<line x1="{L_}" y1="{y(frac):.1f}" x2="{W_ - R_}" y2="{y(frac):.1f}" stroke="#eee"/>')
        o.append(f'<text x="{L_ - 6}" y="{y(frac) + 4:.1f}" text-anchor="end">{frac:g}</text>')
    o.append(f'<text x="{(L_ + W_ - R_) / 2}" y="{H_ - 12}" text-anchor="middle">request recorded → page placed (log scale)</text>')
    for i, c in enumerate(configs):
        v = sorted(c["request_us_all"])
        if not v:
            continue
        pts = " ".join(f"{x(u):.1f},{y((k + 1) / len(v)):.1f}" for k, u in enumerate(v))
        col = colors[i % len(colors)]
        o.append(f'<polyline fill="none" stroke="{col}" stroke-width="2" points="{x(v[0]):.1f},{y(0):.1f} {pts}"/>')
        o.append(f'<text x="{W_ - R_ + 10}" y="{T_ + 16 * i + 10}" fill="{col}">QEMU {c["accel"]} {c["mode"]} (n={len(v)})</text>')
    if shoal_p50:
        o.append(f'<line x1="{x(shoal_p50):.1f}" y1="{T_}" x2="{x(shoal_p50):.1f}" y2="{H_ - B_}" stroke="black" stroke-dasharray="5,3" stroke-width="2"/>')
        o.append(f'<text x="{W_ - R_ + 10}" y="{T_ + 16 * len(configs) + 10}">- - shoal tcp p50 {shoal_p50:.0f} µs</text>')
    o.append("</svg>")
    open(path, "w").write("\n".join(o) + "\n")


# shoal: three runs; the reference is the median of their p50s
shoal_runs = []
for n in (1, 2, 3):
    sm = load(f"{w}/shoal-{n}.json")
    if "error" in sm:
        continue
    n0 = sm["nodes"][0]
    summary = [l.strip() for l in open(f"{w}/shoal-{n}.out") if l.startswith("shoal:")]
    shoal_runs.append({
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
    })
sp50 = statistics.median([s["fault_remote_us_p50"] for s in shoal_runs]) if shoal_runs else None
shoal = {"command": shoal_cmd, "runs": shoal_runs, "fault_remote_us_p50_median_of_runs": sp50}

# QEMU, one configuration (accelerator, mode) at a time
configs = []
example = None
for accel in accels:
    for mode in ("default", "preempt"):
        runs = [load(p) for p in sorted(glob.glob(f"{w}/qemu-{accel}-{mode}-*.json"))]
        # post-copy happened when the source sent pages after the switch (the
        # whole migration can end between two polls of its status)
        ok = [r for r in runs if "error" not in r and r["source"].get("status") == "completed"
              and r["source"].get("postcopy_ram_kbytes", 0) > 0]
        errors = [r.get("error", "no page sent in post-copy") for r in runs if r not in ok]
        blk = sum(sum(r["destination"].get("postcopy_vcpu_blocktime_ms", [])) for r in ok)
        tot = sum(r["destination"].get("postcopy_blocktime", 0) for r in ok)
        req = sum(r["source"].get("postcopy_request_count", 0) for r in ok)
        lat = [x for r in ok for x in r.get("trace", {}).get("request_us_all", [])]
        c = {
            "accel": accel,
            "mode": mode,
            "runs": len(runs),
            "runs_ok": len(ok),
            "errors": errors,
            "postcopy_blocktime_ms_sum": tot,
            "postcopy_vcpu_blocktime_ms_sum": blk,
            "postcopy_requests_sum": req,
            "blocktime_us_per_request": 1000.0 * blk / req if req else None,
            "requests_timed": len(lat),
            "request_us_p50": quantile(lat, 0.5),
            "request_us_p90": quantile(lat, 0.9),
            "request_us_p99": quantile(lat, 0.99),
            "request_us_min": min(lat) if lat else None,
            "request_us_mean": statistics.fmean(lat) if lat else None,
            "total_time_ms_median": statistics.median([r["source"].get("total_time_ms", 0) for r in ok]) if ok else None,
            "requests_per_run_median": statistics.median([r["source"].get("postcopy_request_count", 0) for r in ok]) if ok else None,
            "request_us_all": lat,
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
                "trace": {x: y for x, y in r.get("trace", {}).items() if x != "request_us_all"},
            } for r in ok],
        }
        c["ratios"] = {
            "request_p50_over_shoal_p50": c["request_us_p50"] / sp50 if c["request_us_p50"] and sp50 else None,
            "blocktime_per_request_over_shoal_p50":
                c["blocktime_us_per_request"] / sp50 if c["blocktime_us_per_request"] and sp50 else None,
        }
        if ok:
            c["commands"] = {"source": ok[0]["source_command"], "destination": ok[0]["destination_command"],
                             "monitor": ok[0]["monitor_commands"]}
            if example is None:
                example = (accel, mode, ok[0])
        configs.append(c)

res = {
    "bench": "qemu-postcopy",
    "host_kernel": kernel,
    "qemu_version": qver,
    "guest_memory_mib": mem,
    "touched_mib": mib,
    "touched_pages": mib * 256,
    "qemu_stride_pages": stride,
    "rounds": repeat,
    "load_average_before": load_before,
    "load_average_after": load_after,
    "shoal_tcp": shoal,
    "qemu": configs,
}
json.dump(res, open(f"{out}/qemu-postcopy.json", "w"), indent=1)
cdf_svg(configs, sp50, f"{out}/qemu-postcopy.svg")

L = []
L.append("# QEMU post-copy page requests beside shoal's tcp remote fault\n")
L.append(f"Same host, same run of `bench/scripts/qemu-postcopy.sh`: a {mem} MiB guest touching {mib} MiB "
         f"({mib * 256} pages) whose pages another process on this host serves over TCP on 127.0.0.1, "
         f"each fault a userfaultfd fault resolved with `UFFDIO_COPY`. {qver}; host kernel {kernel}. "
         f"{repeat} rounds, each running every QEMU configuration once, pooled; shoal three times "
         f"(before the first round, after the middle one, after the last). Load average (1, 5, 15 min) "
         f"{load_before} before and {load_after} after: two cores shared with other work.\n")
L.append("![QEMU page requests, cumulative, beside shoal's p50](qemu-postcopy.svg)\n")
L.append("Per page: every QEMU page request and every shoal remote fault here brings one 4 KiB page, "
         "so per fault = per page.\n")
L.append("| who | accel | mode | pages requested (timed) | p50 µs | p90 µs | p99 µs | mean µs | "
         "vCPU blocktime ÷ requests µs | p50 ÷ shoal p50 | blocktime per request ÷ shoal p50 |")
L.append("|---|---|---|---|---|---|---|---|---|---|---|")
for c in configs:
    r = c["ratios"]
    L.append(f"| QEMU post-copy | {c['accel']} | {c['mode']} | {c['postcopy_requests_sum']} ({c['requests_timed']}) "
             f"in {c['runs_ok']} runs | **{f(c['request_us_p50'])}** | {f(c['request_us_p90'])} | "
             f"{f(c['request_us_p99'])} | {f(c['request_us_mean'])} | {f(c['blocktime_us_per_request'])} | "
             f"**{f(r['request_p50_over_shoal_p50'], 2)}** | {f(r['blocktime_per_request_over_shoal_p50'], 2)} |")
for i, s in enumerate(shoal_runs, 1):
    L.append(f"| shoal run {i}, 2-node pod | kvm | `--fabric tcp` | {s['faults_remote']} remote faults | "
             f"**{f(s['fault_remote_us_p50'])}** | n/a | {f(s['fault_remote_us_p99'])} | n/a | n/a | "
             f"{f(s['fault_remote_us_p50'] / sp50 if sp50 else None, 2)} | |")
L.append("")
L.append(f"shoal's reference: the median of its three runs' remote-fault p50, **{f(sp50)} µs**. "
         "Its remote fault by phase (p50 µs, node 0, per run): "
         + "; ".join(f"owner's answer {f(s['fault_remote_owner_us_p50'])}, fabric read "
                     f"{f(s['fault_remote_fabric_read_us_p50'])}, map {f(s['fault_remote_map_us_p50'])}, "
                     f"rest {f(s['fault_remote_rest_us_p50'])}" for s in shoal_runs) + ".\n")
L.append("QEMU per configuration: median migration time (source's `total time`) "
         + "; ".join(f"{c['accel']} {c['mode']} {f(c['total_time_ms_median'])} ms with "
                     f"{f(c['requests_per_run_median'])} requests a run" for c in configs) + ".\n")
L.append("## How the QEMU latency is derived\n")
L.append("- **Per request (p50, p90, p99, mean):** the destination runs with QEMU's trace log (`-trace "
         "postcopy_page_req_add -trace postcopy_page_req_del -trace postcopy_ram_fault_thread_request "
         "-D FILE -msg timestamp=on`, microsecond timestamps). For every page requested from the source: "
         "from `postcopy_page_req_add` (QEMU's fault thread has read the userfaultfd fault and records the "
         "request just before sending it over the return path) to `postcopy_page_req_del` (the page has "
         "arrived and been placed with `UFFDIO_COPY`, which wakes the vCPU). Both fire once per requested "
         "page, so this tracing costs little (in a trial, tracing the blocktime events instead, which fire "
         "for every page placed, 16k a run, doubled the migration time and inflated every latency). Not in "
         "it: the fault's delivery to the fault thread (shoal's figure starts at its handler reading the "
         "fault too).")
L.append("- **vCPU blocktime ÷ requests (QEMU's own counters, same runs):** the destination's `postcopy vcpu "
         "blocktime` (ms, summed over the runs) ÷ the source's `postcopy request count` (summed). QEMU 7.2 "
         "keeps blocktime in whole milliseconds per fault (`qemu_clock_get_ms`), so a fault of 0.3 ms counts "
         "0 or 1 and only the sum over many faults means anything; and it keeps one faulting address per "
         "vCPU: a second fault of the same vCPU before the first page arrives (seen here under kvm) replaces "
         "the first, so blocktime can undercount. With one vCPU `postcopy blocktime` (all vCPUs blocked) "
         "equals the vCPU's.")
L.append("- The source sends every page anyway (the background push), and after a request it continues "
         "from the requested page; so only the pages the guest touches before the push reaches them are "
         "requested: a handful to a few dozen a run, hence the rounds. The guest visits its pages in a "
         f"scattered order (page k × {stride} mod {mib * 256} at step k) so that the push, which runs "
         "sequentially, does not serve them ahead of the faults. shoal's memtouch reads its pages "
         "sequentially, and shoal does not prefetch them (`pages_prefetched` 0): every one is a fault.")
mins = [c["request_us_min"] for c in configs if c["request_us_min"] is not None]
fastest = f"{min(mins):.0f}–{max(mins):.0f} µs" if mins else "n/a"
L.append(f"- Not every QEMU request is a full round trip: a page the background push already had on its way arrives just after its request (the fastest here took {fastest}), and a request can wait behind the push (QEMU's defaults: the same stream; with `postcopy-preempt` a channel of its own, but the same two cores). shoal's remote faults are all demand fetches: nothing is pushed.")
L.append("- Unlimited `max-postcopy-bandwidth` (QEMU's default). Found while writing this script (not "
         "re-measured by each run): with `max-postcopy-bandwidth 1048576` QEMU 7.2 answers requests only "
         "when its rate limit's 100 ms window reopens: 202 requests in one kvm run had a p50 of 99.9 ms, and "
         "the source's trace showed its migration thread woken as urgent (`migration_rate_limit_post "
         "urgent: 1`) again and again without sending the queued page (its iteration returns early while "
         "the rate limit holds).")
L.append("- `$W` below is the script's temporary work directory (removed at the end).\n")
L.append("## QEMU's own counters, summed per configuration\n")
L.append("| accel | mode | runs | postcopy blocktime ms | vCPU blocktime ms | postcopy requests | failed runs |")
L.append("|---|---|---|---|---|---|---|")
for c in configs:
    L.append(f"| {c['accel']} | {c['mode']} | {c['runs_ok']} | {c['postcopy_blocktime_ms_sum']} | "
             f"{c['postcopy_vcpu_blocktime_ms_sum']} | {c['postcopy_requests_sum']} | "
             f"{len(c['errors'])}{': ' + c['errors'][0][:200] if c['errors'] else ''} |")
L.append("\nEvery run's counters (pages, bytes, times) are in `qemu-postcopy.json`.\n")
L.append("## Commands\n")
L.append("```sh")
L.append(f"bench/scripts/qemu-postcopy.sh --memory {mem} --mib {mib} --stride {stride} "
         f"--accel \"{' '.join(accels)}\" --repeat {repeat}")
L.append("# shoal (three times)")
L.append(shoal_cmd)
for c in configs:
    if "commands" in c:
        L.append(f"# QEMU {c['accel']} {c['mode']}: source, destination, then on their monitors "
                 "(over QMP, as human-monitor-command)")
        L.append(c["commands"]["source"])
        L.append(c["commands"]["destination"])
        for m in c["commands"]["monitor"]:
            L.append("#   " + m)
L.append("```\n")
if example:
    accel, mode, r = example
    L.append(f"`info migrate` after one {accel} {mode} run, source then destination:\n")
    L.append("```")
    L.append(r["source_info_migrate"])
    L.append("---")
    L.append(r["destination_info_migrate"])
    L.append("```")
text = "\n".join(L).replace(w, "$W")
open(f"{out}/qemu-postcopy.md", "w").write(text + "\n")
print(f"wrote {out}/qemu-postcopy.json, .md and .svg")
