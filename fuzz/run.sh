#!/usr/bin/env bash
# Runs every fuzz target for SECONDS seconds each (default 60), one after another, each
# on its own corpus (fuzz/corpus/TARGET, not committed) seeded from fuzz/seeds/TARGET, and
# prints one line per target: executions, executions per second, coverage (edges and
# features) and the corpus size. A crash stops the script with a non-zero status; libFuzzer
# leaves the input in fuzz/artifacts/TARGET/ (reproduce it with
# `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...`).
#
# Needs the nightly toolchain (libFuzzer's instrumentation); without it, it says so and
# exits 0, so that a machine without nightly still passes run-tests. cargo-fuzz is
# installed when missing. Extra arguments after SECONDS name the targets to run.
# FUZZ_PROFILE=dev builds without optimisation: a cold build takes less time, the targets
# run slower; run-tests uses it for its smoke run.
#
# The targets are built without a sanitizer (`-s none`): the workspace forbids unsafe
# code, so what the fuzzer looks for is panics (assertions and debug overflow checks are
# on), endless loops (-timeout) and runaway memory (-rss_limit_mb), and without
# AddressSanitizer each input costs less.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
shift || true

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: no nightly toolchain here (rustup toolchain install nightly); skipping the fuzz targets"
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

profile=()
if [ "${FUZZ_PROFILE:-release}" = "dev" ]; then
  profile=(--dev)
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build -s none "${profile[@]}"
mkdir -p logs
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "seeds/$target"
  log="logs/$target.log"
  if ! cargo +nightly fuzz run -s none "${profile[@]}" "$target" "corpus/$target" "seeds/$target" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz/run.sh: $target FAILED; the input is in fuzz/artifacts/$target/"
    exit 1
  fi
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  cov=$(sed -n 's/.* cov: \([0-9]*\) .*/\1/p' <<<"$done_line")
  ft=$(sed -n 's/.* ft: \([0-9]*\) .*/\1/p' <<<"$done_line")
  corp=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$done_line")
  printf 'fuzz/run.sh: %-16s %6ss  %10s execs  %7s/s  cov %6s  ft %6s  corpus %5s\n' \
    "$target" "$seconds" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}"
done
