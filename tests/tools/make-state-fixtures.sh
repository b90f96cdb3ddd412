#!/usr/bin/env bash
# Writes the state directories of one vpcgate release, for the migration
# fixtures in daemon/fixtures/state/VERSION/:
#
#   tests/tools/make-state-fixtures.sh VPCGATED VPCGATE OUT_DIR
#
# VPCGATED and VPCGATE are that release's binaries. Run as root: it starts a
# gateway and a client (a vpcgated with --accept-routes on the gateway peer)
# in two network namespaces of its own, joined by a veth, configures them the
# way the guide does with every kind of state the release can save, stops
# them with SIGTERM and copies their state directories to OUT_DIR/gateway
# and OUT_DIR/client. Each also gets `public.key`, the public key of its
# private.key, for the tests to check the key against.
#
# Everything it uses lies in 198.18.0.0/15 and 100.64.0.0/10, inside its own
# namespaces; it removes them on exit. Record in OUT_DIR/README.md which
# release made the files. Only the CLI flags of 0.1.0 are used, so later
# releases can run it too.
set -euo pipefail

if [ $# -ne 3 ]; then
    echo "usage: $0 VPCGATED VPCGATE OUT_DIR" >&2
    exit 2
fi
[ "$(id -u)" = 0 ] || { echo "$0: must run as root (network namespaces)" >&2; exit 1; }
vpcgated=$(realpath "$1")
vpcgate=$(realpath "$2")
out=$3

tmp=$(mktemp -d /tmp/vpcgate-fixtures.XXXXXX)
gw=vgfixgw$$
cl=vgfixcl$$
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    ip netns del "$gw" 2>/dev/null || true
    ip netns del "$cl" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

ip netns add "$gw"
ip netns add "$cl"
ip -n "$gw" link set lo up
ip -n "$cl" link set lo up
ip -n "$gw" link add fixu0 type veth peer name fixu1 netns "$cl"
ip -n "$gw" addr add 198.18.7.1/24 dev fixu0
ip -n "$cl" addr add 198.18.7.2/24 dev fixu1
ip -n "$gw" link set fixu0 up
ip -n "$cl" link set fixu1 up

# start NETNS NAME ARGS...: vpcgated with its state and socket under $tmp.
start() {
    local ns=$1 name=$2
    shift 2
    ip netns exec "$ns" "$vpcgated" --interface "vgfix$name" --state-dir "$tmp/$name" \
        --socket "$tmp/$name.sock" "$@" >"$tmp/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 300); do
        [ -S "$tmp/$name.sock" ] && ctl "$name" status >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    cat "$tmp/$name.log" >&2
    echo "$0: vpcgated $name did not come up" >&2
    exit 1
}
ctl() {
    local name=$1
    shift
    "$vpcgate" --socket "$tmp/$name.sock" "$@"
}

start "$gw" gateway --listen-port 51901
start "$cl" client --listen-port 51902 --address 100.64.0.9/24,fd00:64::9/64
gw_pub=$(ctl gateway pubkey <"$tmp/gateway/private.key")
cl_pub=$(ctl client pubkey <"$tmp/client/private.key")

# Gateway: non-default settings, two advertised ranges, a generated client
# (its private key is saved), a client that keeps its own key, and the
# vpcgate client below, whose peer entry gets a preshared key through the
# UAPI.
ctl gateway set --public-endpoint 198.18.7.1:51901 --mtu 1380 --mss-clamp off
ctl gateway set --address 100.64.0.1/24,fd00:64::1/64
ctl gateway advertise-routes 198.18.64.0/20,198.19.101.0/24
ctl gateway peer add laptop >"$tmp/laptop.conf"
ctl gateway peer add phone --public-key "$(ctl gateway genkey | ctl gateway pubkey)" --keepalive 25
ctl gateway peer add client --public-key "$cl_pub" --allowed-ips 100.64.0.9/32,fd00:64::9/128
psk=$(ctl gateway genkey)
printf '%s\n' "$psk" >"$tmp/psk"
ip netns exec "$gw" wg set vgfixgateway peer "$cl_pub" preshared-key "$tmp/psk"

# Client: the gateway as a peer whose routes it accepts, SNAT off, and the
# same preshared key; it learns the two ranges over the tunnel.
ctl client set --snat off
ctl client peer add gateway --public-key "$gw_pub" --endpoint 198.18.7.1:51901 \
    --allowed-ips 100.64.0.1/32,fd00:64::1/128 --accept-routes --keepalive 25
ip netns exec "$cl" wg set vgfixclient peer "$gw_pub" preshared-key "$tmp/psk"
learned_both() {
    ctl client --json status | python3 -c \
        'import json, sys; sys.exit(len(json.load(sys.stdin)["accepted_routes"]) != 2)'
}
for _ in $(seq 600); do
    learned_both && break
    sleep 0.1
done
learned_both || {
    ctl client status >&2
    echo "$0: the client did not learn the gateway's two ranges" >&2
    exit 1
}

for pid in "${pids[@]}"; do
    kill -TERM "$pid"
done
wait
pids=()

mkdir -p "$out"
for name in gateway client; do
    rm -rf "${out:?}/$name"
    mkdir -p "$out/$name"
    cp "$tmp/$name"/private.key "$tmp/$name"/settings.json "$tmp/$name"/peers.json "$out/$name/"
    ctl "$name" pubkey <"$tmp/$name/private.key" >"$out/$name/public.key"
    chmod 0644 "$out/$name"/*
done
echo "wrote $out/gateway and $out/client" >&2
