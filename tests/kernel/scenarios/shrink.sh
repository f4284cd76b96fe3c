# shrink: the VM side of `tests/kernel/prove shrink` (busybox ash, set -ex).
# The host pre-places meta.img and data.img: kernel-small after
# `thin_message release_metadata_snap` and `delete 2` (32 data blocks in use,
# 6 of them at or above block 32), shrunk by `thinmeta thin_shrink --binary
# --nr-blocks 36` (the data of the blocks at or above 36 copied into free
# blocks below, within the full 256-block data image), and data.img = the
# first 36 blocks of that image: the blocks above 36 are gone, so every
# device must read from the moved copies. /input/sizes: "ID SECTORS" of
# devices 1, 3, 4 (kernel-small's). The host checks every result (the VM
# fails only when a command fails):
#  1. activate the pool on the 36-block data disk (status-0: 32/36 data
#     blocks used) and devices 1, 3, 4: shrunk.thinN (the host requires
#     == final.thinN of kernel-small's expect); device 2 must not activate
#  2. the kernel allocates from the shrunk data space map: thin1 writes a new
#     block (30), thin3 overwrites a block it shares with thin4 (0, a
#     copy-on-write) and part of another (10); each write also goes to a
#     model file; written.thinN == model.thinN, after.thin4 unchanged
#     (a block wrongly free in the new space map would be handed out here
#     and change another device)
#  3. set_transaction_id N N+1, commit (pool suspend: status-1, 35/36 used),
#     clean teardown, activate again from the committed metadata
#     (status-2): reread.thin1/3/4.
#@disk meta 4M
#@disk data 2304K
#@keep-disks
T=/dev/mapper/thin
BS=65536
size() { awk -v d="$1" '$1 == d {print $2}' /input/sizes; }
status() { dmsetup status pool > "/results/status-$1"; cat "/results/status-$1"; }
LIVE="1 3 4"

# 1. the shrunk pool as thinmeta left it
pool_up
status 0-activated
for i in $LIVE; do thin_up "$i" "$(size "$i")"; done
for i in $LIVE; do expect "shrunk.thin$i" "$T$i"; done
if dmsetup create thin2 --table "0 $(size 1) thin /dev/mapper/pool 2"; then
    echo "thin device 2 still exists"
    false
fi

# 2. writes that allocate from the shrunk space map
cp "${T}1" /tmp/model1
cp "${T}3" /tmp/model3
put $((30 * BS)) $BS s1 "${T}1" /tmp/model1
put 0 $BS s3 "${T}3" /tmp/model3
put $((10 * BS + 4096)) 4096 s3 "${T}3" /tmp/model3
sync
expect written.thin1 "${T}1"
expect model.thin1 /tmp/model1
expect written.thin3 "${T}3"
expect model.thin3 /tmp/model3
expect after.thin4 "${T}4"

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
