# Application-consistent markers: ext4 on /dev/ublkbN, `marker create --freeze` freezes it
# around the marker, and the replica's snapshot at that marker, exported read-only over NBD
# and copied out with qemu-img, is clean under `e2fsck -fn` with no journal to replay; the
# filesystem is thawed afterwards, also when the marker fails after the freeze.
. "${LIB:-/files/lib.sh}"

step "volume of 160M mirrored to a local applier; ublk device; ext4 mounted"
setup_pair 160M
start_ublk
mkfs.ext4 -q -F -b 4096 "$DEV"
mount "$DEV" "$MNT"
wait_for 120 sh -c "ublk-mirror status --dir '$WORK/v' --json | grep -q '\"consistent\": true'" || fail "mirror never consistent"

step "files written and left unsynced (dirty in the page cache, the ext4 journal busy)"
for i in 1 2 3 4; do dd if=/dev/urandom of="$MNT/file$i" bs=64k count=32 2>/dev/null; done
mkdir -p "$MNT/dir"
echo "before the marker" > "$MNT/dir/note"

step "a marker with --freeze"
ublk-mirror marker create --dir "$WORK/v" --name frozen1 --freeze "$MNT" --json > "$WORK/marker.json" || fail "marker create --freeze failed"
cat "$WORK/marker.json"
grep -q '"frozen"' "$WORK/marker.json" || fail "the marker does not report the frozen filesystem"
checksums "$MNT" > "$WORK/sums-at-marker"
echo "after the marker" > "$MNT/dir/later" || fail "the filesystem is not thawed after the marker"
dd if=/dev/urandom of="$MNT/file1" bs=64k count=32 conv=notrunc,fsync 2>/dev/null || fail "writing after the marker"

step "a marker that fails after the freeze (its name is taken) still thaws"
if ublk-mirror marker create --dir "$WORK/v" --name frozen1 --freeze "$MNT" 2> "$WORK/dup.err"; then fail "a duplicate marker name was accepted"; fi
grep -q "already has a marker named" "$WORK/dup.err" || { cat "$WORK/dup.err"; fail "unexpected error for a duplicate name"; }
timeout 20 sh -c "echo thawed > '$MNT/dir/after-failure' && sync" || fail "the filesystem stayed frozen after a failed marker"

step "a marker on a path that is not a mount point is refused before anything"
if ublk-mirror marker create --dir "$WORK/v" --name frozen2 --freeze "$MNT/dir" 2> "$WORK/mp.err"; then fail "--freeze on a non mount point was accepted"; fi
grep -q "not the mount point" "$WORK/mp.err" || { cat "$WORK/mp.err"; fail "unexpected error for a non mount point"; }

step "the snapshot at the marker, exported over NBD, checked with e2fsck"
ublk-mirror mirror wait --dir "$WORK/v" --timeout 300
wait_for 60 sh -c "ublk-mirror applier snapshot list --dir '$WORK/a' --json | grep -q '\"name\": \"frozen1\"'" || fail "no snapshot frozen1"
ublk-mirror applier snapshot list --dir "$WORK/a"
ublk-mirror applier snapshot export --dir "$WORK/a" --volume vol --snapshot frozen1 --nbd "unix:$WORK/snap.sock" > "$WORK/export.out" 2>> "$WORK/export.log" &
EXPORT=$!
wait_for 30 test -S "$WORK/snap.sock" || { cat "$WORK/export.log"; fail "the export did not start"; }
qemu-img convert -f raw -O raw "nbd+unix:///vol?socket=$WORK/snap.sock" "$WORK/snapshot.img" || fail "qemu-img could not read the export"
kill -TERM "$EXPORT"; wait "$EXPORT" || fail "export exit status"
e2fsck -fn "$WORK/snapshot.img" > "$WORK/fsck.out" 2>&1 || { cat "$WORK/fsck.out"; fail "e2fsck found problems in the snapshot"; }
if grep -qi "recovering journal\|needs_recovery" "$WORK/fsck.out"; then cat "$WORK/fsck.out"; fail "the snapshot needed a journal replay"; fi
dumpe2fs -h "$WORK/snapshot.img" 2>/dev/null | grep -i "features" | grep -q needs_recovery && fail "the snapshot's ext4 needs recovery"
mkdir -p "$WORK/snapmnt"
mount -o loop,ro,noload "$WORK/snapshot.img" "$WORK/snapmnt"
checksums "$WORK/snapmnt" > "$WORK/sums-snapshot"
umount "$WORK/snapmnt"
cmp "$WORK/sums-at-marker" "$WORK/sums-snapshot" || fail "the snapshot's files differ from the filesystem at the marker"

umount "$MNT"
stop_run
kill -TERM "$APPLIER"; wait "$APPLIER" || fail "applier exit status"
echo "PASS: --freeze markers give fsck-clean snapshots, thawed on success and on failure"
