#!/usr/bin/env bash
# Benchmark: thin_merge's data copy against a plain sequential copy of the
# same number of bytes, measured in the same run on the same files.
#
# Usage: bench/thin_merge.sh [SIZE_MIB] [REPS]
#   SIZE_MIB  the thin device's size (default 1024): every block is mapped
#   REPS      timed repetitions of each command (default 5), after one warm-up
#
# Setup (in ${BENCH_DIR:-<repo>/target/bench}/merge, rebuilt when missing or
# when SIZE_MIB changes): a data device of SIZE_MIB filled with random bytes,
# an origin file of the same size, and a pool of 64 KiB blocks written by
# thin_restore from XML, with two devices of SIZE_MIB, all blocks mapped:
#   1  sequential: virtual block v -> data block v (one run: large reads and
#      writes)
#   2  scattered: v -> (v * 7919) mod N (every block its own read; the
#      writes are still gathered into 8 MiB, as the virtual blocks continue)
# Measured (wall clock, median of REPS; the data device is read once before,
# so it is in the page cache, as it is for the baseline):
#   baseline   dd if=data of=origin bs=8M conv=notrunc,fsync  (the same bytes)
#   seq        thin_merge --dev-id 1 (fsyncs the origin at the end)
#   scattered  thin_merge --dev-id 2
#   dry-run    thin_merge --dev-id 1 --dry-run (the metadata pass alone)
# Target: seq >= 80 % of the baseline's throughput.
# This script reports figures; it is not a test and always exits 0.

set -u -o pipefail
export LC_ALL=C

size_mib=${1:-1024}
reps=${2:-5}
[[ $size_mib =~ ^[1-9][0-9]*$ ]] || { echo "bad SIZE_MIB '$size_mib'" >&2; exit 0; }
[[ $reps =~ ^[1-9][0-9]*$ ]] || reps=5
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
dir=${BENCH_DIR:-$root/target/bench}/merge
mkdir -p "$dir"
bin=${THINMETA:-$root/target/release/thinmeta}
if [[ -z ${THINMETA:-} ]]; then
    echo "building release (cargo build --release)..." >&2
    (cd "$root" && cargo build --release --quiet) >&2 || { echo "error: build failed" >&2; exit 0; }
fi
[[ -x $bin ]] || { echo "error: no $bin" >&2; exit 0; }

bs=65536
nblocks=$((size_mib * 1048576 / bs))
bytes=$((nblocks * bs))

