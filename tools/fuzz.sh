#!/usr/bin/env bash
# Fuzz nerve's readers of untrusted files with cargo-fuzz (libFuzzer): IDX, CSV,
# safetensors, GGUF, the pickle machine, PyTorch checkpoints, tokenizers, config JSON and
# images. One target per reader, in fuzz/fuzz_targets/.
#
#   tools/fuzz.sh                       # every target, 60 s each
#   tools/fuzz.sh gguf pickle           # only the targets named
#   FUZZ_SECONDS=600 tools/fuzz.sh torch
#   tools/fuzz.sh --list                # the target names
#
# Each target runs for FUZZ_SECONDS (default 60) with -rss_limit_mb=2048 -timeout=10, so a
# runaway allocation or an input that takes over 10 s counts as a failure like a crash or a
# panic; overflow checks and debug assertions are on. Inputs go up to 8 KiB from the start
# (-len_control=0): the seeds are whole files, and mutating them needs room. Extra libFuzzer flags can be given in
# FUZZ_ARGS (e.g. FUZZ_ARGS="-jobs=4 -workers=4"). The corpus grows in fuzz/corpus/<target>
# (generated, git-ignored), starting from the committed seeds in fuzz/seeds/<target>
# (written by tools/fuzz_seeds.py). A failing input is saved as
# fuzz/artifacts/<target>/{crash,oom,timeout}-<hash>, the log as fuzz/logs/<target>.log, and
# the script exits non-zero after running the other targets. Replay a failing input with
#   cargo +nightly fuzz run --debug-assertions <target> fuzz/artifacts/<target>/<file>
# and turn it into a regression test beside the reader's own tests.
#
# cargo-fuzz is installed (`cargo install cargo-fuzz --locked`) when missing. libFuzzer
# needs nightly Rust: the nightly toolchain is used when rustup has one, otherwise stable
# with RUSTC_BOOTSTRAP=1.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seconds="${FUZZ_SECONDS:-60}"
all_targets=(idx csv safetensors gguf pickle torch tokenizer config_json image)

if [[ "${1:-}" == "--list" ]]; then
    printf '%s\n' "${all_targets[@]}"
    exit 0
fi
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=("${all_targets[@]}")
fi
for t in "${targets[@]}"; do
    if [[ ! -f "fuzz/fuzz_targets/$t.rs" ]]; then
        echo "fuzz.sh: no target '$t' (known: ${all_targets[*]})" >&2
        exit 2
    fi
done

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

cargo_fuzz=(cargo)
if command -v rustup >/dev/null 2>&1 && rustup toolchain list | grep -q '^nightly'; then
    cargo_fuzz+=(+nightly)
else
    echo "fuzz.sh: no nightly toolchain; using stable with RUSTC_BOOTSTRAP=1" >&2
    export RUSTC_BOOTSTRAP=1
fi
cargo_fuzz+=(fuzz)

# Build every target first (they share one build), so a build failure is not mistaken
# for a finding.
"${cargo_fuzz[@]}" build --debug-assertions

mkdir -p fuzz/logs
failed=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t" "fuzz/seeds/$t"
    echo "== $t: ${seconds} s" >&2
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
    if "${cargo_fuzz[@]}" run --debug-assertions "$t" "$root/fuzz/corpus/$t" "$root/fuzz/seeds/$t" \
        -- -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        -max_len=8192 -len_control=0 ${FUZZ_ARGS:-} >"fuzz/logs/$t.log" 2>&1; then
        grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "fuzz/logs/$t.log" >&2 || true
    else
        failed+=("$t")
        tail -n 40 "fuzz/logs/$t.log" >&2
        echo "== $t FAILED: input in fuzz/artifacts/$t/, log in fuzz/logs/$t.log" >&2
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz.sh: failures in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: ${targets[*]}: no crash, hang or runaway allocation in ${seconds} s each" >&2
