#!/usr/bin/env bash
# launch/preemptible.sh accelerate launch ... : SIGTERM/SIGINT go to the training processes only.
# torchrun's agent exits 1 when IT receives SIGTERM, even after every rank checkpointed and exited 0
# (docs/RELIABILITY.md). With this wrapper the signal goes to the launcher's children, which
# checkpoint and exit 0, and so does the launcher. Example:
#   launch/preemptible.sh accelerate launch --config_file launch/multi-gpu.yaml \
#       facegan_dist train --data shards/celeba64 --out runs/x --resume auto
"$@" &
launcher=$!
trap 'pkill -TERM -P "$launcher"' TERM
trap 'pkill -INT -P "$launcher"' INT
while true; do
    wait "$launcher"; rc=$?
    kill -0 "$launcher" 2>/dev/null || exit "$rc"  # wait returns early when a trap runs
done
