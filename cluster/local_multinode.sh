#!/usr/bin/env bash
# A two-"node" Ray cluster on one machine (head + one worker raylet), to try
# `xfer tune --address` and multi-node placement locally.
#   cluster/local_multinode.sh start     # prints the address
#   xfer tune --address 127.0.0.1:6390 ... --num_cpus is ignored with --address
#   cluster/local_multinode.sh stop
set -euo pipefail
RAY=${RAY:-$(dirname "$0")/../.venv/bin/ray}
case "${1:-start}" in
  start)
    "$RAY" start --head --node-ip-address=127.0.0.1 --port=6390 --dashboard-host=127.0.0.1 \
      --num-cpus=1 --resources='{"node_a": 1}'
    "$RAY" start --address=127.0.0.1:6390 --node-ip-address=127.0.0.1 --num-cpus=1 --resources='{"node_b": 1}'
    echo "cluster up: --address 127.0.0.1:6390"
    ;;
  stop) "$RAY" stop --force ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
