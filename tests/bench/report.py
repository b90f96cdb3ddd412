#!/usr/bin/env python3
"""Turns what tests/bench/run.sh and micro.sh measured into one table, and
records it in BENCHMARKS.md.

    report.py net RESULTS_DIR [--record BENCHMARKS.md]
    report.py micro DIVAN_OUTPUT [--record BENCHMARKS.md]

`net` reads RESULTS_DIR/{run.env, PAIR/*.json, PAIR/*.txt, PAIR/stats.env} as
run.sh writes them and prints a Markdown table. `micro` reads the text divan
printed. With --record, the new entry replaces the "latest" section of its
kind in BENCHMARKS.md and the entry it replaces moves to the top of "Older
runs", so the file keeps every dated run, newest first. Standard library only.
"""

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import textwrap

PAIRS = [
    ("vv", "vpcgated ↔ vpcgated"),
    ("gg", "wireguard-go ↔ wireguard-go"),
    ("vg", "vpcgated → wireguard-go"),
]

MARKERS = {
    "net": ("<!-- bench:net:latest:begin -->", "<!-- bench:net:latest:end -->"),
    "micro": ("<!-- bench:micro:latest:begin -->", "<!-- bench:micro:latest:end -->"),
}
OLDER = "<!-- bench:older -->"


def bullet(text):
    """A Markdown list item wrapped like the rest of BENCHMARKS.md."""
    return textwrap.fill(text, width=78, initial_indent="- ", subsequent_indent="  ")


def fail(msg):
    sys.exit(f"report.py: {msg}")


