#!/bin/sh
# Joins the mesh once (ENROLLMENT_TOKEN, with NODE_NAME, ENDPOINT and
# MESH_ADDRESS when set; the key pair is made here and never leaves the
# state volume), then runs bgp4mesh with the container's arguments.
set -eu
state_dir="${STATE_DIR:-/var/lib/bgp4mesh/agent}"
if [ -n "${ENROLLMENT_TOKEN:-}" ] && [ ! -e "$state_dir/node.json" ]; then
  bgp4mesh join "$ENROLLMENT_TOKEN" --state-dir "$state_dir" \
    ${NODE_NAME:+--name "$NODE_NAME"} \
    ${ENDPOINT:+--endpoint "$ENDPOINT"} \
    ${MESH_ADDRESS:+--address "$MESH_ADDRESS"}
fi
exec bgp4mesh "$@"
