# fixture-small: a SMALL dm-thin pool for thinmeta's tests (tests/data/kernel-small).
# Run by tests/kernel/make-fixtures inside kernel-lab (busybox ash, set -ex).
# Pool: 4 MiB metadata, 16 MiB data (256 blocks), 64 KiB blocks (128 sectors),
# zeroing on (no feature args), low water mark 0.
# Devices: 1 = thin (8 MiB), 3 = thin (4 MiB), 2 = snap of 1 (8 MiB),
#          4 = snap of 3 (4 MiB, never written: 3 and 4 share one mapping leaf).
# Transaction id 0 -> 5, then reserve_metadata_snap: the metadata snapshot is
# HELD at the end; afterwards only dev 1 is written, and only to blocks still
# shared with dev 2 or to unmapped blocks (see kernel-lab README, "Kernel
# semantics"), so the metasnap.* hashes stay reconstructable from data.img.
#@disk meta 4M
#@disk data 16M
BS=65536
T=/dev/mapper/thin
dmc pool "0 $(blockdev --getsz /dev/lab/data) thin-pool /dev/lab/meta /dev/lab/data 128 0"
msg() { dmsetup message pool 0 "$*"; }
thin() { dmc thin$1 "0 $2 thin /dev/mapper/pool $1"; }
snap() { dmsetup suspend thin$2; msg create_snap $1 $2; dmsetup resume thin$2; }
poolstat() { note status-$1 dmsetup status; note status-$1 dmsetup table; }

msg create_thin 1; thin 1 16384               # 8 MiB = 128 blocks
msg create_thin 3; thin 3 8192                # 4 MiB = 64 blocks

# phase 1: plain provisioning, scattered blocks
pat ${T}1 $BS 0 8 t1a                         # blocks 0-7
pat ${T}1 $BS 16 4 t1a                        # blocks 16-19
wr  ${T}1 $((24 * BS + 8192)) 4096 t1a        # partial block 24: rest zeroed by the pool
pat ${T}1 $BS 40 1 t1a
pat ${T}1 $BS 64 8 t1a                        # blocks 64-71
pat ${T}1 $BS 100 1 t1a
pat ${T}1 $BS 127 1 t1a                       # last block of dev 1
pat ${T}3 $BS 0 1 t3a; pat ${T}3 $BS 10 1 t3a; pat ${T}3 $BS 30 2 t3a
wr  ${T}3 $((63 * BS + 4096)) 4096 t3a        # partial, last block of dev 3

# dev 2 = snapshot of dev 1
snap 2 1; thin 2 16384

# phase 2: divergent writes to both 1 and 2
pat ${T}1 $BS 0 2 t1b                         # overwrite shared blocks 0-1 (COW)
wr  ${T}1 $((5 * BS + 4096)) 4096 t1b         # partial write to shared block 5 (copy + overwrite)
pat ${T}1 $BS 50 1 t1b                        # new block 50, only in dev 1
pat ${T}2 $BS 16 2 t2b                        # snapshot overwrites shared blocks 16-17
wr  ${T}2 $((64 * BS + 61440)) 4096 t2b       # partial, last 4 KiB of shared block 64
pat ${T}2 $BS 80 1 t2b                        # new block 80, only in dev 2
wr  ${T}2 $((90 * BS)) 4096 t2b               # new partial block 90, only in dev 2

# dev 4 = snapshot of dev 3, never written (dev 3 is not written again either)
snap 4 3; thin 4 8192

msg set_transaction_id 0 5
sync
for i in 1 2 3 4; do expect metasnap.thin$i ${T}$i; done
msg reserve_metadata_snap
poolstat 1-after-reserve

# phase 3: after the metadata snapshot, dev 1 only. Overwrites only hit blocks
# still shared with dev 2 (so they are copied, never changed in place).
pat ${T}1 $BS 6 2 t1c                         # shared 6-7 (COW)
pat ${T}1 $BS 40 1 t1c                        # shared 40 (COW)
pat ${T}1 $BS 110 1 t1c                       # new block 110
wr  ${T}1 $((120 * BS + 32768)) 4096 t1c      # new partial block 120
sync
for i in 1 2 3 4; do expect final.thin$i ${T}$i; done

# Commit: suspending the pool commits its metadata. Status/table are taken
# while everything is suspended (nothing can change), then torn down cleanly.
for i in 1 2 3 4; do dmsetup suspend thin$i; done
dmsetup suspend pool
dmsetup status > /results/status
dmsetup table > /results/table
poolstat 2-final
dmsetup resume pool
for i in 1 2 3 4; do dmsetup resume thin$i; done
for i in 1 2 3 4; do dmsetup remove thin$i; done
dmsetup remove pool
