#!/bin/bash
# usage: run_matrix.sh "A B" "200 1000 2000" DURATION
cd /work/scratch/ray_proto && . /work/main/.venv/bin/activate
for n in $2; do for d in $1; do
  ramp=$(( n / 100 )); [ $ramp -lt 5 ] && ramp=5
  echo "=== $d n=$n ramp=$ramp dur=$3 $(date +%T)"
  timeout 600 python run_bench.py --design $d --n $n --ramp $ramp --duration $3 ${4:+--tag $4} > logs/${d}_${n}$4.txt 2>&1
  echo "rc=$?"; sleep 3
done; done
