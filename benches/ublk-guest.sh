# Guest side of benches/ublk-vm.sh: fio against /dev/ublkbN served by (1) libublk's own loop
# example, (2) ublk-mirror without a mirror, (3) ublk-mirror with a live mirror to a local
# applier, all on the same backing file in the guest's tmpfs. Prints one result line per run:
#   RESULT <target> <job> <iops> <MB/s>
set -eu
cd /tmp
SECONDS_PER_JOB="${BENCH_SECONDS:-15}"
size=256M
truncate -s "$size" /tmp/backing.img

wait_device() { tries=0; until [ -b "$1" ]; do tries=$((tries+1)); [ $tries -lt 300 ] || { echo "no $1"; exit 1; }; sleep 0.1; done; }

run_jobs() { # TARGET DEVICE
    for job in randwrite-4k-qd32 randread-4k-qd32 write-1m-qd8; do
        case "$job" in
            randwrite-4k-qd32) set -- --rw=randwrite --bs=4k --iodepth=32 ;;
            randread-4k-qd32) set -- --rw=randread --bs=4k --iodepth=32 ;;
            write-1m-qd8) set -- --rw=write --bs=1M --iodepth=8 ;;
        esac
        fio --name=bench --filename="$DEVICE" --direct=1 --ioengine=io_uring "$@" --size=192M \
            --time_based --runtime="$SECONDS_PER_JOB" --ramp_time=2 --group_reporting --output-format=terse \
            --terse-version=3 > /tmp/fio.out 2>/tmp/fio.err || { cat /tmp/fio.err; exit 1; }
        # terse v3: field 8 read IOPS, 49 write IOPS, 7 read KB/s, 48 write KB/s
        awk -F';' -v target="$TARGET" -v job="$job" '{ iops = $8 + $49; kb = $7 + $48; printf "RESULT %s %s %d %.1f\n", target, job, iops, kb / 1000 }' /tmp/fio.out
    done
}

echo "== libublk loop example"
loop --version >/dev/null 2>&1 || true
loop add -n 7 -f /tmp/backing.img --foreground -a > /tmp/loop.log 2>&1 &
loop_pid=$!
wait_device /dev/ublkb7
TARGET=libublk-loop DEVICE=/dev/ublkb7 run_jobs
kill -TERM $loop_pid 2>/dev/null; loop del -n 7 >/dev/null 2>&1 || true; wait $loop_pid 2>/dev/null || true

echo "== ublk-mirror, no mirror"
ublk-mirror volume create --dir /tmp/v --name bench --size "$size" --backing /tmp/backing.img --journal-size 128M >/tmp/create.out
ublk-mirror run --dir /tmp/v --ublk --ublk-id 1 > /tmp/run.out 2>/tmp/run.log &
run=$!
wait_device /dev/ublkb1
TARGET=ublk-mirror DEVICE=/dev/ublkb1 run_jobs
kill -TERM $run; wait $run

echo "== ublk-mirror, live mirror to a local applier"
fingerprint=$(ublk-mirror applier init --dir /tmp/a | grep '^sha256:')
ublk-mirror applier allow --dir /tmp/a "$(grep '^sha256:' /tmp/create.out)" >/dev/null
ublk-mirror mirror add --dir /tmp/v --to 127.0.0.1:7450 --fingerprint "$fingerprint" >/dev/null
ublk-mirror applier run --dir /tmp/a --listen 127.0.0.1:7450 2>/tmp/applier.log &
applier=$!
ublk-mirror run --dir /tmp/v --ublk --ublk-id 2 > /tmp/run.out 2>/tmp/run.log &
run=$!
wait_device /dev/ublkb2
TARGET=ublk-mirror+mirror DEVICE=/dev/ublkb2 run_jobs
ublk-mirror status --dir /tmp/v | grep mirror
kill -TERM $run; wait $run
kill -TERM $applier; wait $applier
