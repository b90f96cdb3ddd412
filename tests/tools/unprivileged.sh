#!/usr/bin/env bash
# Runs every test outside tests/ as nobody (uid 65534), to show that none of
# them needs root. Run as root from the repository root:
#   bash tests/tools/unprivileged.sh
# The test binaries are built as root (debug profile), then run as nobody
# from their package's directory, as cargo would run them. node/sim's tests
# run from their own binary, because node/tests/sim.rs needs a Rust
# toolchain, which nobody has on a machine where rustup lives in /root.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
    echo "run as root: the binaries are run as nobody through setpriv" >&2
    exit 1
fi
list=$(mktemp)
trap 'rm -f "$list"' EXIT
cargo test --workspace --exclude vpcgate-e2e --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, os, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        if not m["target"]["name"] == "sim":  # the runner; its tests follow below
            print(os.path.dirname(m["manifest_path"]), m["executable"])
' >"$list"
sim_target=target/unprivileged-sim
cargo test --locked --manifest-path node/sim/Cargo.toml --target-dir "$sim_target" --no-run \
    --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print("node/sim", m["executable"])
' >>"$list"
chmod -R o+rX target
failed=0
while read -r dir bin; do
    if out=$(cd "$dir" && setpriv --reuid=65534 --regid=65534 --clear-groups \
        env -i PATH=/usr/bin:/bin HOME=/tmp "$bin" 2>&1); then
        echo "ok    $(basename "$bin"): $(grep 'test result' <<<"$out" | tail -1)"
    else
        echo "FAIL  $(basename "$bin") (from $dir):"
        grep -E 'panicked|FAILED' <<<"$out" | head -20
        failed=1
    fi
done <"$list"
exit $failed
