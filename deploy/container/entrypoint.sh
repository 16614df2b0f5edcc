#!/bin/sh
# The image's entrypoint: before `relay serve`, checks that the spool can keep mail (a
# volume the relay's user can write), then runs `relay "$@"` as process 1. Any other
# command (`check`, `queue list`, ...) runs as it is. Exit 78 with one line naming the
# directory and the fix, instead of a traceback from the relay.
set -eu

spool=${RELAY_SPOOL__DIR:-/var/spool/relay}

fail() {
    echo "relay: $*" >&2
    exit 78
}

is_mount() {
    # a field-5 match in mountinfo: the directory is a mount point (volume, bind, emptyDir)
    target=$(cd "$1" && pwd -P) || return 1
    while read -r _ _ _ _ point _; do
        [ "$point" = "$target" ] && return 0
    done < /proc/self/mountinfo
    return 1
}

if [ "${1:-}" = serve ]; then
    # group-writable files and directories: with fsGroup, or OpenShift's arbitrary uid in
    # group 0, a later container under another uid of the same group can go on
    umask 0002
    who="uid $(id -u) gid $(id -g)"
    [ -d "$spool" ] || fail "spool directory $spool does not exist: mount a volume there" \
        "(-v relay-spool:$spool)"
    if [ "${RELAY_ALLOW_EPHEMERAL_SPOOL:-0}" != 1 ] && ! is_mount "$spool"; then
        fail "spool directory $spool is not a volume: queued mail would be lost with the" \
            "container; mount one (-v relay-spool:$spool), or set" \
            "RELAY_ALLOW_EPHEMERAL_SPOOL=1 to accept that"
    fi
    if [ ! -w "$spool" ] || [ ! -x "$spool" ]; then
        fail "spool directory $spool is not writable by $who" \
            "(owner $(stat -c %u:%g "$spool"), mode $(stat -c %a "$spool")):" \
            "chown -R 10001:10001 it, or make it group-writable for gid $(id -g)" \
            "(Kubernetes: securityContext.fsGroup: $(id -g))"
    fi
    bad=$(find "$spool" -mindepth 1 -maxdepth 1 ! -writable -print -quit)
    if [ -n "$bad" ]; then
        fail "$bad is not writable by $who (owner $(stat -c %u:%g "$bad")," \
            "mode $(stat -c %a "$bad")): chown -R 10001:10001 $spool, or make it" \
            "group-writable (chmod -R g+rwX $spool) for gid $(id -g)"
    fi
    # a read-only root without a /tmp mount: temporary files (SQLite's too) in the volume
    tmp=${TMPDIR:-/tmp}
    if [ ! -w "$tmp" ]; then
        tmp=$spool/tmp
        mkdir -p "$tmp"
    fi
    export TMPDIR="$tmp" SQLITE_TMPDIR="${SQLITE_TMPDIR:-$tmp}"
fi

exec relay "$@"
