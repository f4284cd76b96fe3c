# message: the VM side of `tests/kernel/prove message` (busybox ash, set -ex).
# The host pre-places meta.img: kernel-small after `thinmeta thin_message`
# release_metadata_snap, create_thin 9, create_snap 10 1, delete 3,
# reserve_metadata_snap, set_transaction_id 5 6 (offline); data.img is
# kernel-small's. In /input:
#   sizes     "ID SECTORS" of devices 1 2 4 9 10 (the pool as thinmeta left
#             it), 3 (deleted offline) and 11 (created here by thinmeta)
#   writes    "ID OFFSET LEN TAG" lines: what the kernel writes to 1 and 9
#             after its own reserve_metadata_snap
#   thinmeta/ the thinmeta binary, and lib/ with the libraries ldd lists
#             (run through that ld.so: the initramfs need not hold them)
# The host checks every result (the VM only fails when a command fails):
#  1. activate the pool (status-0: thinmeta's held metadata root, transaction
#     6) and 1 2 4 10 9: act.thinN; thin 3 must not activate
#  2. the kernel releases thinmeta's metadata snapshot (status-1) and takes
#     its own (status-2); the writes; status-3; after.thinN of 1 2 4 10 9
#  3. thinmeta thin_message --pool pool: create_thin 11 (activated:
#     after.thin11, dmsetup status thin11), set_transaction_id 6 7 (the pool
#     status must say 7), then the exit status of messages the kernel refuses
#     (create_thin 11 again, in tm-exists.rc) and of one to a device that
#     does not exist (tm-nodev.rc)
#  4. commit by pool suspend (status-4), resume, clean teardown.
#@disk meta 4M
#@disk data 16M
#@keep-disks
T=/dev/mapper/thin
size() { awk -v d="$1" '$1 == d {print $2}' /input/sizes; }
status() { dmsetup status pool > "/results/status-$1"; cat "/results/status-$1"; }
# tm ARGS...: the host's thinmeta, with the host's libraries
tm() {
    local d=/input/thinmeta ld f
    # No pipeline: under set -x its two commands trace at once, and their
    # lines can interleave in the stderr a check reads.
    ld=
    for f in "$d"/lib/ld-linux*; do
        if [ -e "$f" ]; then ld=$f; break; fi
    done
    if [ -n "$ld" ]; then
        "$ld" --library-path "$d/lib" "$d/thinmeta" "$@"
    else
        "$d/thinmeta" "$@"
    fi
}
LIVE="1 2 4 10 9"

# 1. the pool as thinmeta left it
pool_up
status 0-activated
for i in $LIVE; do thin_up "$i" "$(size "$i")"; done
for i in $LIVE; do expect "act.thin$i" "$T$i"; done
if dmsetup create thin3 --table "0 $(size 3) thin /dev/mapper/pool 3"; then
    echo "thin device 3 still exists after thin_message delete 3"
    false
fi

# 2. the kernel drops thinmeta's metadata snapshot and takes its own; the
# writes come after it, so the snapshot must keep the pool as it is now
msg release_metadata_snap
status 1-released
msg reserve_metadata_snap
status 2-reserved
sed 's/#.*//' /input/writes | while read -r id off len tag; do
    [ -z "$id" ] || put "$off" "$len" "$tag" "$T$id"
done
sync
status 3-written
for i in $LIVE; do expect "after.thin$i" "$T$i"; done

# 3. messages through thinmeta's own ioctl
tm thin_message --pool pool create_thin 11
thin_up 11 "$(size 11)"
dmsetup status thin11 > /results/status-thin11
expect after.thin11 "${T}11"
tm thin_message --pool pool set_transaction_id 6 7
[ "$(pool_tid)" = 7 ]
rc=0
tm thin_message --pool pool create_thin 11 || rc=$?
echo "$rc" > /results/tm-exists.rc
rc=0
tm thin_message --pool no-such-pool create_thin 12 || rc=$?
echo "$rc" > /results/tm-nodev.rc
LIVE="$LIVE 11"

# 4. commit: suspending the pool commits the metadata
for i in $LIVE; do dmsetup suspend "thin$i"; done
dmsetup suspend pool
status 4-committed
dmsetup resume pool
for i in $LIVE; do dmsetup resume "thin$i"; done
for i in $LIVE; do dmsetup remove "thin$i"; done
dmsetup remove pool
