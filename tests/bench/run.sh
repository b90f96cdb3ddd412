#!/usr/bin/env bash
# Network benchmark: vpcgated against Debian's wireguard-go, side by side in
# one run, in two network namespaces joined by a veth.
#
#   sudo tests/bench/run.sh [--no-record] [--no-build] [--perf] [--steps] [--keep]
#
# Three pairs are set up at once: vpcgated ↔ vpcgated, wireguard-go ↔
# wireguard-go, and vpcgated (A) → wireguard-go (B). Each measurement then
# runs through the three back to back, in an order that rotates between
# measurements, so background load on a shared machine hits all three alike.
# For each pair: iperf3 TCP with 1 stream each way and with 4 streams, UDP at
# a fixed offered load, ping RTT p50/p99 idle and under a 1-stream TCP load,
# CPU seconds per GB for each daemon, and idle and peak RSS. Prints one table
# with the vpcgated/wireguard-go ratios and records it in BENCHMARKS.md (the
# previous run moves to "Older runs"). The machine is shared, so only ratios
# from the same run mean much.
#
# Needs root, and Debian's wireguard-go, wireguard-tools, iperf3, iproute2,
# iputils-ping and python3. Builds `cargo build --release -p vpcgated -p
# vpcgate` into $CARGO_TARGET_DIR (default target/), as $SUDO_USER when run
# through sudo; `sudo -E` or `sudo CARGO_TARGET_DIR=... tests/bench/run.sh`
# passes the variable through. --no-build uses the binaries in
# $VPCGATE_BIN_DIR (default: the target directory's release/). --perf adds
# a fourth, profiled vpcgated pair after the table's runs and prints where
# each side spends its time (needs perf: apt-get install linux-perf).
# --steps adds, after the table, single-stream TCP through vpcgated pairs
# with the kernel offloads turned on one at a time (--no-offload), each
# beside a wireguard-go run measured just before it.
# --keep leaves the logs and raw iperf3/ping/perf output in /tmp.
#
# Environment knobs, for quick trial runs: BENCH_SECONDS (10), BENCH_UDP_RATE
# (500M), BENCH_PING_COUNT (200). Addresses: underlay 198.18.0.0/15, tunnels
# 100.64.0.0/10. Nothing is sent from the root namespace; everything created
# is removed on exit, on failure and on Ctrl-C.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH=$ROOT/tests/bench

SECONDS_PER_TEST=${BENCH_SECONDS:-10}
UDP_RATE=${BENCH_UDP_RATE:-500M}
UDP_LEN=1300
PING_LOAD_COUNT=${BENCH_PING_COUNT:-200}
PING_INTERVAL=0.05
PING_IDLE_COUNT=20
BASE_PORT=51820
IPERF_PORT=5201
TUNNEL_MTU=1420

RECORD=1
BUILD=1
PERF=0
STEPS=0
KEEP=0
for arg in "$@"; do
    case $arg in
        --no-record) RECORD=0 ;;
        --no-build) BUILD=0 ;;
        --perf) PERF=1 ;;
        --steps) STEPS=1 ;;
        --keep) KEEP=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "unknown argument: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

die() {
    echo "run.sh: $*" >&2
    exit 1
}
log() { echo "== $*" >&2; }

# --- preconditions: fail loudly, never skip ---------------------------------

[ "$(id -u)" = 0 ] || die "must run as root: it creates network namespaces and TUN devices (sudo tests/bench/run.sh)"

missing=()
packages=()
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    missing+=("$1 (Debian package $2)")
    packages+=("$2")
}
need wireguard-go wireguard-go
need wg wireguard-tools
need iperf3 iperf3
need ip iproute2
need ping iputils-ping
need python3 python3
if ((PERF)); then
    need perf linux-perf
