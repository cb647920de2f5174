# The main job, as a POSIX sh script run by scripts/demo.sh (natively, or as the guest script of
# ublk/vm/run). Needs ublk-mirror on PATH, root, ublk_drv and loop, mkfs.ext4, e2fsck.
set -eu
WORK="${WORK:-/tmp}"
step() { echo; echo "== $*"; }
fail() { echo "demo: FAILED: $*"; exit 1; }
port=7440

step "creating volume 'demo' (256M) in $WORK/vol"
ublk-mirror volume create --dir "$WORK/vol" --name demo --size 256M --journal-size 128M | tee "$WORK/create.out"
step "creating an applier in $WORK/applier, allowing the volume's certificate, adding the mirror"
ublk-mirror applier init --dir "$WORK/applier" | tee "$WORK/init.out"
ublk-mirror applier allow --dir "$WORK/applier" "$(grep '^sha256:' "$WORK/create.out")"
ublk-mirror mirror add --dir "$WORK/vol" --to "127.0.0.1:$port" --fingerprint "$(grep '^sha256:' "$WORK/init.out")"
ublk-mirror applier run --dir "$WORK/applier" --listen "127.0.0.1:$port" 2> "$WORK/applier.log" &
applier=$!

step "serving the volume as a block device: ublk-mirror run --ublk"
ublk-mirror run --dir "$WORK/vol" --ublk > "$WORK/run.out" 2> "$WORK/run.log" &
server=$!
tries=0
until [ -s "$WORK/run.out" ]; do
    tries=$((tries + 1)); [ $tries -lt 600 ] || { cat "$WORK/run.log"; fail "no device"; }
    sleep 0.1
done
device=$(head -n 1 "$WORK/run.out")
echo "device: $device"

step "mkfs.ext4 $device, mount, write files"
mkfs.ext4 -q "$device"
mkdir -p "$WORK/mnt"
mount "$device" "$WORK/mnt"
mkdir -p "$WORK/mnt/data" "$WORK/mnt/programs"
for i in 1 2 3 4 5 6 7 8; do
    dd if=/dev/urandom of="$WORK/mnt/data/file$i" bs=256k count=$((i * 4)) 2>/dev/null
done
cp "$(command -v ublk-mirror)" "$WORK/mnt/programs/"
rm "$WORK/mnt/data/file3"
(cd "$WORK/mnt" && find . -type f | sort | xargs sha256sum) > "$WORK/source.sums"
sync
echo "$(wc -l < "$WORK/source.sums") files, $(du -sk "$WORK/mnt" | cut -f1) KiB, synced"

step "status while the mirror catches up"
caught_up=no
for second in $(seq 1 300); do
    ublk-mirror status --dir "$WORK/vol" | grep -E "^  (lsn|mirror)"
    if ublk-mirror mirror wait --dir "$WORK/vol" --timeout 1 > /dev/null 2>&1; then caught_up=yes; break; fi
done
[ "$caught_up" = yes ] || fail "the mirror did not catch up in 300 s"
ublk-mirror status --dir "$WORK/vol"
ublk-mirror applier status --dir "$WORK/applier"

step "unmount, wait for the mirror to apply the unmount's writes too, stop server and applier"
umount "$WORK/mnt"
ublk-mirror mirror wait --dir "$WORK/vol" --timeout 300 || fail "the mirror did not catch up after unmount"
kill -TERM "$server"; wait "$server" || fail "run did not stop cleanly"
kill -TERM "$applier"; wait "$applier" || fail "the applier did not stop cleanly"

step "verifying the replica"
replica=$(echo "$WORK"/applier/replicas/*/demo/data.img)   # replicas/SOURCE/NAME
e2fsck -fn "$replica" || fail "e2fsck found problems on the replica"
mount -o loop,ro "$replica" "$WORK/mnt"
(cd "$WORK/mnt" && find . -type f | sort | xargs sha256sum) > "$WORK/replica.sums"
umount "$WORK/mnt"
cmp "$WORK/source.sums" "$WORK/replica.sums" || fail "files on the replica differ"
echo "replica: e2fsck clean, mounted read-only, $(wc -l < "$WORK/replica.sums") files with equal checksums"
cmp "$WORK/vol/data.img" "$replica" || fail "replica image differs from the source"
echo "replica image equals the source byte for byte"
echo
echo "demo: OK"
