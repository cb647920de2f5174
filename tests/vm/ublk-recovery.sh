# The user-recovery matrix: for each queue count and depth, ext4 on /dev/ublkbN mirrored to a
# running applier, a busy mixed workload that checks its own data (buffered writes and reads,
# mmap writes, fallocate, punch-hole, truncate, O_DIRECT writes, fsync: fs_workload), kill -9
# of the server in the middle, `run --recover` without --queues/--depth (the device's are
# used). The workload must finish with every byte as written, the kernel must log no I/O or
# ext4 error, e2fsck must find the filesystem clean, and the replica must converge byte-equal.
. "${LIB:-/files/lib.sh}"
command -v fs_workload >/dev/null || fail "fs_workload is not on PATH (built as an example: cargo build --examples)"
MATRIX="${RECOVERY_MATRIX:-1:64 2:128 4:128}"
# 600 operations do every kind of operation many times (checked below); 2000 only made the
# same run longer. The kill comes once KILL_AT of them are done, counted by the workload
# itself: a fixed sleep raced it (a fast machine ran all 600 in 3.9 s, before a kill at 4 s).
OPS="${RECOVERY_OPS:-600}"
KILL_AT=150
seed=1
port=7440
for combo in $MATRIX; do
    queues=${combo%:*}; depth=${combo#*:}
    step "queues $queues, depth $depth: mirrored volume, ext4, busy workload (seed $seed)"
    rm -rf "$WORK/v" "$WORK/a"
    dmesg -c >/dev/null
    setup_pair 256M "$port"
    start_ublk --queues "$queues" --depth "$depth"
    first_device="$DEV"
    # The block layer uses at most one hardware context per CPU; the ublk device has them all.
    contexts=$(ls /sys/block/${DEV#/dev/}/mq | wc -l)
    [ "$contexts" = "$queues" ] || [ "$contexts" = "$(nproc)" ] || fail "$DEV has $contexts hardware contexts, expected $queues"
    grep -q "\"queues\": $queues" "$WORK/v/ublk-device.json" || { cat "$WORK/v/ublk-device.json"; fail "the device does not have $queues queues"; }
    mkfs.ext4 -q "$DEV"
    mount "$DEV" "$MNT"
    rm -f "$WORK/progress"
    FS_WORKLOAD_PROGRESS="$WORK/progress" fs_workload "$MNT" "$seed" "$OPS" 300 > "$WORK/workload.out" 2>&1 &
    workload=$!
    # At most 120 s (1200 looks) for KILL_AT operations.
    for _ in $(seq 1200); do
        [ "$(cat "$WORK/progress" 2>/dev/null || echo 0)" -ge "$KILL_AT" ] && break
        kill -0 "$workload" 2>/dev/null || break
        sleep 0.1
    done

    step "kill -9 of the server while the workload runs ($(cat "$WORK/progress" 2>/dev/null || echo 0) of $OPS operations done)"
    kill -0 "$workload" 2>/dev/null || { cat "$WORK/workload.out"; fail "the workload ended before the kill"; }
    [ "$(cat "$WORK/progress" 2>/dev/null || echo 0)" -ge "$KILL_AT" ] || { cat "$WORK/workload.out"; fail "the workload did not reach $KILL_AT operations in 120 s"; }
    kill -9 "$RUN"
    wait "$RUN" 2>/dev/null || true
    [ -b "$first_device" ] || fail "the device vanished after kill -9 (user recovery not in effect)"
    sleep 1

    step "run --recover (queues and depth from the device)"
    start_ublk --recover
    [ "$DEV" = "$first_device" ] || fail "recovered $DEV, expected $first_device"
    grep -q "\"queues\": $queues" "$WORK/v/ublk-device.json" || { cat "$WORK/v/ublk-device.json"; fail "the recovered device does not have $queues queues"; }
    grep -q "\"depth\": $depth" "$WORK/v/ublk-device.json" || { cat "$WORK/v/ublk-device.json"; fail "the recovered device is not $depth deep"; }
    if ! wait "$workload"; then
        cat "$WORK/workload.out"; tail -n 30 "$WORK/run.log"; fail "the workload failed across kill -9 and recovery"
    fi
    cat "$WORK/workload.out"
    if grep -E '[(,] ?[a-z]+ 0[,)]' "$WORK/workload.out"; then fail "the workload left a kind of operation out"; fi
    if dmesg | grep -E "I/O error|EXT4-fs error|EXT4-fs warning|Buffer I/O error|blk_update_request"; then fail "the kernel logged I/O or filesystem errors"; fi

    step "unmount, mirror catches up, stop, fsck, replica byte-equal"
    umount "$MNT"
    ublk-mirror mirror wait --dir "$WORK/v" --timeout 300 || { tail -n 20 "$WORK/applier.log"; fail "the mirror did not catch up"; }
    stop_run
    e2fsck -fn "$WORK/v/data.img" > "$WORK/fsck.out" 2>&1 || { cat "$WORK/fsck.out"; fail "e2fsck found problems (queues $queues, depth $depth)"; }
    kill -TERM "$APPLIER"; wait "$APPLIER" || fail "the applier did not stop cleanly"
    cmp "$WORK/v/data.img" "$(echo "$WORK"/a/replicas/*/vol/data.img)" || fail "the replica differs from the source (queues $queues, depth $depth)"
    echo "ok: queues $queues depth $depth recovered, workload verified, fsck clean, replica byte-equal"
    seed=$((seed + 1)); port=$((port + 1))
done
echo "PASS: recovery matrix ($MATRIX)"
