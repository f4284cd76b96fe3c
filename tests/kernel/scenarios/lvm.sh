# lvm: the VM side of `tests/kernel/prove lvm` (busybox ash, set -ex).
# Debian's lvm2 drives the pool; thinmeta is its thin_check, thin_dump,
# thin_repair and thin_restore (links made by `thinmeta --install-links`,
# named in lvm.conf; thin_check_options and thin_repair_options left at
# LVM's defaults: Debian builds lvm2 with thin_check_options = [ "-q" ],
# upstream's default [ "-q", "--clear-needs-check-flag" ] is given with
# --config where it matters, the leak phase). /input/root is copied onto / first: lvm and its links,
# thinmeta, the test helper leak_blocks (examples/leak_blocks.rs) and the
# libraries they need (the host's, through the host's ld.so).
#
# The VM records, the host checks (scenarios/lvm.host): hashes in
# /results/expect (LABEL SECTORS SHA256), the exit status of every step that
# may fail in STEP.rc, LVM's verbose output in STEP.log.
#  base     pvcreate, vgcreate, lvcreate a thin pool (64 KiB chunks), thin1
#           (24 MiB) with a pattern, snap1 (its thin snapshot) with
#           copy-on-write blocks on both sides, thin2 (8 MiB): base.LV
#  act1     deactivate, activate (LVM runs thin_check with its options):
#           act1.LV
#  leak     deactivate; the pool's metadata (a dm-linear over _tmeta's
#           segment on the PV) gets leaked metadata and data blocks
#           (leak_blocks), thin_check before (must pass) and after (must
#           find the leaks); activate with Debian's default thin_check
#           options (act2.LV), deactivate, activate with upstream's
#           (act2u.LV: --clear-needs-check-flag frees the leaks);
#           deactivate; a plain thin_check (must pass: freed)
#  details  the device-details root block zeroed; thin_check must fail, and
#           so must activation; `lvconvert --repair vg/pool` (LVM runs
#           thin_repair with its default options, then thin_dump for the
#           transaction id); activate: details.rep.LV; writes to thin1
#           through blocks it shares with snap1 (and to a model file):
#           details.post.LV; deactivate, activate again (thin_check on the
#           repaired, kernel-written metadata): details.reread.LV; a plain
#           thin_check on the final metadata (repair_round below)
#  lostsb   the same with the superblock overwritten, thin_repair_options =
#           [ "--data-block-size", "128" ] (what LVM's repair then depends
#           on: the transaction id, the pool size and the time that
#           thin_repair recovers): lostsb.*
#@disk pv 128M
BS=65536
UPSTREAM_CHECK_OPTIONS='global { thin_check_options = [ "-q", "--clear-needs-check-flag" ] }'
LVS="thin1 snap1 thin2"

cp -a /input/root/. /
while read -r ko; do   # dm-snapshot: lvcreate -s checks for its target
    insmod "/input/$ko" 2> /dev/null || echo "insmod $ko: already loaded or built in"
done < /input/modules
mkdir -p /etc/lvm /run/lock/lvm /run/lvm
# (lvm.host's reference mode, LVM_REFERENCE_TOOLS, brings other tools with
# their links instead of thinmeta)
[ ! -x /usr/sbin/thinmeta ] || thinmeta --install-links /usr/sbin > /results/install-links
cat > /etc/lvm/lvm.conf <<'CONF'
devices {
    obtain_device_list_from_udev = 0
    global_filter = [ "a|^/dev/vd|", "r|.*|" ]
}
activation {
    udev_sync = 0
    udev_rules = 0
    verify_udev_operations = 1
    monitoring = 0
}
global {
    use_lvmpolld = 0
    thin_check_executable = "/usr/sbin/thin_check"
    thin_dump_executable = "/usr/sbin/thin_dump"
    thin_repair_executable = "/usr/sbin/thin_repair"
    thin_restore_executable = "/usr/sbin/thin_restore"
}
backup {
    backup = 0
    archive = 0
}
CONF
note config lvm version
note config lvmconfig --type full global/thin_check_executable global/thin_check_options \
    global/thin_repair_executable global/thin_repair_options global/thin_dump_executable
