#!/usr/bin/env bash
# Benchmark for thinmeta's tools.
#
# Usage: [PEER=path/to/pdata_tools] bench/run.sh [SET|IMAGE] [REPS]
#   SET    all (default): the image set, then the large set
#          medium: the image set only: ../shared/testdata/perf/medium.bin.gz relative to
#                  the repo root, plus small.bin.gz when present (thin_check, thin_dump)
#          large:  the large set only (see below)
#          huge:   the huge set only (see below; never part of `all`)
#   IMAGE  a metadata image (raw, or .gz): the image set on that image only.
#   REPS   timed repetitions per command.  Image set: after one warm-up run (default 7).
#          Large set: default 5, and at most LARGE_SLOW_REPS (default 3) for the slow
#          tools (thin_restore, thin_repair, thin_generate_metadata).
#          Huge set: default 1 (HUGE_SLOW_REPS, default 1, for the slow tools).
#   BENCH_LOG=1: print each run's figures on stderr as it ends.
#   PEER   the original's multi-call binary (thin-provisioning-tools' pdata_tools, called
#          as `$PEER thin_check ...`).  When set, every command the peer has is also run
#          with the peer, alternately with ours (ours, peer, ours, peer, ...), on the same
#          files in the same run, and the tables give the peer's medians and ours/peer.
#
# Large set: a pool like the peer's `large` (gen_thin_xml.py --origins 4 --segments 30000
# --snaps 5 --seed 3: 24 devices, 152.6 M mappings, 45.7 M distinct leaf entries, ~788 MiB
# of metadata) written by `thin_generate_metadata` into a 2 GiB file in the cache dir
# ${BENCH_DIR:-<repo>/target/bench}, and dumped once to XML (the input of thin_restore).
# Both are kept and regenerated only when missing, or when the parameters or the
# generator's model (src/thin/generate.rs) changed.  Measured: the baseline
# `cat large.bin > /dev/null`, thin_check, thin_dump (to /dev/null), thin_delta of two
# snapshots of one origin from consecutive epochs (devices 5 and 9; also with
# --changes-only), thin_restore (the XML into a preallocated 2 GiB file), thin_repair
# (the image into that file), and thin_generate_metadata itself (into that file).  The
# output file's block 0 is zeroed before each run that writes it (not timed), so every run
# writes a pool onto a device that holds none, as on a fresh metadata volume.
# Also measured: thin_ls -o DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS (the sharing
# computation).
#
# Huge set: the same measurements on a pool near the 15.875 GiB metadata limit
# (thin_generate_metadata --origins 8 --segments 290000 --snaps 5 --seed 7: 48 devices,
# 2.95 G mappings, 883 M distinct leaf entries, 15.2 GiB of metadata) in a 16640 MiB file
# huge.bin, its XML dump huge.xml (~9 GiB), and the output file huge-out.bin (16640 MiB)
# in the cache dir (the output files in BENCH_OUT_DIR when set): ~42 GiB of disk in all, plus 23 GiB of page cache to keep
# the image and the XML cached.  Whatever is missing is made first (generating the image
# takes minutes); when the free space cannot hold what is missing the set is skipped with
# a message.  An existing huge.bin is reused when huge.stamp matches.  The image and the
# output do not both fit in the page cache: the writers run last (thin_repair, then
# thin_restore), and the read-only tools before them on the cached image.  Not run by
# `all`.  thin_generate_metadata is not timed on huge (its own run is in huge.summary).
#
# Image set: for every command one warm-up run, then REPS timed runs.  Large set: one
# warm-up run for thin_check, thin_dump and thin_delta only.  Every timed run is started
# through
#   /usr/bin/time -f '%e %U %S %M'
# Reported figures:
#   wall  - bash $EPOCHREALTIME around the /usr/bin/time invocation (microsecond
#           clock; includes the ~1 ms fork/exec of /usr/bin/time itself).  The %e of
#           /usr/bin/time only has 10 ms resolution, too coarse for these runtimes;
#           its medians are printed in a cross-check table.
#   CPU   - user+sys of the run, from the change in bash's `times` child totals
#           (1 ms resolution; same rusage that /usr/bin/time's %U/%S come from).
#   peak  - max RSS, /usr/bin/time %M (KiB), shown in MiB.
# Baseline: `cat IMG > /dev/null` after a warm-up read, i.e. a page-cached
# sequential read of the whole image, measured the same way in the same run.
#
# This script reports figures; it is not a test and always exits 0.

set -u -o pipefail
export LC_ALL=C   # "." decimal separator for $EPOCHREALTIME, `times`, awk and printf

REPS_DEFAULT=7
TARGET_CHECK_S=0.05
TARGET_DUMP_S=0.15
TARGET_PEAK_MIB=32

# Large set: generator parameters (the peer's `large`), device size, and targets
# (median wall s, peak MiB; "-" = none).
LARGE_PARAMS=(--origins 4 --segments 30000 --snaps 5 --seed 3)
LARGE_SIZE=2G
LARGE_REPS_DEFAULT=5
LARGE_SLOW_REPS=${LARGE_SLOW_REPS:-3}
LARGE_TARGET_CHECK=(0.7 64)
LARGE_TARGET_DUMP=(2.5 -)
LARGE_TARGET_RESTORE=(2 128)
LARGE_TARGET_REPAIR=(5 -)
LARGE_TARGET_DELTA=(0.1 -)
# thin_delta: two snapshots of origin 1 from consecutive epochs (ids: origins 1-4,
# then epoch e's snapshot of origin o is 4*e + o: 5 and 9).
LARGE_DELTA_DEVS=(--thin1 5 --thin2 9)
LS_FIELDS=DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS

