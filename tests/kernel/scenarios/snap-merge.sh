# snap-merge: the VM side of `tests/kernel/prove snap-merge` (busybox ash,
# set -ex); the host side is scenarios/snap-merge.host.
# The real kernel makes a classic dm-snapshot (persistent store, 4 KiB chunks
# = 8 sectors, so 256 exceptions per metadata area) of an origin of 32763
# sectors (a dm-linear device: not a multiple of the chunk size, its last
# chunk 4095 has 3 sectors), and writes through the origin and the snapshot
# until 566 exceptions exist: areas 0 and 1 fill and the table ends in area 2;
# long runs, scattered chunks, a partial chunk, and the origin's partial last
# chunk among them. It records the snapshot view, removes the snapshot (the
# disks origin/cow then hold the pre-merge state and are not touched again),
# copies both disks to origin_m/cow_m and merges those with the kernel's
# snapshot-merge target. The host runs snap_merge on the pre-merge disks and
# compares with `snap`, `merged.origin` and cow_m.
# /input/modules lists the dm-snapshot module and its dependencies (copied
# from the kernel package by the host; the initramfs only has dm-thin's).
#@disk origin 16M
#@disk cow 8M
#@disk origin_m 16M
#@disk cow_m 8M
OSZ=32763
CH=8
CB=4096

while read -r ko; do
    insmod "/input/$ko" 2>/dev/null || echo "insmod $ko: already loaded or built in"
done < /input/modules
dmsetup targets | grep -q '^snapshot-merge '

# merge_done NAME: wait until the snapshot-merge target NAME has merged all
# (status "<allocated>/<total> <metadata>": done when allocated == metadata).
merge_done() {
    local i=0 st a m
    while :; do
        st=$(dmsetup status "$1")
        a=$(echo "$st" | awk '{split($4, x, "/"); print x[1]}')
        m=$(echo "$st" | awk '{print $5}')
        case $a in '' | *[!0-9]*) echo "merge failed: $st"; return 1 ;; esac
        [ "$a" != "$m" ] || return 0
        i=$((i + 1))
        [ $i -lt 3000 ] || { echo "merge timeout: $st"; return 1; }
        sleep 0.1
    done
}

# span DEV FIRST_BLOCK COUNT BLOCKSIZE TAG: one dd writing COUNT blocks
# ("TAG " repeated), O_DIRECT: one process, however many chunks it covers.
span() {
    yes "$5 " | head -c $(($3 * $4)) |
        dd of="$1" bs="$4" seek="$2" count="$3" iflag=fullblock oflag=direct conv=notrunc status=none
}

dmc olin "0 $OSZ linear /dev/lab/origin 0"
O=/dev/mapper/olin
span $O 0 255 65536 ini                          # sectors 0-32639
span $O 32640 123 512 ini-tail                   # sectors 32640-32762
sync
expect origin.initial $O

dmc snap "0 $OSZ snapshot $O /dev/lab/cow P $CH"
dmc orig "0 $OSZ snapshot-origin $O"
span /dev/mapper/orig 0 24 65536 o1              # chunks 0-383: one run over areas 0 and 1
i=0
while [ $i -lt 80 ]; do                          # 80 scattered chunks, every 7th from 2000
    wr /dev/mapper/orig $(((2000 + i * 7) * CB)) $CB o2
    i=$((i + 1))
done
span /dev/mapper/snap 3000 100 $CB s1            # snapshot writes: chunks 3000-3099
wr /dev/mapper/snap $((3500 * CB + 1024)) 512 s2  # part of chunk 3500 (copied first)
span /dev/mapper/orig 32761 1 512 o3             # the origin's partial last chunk 4095:
span /dev/mapper/snap 32762 1 512 s3             # copied, then changed in the snapshot
span /dev/mapper/orig 1 1 65536 o4               # chunks 16-31 again: no new exceptions
sync
expect snap /dev/mapper/snap
expect origin.pre-merge /dev/mapper/orig
note status dmsetup status
note status dmsetup table
dmsetup remove orig
dmsetup remove snap
expect origin.raw $O                             # == origin.pre-merge
dmsetup remove olin
expect cow.pre-merge /dev/lab/cow

# The kernel's merge, on copies.
dd if=/dev/lab/origin of=/dev/lab/origin_m bs=1M oflag=direct status=none
dd if=/dev/lab/cow of=/dev/lab/cow_m bs=1M oflag=direct status=none
sync
dmc mlin "0 $OSZ linear /dev/lab/origin_m 0"
dmc merge "0 $OSZ snapshot-merge /dev/mapper/mlin /dev/lab/cow_m P $CH"
note merge dmsetup status merge
merge_done merge
note merge dmsetup status merge
dmsetup remove merge
expect merged.origin /dev/mapper/mlin            # == snap
dmsetup remove mlin
expect cow.merged /dev/lab/cow_m
