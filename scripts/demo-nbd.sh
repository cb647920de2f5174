#!/usr/bin/env bash
# The main job end to end on this machine: create a volume and a local applier, serve the
# volume over NBD while it is mirrored over QUIC, write data with a real client (qemu-io),
# show status while the mirror catches up, stop cleanly, and verify the backing image and the
# replica byte for byte. The NBD flavour of the demo (for QEMU and hosts without ublk);
# scripts/demo.sh is the main one, on /dev/ublkbN.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
bin=$PWD/target/release/ublk-mirror
work=$(mktemp -d /tmp/ublk-mirror-demo.XXXXXX)
server=
applier=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; [ -n "$applier" ] && kill "$applier" 2>/dev/null && wait "$applier" 2>/dev/null; rm -rf "$work"' EXIT
echo "== creating volume demo (256M) in $work/vol"
"$bin" volume create --dir "$work/vol" --name demo --size 256M --journal-size 128M | tee "$work/create.out"
echo "== creating an applier in $work/applier and allowing the volume's certificate"
"$bin" applier init --dir "$work/applier" | tee "$work/init.out"
"$bin" applier allow --dir "$work/applier" "$(grep '^sha256:' "$work/create.out")"
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin" mirror add --dir "$work/vol" --to "127.0.0.1:$port" --fingerprint "$(grep '^sha256:' "$work/init.out")"
"$bin" applier run --dir "$work/applier" --listen "127.0.0.1:$port" 2>"$work/applier.log" &
applier=$!
echo "== serving it on unix:$work/demo.sock"
"$bin" run --dir "$work/vol" --nbd "unix:$work/demo.sock" 2>"$work/run.log" &
server=$!
for _ in $(seq 100); do [ -S "$work/demo.sock" ] && break; sleep 0.1; done
uri="nbd+unix:///demo?socket=$work/demo.sock"
echo "== writing 64 MiB of patterned data with qemu-io, then FLUSH"
qemu-io -f raw "$uri" -c "write -P 0xa5 0 32M" -c "write -P 0x5a 64M 32M" -c "write -z 16M 1M" -c flush
echo "== status while the mirror catches up"
"$bin" status --dir "$work/vol"
for _ in $(seq 300); do
    caught_up=$("$bin" status --dir "$work/vol" --json | python3 -c 'import json,sys; s=json.load(sys.stdin); m=s["mirrors"][0]; print(int(m["applied_lsn"] == s["volume"]["last_lsn"] and m["connected"]))')
    [ "$caught_up" = 1 ] && break
    sleep 0.1
done
"$bin" status --dir "$work/vol"
"$bin" applier status --dir "$work/applier"
[ "$caught_up" = 1 ] || { echo "demo: FAILED (the mirror did not catch up)"; exit 1; }
echo "== verifying through the export"
check=$(qemu-io -f raw "$uri" -c "read -P 0xa5 0 16M" -c "read -P 0 16M 1M" -c "read -P 0x5a 64M 32M")
if grep -q "verification failed" <<<"$check"; then echo "$check"; echo "demo: FAILED"; exit 1; fi
echo "read back 49 MiB: every pattern matches"
echo "== stopping (SIGTERM: drain, flush, checkpoint)"
kill -TERM "$server"; wait "$server"; server=
kill -TERM "$applier"; wait "$applier"; applier=
"$bin" status --dir "$work/vol"
replica=$(echo "$work"/applier/replicas/*/demo/data.img)   # replicas/SOURCE/NAME
if ! qemu-img compare -q -f raw -F raw "$work/vol/data.img" "$replica"; then
    echo "demo: FAILED (the replica differs from the source)"; exit 1
fi
echo "replica verified: byte for byte equal to the source"
python3 - "$work/vol/data.img" <<'PY'
import sys
data = open(sys.argv[1], 'rb').read()
M = 1 << 20
assert data[:16*M] == b'\xa5' * (16*M) and data[16*M:17*M] == bytes(M) and data[17*M:32*M] == b'\xa5' * (15*M)
assert data[64*M:96*M] == b'\x5a' * (32*M) and data[96*M:] == bytes(len(data) - 96*M)
print("backing image verified: every written byte is in place")
PY
echo "demo: OK"
