#!/usr/bin/env bash
# The job way in: a Ray cluster on this machine, then the pipeline's steps submitted as Ray jobs.
#
#   source .venv/bin/activate                # jobs run with the python on the head's PATH
#   bash examples/submit_job.sh              # prepare the digits, train (the config: 15 epochs)
#   SMOKE=1 bash examples/submit_job.sh      # the steps' --smoke-test (1 epoch, a small model)
#
# It starts a head (docs/cluster.md) unless one already runs on this machine, and leaves it
# running: `ray stop` stops it, and every other Ray process of this machine. RAY_AUTH_MODE must be
# the same for the head and the client: `disabled` here, for a throwaway cluster on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
ADDRESS=http://127.0.0.1:8265
CONFIG=pipelines/configs/mnist.yaml
SMOKE_TEST=()
if [[ ${SMOKE:-0} == 1 ]]; then SMOKE_TEST=(--smoke-test); fi

if ! ray status >/dev/null 2>&1; then
    ray start --head --num-cpus 4 --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --disable-usage-stats
fi

# Ray's own client: runs the step once; --working-dir . uploads this checkout for the job.
ray job submit --address "$ADDRESS" --working-dir . -- \
    python -m pipelines.prepare_data --config "$CONFIG" "${SMOKE_TEST[@]}"

# lepton-ray submit: the same, and a failed job is submitted again and resumes its run from its
# last checkpoint (a new run name each time this script runs; the retries share it).
lepton-ray submit --address "$ADDRESS" --max-retries 2 -- \
    python -m pipelines.train --config "$CONFIG" "${SMOKE_TEST[@]}" \
    --set "train.run_name=mnist-job-$(date +%Y%m%d-%H%M%S)"
