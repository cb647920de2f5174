# kill -9 of the server under a mounted, busy filesystem: the device is held by the kernel
# (user recovery), `run --recover` re-attaches, the filesystem sees no error and every fsync'd
# file reads back from what the new process recovered from disk. Then a plain restart
# (unmount, stop, run again, mount) finds everything too.
. "${LIB:-/files/lib.sh}"

step "volume, ublk device, ext4 with fsync'd files"
ublk-mirror volume create --dir "$WORK/v" --name vol --size 256M --journal-size 192M >/dev/null
start_ublk
first_device="$DEV"
mkfs.ext4 -q "$DEV"
mount "$DEV" "$MNT"
for i in 1 2 3 4; do
    dd if=/dev/urandom of="$MNT/synced$i" bs=64k count=$((i * 20)) conv=fsync 2>/dev/null
done
sync
checksums "$MNT" > "$WORK/synced-sums"

step "kill -9 while a writer is busy"
(
    i=0
    while [ $i -lt 40 ]; do
        dd if=/dev/urandom of="$MNT/busy$i" bs=64k count=8 2>/dev/null || { echo "writer error at $i" > "$WORK/writer-error"; exit 1; }
        i=$((i + 1))
    done
) &
writer=$!
sleep 1
kill -9 "$RUN"
wait "$RUN" 2>/dev/null || true
[ -b "$first_device" ] || fail "the device vanished after kill -9 (user recovery not in effect)"
if ublk-mirror run --dir "$WORK/v" --ublk > "$WORK/refused.out" 2>&1; then fail "run without --recover started beside an abandoned device"; fi
grep -q -- "--recover" "$WORK/refused.out" || { cat "$WORK/refused.out"; fail "refusal does not point to --recover"; }

step "re-attach with --recover"
start_ublk --recover
[ "$DEV" = "$first_device" ] || fail "recovered $DEV, expected $first_device"
wait "$writer" || fail "the writer saw an error: $(cat "$WORK/writer-error" 2>/dev/null)"
sync
echo 3 > /proc/sys/vm/drop_caches   # reads now come from the recovered server
checksums "$MNT" | grep synced > "$WORK/after-recover"
cmp "$WORK/synced-sums" "$WORK/after-recover" || fail "fsync'd files changed across kill -9 + recovery"
ls "$MNT"/busy* | wc -l | grep -q '^40$' || fail "writer files missing"
if dmesg | grep -E "ublkb.*(I/O error|error)|EXT4-fs error|Buffer I/O error"; then fail "the kernel logged I/O errors"; fi
checksums "$MNT" > "$WORK/all-sums"

step "clean stop, plain restart, mount, check"
umount "$MNT"
stop_run
[ ! -e "$WORK/v/ublk-device.json" ] || fail "device record left after a clean stop"
start_ublk
mount "$DEV" "$MNT"
checksums "$MNT" > "$WORK/restart-sums"
cmp "$WORK/all-sums" "$WORK/restart-sums" || fail "files differ after restart"
umount "$MNT"
stop_run
e2fsck -fn "$WORK/v/data.img" || fail "e2fsck on the backing file"
echo "PASS: kill -9, recovery, restart"
