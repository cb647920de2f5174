# A disk error under /dev/ublkbN: the write that hit a full journal disk fails with ENOSPC in
# the guest, later writes with EIO, reads go on, `status` says FAILED; once the disk is fine a
# restart serves everything that was fsync'd. (The journal's disk "fills" through the
# journal-write-enospc failpoint while $WORK/full exists.)
. "${LIB:-/files/lib.sh}"

step "volume on ublk, 1 MiB written with O_DIRECT and fsync'd"
ublk-mirror volume create --dir "$WORK/v" --name vol --size 64M --journal-size 64M >/dev/null
UBLK_MIRROR_FAILPOINTS="journal-write-enospc=while:$WORK/full" start_ublk
dd if=/dev/urandom of="$WORK/data" bs=64k count=16 2>/dev/null
dd if="$WORK/data" of="$DEV" bs=64k oflag=direct conv=fsync 2>/dev/null || fail "the first write failed"

step "the journal's disk is full: ENOSPC, then EIO"
touch "$WORK/full"
if dd if="$WORK/data" of="$DEV" bs=64k count=1 seek=16 oflag=direct 2> "$WORK/dd.err"; then fail "a write to a full journal succeeded"; fi
grep -q "No space left on device" "$WORK/dd.err" || { cat "$WORK/dd.err"; fail "the write did not fail with ENOSPC"; }
echo "ok: $(cat "$WORK/dd.err")"
rm "$WORK/full"
if dd if="$WORK/data" of="$DEV" bs=64k count=1 seek=17 oflag=direct 2> "$WORK/dd.err"; then fail "a failed volume took a write"; fi
grep -q "I/O error\|Input/output error" "$WORK/dd.err" || { cat "$WORK/dd.err"; fail "a later write did not fail with EIO"; }
echo "ok: $(cat "$WORK/dd.err")"
dd if="$DEV" of="$WORK/back" bs=64k count=16 iflag=direct 2>/dev/null || fail "reads stopped"
cmp "$WORK/data" "$WORK/back" || fail "the fsync'd data does not read back"
ublk-mirror status --dir "$WORK/v" > "$WORK/status.out"
grep -q "FAILED.*No space left on device" "$WORK/status.out" || { cat "$WORK/status.out"; fail "status does not say FAILED with the reason"; }

step "restart once the disk is fine"
kill -TERM "$RUN"
wait "$RUN" && fail "a failed volume stopped with status 0"
wait_for 30 test ! -e "$DEV" || fail "$DEV still exists after run stopped"
start_ublk
dd if="$DEV" of="$WORK/back" bs=64k count=16 iflag=direct 2>/dev/null || fail "read after restart"
cmp "$WORK/data" "$WORK/back" || fail "the fsync'd data did not survive"
dd if="$WORK/data" of="$DEV" bs=64k count=1 seek=16 oflag=direct conv=fsync 2>/dev/null || fail "writes do not work after the restart"
stop_run
echo "PASS: disk errors"
