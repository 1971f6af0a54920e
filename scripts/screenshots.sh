#!/usr/bin/env bash
# Regenerates the README's pictures (docs/images/): the explorer and the status page as headless
# Chromium shows them, and tallyd top as tmux shows it, from the tests that check what they show
# (tests/explorer.rs, with its own private ClickHouse). Needs what scripts/test.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
export TALLYD_SCREENSHOTS=$PWD/docs/images
mkdir -p "$TALLYD_SCREENSHOTS"
cargo test --locked --test explorer -- \
    the_pages_show_known_values_in_headless_chromium tallyd_top_under_tmux_shows_the_exploding_metric_first
ls -l "$TALLYD_SCREENSHOTS"
