#!/usr/bin/env bash
# Issue #25's tuned CPU reproductions, in the order of the claims they test (each line resumes where it stopped:
# resubmit the whole script after an interruption; finished searches and runs are not recomputed):
#   1. SpaRTA close to LoRA at equal count (then the rest of SpaRTA Table 3's rows, line 4)
#   2. RIGSA learns, forgets less than QLoRA, is comparable to the random mask (Figures 2 and 4): searches
#   3. GaLLoP forgets least: searches
#   5. QLoRA's ranks (Figure 3): searches
# The lines with final_runs=false stop after the search; run them again without it for the 3 seeds each.
# Long runs outlive an editable install's source: run this from a frozen copy of src/ (docs/sweeps.md), e.g.
#   PYTHONPATH=/path/to/frozen/src THREADS=2 nohup scripts/tuned_cpu.sh > tuned.log 2>&1 &
set -u
PYTHON=${PYTHON:-python}
T="train.threads=${THREADS:-0} logger=none"
run() {
  echo "=== $(date -u +%FT%TZ) $*"
  $PYTHON -c 'from rigsa.cli import run_main; run_main()' "$@"
  echo "=== exit $? $(date -u +%FT%TZ)"
}
run --multirun experiment=sparta_table3_tuned_cpu variant=lora_r8,sparta_lora_count $T
run --multirun experiment=rigsa_fig24_tuned_cpu variant=rigsa,qlora_r8,random_mask_rigsa_budget $T hydra.sweeper.final_runs=false
run --multirun experiment=gallop_forgetting_tuned_cpu $T hydra.sweeper.final_runs=false
run --multirun experiment=sparta_table3_tuned_cpu $T
run --multirun experiment=rigsa_fig3_tuned_cpu $T hydra.sweeper.final_runs=false