def read_env(path):
    """KEY=VALUE lines, as run.sh writes them."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                line = line.rstrip("\n")
                if "=" in line:
                    k, v = line.split("=", 1)
                    out[k] = v
    except OSError as e:
        fail(f"cannot read {path}: {e}")
    return out


def read_json(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read iperf3 output {path}: {e}")
    if "error" in data:
        fail(f"iperf3 reported an error in {path}: {data['error']}")
    return data


def tcp_figures(path):
    end = read_json(path)["end"]
    received = end["sum_received"]
    return {
        "gbps": received["bits_per_second"] / 1e9,
        "bytes": received["bytes"],
        "retransmits": end["sum_sent"].get("retransmits"),
    }


def udp_figures(path):
    end = read_json(path)["end"]
    total = end.get("sum", {})
    loss = total.get("lost_percent")
    if "sum_received" in end:
        received_bps = end["sum_received"]["bits_per_second"]
    else:
        # iperf3 before 3.13 reports only the sender's rate plus the loss
        # that the server counted.
        received_bps = total["bits_per_second"] * (1 - (loss or 0) / 100)
    sent_bps = end.get("sum_sent", total)["bits_per_second"]
    return {"sent_mbps": sent_bps / 1e6, "received_mbps": received_bps / 1e6, "loss": loss}


PING_RE = re.compile(r"time=([0-9.]+) ms")


def percentile(sorted_values, p):
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def ping_figures(path, sent):
    try:
        with open(path) as f:
            rtts = sorted(float(m.group(1)) for m in PING_RE.finditer(f.read()))
    except OSError as e:
        fail(f"cannot read {path}: {e}")
    return {
        "p50": percentile(rtts, 50),
        "p99": percentile(rtts, 99),
        "lost": sent - len(rtts),
        "sent": sent,
    }


def pair_figures(results, pair, run):
    d = os.path.join(results, pair)
    stats = read_env(os.path.join(d, "stats.env"))
    clk = float(run["CLK_TCK"])
    tcp1 = tcp_figures(os.path.join(d, "tcp1.json"))
    gb = tcp1["bytes"] / 1e9
    cpu = {}
    for side in ("A", "B"):
        ticks = int(stats[f"CPU_{side}_AFTER"]) - int(stats[f"CPU_{side}_BEFORE"])
        cpu[side] = (ticks / clk) / gb if gb > 0 else None
    mem = {
        k: int(v) / 1024
        for k, v in stats.items()
        if k.startswith(("IDLE_RSS_", "HWM_", "PEERS_RSS"))
    }
    return {
        "tcp1": tcp1,
        "tcp1r": tcp_figures(os.path.join(d, "tcp1r.json")),
        "tcp4": tcp_figures(os.path.join(d, "tcp4.json")),
        "udp": udp_figures(os.path.join(d, "udp.json")),
        "idle": ping_figures(os.path.join(d, "ping_idle.txt"), int(run["PING_IDLE_COUNT"])),
        "load": ping_figures(os.path.join(d, "ping_load.txt"), int(run["PING_LOAD_COUNT"])),
        "load_tcp": tcp_figures(os.path.join(d, "ping_load_tcp.json")),
        "cpu": cpu,
        "mem": mem,
    }


def fmt(value, digits):
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}×"


def net_table(results, run):
    figs = {pair: pair_figures(results, pair, run) for pair, _ in PAIRS}
    secs = run["SECONDS"]
    rate = run["UDP_RATE"]
    rows = [
        # (label, getter, digits)
        (f"TCP, 1 stream, A→B, {secs} s (Gbit/s)", lambda f: f["tcp1"]["gbps"], 2),
        (f"TCP, 1 stream, B→A, {secs} s (Gbit/s)", lambda f: f["tcp1r"]["gbps"], 2),
        (f"TCP, 4 streams, A→B, {secs} s (Gbit/s)", lambda f: f["tcp4"]["gbps"], 2),
        ("TCP retransmits, 1 stream A→B", lambda f: f["tcp1"]["retransmits"], 0),
        (f"UDP, {rate} offered, 1300 B: sent (Mbit/s)", lambda f: f["udp"]["sent_mbps"], 0),
        (f"UDP, {rate} offered: received (Mbit/s)", lambda f: f["udp"]["received_mbps"], 0),
        (f"UDP, {rate} offered: loss (%)", lambda f: f["udp"]["loss"], 2),
        ("ping RTT idle, p50 (ms)", lambda f: f["idle"]["p50"], 3),
        ("ping RTT under 1-stream TCP load, p50 (ms)", lambda f: f["load"]["p50"], 3),
        ("ping RTT under 1-stream TCP load, p99 (ms)", lambda f: f["load"]["p99"], 3),
        (
            "pings lost under load (of {})".format(run["PING_LOAD_COUNT"]),
            lambda f: f["load"]["lost"],
            0,
        ),
        ("TCP during the ping (Gbit/s)", lambda f: f["load_tcp"]["gbps"], 2),
        ("CPU s per GB, daemon A (sender)", lambda f: f["cpu"]["A"], 2),
        ("CPU s per GB, daemon B (receiver)", lambda f: f["cpu"]["B"], 2),
        ("RSS after start + handshake, A (MiB)", lambda f: f["mem"]["IDLE_RSS_A"], 1),
        ("RSS after start + handshake, B (MiB)", lambda f: f["mem"]["IDLE_RSS_B"], 1),
        ("peak RSS (VmHWM), A (MiB)", lambda f: f["mem"]["HWM_A"], 1),
        ("peak RSS (VmHWM), B (MiB)", lambda f: f["mem"]["HWM_B"], 1),
        ("RSS with 1,000 peers configured (MiB)", lambda f: f["mem"].get("PEERS_RSS"), 1),
    ]
    head = ["", *[name for _, name in PAIRS], "vpcgated / wireguard-go"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for label, get, digits in rows:
        values = [get(figs[pair]) for pair, _ in PAIRS]
        cells = [fmt(v, digits) for v in values]
        lines.append(
            "| " + " | ".join([label, *cells, ratio(values[0], values[1])]) + " |"
        )
    return "\n".join(lines)


def git_describe(root):
    def git(*args):
        r = subprocess.run(
            ["git", "-c", f"safe.directory={root}", "-C", root, *args],
            capture_output=True,
            text=True,
        )
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return "unknown commit"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return commit + (" with uncommitted changes" if dirty else "")


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
    except OSError:
        pass
    mem = f"{mem_kib / 1024 / 1024:.1f} GiB" if mem_kib else "unknown memory"
    return f"nproc {os.cpu_count()}, {model}, {mem}, kernel {os.uname().release}"


def load_average():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def net_entry(results, root):
    run = read_env(os.path.join(results, "run.env"))
    table = net_table(results, run)
    lines = [
        f"### {run.get('DATE', utc_now())}: network namespaces, vpcgated against wireguard-go",
        "",
        bullet(
            f"Machine: {machine()}. Load average before and after the run: "
            f"{run.get('LOAD_BEFORE', '?')} / {run.get('LOAD_AFTER', '?')}."
        ),
        bullet(
            f"vpcgated {run.get('VPCGATED_VERSION', '?')} at "
            f"{run.get('COMMIT') or git_describe(root)}, release "
            f"build; {run.get('WG_GO_VERSION', 'wireguard-go ?')} (Debian); "
            f"{run.get('IPERF_VERSION', 'iperf3 ?')}."
        ),
        bullet(
            "Two namespaces A and B joined by a veth, all three pairs up at once; each "
            "measurement runs through the pairs back to back while the other two idle, "
            "in an order that rotates from one measurement to the next. Each figure is "
            f"one {run['SECONDS']}-second run. A sends unless the row says B→A; in the mixed "
            "pair vpcgated is A, so it encrypts and wireguard-go decrypts, except in "
            "the B→A row."
        ),
        bullet(
            "The last column is the first column divided by the second, both from this "
            "run: above 1 means vpcgated's figure is the larger, which is better for "
            "throughput and worse for RTT, loss, CPU and memory."
        ),
        "",
        table,
        "",
    ]
    return "\n".join(lines)


def micro_entry(path, root):
    """Keeps divan's own tree output (it is already a table) in a code block."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        fail(f"cannot read {path}: {e}")
    kept = []
    for line in text.splitlines():
        # cargo's own progress lines are not results.
        if line.lstrip().startswith(("Compiling", "Finished", "Running", "Downloaded", "Updating", "Locking", "Adding")):
            continue
        kept.append(line.rstrip())
    while kept and not kept[0]:
        kept.pop(0)
    return "\n".join(
        [
            f"### {utc_now()}: microbenchmarks (daemon/benches, divan)",
            "",
            bullet(f"Machine: {machine()}. Load average at the end: {load_average()}."),
            bullet(
                f"vpcgated at {git_describe(root)}; `tests/bench/micro.sh`, that is "
                "`cargo bench -p vpcgated --bench routing --bench packet`."
            ),
            "",
            "```text",
            *kept,
            "```",
            "",
        ]
    )


