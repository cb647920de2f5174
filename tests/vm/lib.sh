# Helpers for the guest test scripts (sourced as /files/lib.sh inside ublk/vm/run, or from
# tests/vm/ when the host itself has ublk). POSIX sh + busybox.
set -eu
WORK="${WORK:-/tmp}"
MNT="$WORK/mnt"
mkdir -p "$MNT"

# util-linux's blkdiscard (for -z): busybox's shell would otherwise run its own applet.
UTIL_BLKDISCARD=/usr/local/bin/blkdiscard
[ -x "$UTIL_BLKDISCARD" ] || UTIL_BLKDISCARD=/usr/sbin/blkdiscard

fail() { echo "FAIL: $*"; exit 1; }
# step TEXT: "== [SECONDS SINCE BOOT] TEXT", to see where a slow run spends its time.
step() { read -r up _ < /proc/uptime; echo "== [$up] $*"; }

# wait_for SECONDS COMMAND...: polls every 0.1 s until COMMAND succeeds.
wait_for() {
    limit=$(( $1 * 10 )); shift; tries=0
    until "$@" >/dev/null 2>&1; do
        tries=$((tries + 1)); [ "$tries" -lt "$limit" ] || return 1; sleep 0.1
    done
}

# setup_pair SIZE [PORT]: a volume in $WORK/v mirrored to an applier in $WORK/a (started, $APPLIER).
setup_pair() {
    port="${2:-7430}"
    ublk-mirror volume create --dir "$WORK/v" --name vol --size "$1" --journal-size 192M > "$WORK/create.out"
    volume_fingerprint=$(grep '^sha256:' "$WORK/create.out")
    applier_fingerprint=$(ublk-mirror applier init --dir "$WORK/a" | grep '^sha256:')
    ublk-mirror applier allow --dir "$WORK/a" "$volume_fingerprint" >/dev/null
    ublk-mirror mirror add --dir "$WORK/v" --to "127.0.0.1:$port" --fingerprint "$applier_fingerprint" >/dev/null
    ublk-mirror applier run --dir "$WORK/a" --listen "127.0.0.1:$port" >> "$WORK/applier.log" 2>&1 &
    APPLIER=$!
}

# start_ublk [ARGS...]: serves $WORK/v on a ublk device; sets $RUN (pid) and $DEV (path).
start_ublk() {
    : > "$WORK/run.out"
    ublk-mirror run --dir "$WORK/v" --ublk "$@" > "$WORK/run.out" 2>> "$WORK/run.log" &
    RUN=$!
    if ! wait_for 60 test -s "$WORK/run.out"; then
        tail -n 20 "$WORK/run.log"; fail "the ublk device did not appear"
    fi
    DEV=$(head -n 1 "$WORK/run.out")
    [ -b "$DEV" ] || fail "$DEV is not a block device"
}

# stop_run: SIGTERM, which must drain, flush, remove the device and exit 0.
stop_run() {
    kill -TERM "$RUN"
    wait "$RUN" || { tail -n 20 "$WORK/run.log"; fail "run exited non-zero after SIGTERM"; }
    [ ! -e "$DEV" ] || fail "$DEV still exists after run stopped"
}

# checksums DIR: sorted sha256 of every regular file under DIR, paths relative to DIR.
checksums() { (cd "$1" && find . -type f | sort | xargs sha256sum); }
