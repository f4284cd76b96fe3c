#!/usr/bin/env bash
# Benchmark for thinmeta's thin_check / thin_dump.
#
# Usage: bench/run.sh [IMAGE] [REPS]
#   IMAGE  metadata image (raw, or .gz).  Default: ../shared/testdata/perf/medium.bin.gz
#          relative to the repo root, plus small.bin.gz when present.
#   REPS   timed repetitions per command after one warm-up run (default 7).
#
# For every command: one warm-up run, then REPS timed runs, each started through
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

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(git -C "$here" rev-parse --show-toplevel 2>/dev/null || (cd "$here/.." && pwd))
perf_dir="$root/../shared/testdata/perf"
peer_md="$perf_dir/peer_bench_medians.md"

reps=${2:-$REPS_DEFAULT}
if ! [[ $reps =~ ^[1-9][0-9]*$ ]]; then
    echo "warning: bad repetition count '$reps', using $REPS_DEFAULT" >&2
    reps=$REPS_DEFAULT
fi

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
if [[ $# -ge 1 && -n $1 ]]; then
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
        exit 0
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
echo "repetitions : $reps timed runs per command, after 1 warm-up run"
echo "timing      : wall = \$EPOCHREALTIME around /usr/bin/time; CPU = user+sys (rusage);"
echo "              peak = max RSS (/usr/bin/time %M). ratio = median wall / median baseline wall."
echo "baseline    : cat IMG > /dev/null (page-cached sequential read, after a warm-up read)"
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

exit 0