note config ls -l /usr/sbin/thin_check /usr/sbin/thin_repair /usr/sbin/thin_dump /usr/sbin/thin_restore

# step NAME CMD...: run CMD, its output (also stderr) to NAME.log, its exit
# status to NAME.rc; never fails (the host judges).
step() {
    { set +x; } 2> /dev/null
    local n=$1 rc=0
    shift
    echo "+ $* > $n.log"
    "$@" > "/results/$n.log" 2>&1 || rc=$?
    echo "$rc" > "/results/$n.rc"
    echo "  rc=$rc"
    set -x
}
hash_all() { for lv in $LVS; do expect "$1.$lv" "/dev/vg/$lv"; done; }
# meta_up / meta_down: the pool's metadata as /dev/mapper/tmeta, a dm-linear
# over the _tmeta segment(s) recorded while the pool was active (the VG must
# be inactive: LVM's own component activation is read-only).
meta_up() { dmsetup create tmeta < /tmp/tmeta.table && dmsetup mknodes tmeta; }
meta_down() { dmsetup remove tmeta; }
save_tmeta_table() { dmsetup table vg-pool_tmeta > /tmp/tmeta.table; cat /tmp/tmeta.table >> /results/tmeta.table; }

# --- base: a pool, a thin LV, its snapshot, another thin LV ---
PV=$(readlink -f /dev/lab/pv)
pvcreate -y "$PV"
vgcreate vg "$PV"
lvcreate -y --type thin-pool -L 64M --poolmetadatasize 4M --chunksize 64k -Zy -n pool vg
lvcreate -y -V 24M --thin -n thin1 vg/pool
pat /dev/vg/thin1 $BS 0 48 t1a
wr /dev/vg/thin1 $((60 * BS + 8192)) 4096 t1a
lvcreate -y -s -kn -n snap1 vg/thin1
pat /dev/vg/thin1 $BS 0 4 t1b        # copy-on-write: snap1 keeps t1a
pat /dev/vg/snap1 $BS 10 2 s1        # copy-on-write on the snapshot's side
pat /dev/vg/snap1 $BS 200 1 s1       # unmapped in both
lvcreate -y -V 8M --thin -n thin2 vg/pool
pat /dev/vg/thin2 $BS 0 16 t2
sync
hash_all base
note lvs lvs -a -o lv_name,lv_attr,lv_size,pool_lv,origin,data_percent,metadata_percent,chunk_size,transaction_id,thin_id
note lvs dmsetup status
save_tmeta_table

# --- act1: LVM activates the pool through thin_check ---
vgchange -an vg
step act1 vgchange -ay -vv vg
[ "$(cat /results/act1.rc)" = 0 ]
hash_all act1
vgchange -an vg

# --- leak: leaked metadata and data blocks; LVM's thin_check must take them ---
meta_up
step leak-check0 thin_check /dev/mapper/tmeta
step leak-make leak_blocks /dev/mapper/tmeta 5 3
step leak-check1 thin_check /dev/mapper/tmeta
meta_down
# Debian's lvm2 is built with thin_check_options = [ "-q" ] (lvmconfig in
# /results/config); upstream's default adds --clear-needs-check-flag. Both.
step act2 vgchange -ay -vv vg
if [ "$(cat /results/act2.rc)" = 0 ]; then
    hash_all act2
fi
vgchange -an vg || true
step act2u vgchange --config "$UPSTREAM_CHECK_OPTIONS" -ay -vv vg
if [ "$(cat /results/act2u.rc)" = 0 ]; then
    hash_all act2u
    vgchange -an vg
else
    # Go on with the damage phase anyway: free the leaks by hand.
    vgchange -an vg || true
    meta_up
    step leak-fallback thin_check --auto-repair /dev/mapper/tmeta
    meta_down
fi
meta_up
step leak-check2 thin_check /dev/mapper/tmeta

