#!/usr/bin/env bash
# The command-line way in: prepare the built-in digits, train, serve the checkpoint, classify PNGs.
#
#   source .venv/bin/activate
#   bash examples/cli.sh                                  # 10 epochs, 2 workers
#   SMOKE=1 bash examples/cli.sh                          # 1 epoch: checks the wiring
#   RAY_ADDRESS=127.0.0.1:6379 bash examples/cli.sh       # on a `ray start` cluster
#
# Without RAY_ADDRESS each command starts a local Ray instance of its own, and the endpoint stops
# when the script ends; with it, every command runs on that cluster and the endpoint stays up
# (`serve --detach`). LEPTON_STORE (default ~/.lepton_ray/store) and PORT (8000) say where.
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${LEPTON_STORE:-$HOME/.lepton_ray/store}
PORT=${PORT:-8000}
EPOCHS=10
if [[ ${SMOKE:-0} == 1 ]]; then EPOCHS=1; fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

lepton-ray data prepare mnist5k "$STORE/datasets/mnist5k"   # does nothing if already prepared
lepton-ray data inspect "$STORE/datasets/mnist5k/train"
lepton-ray train --data "$STORE/datasets/mnist5k/train" --val "$STORE/datasets/mnist5k/test" \
    --workers 2 --epochs "$EPOCHS" --storage "$STORE/runs" | tee "$OUT/results.json"
CHECKPOINT=$(python -c 'import json, sys; print(json.load(sys.stdin)["checkpoint"])' <"$OUT/results.json")
echo "trained: $CHECKPOINT"

if [[ -n ${RAY_ADDRESS:-} ]]; then
    lepton-ray serve "$CHECKPOINT" --port "$PORT" --detach   # returns once deployed
else
    lepton-ray serve "$CHECKPOINT" --port "$PORT" >"$OUT/serve.json" &   # SIGTERM stops it cleanly
    SERVER=$!
    trap 'kill $SERVER; wait $SERVER; rm -rf "$OUT"' EXIT
    until grep -q endpoint "$OUT/serve.json"; do kill -0 $SERVER; sleep 1; done   # deployed
fi
curl -s "http://127.0.0.1:$PORT/healthz"; echo
lepton-ray predict "http://127.0.0.1:$PORT" examples/images/*.png
