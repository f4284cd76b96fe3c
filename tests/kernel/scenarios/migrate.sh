# migrate: the VM side of `tests/kernel/prove migrate` (busybox ash, set -ex).
# The host pre-places meta.img and data.img: kernel-small's, unchanged. In
# /input: sizes ("ID SECTORS" of devices 1-4), thinmeta/ (the binary and the
# libraries ldd lists, run through that ld.so), and, optionally, peer/ (the
# original pdata_tools, the same way: its results are only recorded).
# The host checks every result (the VM fails only when a command fails):
#  1. activate the pool and devices 1-4 (2, 3 and 4 read-only); the kernel's
#     metadata snapshot is stale (device 1 changed after it): release it and
#     reserve a new one
#  2. thinmeta thin_migrate --dest-file of every device: mig.thinN (the host
#     requires final.thinN); the written bytes (du) of each file; the
#     warning for the writable thin1
#  3. --dest-dev: a disk filled with garbage first; thin2 onto it: migdev.thin2
#     (== final.thin2: unprovisioned ranges zeroed)
#  4. refusals (exit statuses in results/*.rc): the pool device as the source,
#     a non-dm disk as the source, the pool's data disk as the destination,
#     a destination smaller than the source, and, after
#     release_metadata_snap, no metadata snapshot
#@disk meta 4M
#@disk data 16M
#@disk dest 8M
#@disk small 1M
#@keep-disks
T=/dev/mapper/thin
size() { awk -v d="$1" '$1 == d {print $2}' /input/sizes; }
# run_in DIR BIN ARGS...: a host binary with the host's libraries
run_in() {
    local d=$1 b=$2 ld f
    shift 2
    # No pipeline: under set -x its two commands trace at once, and their
    # lines can interleave in the stderr file a check reads.
    ld=
    for f in "$d"/lib/ld-linux*; do
        if [ -e "$f" ]; then ld=$f; break; fi
    done
    if [ -n "$ld" ]; then
        "$ld" --library-path "$d/lib" "$d/$b" "$@"
    else
        "$d/$b" "$@"
    fi
}
tm() { run_in /input/thinmeta thinmeta "$@"; }
# rc NAME CMD...: run CMD, its exit status to /results/NAME.rc, stderr to
# /results/NAME.err
rc() {
    local n=$1 r=0
    shift
    "$@" 2> "/results/$n.err" || r=$?
    echo "$r" > "/results/$n.rc"
}
# fill DEV: "garbage " repeated over the whole device
fill() { yes garbage | dd of="$1" bs=65536 count="$(($(blockdev --getsz "$1") / 128))" iflag=fullblock status=none; }

# 1. the pool, a fresh metadata snapshot
pool_up
thin_up 1 "$(size 1)"
for i in 2 3 4; do
    dmsetup create "thin$i" --readonly --table "0 $(size "$i") thin /dev/mapper/pool $i"
    dmsetup mknodes "thin$i"
done
msg release_metadata_snap
msg reserve_metadata_snap
dmsetup status pool > /results/status-0

# 2. to files
for i in 1 2 3 4; do
    rc "mig$i" tm thin_migrate --source-dev "$T$i" --dest-file "/tmp/mig$i"
    [ ! -f "/tmp/mig$i" ] || expect "mig.thin$i" "/tmp/mig$i"
    [ ! -f "/tmp/mig$i" ] || du -k "/tmp/mig$i" >> /results/du
done
# an existing, larger file is cut to the source's size and rewritten
yes garbage | head -c 9437184 > /tmp/mig2
rc mig2again tm thin_migrate --source-dev "${T}2" --dest-file /tmp/mig2 --buffer-size-meg 1
expect mig2again.thin2 /tmp/mig2

# 3. to a device full of garbage
fill /dev/lab/dest
rc migdev2 tm thin_migrate -q --source-dev "${T}2" --dest-dev /dev/lab/dest
expect migdev.thin2 /dev/lab/dest

# 4. refusals
rc nothin tm thin_migrate --source-dev /dev/mapper/pool --dest-file /tmp/x1
rc notdm tm thin_migrate --source-dev /dev/lab/meta --dest-file /tmp/x2
rc destdata tm thin_migrate --source-dev "${T}2" --dest-dev /dev/lab/data
rc small tm thin_migrate --source-dev "${T}2" --dest-dev /dev/lab/small
ls /tmp > /results/tmp-files

# the original tool, when the host gave it (recorded only)
if [ -x /input/peer/pdata_tools ]; then
    for i in 1 2 3 4; do
        rc "peer-mig$i" run_in /input/peer pdata_tools thin_migrate --source-dev "$T$i" --dest-file "/tmp/peer$i"
        [ ! -f "/tmp/peer$i" ] || expect "peer-mig.thin$i" "/tmp/peer$i"
    done
    fill /dev/lab/dest
    rc peer-migdev2 run_in /input/peer pdata_tools thin_migrate --source-dev "${T}2" --dest-dev /dev/lab/dest
    expect peer-migdev.thin2 /dev/lab/dest
    rc peer-small run_in /input/peer pdata_tools thin_migrate --source-dev "${T}2" --dest-dev /dev/lab/small
fi

msg release_metadata_snap
rc nosnap tm thin_migrate --source-dev "${T}2" --dest-file /tmp/x3
if [ -x /input/peer/pdata_tools ]; then
    rc peer-nosnap run_in /input/peer pdata_tools thin_migrate --source-dev "${T}2" --dest-file /tmp/x4
fi
ls /tmp > /results/tmp-files-2
for i in 1 2 3 4; do dmsetup remove "thin$i"; done
dmsetup remove pool
