#!/usr/bin/env bash
# Run every fuzz target (or the ones named) for SECONDS each, one at a time,
# and append a per-target tally line to $FUZZ_WORK/tally.tsv.
#
#   fuzz/run-all.sh SECONDS [TARGET...]     one rotation
#   UNTIL=<epoch> fuzz/run-all.sh SECONDS   rotate until that time
#   fuzz/run-all.sh --tally                 sum the tally per target
#
# Environment:
#   FUZZ_WORK   work directory, outside the repository (default /tmp/thinmeta-fuzz):
#               corpus/<target> (a copy of fuzz/corpus/<target>, grown by the
#               fuzzer), artifacts/<target> (crashes), logs/, tally.tsv
#   NICE        niceness of the fuzzer (default 10)
#   NO_BUILD=1  use the binaries already built
#
# The committed corpus is never written: the fuzzer works on its copy.
# Exit status 1 when a target crashed, hung (-timeout=10) or allocated more
# than 2 GiB (-rss_limit_mb/-malloc_limit_mb); the input is in artifacts/.
set -uo pipefail
cd "$(dirname "$0")"

WORK=${FUZZ_WORK:-/tmp/thinmeta-fuzz}
TALLY=$WORK/tally.tsv
ALL=(thin_check thin_dump thin_repair thin_query thin_restore thin_shrink_xml thin_message thin_metadata_unpack snap)

if [ "${1:-}" = "--tally" ]; then
    [ -f "$TALLY" ] || { echo "no tally at $TALLY"; exit 0; }
    printf "%-22s %9s %12s %6s %7s %7s\n" target seconds execs cov ft crashes
    awk -F'\t' 'NR > 1 { s[$2] += $3; e[$2] += $4; if ($5 + 0 > c[$2] + 0) c[$2] = $5; if ($6 + 0 > f[$2] + 0) f[$2] = $6; k[$2] += $7 }
        END { for (t in s) printf "%-22s %9d %12d %6d %7d %7d\n", t, s[t], e[t], c[t], f[t], k[t] }' "$TALLY" | sort
    exit 0
fi

SECS=${1:?usage: run-all.sh SECONDS [TARGET...] | --tally}
shift
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL[@]}")

mkdir -p "$WORK/logs"
[ -f "$TALLY" ] || printf 'date\ttarget\tseconds\texecs\tcov\tft\tcrashes\tartifact\n' > "$TALLY"

# One build of every target: optimised, debug assertions (overflow checks)
# on, no sanitizer (the library has no unsafe code to check; speed matters).
if [ "${NO_BUILD:-0}" != 1 ]; then
    nice -n "${NICE:-10}" cargo +nightly fuzz build -O -a -s none || exit 1
fi
BIN=target/x86_64-unknown-linux-gnu/release

status=0
rotate() {
    local t
    for t in "${TARGETS[@]}"; do
        if [ -n "${UNTIL:-}" ] && [ "$(date +%s)" -ge "$UNTIL" ]; then
            return 1
        fi
        local secs=$SECS
        if [ -n "${UNTIL:-}" ]; then
            local left=$((UNTIL - $(date +%s)))
            [ "$left" -lt "$secs" ] && secs=$left
            [ "$secs" -lt 5 ] && return 1
        fi
        local corpus=$WORK/corpus/$t art=$WORK/artifacts/$t/
        mkdir -p "$corpus" "$art"
        cp -n corpus/"$t"/* "$corpus"/ 2>/dev/null
        local dict=()
        case $t in thin_restore | thin_shrink_xml) dict=(-dict=dict/xml.dict) ;; esac
        local log=$WORK/logs/$t-$(date -u +%Y%m%dT%H%M%S).log
        local before after start end
        before=$(ls "$art" | wc -l)
        start=$(date +%s)
        nice -n "${NICE:-10}" "$BIN/$t" "$corpus" "${dict[@]}" \
            -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
            -artifact_prefix="$art" -print_final_stats=1 >"$log" 2>&1
        local rc=$?
        end=$(date +%s)
        after=$(ls "$art" | wc -l)
        local execs cov ft crashes artifact
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
        ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
        crashes=$((after - before))
        artifact=$(sed -n 's/.*Test unit written to //p' "$log" | tail -1)
        if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then crashes=1; fi
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$t" "$((end - start))" \
            "${execs:-0}" "${cov:-0}" "${ft:-0}" "$crashes" "${artifact:--}" >> "$TALLY"
        echo "$t: $((end - start)) s, ${execs:-0} execs, cov ${cov:-0}, ft ${ft:-0}, crashes $crashes ${artifact:-}"
        [ "$crashes" -eq 0 ] || status=1
    done
}

if [ -n "${UNTIL:-}" ]; then
    while rotate; do :; done
else
    rotate
fi
exit $status
