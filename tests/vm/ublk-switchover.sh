# A planned switchover with ext4 on /dev/ublkbN, both ends in the guest: files written,
# unmounted, `mirror switchover` to the replica's host; the new primary serves its own
# /dev/ublkbN there, mounted, fsck clean, the files equal, nothing resent; more files; then
# the same command the other way, and the original directory is the primary again.
. "${LIB:-/files/lib.sh}"

step "volume of 128M mirrored to a local applier; ublk device; ext4 with files"
setup_pair 128M
start_ublk
mkfs.ext4 -q -F -b 4096 "$DEV"
mount "$DEV" "$MNT"
for i in 1 2 3 4 5 6; do dd if=/dev/urandom of="$MNT/file$i" bs=64k count=40 2>/dev/null; done
mkdir -p "$MNT/dir" && echo "written on the first primary" > "$MNT/dir/note"
checksums "$MNT" > "$WORK/sums-before"
umount "$MNT"

step "switchover to the replica's side (the old source becomes its replica in a local applier)"
ublk-mirror applier init --dir "$WORK/a2" > /dev/null
ublk-mirror mirror switchover --dir "$WORK/v" --applier "$WORK/a2" --applier-address 127.0.0.1:7431 --json > "$WORK/switch.json" 2> "$WORK/switch.err" || { cat "$WORK/switch.err"; fail "switchover failed"; }
cat "$WORK/switch.json"
wait "$RUN" || fail "run did not exit cleanly after the switchover"
NEW=$(sed -n 's/.*"to":"\([^"]*\)".*/\1/p' "$WORK/switch.json")
[ -n "$NEW" ] && [ -f "$NEW/volume.toml" ] || fail "no new primary directory in the answer"
ublk-mirror status --dir "$WORK/v" --json | grep -q '"role": "demoted"' || fail "the old source is not demoted"

step "the new primary serves /dev/ublkbN: fsck clean, files equal, nothing resent"
ublk-mirror applier run --dir "$WORK/a2" --listen 127.0.0.1:7431 >> "$WORK/applier2.log" 2>&1 &
APPLIER2=$!
: > "$WORK/run2.out"
ublk-mirror run --dir "$NEW" --ublk > "$WORK/run2.out" 2>> "$WORK/run2.log" &
RUN2=$!
wait_for 60 test -s "$WORK/run2.out" || { tail -n 20 "$WORK/run2.log"; fail "the new primary's device did not appear"; }
DEV2=$(head -n 1 "$WORK/run2.out")
e2fsck -fn "$DEV2" > "$WORK/fsck.out" 2>&1 || { cat "$WORK/fsck.out"; fail "e2fsck found problems on the new primary"; }
# Before anything is written here (mounting writes the superblock): the mirror back has
# connected and sent nothing.
wait_for 60 sh -c "ublk-mirror status --dir '$NEW' --json | grep -q '\"connected\": true'" || fail "the new primary's mirror back never connected"
ublk-mirror status --dir "$NEW" --json | grep -q '"sent_bytes": 0' || { ublk-mirror status --dir "$NEW"; fail "bytes were resent after the switch"; }
mount "$DEV2" "$MNT"
checksums "$MNT" > "$WORK/sums-after"
cmp "$WORK/sums-before" "$WORK/sums-after" || fail "the files differ on the new primary"
echo "written on the second primary" > "$MNT/dir/second"
dd if=/dev/urandom of="$MNT/file7" bs=64k count=16 conv=fsync 2>/dev/null
checksums "$MNT" > "$WORK/sums-second"
umount "$MNT"
ublk-mirror mirror wait --dir "$NEW" --timeout 120 || fail "the mirror back did not catch up"

step "switchover back: the original directory is the primary again"
ublk-mirror mirror switchover --dir "$NEW" --applier "$WORK/a" --applier-address 127.0.0.1:7430 > "$WORK/back.out" 2> "$WORK/back.err" || { cat "$WORK/back.err"; fail "switchover back failed"; }
wait "$RUN2" || fail "the second primary's run did not exit cleanly"
ublk-mirror status --dir "$WORK/v" --json | grep -q '"role": "primary"' || fail "the original volume is not the primary again"
start_ublk
e2fsck -fn "$DEV" > "$WORK/fsck2.out" 2>&1 || { cat "$WORK/fsck2.out"; fail "e2fsck found problems after switching back"; }
mount "$DEV" "$MNT"
checksums "$MNT" > "$WORK/sums-back"
cmp "$WORK/sums-second" "$WORK/sums-back" || fail "the files differ after switching back"
umount "$MNT"
stop_run
kill -TERM "$APPLIER" "$APPLIER2"; wait "$APPLIER" "$APPLIER2" || true
echo "PASS: switchover with ext4 on /dev/ublkbN and back, fsck clean, files equal, nothing resent"
