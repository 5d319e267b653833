#!/usr/bin/env bash
# Join a run as a volunteer with one of the configs in this folder.
#   peers/join.sh BOOTSTRAP_MULTIADDR RUN_ID DATA_PATH [CONFIG] [more photon-peer flags...]
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 BOOTSTRAP_MULTIADDR RUN_ID DATA_PATH [CONFIG.toml] [photon-peer flags...]" >&2
  exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
addr="$1"; run="$2"; data="$3"; shift 3
config="${1:-$here/workstation-volunteer.toml}"; [ $# -gt 0 ] && shift
exec photon-peer --config "$config" --initial-peers "$addr" --run-id "$run" --data "$data" "$@"
