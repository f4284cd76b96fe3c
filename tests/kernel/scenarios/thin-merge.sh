# thin-merge: the VM side of `tests/kernel/prove thin-merge` (busybox ash,
# set -ex). The host pre-places meta.img: kernel-small after the offline,
# metadata-only merge `thinmeta thin_merge --metadata meta.img --dev-id 2
# --into-thin 1` (device 1 took snapshot 2's mapping tree and mapped_blocks,
# device 2 is gone, device 1's old tree was released); data.img is
# kernel-small's. /input/sizes: "ID SECTORS" of devices 1-4 (kernel-small's).
# The host checks every result (the VM fails only when a command fails):
#  1. activate the pool (status-0: used data blocks, held metadata root) and
#     devices 1, 3, 4: merged.thinN (the host requires merged.thin1 ==
#     final.thin2, merged.thin3/4 == final.thin3/4); device 2 must not
#     activate
#  2. the kernel writes to thin1 and to a model file (a copy of thin1 taken
#     before): copy-on-write of blocks its tree shares with the metadata
#     snapshot (0, a partial 5, 65) and new blocks (30, a partial 110);
#     written.thin1 == model.thin1; after.thin3/4 (unchanged). A data block
#     the merge freed while still in use would be handed out here and
#     change thin1's other blocks or thin3/4.
#  3. set_transaction_id N N+1, commit (pool suspend: status-1), clean
#     teardown, activate again from the committed metadata (status-2):
#     reread.thin1/3/4.
#@disk meta 4M
#@disk data 16M
#@keep-disks
T=/dev/mapper/thin
BS=65536
size() { awk -v d="$1" '$1 == d {print $2}' /input/sizes; }
status() { dmsetup status pool > "/results/status-$1"; cat "/results/status-$1"; }
LIVE="1 3 4"

# 1. the pool as thinmeta left it
pool_up
status 0-activated
for i in $LIVE; do thin_up "$i" "$(size "$i")"; done
for i in $LIVE; do expect "merged.thin$i" "$T$i"; done
if dmsetup create thin2 --table "0 $(size 2) thin /dev/mapper/pool 2"; then
    echo "thin device 2 still exists after the merge"
    false
fi

# 2. writes through the merged tree
cp "${T}1" /tmp/model1
for b in 0 65 30; do put $((b * BS)) $BS m1 "${T}1" /tmp/model1; done
put $((5 * BS + 8192)) 4096 m1 "${T}1" /tmp/model1
put $((110 * BS + 4096)) 4096 m1 "${T}1" /tmp/model1
sync
expect written.thin1 "${T}1"
expect model.thin1 /tmp/model1
for i in 3 4; do expect "after.thin$i" "$T$i"; done

# 3. commit, tear down, read back
tid=$(pool_tid)
msg set_transaction_id "$tid" $((tid + 1))
for i in $LIVE; do dmsetup suspend "thin$i"; done
dmsetup suspend pool
status 1-committed
dmsetup resume pool
for i in $LIVE; do dmsetup resume "thin$i"; done
for i in $LIVE; do dmsetup remove "thin$i"; done
dmsetup remove pool
pool_up
status 2-reread
[ "$(pool_tid)" = $((tid + 1)) ]
for i in $LIVE; do thin_up "$i" "$(size "$i")"; done
for i in $LIVE; do expect "reread.thin$i" "$T$i"; done
for i in $LIVE; do dmsetup remove "thin$i"; done
dmsetup remove pool
