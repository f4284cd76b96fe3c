# pool-verify: the VM side of tests/kernel/prove (busybox ash, set -ex).
# The host pre-places meta.img (metadata prepared by thinmeta, or the kernel's
# own) and data.img, plus /input/expect, the reference "final.thinN SECTORS
# SHA256" lines of tests/data/kernel-small.
#  1. Activate the pool and every thin device N listed in /input/expect with
#     its size, and record "final.thinN SECTORS SHA256" (the host compares).
#  2. Only when /input/write exists (needs devices 1-4 of kernel-small): make
#     the kernel change the metadata and allocate from its space maps:
#     snapshot 1 as 5, delete 3 (its data and mapping leaf are shared with 4),
#     write new and COW blocks to 1 and 5, bump the transaction id, commit,
#     tear down, then activate everything again from the committed metadata.
#     Each write goes to the device and to a model file (a copy taken before),
#     so the expected contents are known: the host requires written.thinN ==
#     model.thinN == reread.thinN, and after/reread.thin2, .thin4 == final.
#     A block wrongly free in our data space map would be handed out again
#     here and change thin2 or thin4; a wrong metadata space map or refcount
#     corrupts the trees the kernel reads back (and thin_check on the host).
#@disk meta 4M
#@disk data 16M
#@keep-disks
T=/dev/mapper/thin
BS=65536
# size ID: sectors of thin device ID (5, the snapshot of 1, has the size of 1)
size() {
    local d=$1
    [ "$d" != 5 ] || d=1
    awk -v l="final.thin$d" '$1 == l {print $2}' /input/expect
}
ids=$(sed -n 's/^final\.thin\([0-9][0-9]*\) .*/\1/p' /input/expect)
[ -n "$ids" ]

pool_up
note status-0-activated dmsetup status
for i in $ids; do thin_up "$i" "$(size "$i")"; done
for i in $ids; do expect "final.thin$i" "$T$i"; done

if [ ! -e /input/write ]; then
    for i in $ids; do dmsetup remove "thin$i"; done
    dmsetup remove pool
    return 0
fi

[ "$ids" = "1
2
3
4" ]
tid=$(pool_tid)
cp "${T}1" /tmp/model1
dmsetup suspend thin1
msg create_snap 5 1
dmsetup resume thin1
thin_up 5 "$(size 1)"
cp /tmp/model1 /tmp/model5
dmsetup remove thin3
msg delete 3

# thin1: COW of blocks shared with 5 (0, 1, partial 3), new blocks 30 and 126
for b in 0 1 30 126; do put $((b * BS)) $BS w1 "${T}1" /tmp/model1; done
put $((3 * BS + 4096)) 4096 w1 "${T}1" /tmp/model1
# thin5: COW of 2, 7, 64; new block 90 and new partial block 115 (rest zeroed)
for b in 2 7 64 90; do put $((b * BS)) $BS w5 "${T}5" /tmp/model5; done
put $((115 * BS + 8192)) 4096 w5 "${T}5" /tmp/model5
sync

expect written.thin1 "${T}1"
expect model.thin1 /tmp/model1
expect written.thin5 "${T}5"
expect model.thin5 /tmp/model5
expect after.thin2 "${T}2"
expect after.thin4 "${T}4"
msg set_transaction_id "$tid" $((tid + 1))

# Suspending the pool commits the metadata.
for i in 1 2 4 5; do dmsetup suspend "thin$i"; done
dmsetup suspend pool
note status-1-committed dmsetup status
dmsetup resume pool
for i in 1 2 4 5; do dmsetup resume "thin$i"; done
for i in 1 2 4 5; do dmsetup remove "thin$i"; done
dmsetup remove pool

# Read back what the kernel committed.
pool_up
note status-2-reread dmsetup status
[ "$(pool_tid)" = $((tid + 1)) ]
for i in 1 2 4 5; do thin_up "$i" "$(size "$i")"; done
for i in 1 2 4 5; do expect "reread.thin$i" "$T$i"; done
if dmsetup create thin3 --table "0 $(size 3) thin /dev/mapper/pool 3"; then
    echo "thin device 3 still exists after delete"
    false
fi
for i in 1 2 4 5; do dmsetup remove "thin$i"; done
dmsetup remove pool
