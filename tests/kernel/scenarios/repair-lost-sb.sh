# repair-lost-sb: the VM side of `tests/kernel/prove repair-lost-sb` (busybox
# ash, set -ex). Disks are fresh; /input/thinmeta/ holds the host's thinmeta
# and the libraries ldd lists.
#  1. the kernel writes a pool: origin 1 (8 MiB) with blocks 0-99 written at
#     pool time 0, then snapshot 2 of it (time 1), which shares every data
#     block with 1; nothing written after the snapshot. before.thin1/2.
#  2. clean teardown; the superblock (block 0) and the device-details root
#     (superblock offset 328) of /dev/lab/meta are zeroed; `thin_check` must
#     fail on it (check-damaged.rc); `thin_repair -i meta -o meta2
#     --data-block-size 128` (repair.rc, repair.stderr; repaired.xml =
#     thin_dump --skip-mappings of the result).
#  3. the pool is activated on meta2 and the same data disk: repaired.thin1/2
#     (== before). Writes through the ORIGIN over the blocks it shares with
#     the snapshot: whole blocks 0-49, 4 KiB in blocks 60, 75 and 99 (the
#     copy-on-write copies the rest), a new block 120; each also to a model
#     file. written.thin1 (== model.thin1), after.thin2 (== before.thin2:
#     repaired with the shared blocks taken for the origin's own, the kernel
#     overwrites them in place and the snapshot changes).
#  4. set_transaction_id, commit, teardown, activate again: reread.thin1/2.
# The host checks every result (the VM fails only when a command fails).
#@disk meta 4M
#@disk meta2 4M
#@disk data 16M
T=/dev/mapper/thin
BS=65536
SZ=16384
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
pool_on() { dmc pool "0 $(blockdev --getsz /dev/lab/data) thin-pool $1 /dev/lab/data 128 0"; }
status() { dmsetup status pool > "/results/status-$1"; cat "/results/status-$1"; }
down() {
    for i in 1 2; do dmsetup suspend "thin$i"; done
    dmsetup suspend pool
    status "$1"
    dmsetup resume pool
    for i in 1 2; do dmsetup resume "thin$i"; done
    for i in 1 2; do dmsetup remove "thin$i"; done
    dmsetup remove pool
}

# 1. origin and snapshot, sharing data blocks 0-99
pool_on /dev/lab/meta
msg create_thin 1
thin_up 1 $SZ
wr ${T}1 0 $((100 * BS)) o1
dmsetup suspend thin1
msg create_snap 2 1
dmsetup resume thin1
thin_up 2 $SZ
msg set_transaction_id 0 1
sync
for i in 1 2; do expect "before.thin$i" "$T$i"; done
down 0-built

# 2. lose the superblock and the details tree; repair
droot=$(od -A n -t u8 -j 328 -N 8 /dev/lab/meta | tr -d ' ')
echo "details root: block $droot"
for b in 0 "$droot"; do
    dd if=/dev/zero of=/dev/lab/meta bs=4096 seek="$b" count=1 conv=notrunc,fsync status=none
done
rc=0; tm thin_check /dev/lab/meta > /results/check-damaged.out 2>&1 || rc=$?
echo $rc > /results/check-damaged.rc
rc=0; tm thin_repair -i /dev/lab/meta -o /dev/lab/meta2 --data-block-size 128 2> /results/repair.stderr || rc=$?
echo $rc > /results/repair.rc
cat /results/repair.stderr
[ "$rc" = 0 ]
tm thin_dump --skip-mappings /dev/lab/meta2 > /results/repaired.xml
cat /results/repaired.xml

# 3. the repaired pool: read, then write through the origin
pool_on /dev/lab/meta2
status 1-repaired
for i in 1 2; do thin_up "$i" $SZ; done
for i in 1 2; do expect "repaired.thin$i" "$T$i"; done
cp ${T}1 /tmp/model1
put 0 $((50 * BS)) w1 ${T}1 /tmp/model1
for b in 60 75 99; do put $((b * BS + 8192)) 4096 w1 ${T}1 /tmp/model1; done
put $((120 * BS)) $BS w1 ${T}1 /tmp/model1
sync
expect written.thin1 ${T}1
expect model.thin1 /tmp/model1
expect after.thin2 ${T}2

# 4. commit, tear down, read back
tid=$(pool_tid)
msg set_transaction_id "$tid" $((tid + 1))
down 2-committed
pool_on /dev/lab/meta2
for i in 1 2; do thin_up "$i" $SZ; done
for i in 1 2; do expect "reread.thin$i" "$T$i"; done
status 3-reread
for i in 1 2; do dmsetup remove "thin$i"; done
dmsetup remove pool
