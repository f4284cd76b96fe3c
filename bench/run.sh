#!/usr/bin/env bash
# Benchmark for thinmeta's tools.
#
# Usage: bench/run.sh [SET|IMAGE] [REPS]
#   SET    all (default): the image set, then the large set
#          medium: the image set only: ../shared/testdata/perf/medium.bin.gz relative to
#                  the repo root, plus small.bin.gz when present (thin_check, thin_dump)
#          large:  the large set only (see below)
#   IMAGE  a metadata image (raw, or .gz): the image set on that image only.
#   REPS   timed repetitions per command.  Image set: after one warm-up run (default 7).
#          Large set: default 5, and at most LARGE_SLOW_REPS (default 3) for the slow
#          tools (thin_restore, thin_repair, thin_generate_metadata).
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

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(git -C "$here" rev-parse --show-toplevel 2>/dev/null || (cd "$here/.." && pwd))
perf_dir="$root/../shared/testdata/perf"
peer_md="$perf_dir/peer_bench_medians.md"

set_arg=${1:-all}
run_images=1; run_large=1
case $set_arg in
    all)    ;;
    medium) run_large=0 ;;
    large)  run_images=0 ;;
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
bench_dir=${BENCH_DIR:-$root/target/bench}

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
echo "binary      : $bin"
echo "commit      : $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')$( [[ -n $(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null) ]] && echo ' (working tree modified)')"
echo "loadavg     : $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null) at start (other load on the machine inflates wall, not CPU)"
[[ $run_images -eq 1 ]] && echo "repetitions : image set: $reps timed runs per command, after 1 warm-up run"
[[ $run_large -eq 1 ]] && echo "repetitions : large set: $large_reps timed runs ($large_slow_reps for thin_restore, thin_repair, thin_generate_metadata)"
echo "timing      : wall = \$EPOCHREALTIME around /usr/bin/time; CPU = user+sys (rusage);"
echo "              peak = max RSS (/usr/bin/time %M). ratio = median wall / median baseline wall."
echo "baseline    : cat IMG > /dev/null (page-cached sequential read, after a warm-up read)"
[[ $run_large -eq 1 ]] && echo "cache       : $bench_dir (large set)"
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
        for ((i = 0; i < reps; i++)); do
            measure "t$ti" "$bin" "${args[0]}" "${args[@]:1}" "$img"
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


