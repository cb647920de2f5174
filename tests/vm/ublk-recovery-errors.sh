# Recoveries that cannot work are refused with a clear message, exit 1, and no hang, while the
# device stays recoverable; once a server re-attaches, further attempts are refused and leave
# it serving. A recovery that fails after the kernel began it says where the device stands,
# and `ublk-mirror ublk delete` gives the device up: I/O that waited fails instead of hanging.
. "${LIB:-/files/lib.sh}"

expect_error() { # PATTERN COMMAND...: COMMAND must exit 1 within 60 s and print PATTERN
    pattern="$1"; shift
    set +e; timeout 60 "$@" > "$WORK/out" 2>&1; status=$?; set -e
    [ "$status" -eq 1 ] || { cat "$WORK/out"; fail "expected exit 1 from: $*; got $status"; }
    grep -q -- "$pattern" "$WORK/out" || { cat "$WORK/out"; fail "expected '$pattern' from: $*"; }
    echo "ok: $(tail -n 1 "$WORK/out")"
}

step "volume V on 2 queues of depth 128 with ext4 and a writer; volume W beside it"
ublk-mirror volume create --dir "$WORK/v" --name vol --size 128M --journal-size 64M >/dev/null
ublk-mirror volume create --dir "$WORK/w" --name other --size 128M --journal-size 64M >/dev/null
start_ublk --queues 2 --depth 128
device="$DEV"; id=${DEV#/dev/ublkb}
mkfs.ext4 -q "$DEV"
mount "$DEV" "$MNT"
( i=0; while [ $i -lt 30 ]; do dd if=/dev/urandom of="$MNT/w$i" bs=64k count=4 conv=fsync 2>/dev/null || exit 1; i=$((i + 1)); done ) &
writer=$!
sleep 1
kill -9 "$RUN"; wait "$RUN" 2>/dev/null || true
[ -b "$device" ] || fail "the device vanished after kill -9"
ublk-mirror ublk list | grep -q "ublkb$id .*quiesced" || { ublk-mirror ublk list; fail "ublk list does not show the device quiesced"; }

step "refused: another volume's directory, contradicting --queues/--depth, a copied record"
expect_error "nothing to recover" ublk-mirror run --dir "$WORK/w" --ublk --recover
expect_error "not this volume's" ublk-mirror run --dir "$WORK/w" --ublk --recover --ublk-id "$id"
expect_error "contradicts ublk device $id, which has 2 queues" ublk-mirror run --dir "$WORK/v" --ublk --recover --queues 1
expect_error "128 deep" ublk-mirror run --dir "$WORK/v" --ublk --recover --depth 64
expect_error "this volume's server left device $id" ublk-mirror run --dir "$WORK/v" --ublk --recover --ublk-id $((id + 7))
cp "$WORK/v/ublk-device.json" "$WORK/w/ublk-device.json"
expect_error "belongs to another volume" ublk-mirror run --dir "$WORK/w" --ublk --recover
rm "$WORK/w/ublk-device.json"
[ -b "$device" ] || fail "a refused recovery removed the device"

step "the real recovery; then a second one, and another volume's, are refused"
start_ublk --recover
[ "$DEV" = "$device" ] || fail "recovered $DEV, expected $device"
wait "$writer" || fail "the writer saw an error across the recovery"
expect_error "in use by another process" ublk-mirror run --dir "$WORK/v" --ublk --recover
cp "$WORK/v/ublk-device.json" "$WORK/w/ublk-device.json"
expect_error "belongs to another volume" ublk-mirror run --dir "$WORK/w" --ublk --recover --ublk-id "$id"
rm "$WORK/w/ublk-device.json"
expect_error "served by pid" ublk-mirror ublk delete --id "$id"
dd if=/dev/urandom of="$MNT/after" bs=64k count=16 conv=fsync 2>/dev/null || fail "the server stopped serving after refused attempts"
sync; echo 3 > /proc/sys/vm/drop_caches
checksums "$MNT" > "$WORK/sums" || fail "reading the filesystem back"
umount "$MNT"
stop_run
e2fsck -fn "$WORK/v/data.img" > "$WORK/fsck.out" 2>&1 || { cat "$WORK/fsck.out"; fail "e2fsck after the refused attempts"; }

step "a recovery that fails after the kernel began it: guidance, then ublk delete"
start_ublk
device="$DEV"; id=${DEV#/dev/ublkb}
mount "$DEV" "$MNT"
kill -9 "$RUN"; wait "$RUN" 2>/dev/null || true
( set +e; dd if=/dev/zero of="$MNT/blocked" bs=4k count=16 conv=fsync 2>/dev/null; echo "$?" > "$WORK/blocked.status" ) &
blocked=$!
sleep 2
[ ! -s "$WORK/blocked.status" ] || fail "a write to the quiesced device completed: $(cat "$WORK/blocked.status")"
export UBLK_MIRROR_FAILPOINTS=ublk-recover-fail-after-start
expect_error "ublk-mirror ublk delete --id $id" ublk-mirror run --dir "$WORK/v" --ublk --recover
grep -q "quiesced" "$WORK/out" || { cat "$WORK/out"; fail "the failure does not say the device is quiesced"; }
unset UBLK_MIRROR_FAILPOINTS
[ ! -s "$WORK/blocked.status" ] || fail "a write to the quiesced device completed"
ublk-mirror ublk delete --dir "$WORK/v" > "$WORK/out" 2>&1 || { cat "$WORK/out"; fail "ublk delete failed"; }
cat "$WORK/out"
wait_for 30 test -s "$WORK/blocked.status" || fail "the blocked writer still hangs after ublk delete"
[ "$(cat "$WORK/blocked.status")" != 0 ] || fail "the blocked write succeeded on a deleted device"
wait "$blocked" || true
umount "$MNT" 2>/dev/null || umount -l "$MNT"
[ ! -e "$WORK/v/ublk-device.json" ] || fail "ublk delete --dir left the device record"
wait_for 30 sh -c "! test -e /sys/class/ublk-char/ublkc$id" || fail "device $id still exists after ublk delete and unmount"

step "the volume serves again on a new device"
start_ublk
stop_run
echo "PASS: recovery errors"
