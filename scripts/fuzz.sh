#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ and runs each for a bounded time on its committed seed
# corpus (fuzz/corpus/<target>), on the stable toolchain: the coverage instrumentation is
# LLVM's sanitizer-coverage pass, requested with stable `-C passes` / `-C llvm-args` flags (no
# nightly, no RUSTC_BOOTSTRAP, no AddressSanitizer; the code under test forbids `unsafe`).
#
#   scripts/fuzz.sh                     every target, FUZZ_SECONDS (default 20) each
#   scripts/fuzz.sh tokenizer 600       one target for ten minutes
#   scripts/fuzz.sh --build             build only
#
# New inputs that find coverage go to fuzz/target/corpus/<target> (not committed); a crash is
# written to fuzz/artifacts/<target>/ and fails the run. Reproduce one with
# `fuzz/target/x86_64-unknown-linux-gnu/release/<target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

triple="$(rustc -vV | sed -n 's/^host: //p')"
# Its own target dir: the instrumented build must not mix with the workspace's.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
# `--target` keeps these flags off build scripts and proc macros, as cargo-fuzz does; the
# wrapper puts them only on the crates that parse fuzz input (see scripts/fuzz-rustc.sh).
export RUSTC_WRAPPER="$PWD/../scripts/fuzz-rustc.sh"
export FUZZ_INSTRUMENT="graft_fuzz models plugins server minijinja minijinja_contrib safetensors serde_json serde_path_to_error"
export FUZZ_RUSTFLAGS="--cfg fuzzing -C passes=sancov-module \
-C llvm-args=-sanitizer-coverage-level=4 \
-C llvm-args=-sanitizer-coverage-inline-8bit-counters \
-C llvm-args=-sanitizer-coverage-pc-table \
-C llvm-args=-sanitizer-coverage-trace-compares"
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^graft-fuzz$')

cargo build --release --locked --target "$triple" --bins
[ "${1:-}" = "--build" ] && exit 0

bin="$CARGO_TARGET_DIR/$triple/release"
seconds="${2:-${FUZZ_SECONDS:-20}}"
[ $# -ge 1 ] && targets="$1"
for t in $targets; do
  printf '\n== fuzz %s (%ss)\n' "$t" "$seconds"
  mkdir -p "$CARGO_TARGET_DIR/corpus/$t" "corpus/$t" "artifacts/$t"
  log="$CARGO_TARGET_DIR/fuzz-$t.log"
  # -timeout: an input that runs for 10 s is a hang and fails the run like a crash.
  if "$bin/$t" "$CARGO_TARGET_DIR/corpus/$t" "corpus/$t" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$log" 2>&1; then
    grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added)' "$log" || true
  else
    tail -n 60 "$log"
    echo "fuzz target $t failed; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
