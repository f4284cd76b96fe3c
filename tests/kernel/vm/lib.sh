# tests/kernel/vm/lib.sh: helpers for scenario scripts, sourced by /init inside
# the VM (busybox ash). Scenarios run under `set -ex`; their xtrace goes to
# /results/log. Disks are /dev/lab/NAME (NAME from the scenario's #@disk lines).
#
# Data written by pat/wr/put is a deterministic function of its arguments, so
# the sha256 values recorded by `expect` are reproducible from run to run.
# (pat/wr/expect/note/dmc behave exactly as the kernel-lab helpers that wrote
# tests/data/kernel-small, so scenarios/fixture-small.sh regenerates the same
# data.)

# O_DIRECT for block devices (bypass the guest page cache, like a real
# workload); plain writes for regular files (tmpfs has no O_DIRECT).
_oflag() {
    local f=$2
    [ -b "$1" ] && f=direct${f:+,$f}
    [ -z "$f" ] || echo "oflag=$f"
}

# pat DEV BLOCKSIZE FIRST COUNT TAG: write COUNT whole blocks from block FIRST;
# block b holds the string "TAG:b " repeated.
pat() {
    local dev=$1 bs=$2 first=$3 count=$4 tag=$5 b o
    o=$(_oflag "$dev" "")
    for b in $(seq "$first" $((first + count - 1))); do
        yes "$tag:$b " | head -c "$bs" |
            dd of="$dev" bs="$bs" seek="$b" count=1 iflag=fullblock $o conv=notrunc status=none
    done
}

# wr DEV OFFSET_BYTES LEN_BYTES TAG: one write at a byte offset (4 KiB aligned
# for block devices); the content is "DEV TAG@OFFSET " repeated.
wr() {
    yes "$1 $4@$2 " | head -c "$3" |
        dd of="$1" bs="$3" seek="$2" count=1 iflag=fullblock \
           $(_oflag "$1" seek_bytes) conv=notrunc status=none
}

# put OFFSET_BYTES LEN_BYTES TAG TARGET...: write the same bytes ("TAG@OFFSET "
# repeated) at the same offset of every TARGET (a device and its model file).
put() {
    local off=$1 len=$2 tag=$3 t
    shift 3
    yes "$tag@$off " | head -c "$len" > /tmp/put.chunk
    for t in "$@"; do
        dd if=/tmp/put.chunk of="$t" bs="$len" seek="$off" count=1 iflag=fullblock \
           $(_oflag "$t" seek_bytes) conv=notrunc status=none
    done
    rm -f /tmp/put.chunk
}

# sectors DEV_OR_FILE: size in 512-byte sectors.
sectors() {
    if [ -b "$1" ]; then blockdev --getsz "$1"; else echo $(($(stat -c %s "$1") / 512)); fi
}

# expect LABEL DEV_OR_FILE: append "LABEL SECTORS SHA256" to /results/expect.
expect() {
    echo "$1 $(sectors "$2") $(sha256sum < "$2" | cut -d' ' -f1)" | tee -a /results/expect
}

# note FILE CMD...: append "$ CMD" and its output to /results/FILE.
note() {
    { set +x; } 2>/dev/null
    local f=$1
    shift
    { echo "\$ $*"; "$@"; } >> "/results/$f" 2>&1
    set -x
}

# dmc NAME TABLE: dmsetup create, then make /dev/mapper/NAME (no udev here).
dmc() {
    dmsetup create "$1" --table "$2"
    dmsetup mknodes "$1"
}

# msg TEXT...: message to the pool target (create_thin, create_snap, delete...).
msg() { dmsetup message pool 0 "$*"; }

# pool_up: the thin pool on /dev/lab/meta + /dev/lab/data, 64 KiB blocks
# (128 sectors), low water mark 0, default features (block zeroing on).
pool_up() {
    dmc pool "0 $(blockdev --getsz /dev/lab/data) thin-pool /dev/lab/meta /dev/lab/data 128 0"
}

# thin_up ID SECTORS: activate thin device ID of the pool as /dev/mapper/thinID.
thin_up() { dmc "thin$1" "0 $2 thin /dev/mapper/pool $1"; }

# pool_tid: the pool's current transaction id (from dmsetup status).
pool_tid() { dmsetup status pool | awk '{print $4}'; }