# repair_round TAG CONFIG WRITE...: with the damage done (the VG inactive),
# thin_check must fail and so must activation; `lvconvert --repair` (with
# --config CONFIG unless it is empty); activate
# (TAG.rep.LV); the WRITEs ("OFFSET LEN") to thin1 and its model (TAG.post.LV,
# TAG.model.thin1); deactivate, activate again (TAG.reread.LV); a plain
# thin_check on the repaired and kernel-written metadata (TAG-final-check).
# Stops (returns 1) where a step the next ones need failed.
repair_round() {
    local t=$1 config=$2 w
    shift 2
    meta_up
    step "$t-damage-check" thin_check /dev/mapper/tmeta
    meta_down
    step "$t-act-damaged" vgchange -ay -vv vg
    vgchange -an vg || true
    if [ -n "$config" ]; then
        step "$t-repair" lvconvert --config "$config" -y -vv --repair vg/pool
    else
        step "$t-repair" lvconvert -y -vv --repair vg/pool
    fi
    note lvs lvs -a -o lv_name,lv_attr,lv_size,pool_lv,origin,data_percent,metadata_percent,transaction_id,thin_id
    [ "$(cat "/results/$t-repair.rc")" = 0 ] || return 1
    step "$t-act" vgchange -ay -vv vg
    [ "$(cat "/results/$t-act.rc")" = 0 ] || return 1
    hash_all "$t.rep"
    note lvs dmsetup status
    save_tmeta_table
    dd if=/dev/vg/thin1 of=/tmp/model.thin1 bs=1M status=none
    for w in "$@"; do
        # shellcheck disable=SC2086 # offset and length
        put $w "$t" /dev/vg/thin1 /tmp/model.thin1
    done
    sync
    hash_all "$t.post"
    expect "$t.model.thin1" /tmp/model.thin1
    rm -f /tmp/model.thin1
    vgchange -an vg
    step "$t-react" vgchange -ay -vv vg
    [ "$(cat "/results/$t-react.rc")" = 0 ] || return 1
    hash_all "$t.reread"
    note lvs dmsetup status
    vgchange -an vg
    meta_up
    step "$t-final-check" thin_check /dev/mapper/tmeta
    thin_dump /dev/mapper/tmeta > "/results/$t.xml" 2>&1 || true
    meta_down
}
# zero_block N: zero metadata block N (of /dev/mapper/tmeta)
zero_block() { dd if=/dev/zero of=/dev/mapper/tmeta bs=4096 seek="$1" count=1 conv=notrunc status=none; }
# sb_u64 OFFSET: a superblock field
sb_u64() { od -An -t u8 -j "$1" -N 8 /dev/mapper/tmeta | tr -d ' '; }

# --- details: the details root zeroed; lvconvert --repair ---
# (/dev/mapper/tmeta is up after leak-check2.) The writes: whole and partial
# blocks thin1 shares with snap1 (copy-on-write), one of its own, an
# unmapped one.
droot=$(sb_u64 328)
echo "details root $droot" > /results/details.damage
zero_block "$droot"
meta_down
repair_round details "" "$((20 * BS)) $BS" "$((21 * BS + 4096)) 4096" "$((2 * BS)) $BS" "$((300 * BS)) $BS"

# --- lostsb: the superblock overwritten ---
# Overwritten, not zeroed: LVM does not check metadata whose first block is
# all zeros (a new pool) and the kernel formats it: an empty pool, the old
# metadata gone (seen with this LVM). Neither thinmeta nor the original tools
# repair a pool without its superblock unless told the data block size,
# which LVM does not pass: it is given in thin_repair_options, as a user
# would. What else the superblock held, repair must recover as LVM needs it:
# the transaction id (LVM takes its own or one more), the number of data
# blocks and the time (the kernel's copy-on-write depends on it).
meta_up
echo "superblock overwritten" > /results/lostsb.damage
yes "lost superblock " | head -c 4096 | dd of=/dev/mapper/tmeta bs=4096 count=1 conv=notrunc status=none
meta_down
repair_round lostsb 'global { thin_repair_options = [ "--data-block-size", "128" ] }' \
    "$((24 * BS)) $BS" "$((25 * BS + 4096)) 8192" "$((30 * BS)) $BS" "$((10 * BS)) $BS" "$((310 * BS)) $BS"
