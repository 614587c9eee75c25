#!/usr/bin/env bash
# Batch records of the BPL CHO FMU (examples/hmpc_amribt) for docs/calibration.md: eight
# fed-batches of the FMU plant with the amribt plug-in's probes and assays, differing in
# the start (seeding density, glucose, glutamine; the feed is the same 15/4 mM), the
# controller (the author's recipe or the feedback rule) and the sensor noise seed.
# Usage: bash docs/calibration/fmu_records.sh OUT   (writes OUT/batchN/trajectory.csv, ...)
set -euo pipefail
out=${1:?usage: fmu_records.sh OUT}
here=$(cd "$(dirname "$0")/../.." && pwd)
process=$here/examples/hmpc_amribt/hmpc_amribt/data/amribt_process.toml
fmu=$here/examples/hmpc_amribt/hmpc_amribt/fmu/BPL_CHO_Fedbatch_linux_om_me.fmu
python=${PYTHON:-python}
mkdir -p "$out/process"
i=0
# seeding density [1e9 cells/L], glucose [mM], glutamine [mM], controller
while read -r seeding glucose glutamine controller; do
  i=$((i + 1))
  sed -e "s/^seeding_density = { value = 0.2,/seeding_density = { value = $seeding,/" \
      -e "s/^initial_glucose = { value = 18.0,/initial_glucose = { value = $glucose,/" \
      -e "s/^initial_glutamine = { value = 2.4,/initial_glutamine = { value = $glutamine,/" \
      "$process" > "$out/process/batch$i.toml"
  "$python" -m sim.cli simulate --model amribt --controller "$controller" \
      --plant "fmu:$fmu" --process "$out/process/batch$i.toml" --sensor-seed "$i" \
      --out "$out/batch$i"
done <<'TABLE'
0.20 18.0 2.4 recipe
0.15 18.0 2.4 rule
0.25 22.0 3.0 recipe
0.18 15.0 2.0 rule
0.22 20.0 2.8 rule
0.20 25.0 2.4 recipe
0.17 20.0 3.0 recipe
0.24 16.0 2.2 rule
TABLE
