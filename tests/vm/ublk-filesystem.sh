# A filesystem on /dev/ublkbN: mkfs, mount, files written and deleted on two queues, fstrim,
# raw discard and write-zeroes, then the mirror catches up and the replica is checked three
# ways: byte-equal to the source, clean under e2fsck, and the same files when mounted.
. "${LIB:-/files/lib.sh}"
export UBLK_MIRROR_FAILPOINTS=journal-no-trim   # keep every record for the journal checks

step "volume of 320M mirrored to a local applier; ublk device with 2 queues"
setup_pair 320M
start_ublk --queues 2 --depth 64
[ "$(cat /sys/block/${DEV#/dev/}/queue/write_cache)" = "write back" ] || fail "no volatile write cache"
[ "$(cat /sys/block/${DEV#/dev/}/queue/fua)" = "1" ] || fail "FUA not advertised"
[ "$(cat /sys/block/${DEV#/dev/}/queue/discard_granularity)" = "4096" ] || fail "discard granularity"
[ "$(cat /sys/block/${DEV#/dev/}/size)" = "655360" ] || fail "device size"
ublk-mirror status --dir "$WORK/v" | grep -q "ublk:$DEV" || fail "status does not show the device"
ublk-mirror status --dir "$WORK/v" --json | grep -q "\"device\": \"$DEV\"" || fail "status --json lacks device"

step "ext4 on the first 256M (the tail stays raw for discard checks)"
mkfs.ext4 -q -F -b 4096 "$DEV" 65536
mount "$DEV" "$MNT"
for i in 1 2 3 4 5 6; do
    dd if=/dev/urandom of="$MNT/file$i" bs=64k count=$((i * 16)) 2>/dev/null
done
mkdir -p "$MNT/tree/a/b"
cp "$MNT/file1" "$MNT/tree/a/b/copy"
rm "$MNT/file2" "$MNT/file5"

step "parallel writers (both queues), fsync'd"
writers=""
for i in 1 2 3 4; do
    dd if=/dev/urandom of="$MNT/parallel$i" bs=128k count=96 conv=fsync 2>/dev/null &
    writers="$writers $!"
done
for writer in $writers; do wait "$writer" || fail "parallel writer failed"; done
checksums "$MNT" > "$WORK/sums"
fstrim "$MNT"
sync
umount "$MNT"

step "raw discard and write-zeroes beyond the filesystem"
dd if=/dev/urandom of="$DEV" bs=1M seek=260 count=40 conv=fsync 2>/dev/null
"$UTIL_BLKDISCARD" -f -o $((264 << 20)) -l $((8 << 20)) "$DEV"
"$UTIL_BLKDISCARD" -f -z -o $((280 << 20)) -l $((8 << 20)) "$DEV"
sync
for offset in 264 280; do
    [ "$(dd if="$DEV" bs=1M skip=$offset count=8 2>/dev/null | tr -d '\0' | wc -c)" = 0 ] \
        || fail "device range at ${offset}M not zero after discard/write-zeroes"
done
ublk-mirror journal dump --dir "$WORK/v" > "$WORK/dump"
grep -q "discard .*offset *$((264 << 20)) length *$((8 << 20))" "$WORK/dump" || fail "discard not journaled"
grep -q "write-zeroes .*offset *$((280 << 20)) length *$((8 << 20))" "$WORK/dump" || fail "write-zeroes not journaled"
grep -c " discard " "$WORK/dump" | grep -qv '^0$' || fail "no discard records (fstrim)"

step "mirror catch-up while the volume still runs"
ublk-mirror status --dir "$WORK/v"
ublk-mirror mirror wait --dir "$WORK/v" --timeout 300
ublk-mirror applier status --dir "$WORK/a"
stop_run
kill -TERM "$APPLIER"; wait "$APPLIER" || fail "applier exit status"

step "replica checks"
replica=$(echo "$WORK"/a/replicas/*/vol/data.img)   # replicas/SOURCE/NAME
cmp "$WORK/v/data.img" "$replica" || fail "replica differs from the source"
e2fsck -fn "$WORK/v/data.img" || fail "e2fsck on the source backing file"
e2fsck -fn "$replica" || fail "e2fsck on the replica"
mount -o loop,ro "$replica" "$MNT"
checksums "$MNT" > "$WORK/replica-sums"
umount "$MNT"
cmp "$WORK/sums" "$WORK/replica-sums" || fail "files on the replica differ"
echo "PASS: filesystem, discard, write-zeroes, two queues, replica equal"
