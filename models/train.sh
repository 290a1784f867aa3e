#!/usr/bin/env bash
# Trains the shipped LSTM from scratch: one command, reproducible (fixed seeds).
#
#   models/train.sh            # export windows, hold-out run, final model -> models/
#
# 1. `export_windows` encodes real human typing (../shared/data) and generated macro users with
#    the detector's own code into models/data/ (never committed: derived from the dataset),
#    half of them with their keys labelled as the agent sends them.
# 2. A hold-out run trains without the human_sampled family and reports how the model does on
#    it; that model becomes tests/fixtures/lstm-holdout (the hot-reload test swaps it in).
# 3. The shipped model trains on every family: models/keystroke-lstm-<version>.{onnx,json}
#    and the fixed vectors the Rust agreement test checks.
# Afterwards run scripts/eval-model to regenerate models/EVAL.md.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=models/.venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r models/requirements.txt

# Half the users' keys as the agent's 16-press labels (agent.key_label_presses), half as key
# codes, so one model serves both; human_iid is the key-dependence test's family (no window
# shows it).
cargo run --release --example export_windows -- --out models/data --windows-per-user 20 \
    --leave-out human_iid --key-labels 16 --labelled-share 0.5
"$venv/bin/python" models/train.py --data models/data --holdout human_sampled
"$venv/bin/python" models/train.py --data models/data
