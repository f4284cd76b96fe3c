# generated: the VM side of `tests/kernel/prove generated` (busybox ash, set -ex).
# The host pre-places meta.img, written by `thinmeta thin_generate_metadata`
# (origins, snapshots sharing leaves, a held metadata snapshot), and data.img
# (every data block starts with "data block N "), plus in /input:
#   plan.sh  BLOCK_SECTORS DATA_SECTORS DEVS NEWSNAP NEWSNAP_OF DELETE
#   sizes    "ID SECTORS" of every generated thin device
#   writes   "ID OFFSET LEN TAG" lines (chosen by tests/kernel/pool-xml plan)
# The host checks every result (the VM only fails when a command fails):
#  1. activate the pool and every device; status-0 (transaction, used data
#     blocks, held metadata root); gen.thinN = sha256 of each whole device
#     (every mapping's block is read)
#  2. create_snap NEWSNAP NEWSNAP_OF; delete DELETE; the writes (COW through
#     shared leaves of an origin and of a snapshot, new blocks); status-1;
#     after.thinN of every live device; set_transaction_id; commit by pool
#     suspend/resume (status-2); clean teardown
#  3. the pool again from the committed metadata: status-3, and DELETE can
#     no longer be activated.
#@disk meta 8M
#@disk data 128M
#@keep-disks
. /input/plan.sh
T=/dev/mapper/thin
size() { awk -v d="$1" '$1 == d {print $2}' /input/sizes; }
# hashdevs LABEL ID...: expect LABEL.thinID for each device, two at a time (the
# VM has 2 CPUs and sha256 is the slow part under TCG).
hashdevs() {
    local label=$1 n=0 i
    shift
    for i in "$@"; do
        expect "$label.thin$i" "$T$i" &
        n=$((n + 1))
        [ $((n % 2)) != 0 ] || wait
    done
    wait
}
status() { dmsetup status pool > "/results/status-$1"; cat "/results/status-$1"; }
pool_gen() { dmc pool "0 $DATA_SECTORS thin-pool /dev/lab/meta /dev/lab/data $BLOCK_SECTORS 0"; }

pool_gen
status 0-activated
for i in $DEVS; do thin_up "$i" "$(size "$i")"; done
hashdevs gen $DEVS

tid=$(pool_tid)
dmsetup suspend "thin$NEWSNAP_OF"
msg create_snap "$NEWSNAP" "$NEWSNAP_OF"
dmsetup resume "thin$NEWSNAP_OF"
thin_up "$NEWSNAP" "$(size "$NEWSNAP_OF")"
dmsetup remove "thin$DELETE"
msg delete "$DELETE"
LIVE=
for i in $DEVS $NEWSNAP; do [ "$i" = "$DELETE" ] || LIVE="$LIVE $i"; done

sed 's/#.*//' /input/writes | while read -r id off len tag; do
    [ -z "$id" ] || put "$off" "$len" "$tag" "$T$id"
done
sync
status 1-written
hashdevs after $LIVE
msg set_transaction_id "$tid" $((tid + 1))

# Suspending the pool commits the metadata.
for i in $LIVE; do dmsetup suspend "thin$i"; done
dmsetup suspend pool
status 2-committed
dmsetup resume pool
for i in $LIVE; do dmsetup resume "thin$i"; done
for i in $LIVE; do dmsetup remove "thin$i"; done
dmsetup remove pool

# The committed metadata opens again; the deleted device is gone.
pool_gen
status 3-reopened
if dmsetup create "thin$DELETE" --table "0 $(size "$DELETE") thin /dev/mapper/pool $DELETE"; then
    echo "thin device $DELETE still exists after delete"
    false
fi
dmsetup remove pool