# Huge set (see above). Targets: none in seconds (the ratios to the baseline and to the
# peer are what is judged); peak RSS 2048 MiB for every tool.
HUGE_PARAMS=(--origins 8 --segments 290000 --snaps 5 --seed 7)
HUGE_SIZE=16640M
HUGE_SIZE_MIB=16640
HUGE_XML_GIB=${HUGE_XML_GIB:-10}
HUGE_REPS_DEFAULT=1
HUGE_SLOW_REPS=${HUGE_SLOW_REPS:-1}
# origins 1-8, then epoch e's snapshot of origin o is 8*e + o: 9 and 17.
HUGE_DELTA_DEVS=(--thin1 9 --thin2 17)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(git -C "$here" rev-parse --show-toplevel 2>/dev/null || (cd "$here/.." && pwd))
perf_dir="$root/../shared/testdata/perf"
peer_md="$perf_dir/peer_bench_medians.md"

set_arg=${1:-all}
run_images=1; run_large=1; run_huge=0
case $set_arg in
    all)    ;;
    medium) run_large=0 ;;
    large)  run_images=0 ;;
    huge)   run_images=0; run_large=0; run_huge=1 ;;
    *)      run_large=0 ;;   # an image path
esac

reps=${2:-$REPS_DEFAULT}
if ! [[ $reps =~ ^[1-9][0-9]*$ ]]; then
    echo "warning: bad repetition count '$reps', using $REPS_DEFAULT" >&2
    reps=$REPS_DEFAULT
fi
large_reps=${2:-$LARGE_REPS_DEFAULT}
[[ $large_reps =~ ^[1-9][0-9]*$ ]] || large_reps=$LARGE_REPS_DEFAULT
[[ $LARGE_SLOW_REPS =~ ^[1-9][0-9]*$ ]] || LARGE_SLOW_REPS=3
large_slow_reps=$(( LARGE_SLOW_REPS < large_reps ? LARGE_SLOW_REPS : large_reps ))
huge_reps=${2:-$HUGE_REPS_DEFAULT}
[[ $huge_reps =~ ^[1-9][0-9]*$ ]] || huge_reps=$HUGE_REPS_DEFAULT
[[ $HUGE_SLOW_REPS =~ ^[1-9][0-9]*$ ]] || HUGE_SLOW_REPS=1
huge_slow_reps=$(( HUGE_SLOW_REPS < huge_reps ? HUGE_SLOW_REPS : huge_reps ))
bench_dir=${BENCH_DIR:-$root/target/bench}
# Where the writers' output files (large-out.bin, huge-out.bin) go; default: the cache dir.
out_dir=${BENCH_OUT_DIR:-$bench_dir}

scratch=$(mktemp -d "${TMPDIR:-/tmp}/thinmeta-bench.XXXXXX")
cleanup() { rm -rf "$scratch"; }
trap cleanup EXIT
trap 'exit 0' INT TERM

# ---------------------------------------------------------------- prerequisites
if [[ ! -x /usr/bin/time ]]; then
    echo "/usr/bin/time missing; installing package 'time'..." >&2
    if [[ $(id -u) -eq 0 ]]; then
        apt-get install -y time >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get install -y time >/dev/null 2>&1; }
    else
        sudo apt-get install -y time >/dev/null 2>&1 || { sudo apt-get update >/dev/null 2>&1 && sudo apt-get install -y time >/dev/null 2>&1; }
    fi
fi
if [[ ! -x /usr/bin/time ]]; then
    echo "error: /usr/bin/time unavailable; cannot measure" >&2
    exit 0
fi

bin="$root/target/release/thinmeta"
echo "building release (cargo build --release)..." >&2
if ! (cd "$root" && cargo build --release --quiet) >&2; then
    echo "error: cargo build --release failed" >&2
    exit 0
fi
if [[ ! -x $bin ]]; then
    echo "error: $bin not found after build" >&2
    exit 0
fi
# Run a private copy: a rebuild during a long run must not change the binary measured.
cp "$bin" "$scratch/thinmeta" && bin_src=$bin && bin="$scratch/thinmeta"

peer_bin=""
if [[ -n ${PEER:-} ]]; then
    if [[ -x $PEER ]]; then
        peer_bin=$PEER
    else
        echo "warning: PEER=$PEER is not executable; the peer is not measured" >&2
    fi
fi
# Summary rows for the table at the end: "set|tool|ours_med|base_med|peer_med|ours_peak|peer_peak".
summary=()

# ---------------------------------------------------------------- image list
images=()
if [[ $run_images -eq 0 ]]; then
    :
elif [[ $set_arg != all && $set_arg != medium ]]; then
    if [[ ! -f $1 ]]; then
        echo "error: image '$1' not found" >&2
        exit 0
    fi
    images+=("$1")