# ---------------------------------------------------------------- large set
# prealloc FILE: a 2 GiB all-zero file with its blocks allocated.
prealloc() {
    rm -f "$1"
    fallocate -l "$LARGE_SIZE" "$1" 2>/dev/null || truncate -s "$LARGE_SIZE" "$1"
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
# large_row NAME LABEL TARGET_WALL TARGET_PEAK PEER_TEST
large_row() {
    local name=$1 f="$scratch/$2.dat" tw=$3 tp=$4 ptest=$5
    local w_med w_min w_max c_med peak_kib peak_mib ratio verdict prow p_w p_c p_m nbad n
    [[ -s $f ]] || { printf '%-28s  (no runs)\n' "$name"; return; }
    read -r w_med w_min w_max < <(stats "$f" 1)
    read -r c_med _ _ < <(stats "$f" 2)
    n=$(wc -l < "$f")
    peak_kib=$(maxcol "$f" 3)
    peak_mib=$(awk -v k="$peak_kib" 'BEGIN { printf "%.1f", k / 1024 }')
    ratio=$(awk -v a="$w_med" -v b="$lb_med" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "inf" }')
    verdict=$(awk -v w="$w_med" -v t="$tw" -v p="$peak_mib" -v pt="$tp" 'BEGIN {
        m = ""
        if (t != "-" && w > t + 0)  m = m " wall>" t "s"
        if (pt != "-" && p > pt + 0) m = m " peak>" pt "MiB"
        if (t == "-" && pt == "-") print "-"
        else if (m == "") print "PASS"; else print "MISS" m }')
    nbad=$(badrc "$f")
    [[ $nbad -gt 0 ]] && verdict="$verdict (exit!=0 in $nbad runs)"
    prow=""
    [[ $ptest != - ]] && prow=$(peer large "$ptest")
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
    lcross+=("$(printf '%-28s %%e %.2f  %%U %.2f  %%S %.2f  %%M max %s KiB' "$name" "$e_med" "$u_med" "$s_med" "$peak_kib")")
}

if [[ $run_large -eq 1 ]]; then
    rm -f "$scratch"/*.dat
    mkdir -p "$bench_dir"
    limg="$bench_dir/large.bin"
    lxml="$bench_dir/large.xml"
    lout="$bench_dir/large-out.bin"
    lstamp="$bench_dir/large.stamp"
    lsummary="$bench_dir/large.summary"
    model_hash=$(sha256sum "$root/src/thin/generate.rs" 2>/dev/null | cut -c1-16)
    want="params: ${LARGE_PARAMS[*]}; size: $LARGE_SIZE; model: ${model_hash:-?}"
    echo "large set: thin_generate_metadata ${LARGE_PARAMS[*]} into a $LARGE_SIZE file"
    large_ok=1
    if [[ -f $limg && -f $lxml && -f $lstamp && $(cat "$lstamp") == "$want" ]]; then
        echo "       cached: $limg ($want)"
    else
        echo "       generating $limg and $lxml ..." >&2
        rm -f "$lstamp" "$lxml"
        prealloc "$limg"
        if ! "$bin" thin_generate_metadata -o "$limg" "${LARGE_PARAMS[@]}" 2> "$lsummary"; then
            echo "error: thin_generate_metadata failed: $(head -c 300 "$lsummary")" >&2
            large_ok=0
        elif ! "$bin" thin_dump -q -o "$lxml" "$limg" 2> "$scratch/stderr"; then
            echo "error: thin_dump of $limg failed: $(head -c 300 "$scratch/stderr")" >&2
            large_ok=0
        else
            echo "$want" > "$lstamp"
            echo "       generated: $limg ($want)"
        fi
    fi
fi

if [[ $run_large -eq 1 && $large_ok -eq 1 ]]; then
    [[ -f $lsummary ]] && echo "       $(sed 's/^[^:]*: //' "$lsummary" | head -1)"
    img_bytes=$(stat -c %s "$limg")
    xml_bytes=$(stat -c %s "$lxml")
    echo "       image $(awk -v b="$img_bytes" 'BEGIN { printf "%.0f MiB", b / 1048576 }'), XML $(awk -v b="$xml_bytes" 'BEGIN { printf "%.0f MiB", b / 1048576 }') (thin_dump of the image)"
    [[ -f $lout && $(stat -c %s "$lout") -eq $img_bytes ]] || prealloc "$lout"
    lnotes=()

    # baseline (and the XML read, for reference), page-cached
    cat "$limg" > /dev/null; cat "$lxml" > /dev/null
    for ((i = 0; i < large_reps; i++)); do measure lbase cat "$limg"; done
    for ((i = 0; i < large_reps; i++)); do measure lxmlcat cat "$lxml"; done

    # read-only tools: one warm-up, then timed runs
    for t in check dump delta delta_changes_only; do
        case $t in
            check) cmd=("$bin" thin_check "$limg") ;;
            dump)  cmd=("$bin" thin_dump "$limg") ;;
            delta) cmd=("$bin" thin_delta "${LARGE_DELTA_DEVS[@]}" "$limg") ;;
            delta_changes_only) cmd=("$bin" thin_delta --changes-only "${LARGE_DELTA_DEVS[@]}" "$limg") ;;
        esac
        out_bytes=$("${cmd[@]}" 2>"$scratch/stderr" | wc -c)
        wrc=${PIPESTATUS[0]}
        lnotes+=("thin_$t: warm-up exit $wrc, $out_bytes bytes on stdout")
        [[ $wrc -ne 0 ]] && lnotes+=("  stderr: $(head -c 300 "$scratch/stderr" | tr '\n' ' ')")
        for ((i = 0; i < large_reps; i++)); do measure "l$t" "${cmd[@]}"; done
    done

    # writers: into the preallocated file, block 0 wiped before each run
    for ((i = 0; i < large_slow_reps; i++)); do
        measure_fresh lrestore "$lout" "$bin" thin_restore -q -i "$lxml" -o "$lout"
    done
    "$bin" thin_check -q "$lout"; lnotes+=("thin_restore: thin_check of its output exits $?")
    for ((i = 0; i < large_slow_reps; i++)); do
        measure_fresh lrepair "$lout" "$bin" thin_repair -q -i "$limg" -o "$lout"
    done
    "$bin" thin_check -q "$lout"; lnotes+=("thin_repair: thin_check of its output exits $?")
    for ((i = 0; i < large_slow_reps; i++)); do
        measure_fresh lgen "$lout" "$bin" thin_generate_metadata -q -o "$lout" "${LARGE_PARAMS[@]}"
    done
    "$bin" thin_check -q "$lout"; lnotes+=("thin_generate_metadata: thin_check of its output exits $?")
    # The pool occupies blocks 0 .. used-1 (written onto a file that held no pool);
    # what lies beyond is left over from earlier runs.
    used=$(sed -n 's/.* \([0-9][0-9]*\) metadata blocks used.*/\1/p' "$lsummary" 2>/dev/null | head -1)
    if [[ -n $used ]]; then
        if cmp -s -n $((used * 4096)) "$lout" "$limg"; then
            lnotes+=("thin_generate_metadata: its $used blocks are byte-identical to the cached image's")
        else
            lnotes+=("thin_generate_metadata: output DIFFERS from the cached image (first $used blocks)")
        fi
    fi

    read -r lb_med _ _ < <(stats "$scratch/lbase.dat" 1)
    lcross=()
    echo
    printf '%-28s %2s %8s %15s %7s %7s %7s  %-18s %-24s %7s %6s %6s\n' "tool" "n" "wall med" "wall min-max" "CPU med" "peak" "ratio" "target" "verdict" "peer" "peer" "peer"
    printf '%-28s %2s %8s %15s %7s %7s %7s  %-18s %-24s %7s %6s %6s\n' "" "" "s" "s" "s" "MiB" "x base" "" "" "wall s" "CPU s" "MiB"
    printf '%s\n' "----------------------------------------------------------------------------------------------------------------------------------------------"
    large_row "baseline: cat image" lbase - - raw_read_buffered
    large_row "(cat XML, for reference)" lxmlcat - - -
    large_row "thin_check" lcheck "${LARGE_TARGET_CHECK[@]}" thin_check
    large_row "thin_dump > /dev/null" ldump "${LARGE_TARGET_DUMP[@]}" thin_dump
    large_row "thin_delta (5 vs 9)" ldelta "${LARGE_TARGET_DELTA[@]}" thin_delta
    large_row "thin_delta --changes-only" ldelta_changes_only - - -
    large_row "thin_restore XML -> file" lrestore "${LARGE_TARGET_RESTORE[@]}" thin_restore
    large_row "thin_repair image -> file" lrepair "${LARGE_TARGET_REPAIR[@]}" thin_repair
    large_row "thin_generate_metadata" lgen - - -
    echo
    echo "targets (large): thin_check <= ${LARGE_TARGET_CHECK[0]} s and <= ${LARGE_TARGET_CHECK[1]} MiB; thin_dump <= ${LARGE_TARGET_DUMP[0]} s;"
    echo "  thin_restore <= ${LARGE_TARGET_RESTORE[0]} s and <= ${LARGE_TARGET_RESTORE[1]} MiB; thin_repair <= ${LARGE_TARGET_REPAIR[0]} s;"
    echo "  thin_delta <= ${LARGE_TARGET_DELTA[0]} s (median wall, peak RSS). thin_delta compares two snapshots of one origin"
    echo "  from consecutive epochs (the peer's figure: its own choice of devices on its large pool)."
    echo "peer: thin-provisioning-tools on the peer's own large pool (gen_thin_xml.py, same parameters,"
    echo "  same figures: 24 devices, 152.6 M mappings, 45.7 M distinct), from $(basename "$peer_md")."
    echo "  Writers' wall includes the final fsync of ~790 MiB of metadata."
    echo
    echo "cross-check, raw /usr/bin/time medians (10 ms resolution):"
    printf '  %s\n' "${lcross[@]}"
    echo
    echo "sanity:"
    printf '  %s\n' "${lnotes[@]}"
    echo
    echo "loadavg after the large set: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
fi

exit 0
