# Prerequisite and conflict errors: one clear message, exit status 1, nothing changed.
. "${LIB:-/files/lib.sh}"
ublk-mirror volume create --dir "$WORK/v" --name one --size 64M --journal-size 64M >/dev/null
ublk-mirror volume create --dir "$WORK/w" --name two --size 64M --journal-size 64M >/dev/null
chmod 755 "$WORK" "$WORK/w"

expect_error() { # PATTERN COMMAND...: COMMAND must exit 1 and print PATTERN
    pattern="$1"; shift
    set +e; "$@" > "$WORK/out" 2>&1; status=$?; set -e
    [ "$status" -eq 1 ] || { cat "$WORK/out"; fail "expected exit 1 from: $*; got $status"; }
    grep -q -- "$pattern" "$WORK/out" || { cat "$WORK/out"; fail "expected '$pattern' from: $*"; }
    echo "ok: $(cat "$WORK/out")"
}

step "not root"
expect_error "needs root" su -s /bin/sh nobody -c "ublk-mirror run --dir $WORK/w --ublk"

step "id already taken"
start_ublk --ublk-id 3
[ "$DEV" = /dev/ublkb3 ] || fail "asked for id 3, got $DEV"
before=$(ls -l "$WORK/w" | sha256sum)
expect_error "already taken" ublk-mirror run --dir "$WORK/w" --ublk --ublk-id 3
[ "$(ls -l "$WORK/w" | sha256sum)" = "$before" ] || fail "a refused run changed the volume directory"

step "nothing to recover"
expect_error "nothing to recover" ublk-mirror run --dir "$WORK/w" --ublk --recover

step "bad queue count"
expect_error "queues" ublk-mirror run --dir "$WORK/w" --ublk --queues 0
stop_run
echo "PASS: errors"