else
    [[ -f $perf_dir/small.bin.gz ]] && images+=("$perf_dir/small.bin.gz")
    if [[ -f $perf_dir/medium.bin.gz ]]; then
        images+=("$perf_dir/medium.bin.gz")
    else
        echo "warning: $perf_dir/medium.bin.gz not found" >&2
    fi
    if [[ ${#images[@]} -eq 0 ]]; then
        echo "error: no images found under $perf_dir" >&2
        [[ $run_large -eq 0 ]] && exit 0
    fi
fi

# ---------------------------------------------------------------- helpers
tf="$scratch/time.out"
# measure LABEL CMD...  -> appends "wall_s cpu_s peak_kib e U S rc" to $scratch/LABEL.dat
# CPU: the change in bash's `times` child totals (user+sys of reaped children).
# Between the two snapshots only /usr/bin/time and the command are run: `times`
# and `read` are builtins in this shell and $EPOCHREALTIME is a plain variable,
# so no helper process is counted.  Parsing happens after the second snapshot.
measure() {
    local label=$1; shift
    local c0 c1 t0 t1 rc
    times > "$scratch/times0"
    { read -r _; read -r c0; } < "$scratch/times0"
    t0=$EPOCHREALTIME
    /usr/bin/time -o "$tf" -f '%e %U %S %M' "$@" >/dev/null 2>"$scratch/stderr"
    rc=$?
    t1=$EPOCHREALTIME
    times > "$scratch/times1"
    { read -r _; read -r c1; } < "$scratch/times1"
    local e u s m
    read -r e u s m < <(grep -E '^[0-9.]+ [0-9.]+ [0-9.]+ [0-9]+$' "$tf" | tail -1)
    awk -v t0="$t0" -v t1="$t1" -v c0="$c0" -v c1="$c1" -v m="${m:-0}" \
        -v e="${e:-0}" -v u="${u:-0}" -v s="${s:-0}" -v rc="$rc" '
        # "XmY.YYYs XmY.YYYs" -> seconds
        function secs(l,    n, f, i, x, p, tot) {
            n = split(l, f, " "); tot = 0
            for (i = 1; i <= n; i++) { x = f[i]; sub(/s$/, "", x); split(x, p, "m"); tot += p[1] * 60 + p[2] }
            return tot
        }
        BEGIN { printf "%.6f %.3f %d %s %s %s %d\n", t1 - t0, secs(c1) - secs(c0), m, e, u, s, rc }' \
        >> "$scratch/$label.dat"
    # Each run as it ends, on stderr (a long run's figures survive an interruption).
    [[ ${BENCH_LOG:-0} == 1 ]] && echo "measured $label: $(tail -1 "$scratch/$label.dat") ($(date -u +%T))" >&2
    return 0
}

# stats FILE COLUMN -> "median min max"
stats() {
    awk -v c="$2" '{ print $c }' "$1" | sort -g | awk '
        { v[NR] = $1 }
        END {
            if (NR == 0) { print "nan nan nan"; exit }
            med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf "%.6f %.6f %.6f\n", med, v[1], v[NR] }'
}
maxcol() { awk -v c="$2" 'BEGIN { m = 0 } $c > m { m = $c } END { print m }' "$1"; }
badrc() { awk '$7 != 0 { n++ } END { print n + 0 }' "$1"; }

# peer row: peer SIZE TEST -> "wall cpu peak" (or empty)
peer() {
    [[ -f $peer_md ]] || return 0
    awk -F'|' -v sz="$1" -v t="$2" '
        { for (i = 1; i <= NF; i++) gsub(/^ +| +$/, "", $i) }
        $2 == sz && $3 == t { split($5, w, " "); print w[1], $6, $7; exit }' "$peer_md"
}

# ---------------------------------------------------------------- header
cpu_model=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/^[^:]*: *//')
[[ -z $cpu_model ]] && cpu_model=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
mem_total=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo 2>/dev/null)

echo "thinmeta benchmark"
echo "=================="
echo "date        : $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "host        : $(uname -srm)"
echo "cpu         : ${cpu_model:-unknown}"
echo "nproc       : $(nproc)"
echo "memory      : ${mem_total:-unknown}"
echo "binary      : ${bin_src:-$bin} (run as a copy)"
echo "peer        : ${peer_bin:-none (set PEER=path/to/pdata_tools to measure it alternately)}"
echo "commit      : $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')$( [[ -n $(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null) ]] && echo ' (working tree modified)')"
echo "loadavg     : $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null) at start (other load on the machine inflates wall, not CPU)"
[[ $run_images -eq 1 ]] && echo "repetitions : image set: $reps timed runs per command, after 1 warm-up run"
[[ $run_large -eq 1 ]] && echo "repetitions : large set: $large_reps timed runs ($large_slow_reps for thin_restore, thin_repair, thin_generate_metadata)"
[[ $run_huge -eq 1 ]] && echo "repetitions : huge set: $huge_reps timed runs ($huge_slow_reps for thin_restore, thin_repair)"
echo "timing      : wall = \$EPOCHREALTIME around /usr/bin/time; CPU = user+sys (rusage);"
echo "              peak = max RSS (/usr/bin/time %M). ratio = median wall / median baseline wall."
echo "baseline    : cat IMG > /dev/null (page-cached sequential read, after a warm-up read)"
[[ $run_large -eq 1 || $run_huge -eq 1 ]] && echo "cache       : $bench_dir (large and huge sets)"
echo

# ---------------------------------------------------------------- run
tools=("thin_check" "thin_check --skip-mappings" "thin_dump" "thin_dump -f json")

for src in "${images[@]}"; do
    base=$(basename "$src")
    case $base in
        small.*)  size=small ;;
        medium.*) size=medium ;;
        large.*)  size=large ;;
        *)        size="" ;;
    esac

    if [[ $src == *.gz ]]; then
        img="$scratch/${base%.gz}"
        if ! gzip -dc "$src" > "$img"; then
            echo "error: failed to unpack $src" >&2
            continue
        fi
    else
        img="$src"
    fi
    img_bytes=$(stat -c %s "$img")
    rm -f "$scratch"/*.dat

    echo "image: $src"
    where="unpacked to $img"; [[ $img == "$src" ]] && where="used in place"
    echo "       $(awk -v b="$img_bytes" 'BEGIN { printf "%d bytes (%.1f MiB)", b, b / 1048576 }') $where"

    # baseline
    cat "$img" > /dev/null   # warm-up: pull the image into the page cache
    for ((i = 0; i < reps; i++)); do measure baseline cat "$img"; done

    # tools
    notes=()
    for ti in "${!tools[@]}"; do
        read -r -a args <<< "${tools[$ti]}"
        # warm-up, also recording output size and exit status as a sanity check
        out_bytes=$("$bin" "${args[0]}" "${args[@]:1}" "$img" 2>"$scratch/stderr" | wc -c)
        wrc=${PIPESTATUS[0]}
        notes+=("${tools[$ti]}: warm-up exit $wrc, $out_bytes bytes on stdout")
        if [[ $wrc -ne 0 ]]; then
            notes+=("  stderr: $(head -c 300 "$scratch/stderr" | tr '\n' ' ')")
        fi
        peer_has=0
        [[ -n $peer_bin && ${tools[$ti]} != *json* ]] && peer_has=1
        [[ $peer_has -eq 1 ]] && "$peer_bin" "${args[0]}" "${args[@]:1}" "$img" >/dev/null 2>&1
        for ((i = 0; i < reps; i++)); do
            measure "t$ti" "$bin" "${args[0]}" "${args[@]:1}" "$img"
            [[ $peer_has -eq 1 ]] && measure "p$ti" "$peer_bin" "${args[0]}" "${args[@]:1}" "$img"
        done
    done

    read -r b_med b_min b_max < <(stats "$scratch/baseline.dat" 1)
    read -r b_cpu _ _ < <(stats "$scratch/baseline.dat" 2)
    b_peak=$(maxcol "$scratch/baseline.dat" 3)

    echo
    printf '%-27s %9s %17s %8s %8s %7s  %s\n' "tool" "wall med" "wall min-max" "CPU med" "peak" "ratio" "target"
    printf '%-27s %9s %17s %8s %8s %7s  %s\n' "" "s" "s" "s" "MiB" "x base" ""
    printf '%s\n' "--------------------------------------------------------------------------------------------"
    printf '%-27s %9.4f %8.4f-%-8.4f %8.3f %8.1f %7.2f  %s\n' "baseline: cat > /dev/null" \
        "$b_med" "$b_min" "$b_max" "$b_cpu" "$(awk -v k="$b_peak" 'BEGIN { print k / 1024 }')" 1 "-"

    cross=()
    for ti in "${!tools[@]}"; do
        f="$scratch/t$ti.dat"
        read -r w_med w_min w_max < <(stats "$f" 1)
        read -r c_med _ _ < <(stats "$f" 2)
        peak_kib=$(maxcol "$f" 3)
        peak_mib=$(awk -v k="$peak_kib" 'BEGIN { printf "%.1f", k / 1024 }')
        ratio=$(awk -v a="$w_med" -v b="$b_med" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "inf" }')
        case ${tools[$ti]} in
            thin_check*) tgt=$TARGET_CHECK_S ;;
            thin_dump*)  tgt=$TARGET_DUMP_S ;;
        esac
        verdict=$(awk -v w="$w_med" -v t="$tgt" -v p="$peak_mib" -v pt="$TARGET_PEAK_MIB" 'BEGIN {
            m = ""
            if (w > t)  m = m " wall>" t "s"
            if (p > pt) m = m " peak>" pt "MiB"
            if (m == "") print "PASS"; else print "MISS" m }')
        nbad=$(badrc "$f")
        [[ $nbad -gt 0 ]] && verdict="$verdict (exit!=0 in $nbad runs)"
        printf '%-27s %9.4f %8.4f-%-8.4f %8.3f %8s %7s  %s\n' "${tools[$ti]}" \
            "$w_med" "$w_min" "$w_max" "$c_med" "$peak_mib" "$ratio" "$verdict"
        read -r e_med _ _ < <(stats "$f" 4)
        read -r u_med _ _ < <(stats "$f" 5)
        read -r s_med _ _ < <(stats "$f" 6)
        cross+=("$(printf '%-27s %%e %.2f  %%U %.2f  %%S %.2f  %%M max %s KiB' "${tools[$ti]}" "$e_med" "$u_med" "$s_med" "$peak_kib")")
    done
    if [[ -n $peer_bin ]]; then
        echo
        echo "peer, measured alternately with ours in this run ($peer_bin):"
        printf '  %-27s %9s %8s %8s %9s %9s\n' "tool" "peer wall" "CPU med" "peak" "ours wall" "ours/peer"
        for ti in "${!tools[@]}"; do
            [[ -s $scratch/p$ti.dat ]] || continue
            read -r p_med _ _ < <(stats "$scratch/p$ti.dat" 1)
            read -r pc_med _ _ < <(stats "$scratch/p$ti.dat" 2)
            p_peak=$(maxcol "$scratch/p$ti.dat" 3)
            read -r w_med _ _ < <(stats "$scratch/t$ti.dat" 1)
            awk -v n="${tools[$ti]}" -v p="$p_med" -v c="$pc_med" -v k="$p_peak" -v o="$w_med" -v bad="$(badrc "$scratch/p$ti.dat")" 'BEGIN {
                printf "  %-27s %9.4f %8.3f %8.1f %9.4f %9s%s\n", n, p, c, k / 1024, o, (p > 0) ? sprintf("%.2f", o / p) : "-", (bad > 0) ? "  (peer exit!=0)" : "" }'
            summary+=("$base|${tools[$ti]}|$w_med|$b_med|$p_med|$(maxcol "$scratch/t$ti.dat" 3)|$p_peak")
        done
    else
        for ti in "${!tools[@]}"; do
            read -r w_med _ _ < <(stats "$scratch/t$ti.dat" 1)
            summary+=("$base|${tools[$ti]}|$w_med|$b_med|-|$(maxcol "$scratch/t$ti.dat" 3)|-")
        done
    fi
    echo
    echo "targets (set for medium): thin_check <= ${TARGET_CHECK_S} s, thin_dump <= ${TARGET_DUMP_S} s median wall; peak RSS <= ${TARGET_PEAK_MIB} MiB."
    echo "  thin_check target applied to both thin_check rows, thin_dump target to both thin_dump rows."
    [[ $size != medium ]] && echo "  (this image is not medium; the targets are shown for reference only)"

    # peer comparison
    echo
    if [[ -n $size && -f $peer_md ]]; then
        echo "peer (thin-provisioning-tools, from $(basename "$peer_md"), $size, measured elsewhere):"
        pb=$(peer "$size" raw_read_buffered)
        read -r pb_w _ _ <<< "${pb:-nan nan nan}"
        printf '  %-27s %9s %8s %8s %10s  %9s %9s  %9s %9s\n' "test" "wall med" "CPU med" "peak" "ratio" "ours" "ours" "speedup" "speedup"
        printf '  %-27s %9s %8s %8s %10s  %9s %9s  %9s %9s\n' "" "s" "s" "MiB" "x its base" "wall s" "CPU s" "wall" "CPU"
        printf '  %-27s %9s %8s %8s %10s  %9.4f %9.3f  %9s %9s\n' "raw_read_buffered" "$pb_w" "$(cut -d' ' -f2 <<< "$pb")" "$(cut -d' ' -f3 <<< "$pb")" "1.00" \
            "$b_med" "$b_cpu" "-" "-"
        for pair in "thin_check:0" "thin_check_skip_mappings:1" "thin_dump:2"; do
            ptest=${pair%%:*}; ti=${pair##*:}
            row=$(peer "$size" "$ptest")
            [[ -z $row ]] && continue
            read -r p_w p_c p_m <<< "$row"
            read -r w_med _ _ < <(stats "$scratch/t$ti.dat" 1)
            read -r c_med _ _ < <(stats "$scratch/t$ti.dat" 2)
            awk -v n="$ptest" -v w="$p_w" -v c="$p_c" -v m="$p_m" -v pb="$pb_w" -v o="$w_med" -v oc="$c_med" 'BEGIN {
                r  = (pb + 0 > 0) ? sprintf("%.2f", w / pb) : "-"
                sw = (o > 0)  ? sprintf("%.1fx", w / o)  : "-"
                sc = (oc > 0) ? sprintf("%.1fx", c / oc) : "-"
                printf "  %-27s %9s %8s %8s %10s  %9.4f %9.3f  %9s %9s\n", n, w, c, m, r, o, oc, sw, sc }'
        done
        echo "  (no peer figure for thin_dump -f json.)"
        echo "  note: the peer's thin_check wall is ~0.5 s above its CPU time on every size (small: 0.504 s"
        echo "  wall, 0.005 s CPU), a fixed non-CPU delay; the CPU columns compare the work itself."
        echo "  The peer's figures come from another machine: compare its ratios to its own baseline."
    elif [[ $size == medium ]]; then
        echo "peer (from brief; $peer_md not found): medium thin_check 0.506 s wall / 0.051 s CPU, thin_dump 0.484 s wall"
    else
        echo "peer: no figures for this image"
    fi

    echo
    echo "loadavg after this image: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
    echo
    echo "cross-check, raw /usr/bin/time medians (10 ms resolution):"
    printf '  %s\n' "${cross[@]}"
    echo
    echo "warm-up sanity:"
    printf '  %s\n' "${notes[@]}"
    echo
    echo "--------------------------------------------------------------------------------------------"
    echo

    [[ $src == *.gz ]] && rm -f "$img"
done


# ---------------------------------------------------------------- pool sets (large, huge)
# prealloc FILE SIZE: an all-zero file of SIZE with its blocks allocated.
prealloc() {
    rm -f "$1"
    fallocate -l "$2" "$1" 2>/dev/null || truncate -s "$2" "$1"
}
# wipe FILE: zero block 0 (no superblock: the writer treats the file as empty).
wipe() { dd if=/dev/zero of="$1" bs=4096 count=1 conv=notrunc status=none; }
# measure_fresh LABEL OUT CMD...: measure CMD after wiping OUT (the wipe is not timed:
# it runs, and is reaped, before measure takes its first `times` snapshot).
measure_fresh() {
    local label=$1 out=$2; shift 2
    wipe "$out"
    measure "$label" "$@"
}
# pool_row NAME LABEL TARGET_WALL TARGET_PEAK PEER_TEST
# Uses $pset (set name), $pb_med (baseline median); PEER_TEST names the peer's row in
# $peer_md (large only).  Peer runs of this run are in p$LABEL.dat.
pool_row() {
    local name=$1 label=$2 f="$scratch/$2.dat" tw=$3 tp=$4 ptest=$5
    local w_med w_min w_max c_med peak_kib peak_mib ratio verdict prow p_w p_c p_m nbad n
    [[ -s $f ]] || { printf '%-28s  (no runs)\n' "$name"; return; }
    read -r w_med w_min w_max < <(stats "$f" 1)
    read -r c_med _ _ < <(stats "$f" 2)
    n=$(wc -l < "$f")
    peak_kib=$(maxcol "$f" 3)
    peak_mib=$(awk -v k="$peak_kib" 'BEGIN { printf "%.1f", k / 1024 }')
    ratio=$(awk -v a="$w_med" -v b="$pb_med" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "inf" }')
    verdict=$(awk -v w="$w_med" -v t="$tw" -v p="$peak_mib" -v pt="$tp" 'BEGIN {
        m = ""
        if (t != "-" && w > t + 0)  m = m " wall>" t "s"
        if (pt != "-" && p > pt + 0) m = m " peak>" pt "MiB"
        if (t == "-" && pt == "-") print "-"
        else if (m == "") print "PASS"; else print "MISS" m }')
    nbad=$(badrc "$f")
    [[ $nbad -gt 0 ]] && verdict="$verdict (exit!=0 in $nbad runs)"
    prow=""
    [[ $ptest != - && $pset == large ]] && prow=$(peer large "$ptest")
    read -r p_w p_c p_m <<< "${prow:-- - -}"
    local tgt="-"
    [[ $tw != - ]] && tgt="<=${tw}s"
    [[ $tp != - ]] && tgt="$tgt <=${tp}MiB"
    printf '%-28s %2d %8.3f %7.3f-%-7.3f %7.2f %7s %7s  %-18s %-24s %7s %6s %6s\n' "$name" "$n" \
        "$w_med" "$w_min" "$w_max" "$c_med" "$peak_mib" "$ratio" "$tgt" "$verdict" "$p_w" "$p_c" "$p_m"
    local e_med u_med s_med
    read -r e_med _ _ < <(stats "$f" 4)
    read -r u_med _ _ < <(stats "$f" 5)
    read -r s_med _ _ < <(stats "$f" 6)
    pcross+=("$(printf '%-28s %%e %.2f  %%U %.2f  %%S %.2f  %%M max %s KiB' "$name" "$e_med" "$u_med" "$s_med" "$peak_kib")")
    # this run's peer runs
    local pf="$scratch/p$label.dat" pp_med="-" pp_peak="-"
    if [[ -s $pf ]]; then
        local pc_med pw_min pw_max
        read -r pp_med pw_min pw_max < <(stats "$pf" 1)
        read -r pc_med _ _ < <(stats "$pf" 2)
        pp_peak=$(maxcol "$pf" 3)
        ppeer+=("$(awk -v n="$name" -v k="$(wc -l < "$pf")" -v p="$pp_med" -v lo="$pw_min" -v hi="$pw_max" -v c="$pc_med" -v m="$pp_peak" \
            -v b="$pb_med" -v o="$w_med" -v om="$peak_kib" -v bad="$(badrc "$pf")" 'BEGIN {
            printf "%-28s %2d %8.3f %7.3f-%-7.3f %7.2f %7.1f %7.2f  %8.3f %7.1f %9s%s", n, k, p, lo, hi, c, m / 1024,
                (b > 0) ? p / b : 0, o, om / 1024, (p > 0) ? sprintf("%.3f", o / p) : "-", (bad > 0) ? "  (peer exit!=0)" : "" }')")
    fi
    [[ $label != *base && $label != *xmlcat ]] && summary+=("$pset|$name|$w_med|$pb_med|$pp_med|$peak_kib|$pp_peak")
}

# pool_set large|huge
pool_set() {
    pset=$1
    local params size size_mib reps slow delta tcheck tdump trestore trepair tdelta tls
    if [[ $pset == large ]]; then
        params=("${LARGE_PARAMS[@]}"); size=$LARGE_SIZE; size_mib=2048
        reps=$large_reps; slow=$large_slow_reps; delta=("${LARGE_DELTA_DEVS[@]}")
        tcheck=("${LARGE_TARGET_CHECK[@]}"); tdump=("${LARGE_TARGET_DUMP[@]}")
        trestore=("${LARGE_TARGET_RESTORE[@]}"); trepair=("${LARGE_TARGET_REPAIR[@]}")
        tdelta=("${LARGE_TARGET_DELTA[@]}"); tls=(- -)
    else
        params=("${HUGE_PARAMS[@]}"); size=$HUGE_SIZE; size_mib=$HUGE_SIZE_MIB
        reps=$huge_reps; slow=$huge_slow_reps; delta=("${HUGE_DELTA_DEVS[@]}")
        tcheck=(- 2048); tdump=(- 2048); trestore=(- 2048); trepair=(- 2048); tdelta=(- 2048); tls=(- 2048)
    fi
    rm -f "$scratch"/*.dat
    mkdir -p "$bench_dir" "$out_dir"
    local img="$bench_dir/$pset.bin" xml="$bench_dir/$pset.xml" out="$out_dir/$pset-out.bin"
    local stamp="$bench_dir/$pset.stamp" gsummary="$bench_dir/$pset.summary"
    local model_hash want
    model_hash=$(sha256sum "$root/src/thin/generate.rs" 2>/dev/null | cut -c1-16)
    want="params: ${params[*]}; size: $size; model: ${model_hash:-?}"
    echo "$pset set: thin_generate_metadata ${params[*]} into a $size file"

    # Disk space: what is missing must fit (with 1 GiB to spare).
    local need_mib=0 avail_mib
    local cached=0
    [[ -f $img && -f $stamp && $(cat "$stamp") == "$want" ]] && cached=1
    [[ $cached -eq 1 ]] || need_mib=$((need_mib + size_mib))
    local xml_mib=1024
    [[ $pset == huge ]] && xml_mib=$((HUGE_XML_GIB * 1024))
    [[ $cached -eq 1 && -f $xml ]] || need_mib=$((need_mib + xml_mib))
    [[ -f $out && $(stat -c %s "$out") -eq $((size_mib * 1048576)) ]] || need_mib=$((need_mib + size_mib))
    avail_mib=$(df -Pk "$bench_dir" | awk 'NR == 2 { print int($4 / 1024) }')
    if [[ $need_mib -gt 0 && $((need_mib + 1024)) -gt ${avail_mib:-0} ]]; then
        echo "       SKIPPED: needs ~$need_mib MiB more in $bench_dir (image, XML and output file), only ${avail_mib:-?} MiB free"
        echo
        return
    fi

    if [[ $cached -eq 1 && -f $xml ]]; then
        echo "       cached: $img ($want)"
    else
        if [[ $cached -eq 0 ]]; then
            echo "       generating $img (takes minutes on huge) ..." >&2
            rm -f "$stamp" "$xml"
            prealloc "$img" "$size"
            if ! "$bin" thin_generate_metadata -o "$img" "${params[@]}" 2> "$gsummary"; then
                echo "error: thin_generate_metadata failed: $(head -c 300 "$gsummary")" >&2
                echo
                return
            fi
            echo "$want" > "$stamp"
        fi
        echo "       dumping $img to $xml ..." >&2
        if ! "$bin" thin_dump -q -o "$xml.tmp" "$img" 2> "$scratch/stderr"; then
            echo "error: thin_dump of $img failed: $(head -c 300 "$scratch/stderr")" >&2
            rm -f "$xml.tmp"
            echo
            return
        fi
        mv "$xml.tmp" "$xml"
        echo "       generated: $img ($want)"
    fi
    [[ -f $gsummary ]] && echo "       $(sed 's/^[^:]*: //' "$gsummary" | head -1)"
    local img_bytes xml_bytes
    img_bytes=$(stat -c %s "$img")
    xml_bytes=$(stat -c %s "$xml")
    echo "       image $(awk -v b="$img_bytes" 'BEGIN { printf "%.0f MiB", b / 1048576 }'), XML $(awk -v b="$xml_bytes" 'BEGIN { printf "%.0f MiB", b / 1048576 }') (thin_dump of the image)"
    [[ -f $out && $(stat -c %s "$out") -eq $img_bytes ]] || prealloc "$out" "$size"
    pnotes=(); pcross=(); ppeer=()

    # baseline: page-cached read of the image (huge: the XML is read just before
    # thin_restore, which needs it, so that it does not push the image out of the cache)
    cat "$img" > /dev/null
    for ((i = 0; i < reps; i++)); do measure "${pset}base" cat "$img"; done
    if [[ $pset == large ]]; then
        cat "$xml" > /dev/null
        for ((i = 0; i < reps; i++)); do measure "${pset}xmlcat" cat "$xml"; done
    fi

    # read-only tools: one warm-up (large only), then timed runs, the peer's alternately
    local t cmd pcmd out_bytes wrc
    for t in check ls delta delta_changes_only dump; do
        case $t in
            check) cmd=(thin_check "$img") ;;
            dump)  cmd=(thin_dump "$img") ;;
            ls)    cmd=(thin_ls -o "$LS_FIELDS" "$img") ;;
            delta) cmd=(thin_delta "${delta[@]}" "$img") ;;
            delta_changes_only) cmd=(thin_delta --changes-only "${delta[@]}" "$img") ;;
        esac
        pcmd=()
        [[ -n $peer_bin && $t != delta_changes_only ]] && pcmd=("$peer_bin" "${cmd[@]}")
        if [[ $pset == large ]]; then
            out_bytes=$("$bin" "${cmd[@]}" 2>"$scratch/stderr" | wc -c)
            wrc=${PIPESTATUS[0]}
            pnotes+=("thin_$t: warm-up exit $wrc, $out_bytes bytes on stdout")
            [[ $wrc -ne 0 ]] && pnotes+=("  stderr: $(head -c 300 "$scratch/stderr" | tr '\n' ' ')")
            [[ ${#pcmd[@]} -gt 0 ]] && "${pcmd[@]}" > /dev/null 2>&1
        fi
        for ((i = 0; i < reps; i++)); do
            measure "$pset$t" "$bin" "${cmd[@]}"
            if [[ ${#pcmd[@]} -gt 0 ]]; then
                measure "p$pset$t" "${pcmd[@]}"
            fi
        done
    done

    # writers: into the preallocated file, block 0 wiped before each run
    local rc
    for ((i = 0; i < slow; i++)); do
        measure_fresh "${pset}repair" "$out" "$bin" thin_repair -q -i "$img" -o "$out"
        [[ -n $peer_bin ]] && measure_fresh "p${pset}repair" "$out" "$peer_bin" thin_repair -q -i "$img" -o "$out"
    done
    "$bin" thin_check -q "$out"; rc=$?
    pnotes+=("thin_repair: thin_check of the last output ($([[ -n $peer_bin ]] && echo "the peer's" || echo ours)) exits $rc")
    # The XML into the page cache first (minutes of other tools have run since it was
    # read: on hosts that reclaim idle pages, the first run, ours, would read it cold
    # and the peer's right after it warm)
    cat "$xml" > /dev/null
    for ((i = 0; i < slow; i++)); do
        measure_fresh "${pset}restore" "$out" "$bin" thin_restore -q -i "$xml" -o "$out"
        "$bin" thin_check -q "$out"; rc=$?
        [[ $i -eq 0 ]] && pnotes+=("thin_restore: thin_check of its output exits $rc")
        [[ -n $peer_bin ]] && measure_fresh "p${pset}restore" "$out" "$peer_bin" thin_restore -q -i "$xml" -o "$out"
    done
    if [[ $pset == large ]]; then
        for ((i = 0; i < slow; i++)); do
            measure_fresh "${pset}gen" "$out" "$bin" thin_generate_metadata -q -o "$out" "${params[@]}"
        done
        "$bin" thin_check -q "$out"; pnotes+=("thin_generate_metadata: thin_check of its output exits $?")
        # The pool occupies blocks 0 .. used-1 (written onto a file that held no pool);
        # what lies beyond is left over from earlier runs.
        local used
        used=$(sed -n 's/.* \([0-9][0-9]*\) metadata blocks used.*/\1/p' "$gsummary" 2>/dev/null | head -1)
        if [[ -n $used ]]; then
            if cmp -s -n $((used * 4096)) "$out" "$img"; then
                pnotes+=("thin_generate_metadata: its $used blocks are byte-identical to the cached image's")
            else
                pnotes+=("thin_generate_metadata: output DIFFERS from the cached image (first $used blocks)")
            fi
        fi
    fi

    read -r pb_med _ _ < <(stats "$scratch/${pset}base.dat" 1)
    echo
    printf '%-28s %2s %8s %15s %7s %7s %7s  %-18s %-24s %7s %6s %6s\n' "tool" "n" "wall med" "wall min-max" "CPU med" "peak" "ratio" "target" "verdict" "peer" "peer" "peer"
    printf '%-28s %2s %8s %15s %7s %7s %7s  %-18s %-24s %7s %6s %6s\n' "" "" "s" "s" "s" "MiB" "x base" "" "" "wall s" "CPU s" "MiB"
    printf '%s\n' "----------------------------------------------------------------------------------------------------------------------------------------------"
    pool_row "baseline: cat image" "${pset}base" - - raw_read_buffered
    [[ $pset == large ]] && pool_row "(cat XML, for reference)" "${pset}xmlcat" - - -
    pool_row "thin_check" "${pset}check" "${tcheck[@]}" thin_check
    pool_row "thin_dump > /dev/null" "${pset}dump" "${tdump[@]}" thin_dump
    pool_row "thin_ls (excl./shared)" "${pset}ls" "${tls[@]}" thin_ls_excl_shared
    pool_row "thin_delta (${delta[1]} vs ${delta[3]})" "${pset}delta" "${tdelta[@]}" thin_delta
    pool_row "thin_delta --changes-only" "${pset}delta_changes_only" - - -
    pool_row "thin_repair image -> file" "${pset}repair" "${trepair[@]}" thin_repair
    pool_row "thin_restore XML -> file" "${pset}restore" "${trestore[@]}" thin_restore
    [[ $pset == large ]] && pool_row "thin_generate_metadata" "${pset}gen" - - -
    echo
    if [[ $pset == large ]]; then
        echo "targets (large): thin_check <= ${LARGE_TARGET_CHECK[0]} s and <= ${LARGE_TARGET_CHECK[1]} MiB; thin_dump <= ${LARGE_TARGET_DUMP[0]} s;"
        echo "  thin_restore <= ${LARGE_TARGET_RESTORE[0]} s and <= ${LARGE_TARGET_RESTORE[1]} MiB; thin_repair <= ${LARGE_TARGET_REPAIR[0]} s;"
        echo "  thin_delta <= ${LARGE_TARGET_DELTA[0]} s (median wall, peak RSS). thin_delta compares two snapshots of one origin"
        echo "  from consecutive epochs (the peer's figure: its own choice of devices on its large pool)."
        echo "peer columns: thin-provisioning-tools on the peer's own large pool (gen_thin_xml.py, same parameters,"
        echo "  same figures: 24 devices, 152.6 M mappings, 45.7 M distinct), from $(basename "$peer_md")."
    else
        echo "targets (huge): peak RSS <= 2048 MiB for every tool; wall is judged by the ratios (to the baseline, to the peer)."
        echo "  The writers write a 16.25 GiB file: image and output do not both fit in the page cache,"
        echo "  so thin_repair may read part of the image from disk, and the writers' wall includes"
        echo "  the final fsync of ~15 GiB."
    fi
    echo "  Writers' wall includes the final fsync of the metadata written."
    if [[ ${#ppeer[@]} -gt 0 ]]; then
        echo
        echo "peer measured alternately with ours in this run ($peer_bin):"
        printf '%-28s %2s %8s %15s %7s %7s %7s  %8s %7s %9s\n' "tool" "n" "peer" "peer min-max" "CPU med" "peak" "ratio" "ours" "ours" "ours/peer"
        printf '%-28s %2s %8s %15s %7s %7s %7s  %8s %7s %9s\n' "" "" "wall s" "s" "s" "MiB" "x base" "wall s" "MiB" "wall"
        printf '%s\n' "${ppeer[@]}"
    fi
    echo
    echo "cross-check, raw /usr/bin/time medians (10 ms resolution):"
    printf '  %s\n' "${pcross[@]}"
    echo
    echo "sanity:"
    printf '  %s\n' "${pnotes[@]}"
    echo
    echo "loadavg after the $pset set: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
    echo
}

[[ $run_large -eq 1 ]] && pool_set large
[[ $run_huge -eq 1 ]] && pool_set huge

# ---------------------------------------------------------------- summary
if [[ ${#summary[@]} -gt 0 ]]; then
    echo "summary: medians of this run (wall s); x base = / page-cached read of the same image;"
    echo "ours/peer = our median / the peer's median measured alternately in this run (PEER)"
    printf '%-16s %-28s %9s %7s %9s %9s %9s %9s\n' "set/image" "tool" "ours" "x base" "peer" "ours/peer" "ours MiB" "peer MiB"
    printf '%s\n' "---------------------------------------------------------------------------------------------------------"
    for row in "${summary[@]}"; do
        IFS='|' read -r s_set s_tool s_ours s_base s_peer s_opeak s_ppeak <<< "$row"
        awk -v a="$s_set" -v t="$s_tool" -v o="$s_ours" -v b="$s_base" -v p="$s_peer" -v om="$s_opeak" -v pm="$s_ppeak" 'BEGIN {
            printf "%-16s %-28s %9.3f %7s %9s %9s %9.1f %9s\n", a, t, o, (b > 0) ? sprintf("%.2f", o / b) : "-",
                (p == "-") ? "-" : sprintf("%.3f", p), (p != "-" && p > 0) ? sprintf("%.3f", o / p) : "-",
                om / 1024, (pm == "-") ? "-" : sprintf("%.1f", pm / 1024) }'
    done
fi

exit 0
