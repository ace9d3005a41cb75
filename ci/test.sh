#!/usr/bin/env bash
# The whole test suite: what README.md calls "run every test" and what CI
# (.ci/run) runs. Installs what is missing first, then: formatting, clippy
# with warnings as errors, every test of the workspace (integration tests
# boot real guests under KVM).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*" >&2; }

step "install dependencies"
ci/install-deps.sh

# CI machines have /dev/kvm: there a missing KVM must fail the KVM tests,
# not skip them.
if [ "${CI:-}" = true ]; then export SHOAL_REQUIRE_KVM=1; fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
cargo test --workspace --locked

step "all checks passed"
