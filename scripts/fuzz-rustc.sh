#!/usr/bin/env bash
# RUSTC_WRAPPER for scripts/fuzz.sh: adds the sanitizer-coverage flags ($FUZZ_RUSTFLAGS) only
# to the crates named in $FUZZ_INSTRUMENT and to the fuzz targets, and only when compiling for
# the target (not build scripts or proc macros). Instrumenting everything (candle, tokio,
# axum) made one build take over 15 minutes on 2 cores; the parsers that see fuzz input are
# graft's own crates and the few dependencies listed, and those keep their coverage feedback.
set -euo pipefail
rustc="$1"
shift
name="" prev="" for_target=0 ours=0
for a in "$@"; do
  [ "$prev" = "--crate-name" ] && name="$a"
  [ "$a" = "--target" ] && for_target=1
  case "$a" in */fuzz_targets/*.rs | fuzz_targets/*.rs) ours=1 ;; esac
  prev="$a"
done
if [ "$for_target" = 1 ] && { [ "$ours" = 1 ] || [[ " $FUZZ_INSTRUMENT " == *" $name "* ]]; }; then
  # shellcheck disable=SC2086 # the flags are words on purpose
  exec "$rustc" "$@" $FUZZ_RUSTFLAGS
fi
exec "$rustc" "$@"