def record(path, kind, entry):
    begin, end = MARKERS[kind]
    try:
        with open(path) as f:
            doc = f.read()
    except OSError as e:
        fail(f"cannot read {path}: {e}")
    for marker in (begin, end, OLDER):
        if doc.count(marker) != 1:
            fail(f"{path} must contain the line {marker!r} exactly once")
    head, rest = doc.split(begin, 1)
    previous, tail = rest.split(end, 1)
    previous = previous.strip()
    if previous.startswith("###"):
        before_older, after_older = tail.split(OLDER, 1)
        tail = before_older + OLDER + "\n\n" + previous + "\n" + after_older.lstrip("\n")
        if not tail.endswith("\n"):
            tail += "\n"
    doc = head + begin + "\n" + entry.rstrip("\n") + "\n" + end + tail
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["net", "micro"])
    parser.add_argument("source", help="run.sh's results directory, or divan's output file")
    parser.add_argument("--record", metavar="BENCHMARKS.md", help="also record the run there")
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    args = parser.parse_args()
    if args.kind == "net":
        entry = net_entry(args.source, args.root)
    else:
        entry = micro_entry(args.source, args.root)
    print(entry)
    if args.record:
        record(args.record, args.kind, entry)
        print(f"recorded in {args.record}")


if __name__ == "__main__":
    main()
