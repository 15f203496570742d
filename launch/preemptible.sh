#!/usr/bin/env bash
# launch/preemptible.sh accelerate launch [options] facegan_dist train ...
# is `python launch/accelerate_launch.py [options] facegan_dist train ...` (see that file): a
# SIGTERM/SIGINT to the launcher (preemption, Ctrl-C) reaches the training processes, which
# checkpoint and exit 0, and so does the launcher, without torchrun's SignalException traceback;
# a failed training process gives its one `error:` line and its exit code. Example:
#   launch/preemptible.sh accelerate launch --config_file launch/multi-gpu.yaml \
#       facegan_dist train --data shards/celeba64 --out runs/x --resume auto
set -euo pipefail
if [[ $# -lt 2 || $(basename -- "$1") != accelerate || $2 != launch ]]; then
    echo "error: usage: launch/preemptible.sh accelerate launch [options] facegan_dist train ..." >&2
    exit 2
fi
accelerate=$(command -v -- "$1") || { echo "error: $1: command not found" >&2; exit 127; }
python=$(dirname -- "$accelerate")/python  # the environment accelerate is installed in
[[ -x $python ]] || python=python3
exec "$python" "$(dirname -- "$0")/accelerate_launch.py" "${@:3}"