fi
if ((${#missing[@]})); then
    printf 'run.sh: missing: %s\n' "${missing[@]}" >&2
    echo "install them with: apt-get install -y --no-install-recommends ${packages[*]}" >&2
    exit 1
fi
ping -V 2>&1 | grep -q iputils || die "ping is not iputils' (needs -i $PING_INTERVAL as root): apt-get install -y iputils-ping"
[ -e /dev/net/tun ] || die "/dev/net/tun is missing: load the tun module (modprobe tun)"

# --- build ------------------------------------------------------------------

if [ -n "${CARGO_TARGET_DIR:-}" ] && [[ $CARGO_TARGET_DIR != /* ]]; then
    CARGO_TARGET_DIR=$PWD/$CARGO_TARGET_DIR
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

# The tree being built, for the record (read before the build, in case
# someone commits while this runs).
git_() { git -c safe.directory="$ROOT" -C "$ROOT" "$@" 2>/dev/null; }
COMMIT=$(git_ rev-parse --short HEAD || echo "unknown commit")
if [ -n "$(git_ status --porcelain --untracked-files=no || true)" ]; then
    COMMIT="$COMMIT with uncommitted changes"
fi

if ((BUILD)); then
    cargo=$(command -v cargo || true)
    if [ -z "$cargo" ]; then
        # sudo resets PATH; rustup installs cargo in the invoking user's home.
        for home in "$(getent passwd "${SUDO_USER:-root}" | cut -d: -f6)" /root; do
            if [ -n "$home" ] && [ -x "$home/.cargo/bin/cargo" ]; then
                cargo=$home/.cargo/bin/cargo
                break
            fi
        done
    fi
    [ -n "$cargo" ] || die "cargo not found in PATH or ~/.cargo/bin: run \`sudo env PATH=\"\$PATH\" tests/bench/run.sh\`, or build first and pass --no-build"
    build=(env "PATH=$(dirname "$cargo"):$PATH" "CARGO_TARGET_DIR=$TARGET_DIR"
        "$cargo" build --release -p vpcgated -p vpcgate)
    log "building: cargo build --release -p vpcgated -p vpcgate (target dir $TARGET_DIR)"
    if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
        # Build as the user who ran sudo, so target/ does not become root's.
        (cd "$ROOT" && sudo -H -u "$SUDO_USER" "${build[@]}")
    else
        (cd "$ROOT" && "${build[@]}")
    fi
fi
BIN_DIR=${VPCGATE_BIN_DIR:-$TARGET_DIR/release}
VPCGATED=$BIN_DIR/vpcgated
[ -x "$VPCGATED" ] || die "$VPCGATED not found: build it (cargo build --release -p vpcgated) or set VPCGATE_BIN_DIR"

# --- namespaces and cleanup ---------------------------------------------------

ID=$$
NS_PREFIX=vgbench-
NS_A=${NS_PREFIX}$ID-a
NS_B=${NS_PREFIX}$ID-b
WORK=$(mktemp -d /tmp/vpcgate-bench.XXXXXX)
RESULTS=$WORK/results
mkdir -p "$RESULTS"
PIDS=()
IFACES=()

# Namespaces of an earlier run that was killed before it could clean up.
for ns in $(ip netns list | awk '{print $1}' | grep "^$NS_PREFIX" || true); do
    owner=${ns#"$NS_PREFIX"}
    owner=${owner%%-*}
    if [ -n "$owner" ] && [ ! -d "/proc/$owner" ]; then
        log "removing stale namespace $ns of dead run $owner"
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    fi
done

# stop_pid PID: SIGTERM, then SIGKILL after 5 s, then reap it, and forget it
# so that cleanup never signals a pid that may have been reused since.
stop_pid() {
    local pid=$1 p keep=()
    if kill -TERM "$pid" 2>/dev/null; then
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    for ns in "$NS_A" "$NS_B"; do
        if ip netns list | grep -q "^$ns\b"; then
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
            ip netns del "$ns"
        fi
    done
    for ifn in "${IFACES[@]}"; do rm -f "/var/run/wireguard/$ifn.sock"; done
    if [ "$status" != 0 ]; then
        echo "run.sh: failed (exit $status); the last lines of each log:" >&2
        for f in "$WORK"/*.log; do
            [ -e "$f" ] || continue
            echo "--- $f" >&2
            tail -n 30 "$f" >&2
        done
    fi
    if ((KEEP)); then
        echo "run.sh: logs and raw results kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

in_a() { ip netns exec "$NS_A" "$@"; }
in_b() { ip netns exec "$NS_B" "$@"; }
in_ns() {
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

ip netns add "$NS_A"
ip netns add "$NS_B"
ip -n "$NS_A" link set lo up
ip -n "$NS_B" link set lo up
# Created inside A with its other end moved to B: the root namespace never
# sees either end.
ip -n "$NS_A" link add ul0 type veth peer name ul0 netns "$NS_B"
ip -n "$NS_A" addr add 198.18.0.1/24 dev ul0
ip -n "$NS_B" addr add 198.18.0.2/24 dev ul0
ip -n "$NS_A" link set ul0 up
ip -n "$NS_B" link set ul0 up
UNDERLAY_A=198.18.0.1
UNDERLAY_B=198.18.0.2

# --- daemons ----------------------------------------------------------------

# wait_for SECONDS PID WHAT COMMAND...: polls COMMAND until it succeeds, and
# fails at once if PID has exited.
wait_for() {
    local secs=$1 pid=$2 what=$3
    shift 3
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || die "$what: the process exited"
        ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what"
        sleep 0.1
    done
}

link_ready() { # ns ifname address
    local out
    out=$(ip -n "$1" -o addr show dev "$2") || return 1
    [[ $out == *" $3 "* ]] && ip -n "$1" -o link show dev "$2" | grep -q "[<,]UP[,>].* mtu $TUNNEL_MTU "
}

# start_vpcgated NS IFNAME ADDRESS PORT: sets STARTED_PID. Passes the
# arguments in VPCGATED_ARGS too.
VPCGATED_ARGS=()
start_vpcgated() {
    local ns=$1 ifn=$2 addr=$3 port=$4
    IFACES+=("$ifn")
    ip netns exec "$ns" "$VPCGATED" --interface "$ifn" --state-dir "$WORK/$ifn.state" \
        --socket "$WORK/$ifn.ctl" --listen-port "$port" --address "$addr" \
        --log-level warn "${VPCGATED_ARGS[@]}" >"$WORK/vpcgated-$ifn.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    wait_for 20 "$STARTED_PID" "vpcgated $ifn to answer wg show" in_ns "$ns" wg show "$ifn"
    wait_for 10 "$STARTED_PID" "vpcgated's TUN $ifn to be up with $addr" link_ready "$ns" "$ifn" "$addr"
}

# start_wireguard_go NS IFNAME ADDRESS PORT: sets STARTED_PID. Started the
# way the e2e harness starts it (tests/src/wg.rs), then set up with wg and ip.
start_wireguard_go() {
    local ns=$1 ifn=$2 addr=$3 port=$4
    IFACES+=("$ifn")
    WG_PROCESS_FOREGROUND=1 LOG_LEVEL=error \
        ip netns exec "$ns" wireguard-go -f "$ifn" >"$WORK/wireguard-go-$ifn.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    wait_for 20 "$STARTED_PID" "wireguard-go $ifn to answer wg show" in_ns "$ns" wg show "$ifn"
    (umask 077 && wg genkey >"$WORK/$ifn.key")
    in_ns "$ns" wg set "$ifn" private-key "$WORK/$ifn.key" listen-port "$port"
    ip -n "$ns" addr add "$addr" dev "$ifn"
    ip -n "$ns" link set "$ifn" mtu "$TUNNEL_MTU" up
    wait_for 10 "$STARTED_PID" "$ifn to be up with $addr" link_ready "$ns" "$ifn" "$addr"
}

cpu_ticks() { # utime + stime of every thread, in clock ticks
    local stat rest
    stat=$(</proc/"$1"/stat)
    rest=${stat##*) }
    # shellcheck disable=SC2086
    set -- $rest
    echo $((${12} + ${13}))
}

status_kib() { # PID FIELD
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}

iperf() { # KEY OUT.json ARGS...: the client runs in A, the server is KEY's B
    local key=$1 out=$2
    shift 2
    if ! in_a iperf3 -c "${SERVER[$key]}" -p "$IPERF_PORT" -J "$@" >"$out"; then
        cat "$out" >&2
        die "iperf3 $* through pair $key failed"
    fi
}

run_ping() { # KEY OUT COUNT
    local rc=0
    in_a ping -n -c "$3" -i "$PING_INTERVAL" -W 1 "${SERVER[$1]}" >"$2" 2>&1 || rc=$?
    # 1 means some replies were missing: that is a result, not a failure.
    [ "$rc" -le 1 ] || die "ping through pair $1 failed: $(cat "$2")"
}

# Per pair KEY: the daemons' pids, B's tunnel address, the iperf3 server.
declare -A PID_A PID_B SERVER SERVER_PID

# setup_pair KEY INDEX KIND_A KIND_B: starts both daemons (interfaces, ports
# and tunnel subnet numbered INDEX, so pairs coexist), configures them as each
# other's peer, waits for a handshake and starts an iperf3 server in B.
setup_pair() {
    local key=$1 idx=$2 kind_a=$3 kind_b=$4
    local if_a=vgb${ID}${idx}a if_b=vgb${ID}${idx}b
    local addr_a=100.64.$idx.1 addr_b=100.64.$idx.2 port=$((BASE_PORT + idx))
    log "pair $key: $kind_a ($NS_A/$if_a) → $kind_b ($NS_B/$if_b)"

    "start_$kind_a" "$NS_A" "$if_a" "$addr_a/24" "$port"
    PID_A[$key]=$STARTED_PID
    "start_$kind_b" "$NS_B" "$if_b" "$addr_b/24" "$port"
    PID_B[$key]=$STARTED_PID
    SERVER[$key]=$addr_b

    local pub_a pub_b
    pub_a=$(in_a wg show "$if_a" public-key)
    pub_b=$(in_b wg show "$if_b" public-key)
    in_a wg set "$if_a" peer "$pub_b" allowed-ips "$addr_b/32" endpoint "$UNDERLAY_B:$port"
    in_b wg set "$if_b" peer "$pub_a" allowed-ips "$addr_a/32" endpoint "$UNDERLAY_A:$port"
    wait_for 20 "${PID_A[$key]}" "a handshake and a ping from $if_a to $addr_b" \
        in_a ping -n -c 1 -W 1 "$addr_b"

    in_b iperf3 -s -B "$addr_b" -p "$IPERF_PORT" >"$WORK/iperf3-server-$key.log" 2>&1 &
    SERVER_PID[$key]=$!
    PIDS+=("${SERVER_PID[$key]}")
    wait_for 10 "${SERVER_PID[$key]}" "the iperf3 server on $addr_b" \
        in_b sh -c "ss -Htln 'src $addr_b and sport = :$IPERF_PORT' | grep -q ."
}

teardown_pair() {
    stop_pid "${SERVER_PID[$1]}"
    stop_pid "${PID_A[$1]}"
    stop_pid "${PID_B[$1]}"
}

# Each measurement below runs through every pair back to back, in an order
# that rotates from one measurement to the next, so the machine's changing
# background load falls on all pairs alike rather than on whichever ran last.
ORDER=(vv gg vg)
rotate() { ORDER=("${ORDER[@]:1}" "${ORDER[0]}"); }

measure_tcp1() {
    local key dir a0 b0
    log "TCP, 1 stream, A→B, ${SECONDS_PER_TEST}s each (with CPU time)"
    for key in "${ORDER[@]}"; do
        dir=$RESULTS/$key
        a0=$(cpu_ticks "${PID_A[$key]}")
        b0=$(cpu_ticks "${PID_B[$key]}")
        iperf "$key" "$dir/tcp1.json" -t "$SECONDS_PER_TEST"
        {
            echo "CPU_A_BEFORE=$a0"
            echo "CPU_B_BEFORE=$b0"
            echo "CPU_A_AFTER=$(cpu_ticks "${PID_A[$key]}")"
            echo "CPU_B_AFTER=$(cpu_ticks "${PID_B[$key]}")"
        } >>"$dir/stats.env"
    done
}

measure_iperf() { # NAME DESCRIPTION IPERF-ARGS...
    local name=$1 what=$2 key
    shift 2
    log "$what, ${SECONDS_PER_TEST}s each"
    for key in "${ORDER[@]}"; do
        iperf "$key" "$RESULTS/$key/$name.json" -t "$SECONDS_PER_TEST" "$@"
    done
}

measure_ping_under_load() {
    local key load load_secs
    load_secs=$(python3 -c "import math; print(math.ceil($PING_LOAD_COUNT * $PING_INTERVAL) + 3)")
    log "ping RTT under a 1-stream TCP load ($PING_LOAD_COUNT pings, ${PING_INTERVAL}s apart)"
    for key in "${ORDER[@]}"; do
        iperf "$key" "$RESULTS/$key/ping_load_tcp.json" -t "$load_secs" &
        load=$!
        sleep 1
        run_ping "$key" "$RESULTS/$key/ping_load.txt" "$PING_LOAD_COUNT"
        wait "$load" || die "the iperf3 load under the ping through pair $key failed"
    done
}

# measure_peers KEY KIND: a fresh daemon of KIND given 1,000 peers by `wg
# setconf` (random keys, a /32 and an endpoint each); records its RSS.
measure_peers() {
    local key=$1 kind=$2 ifn=vgb${ID}9${1:0:1} conf
    log "RSS of $kind with 1,000 peers"
    "start_$kind" "$NS_A" "$ifn" "100.64.9.1/16" $((BASE_PORT + 9))
    conf=$WORK/$ifn-peers.conf
    python3 - "$conf" <<'PY'
import base64, os, sys
with open(sys.argv[1], "w") as f:
    f.write("[Interface]\nPrivateKey = %s\nListenPort = 51829\n" % base64.b64encode(os.urandom(32)).decode())
    for i in range(1000):
        f.write("[Peer]\nPublicKey = %s\nAllowedIPs = 100.65.%d.%d/32\nEndpoint = 198.18.0.2:%d\n"
                % (base64.b64encode(os.urandom(32)).decode(), i // 250, i % 250 + 1, 40000 + i))
PY
    in_a wg setconf "$ifn" "$conf" || die "wg setconf of 1,000 peers on $kind failed"
    [ "$(in_a wg show "$ifn" peers | wc -l)" = 1000 ] || die "$kind does not list 1,000 peers"
    sleep 2
    echo "PEERS_RSS=$(status_kib "$STARTED_PID" VmRSS)" >>"$RESULTS/$key/stats.env"
    stop_pid "$STARTED_PID"
}

# perf_pair: a fourth vpcgated pair, profiled with perf during a 1-stream TCP
# run. Profiling slows what it watches, so it stays out of the table.
perf_pair() {
    setup_pair perf 4 vpcgated vpcgated
    log "perf: TCP, 1 stream, A→B, ${SECONDS_PER_TEST}s, both daemons profiled"
    perf record -q -g -F 999 -p "${PID_A[perf]}" -o "$WORK/perf-sender.data" \
        -- sleep "$SECONDS_PER_TEST" >"$WORK/perf-sender.log" 2>&1 &
    local rec_a=$!
    perf record -q -g -F 999 -p "${PID_B[perf]}" -o "$WORK/perf-receiver.data" \
        -- sleep "$SECONDS_PER_TEST" >"$WORK/perf-receiver.log" 2>&1 &
    local rec_b=$!
    iperf perf "$RESULTS/perf-tcp1.json" -t "$SECONDS_PER_TEST"
    wait "$rec_a" || die "perf record failed: $(cat "$WORK/perf-sender.log")"
    wait "$rec_b" || die "perf record failed: $(cat "$WORK/perf-receiver.log")"
    teardown_pair perf
    for side in sender receiver; do
        summarize_perf "$WORK/perf-$side.data" "$side" | tee "$RESULTS/perf-$side.txt"
    done
}

# summarize_perf DATA LABEL: where one daemon's CPU time went, inclusive of
# what each system call does in the kernel on its behalf.
summarize_perf() {
    local data=$1 label=$2 children dsos
    children=$(perf report -i "$data" --stdio --children --sort sym -g none 2>/dev/null) ||
        die "perf report failed on $data"
    dsos=$(perf report -i "$data" --stdio --no-children --sort dso -g none 2>/dev/null) ||
        die "perf report failed on $data"
    echo "== perf: vpcgated as the $label, share of its CPU samples"
    awk '!/^#/ && NF >= 2 { if ($2 == "[kernel.kallsyms]") k += $1; else u += $1 }
        END { printf "   %6.1f%%  kernel\n   %6.1f%%  user space (vpcgated, libc)\n", k, u }' <<<"$dsos"
    local entry sym what
    for entry in "__x64_sys_sendmsg|UDP sendmsg, GSO (incl. the veth and the peer's receive softirq)" \
        "__x64_sys_recvmmsg|UDP recvmmsg, GRO" "ksys_read|TUN read" \
        "ksys_write|TUN write (incl. the inner packet's local delivery)" \
        "do_sys_poll|poll" "chacha20_poly1305_seal|ChaCha20-Poly1305 seal" \
        "chacha20_poly1305_open|ChaCha20-Poly1305 open" "__schedule|scheduler (waits, wake-ups)"; do
        sym=${entry%%|*}
        what=${entry#*|}
        awk -v sym="$sym" -v what="$what" \
            '!/^#/ && index($NF, sym) { printf "   %6.1f%%  %s\n", $1, what; found = 1; exit }
             END { if (!found) printf "      0.0%%  %s\n", what }' <<<"$children"
    done
}

{
    echo "DATE=$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "SECONDS=$SECONDS_PER_TEST"
    echo "UDP_RATE=$UDP_RATE"
    echo "PING_IDLE_COUNT=$PING_IDLE_COUNT"
    echo "PING_LOAD_COUNT=$PING_LOAD_COUNT"
    echo "CLK_TCK=$(getconf CLK_TCK)"
    echo "LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "WG_GO_VERSION=$(wireguard-go --version | head -n1)"
    echo "IPERF_VERSION=$(iperf3 --version | head -n1 | cut -d' ' -f1-2)"
    echo "COMMIT=$COMMIT"
    echo "VPCGATED_VERSION=$("$VPCGATED" --version 2>/dev/null | awk '{print $NF}' || echo '?')"
} >"$RESULTS/run.env"

start=$SECONDS
setup_pair vv 1 vpcgated vpcgated
setup_pair gg 2 wireguard_go wireguard_go
setup_pair vg 3 vpcgated wireguard_go
sleep 1
for key in "${ORDER[@]}"; do
    mkdir -p "$RESULTS/$key"
    {
        echo "IDLE_RSS_A=$(status_kib "${PID_A[$key]}" VmRSS)"
        echo "IDLE_RSS_B=$(status_kib "${PID_B[$key]}" VmRSS)"
    } >"$RESULTS/$key/stats.env"
    run_ping "$key" "$RESULTS/$key/ping_idle.txt" "$PING_IDLE_COUNT"
done

measure_tcp1
rotate
measure_iperf tcp1r "TCP, 1 stream, B→A" -R
rotate
measure_iperf tcp4 "TCP, 4 streams, A→B" -P 4
rotate
measure_iperf udp "UDP, $UDP_RATE offered, ${UDP_LEN}-byte datagrams" -u -b "$UDP_RATE" -l "$UDP_LEN"
rotate
measure_ping_under_load

for key in vv gg vg; do
    {
        echo "HWM_A=$(status_kib "${PID_A[$key]}" VmHWM)"
        echo "HWM_B=$(status_kib "${PID_B[$key]}" VmHWM)"
    } >>"$RESULTS/$key/stats.env"
    teardown_pair "$key"
done
measure_peers vv vpcgated
measure_peers gg wireguard_go
echo "LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS/run.env"
log "measured in $((SECONDS - start))s"

report=(python3 "$BENCH/report.py" net "$RESULTS" --root "$ROOT")
if ((RECORD)); then
    report+=(--record "$ROOT/BENCHMARKS.md")
fi
"${report[@]}"
if ((PERF)); then
    perf_pair
fi

# steps: one offload at a time, each variant's single-stream TCP beside a
# wireguard-go run measured just before it.
gbits() { python3 -c "import json,sys; print('%.2f' % (json.load(open(sys.argv[1]))['end']['sum_received']['bits_per_second'] / 1e9))" "$1"; }
if ((STEPS)); then
    setup_pair gg 2 wireguard_go wireguard_go
    echo
    echo "Single-stream TCP, A→B, ${SECONDS_PER_TEST}s, offloads turned on one at a time:"
    echo
    echo "| vpcgated offloads | vpcgated (Gbit/s) | wireguard-go (Gbit/s) | ratio |"
    echo "|---|---:|---:|---:|"
    idx=5
    for step in "none|tun,gso,gro" "TUN|gso,gro" "TUN + UDP GSO|gro" "TUN + UDP GSO + GRO|"; do
        name=${step%%|*}
        off=${step#*|}
        VPCGATED_ARGS=()
        [ -n "$off" ] && VPCGATED_ARGS=(--no-offload "$off")
        setup_pair "s$idx" "$idx" vpcgated vpcgated
        VPCGATED_ARGS=()
        mkdir -p "$RESULTS/steps"
        iperf gg "$RESULTS/steps/gg-$idx.json" -t "$SECONDS_PER_TEST"
        iperf "s$idx" "$RESULTS/steps/vv-$idx.json" -t "$SECONDS_PER_TEST"
        v=$(gbits "$RESULTS/steps/vv-$idx.json")
        g=$(gbits "$RESULTS/steps/gg-$idx.json")
        echo "| $name | $v | $g | $(python3 -c "print('%.2f×' % ($v / $g))") |"
        teardown_pair "s$idx"
        idx=$((idx + 1))
    done
    teardown_pair gg
fi