# ------------------------------------------------------------------ setup
if [[ ! -f $dir/params || $(cat "$dir/params") != "$size_mib" || ! -f $dir/meta.img ]]; then
    echo "setting up $size_mib MiB in $dir ..." >&2
    rm -f "$dir"/*.img "$dir/params"
    head -c $((64 << 20)) /dev/urandom > "$dir/chunk"
    : > "$dir/data.img"
    left=$bytes
    while (( left > 0 )); do
        n=$(( left < (64 << 20) ? left : (64 << 20) ))
        head -c "$n" "$dir/chunk" >> "$dir/data.img"
        left=$((left - n))
    done
    rm -f "$dir/chunk"
    cp "$dir/data.img" "$dir/origin.img"
    awk -v n="$nblocks" -v bs=128 'BEGIN {
        printf "<superblock uuid=\"\" time=\"0\" transaction=\"1\" version=\"2\" data_block_size=\"%d\" nr_data_blocks=\"%d\">\n", bs, n
        printf "  <device dev_id=\"1\" mapped_blocks=\"%d\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n", n
        printf "    <range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"%d\" time=\"0\"/>\n", n
        printf "  </device>\n"
        printf "  <device dev_id=\"2\" mapped_blocks=\"%d\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n", n
        for (v = 0; v < n; v++) printf "    <single_mapping origin_block=\"%d\" data_block=\"%d\" time=\"0\"/>\n", v, (v * 7919) % n
        printf "  </device>\n</superblock>\n" }' > "$dir/pool.xml"
    truncate -s 64M "$dir/meta.img"
    "$bin" thin_restore -i "$dir/pool.xml" -o "$dir/meta.img" || { echo "error: thin_restore failed" >&2; exit 0; }
    "$bin" thin_check -q "$dir/meta.img" || { echo "error: thin_check failed" >&2; exit 0; }
    echo "$size_mib" > "$dir/params"
fi
if (( nblocks % 7919 == 0 )); then echo "warning: 7919 divides the block count: scattered maps repeat" >&2; fi

# ------------------------------------------------------------------ measure
now() { echo "$EPOCHREALTIME"; }
# timeit LABEL CMD...: one timed run, seconds appended to $dir/LABEL.t
timeit() {
    local label=$1 t0 t1 rc=0
    shift
    t0=$(now)
    "$@" > /dev/null 2> "$dir/$label.err" || rc=$?
    t1=$(now)
    [[ $rc == 0 ]] || echo "warning: $label exited $rc: $(head -n 1 "$dir/$label.err")" >&2
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", b - a }' >> "$dir/$label.t"
}
median() { sort -g "$1" | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

cat "$dir/data.img" > /dev/null   # into the page cache
labels=(baseline seq scattered dryrun)
cmd() {
    case $1 in
        baseline) dd if="$dir/data.img" of="$dir/origin.img" bs=8M count=$((bytes / 8388608)) conv=notrunc,fsync status=none ;;
        seq) "$bin" thin_merge -q --metadata "$dir/meta.img" --data "$dir/data.img" --dev-id 1 --origin "$dir/origin.img" ;;
        scattered) "$bin" thin_merge -q --metadata "$dir/meta.img" --data "$dir/data.img" --dev-id 2 --origin "$dir/origin.img" ;;
        dryrun) "$bin" thin_merge -q --dry-run --metadata "$dir/meta.img" --data "$dir/data.img" --dev-id 1 --origin "$dir/origin.img" ;;
    esac
}
(( bytes % 8388608 == 0 )) || echo "warning: the baseline copies $(( bytes / 8388608 * 8 )) MiB only" >&2
for l in "${labels[@]}"; do rm -f "$dir/$l.t"; done
for l in "${labels[@]}"; do cmd "$l" > /dev/null 2>&1; done   # warm-up
# Interleaved, so drifts in the machine's load hit every command alike.
for ((r = 0; r < reps; r++)); do
    for l in "${labels[@]}"; do timeit "$l" cmd "$l"; done
done
# The merges wrote the right bytes (dev 1: the origin is the data device).
cmd seq > /dev/null 2>&1
cmp -s "$dir/data.img" "$dir/origin.img" || echo "warning: after the sequential merge the origin differs from the data device" >&2

# ------------------------------------------------------------------ report
cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/^[^:]*: *//')
fs=$(df -T "$dir" 2>/dev/null | awk 'NR == 2 { print $2 }')
echo "thin_merge benchmark: $size_mib MiB ($nblocks blocks of 64 KiB), $reps reps (median), $(nproc) CPUs ${cpu:+($cpu)}, $fs at $dir"
base=$(median "$dir/baseline.t")
printf '%-10s %10s %10s %8s  %s\n' what "median s" "MiB/s" "vs dd" "command"
for l in "${labels[@]}"; do
    m=$(median "$dir/$l.t")
    case $l in
        baseline) what="dd bs=8M conv=notrunc,fsync" ;;
        seq) what="thin_merge, one run" ;;
        scattered) what="thin_merge, $nblocks scattered blocks" ;;
        dryrun) what="thin_merge --dry-run (metadata only)" ;;
    esac
    if [[ $l == dryrun ]]; then
        printf '%-10s %10.3f %10s %8s  %s\n' "$l" "$m" - - "$what"
    else
        awk -v l="$l" -v m="$m" -v b="$base" -v n="$bytes" -v w="$what" \
            'BEGIN { printf "%-10s %10.3f %10.0f %7.0f%%  %s\n", l, m, n / 1048576 / m, 100 * b / m, w }'
    fi
done
awk -v m="$(median "$dir/seq.t")" -v b="$base" 'BEGIN {
    r = 100 * b / m
    printf "target: sequential merge >= 80%% of the baseline: %.0f%% (%s)\n", r, (r >= 80 ? "met" : "NOT met") }'
exit 0
