#!/usr/bin/env bash
# Issue #23's merging experiments at CPU scale, end to end (each line resumes where it stopped: resubmit the whole
# script after an interruption; finished runs and merges are not recomputed):
#   1. the adapters: each kind on each task (sparse_merging_cpu), SpaRTA 1% with heads (sparta_table6_cpu);
#   2. sparse_merging_cpu: each kind's two adapters merged by mean, overlap_mean, TIES (density 0.2) and DARE-TIES
#      (density 0.5), each merged model scored on both tasks' test snippets;
#   3. sparta_table6_cpu: the two SpaRTA adapters summed (SpaRTA §8), one model with both heads, with forgetting;
#   4. the reports (docs/merging.md reads them).
# Long runs outlive an editable install's source: run this from a frozen copy of src/ (docs/sweeps.md), e.g.
#   PYTHONPATH=/path/to/frozen/src THREADS=2 nohup scripts/merging_cpu.sh > merging.log 2>&1 &
set -u
PYTHON=${PYTHON:-python}
THREADS=${THREADS:-0}
SEED=${SEED:-0}
step() {
  echo "=== $(date -u +%FT%TZ) $*"
  "$@"
  echo "=== exit $? $(date -u +%FT%TZ)"
}
run() { step $PYTHON -c 'from rigsa.cli import run_main; run_main()' "$@"; }
merge() { step $PYTHON -c 'from rigsa.cli import merge_main; merge_main()' "$@"; }

run --multirun experiment=sparse_merging_cpu seed=$SEED train.threads=$THREADS logger=none
run --multirun experiment=sparta_table6_cpu seed=$SEED train.threads=$THREADS logger=none

ADAPTERS=runs/sparse_merging_cpu/adapters
for method in snip lora full; do
  pair="[$ADAPTERS/smollm2_135m-$method-sentiment_tweets-seed$SEED,$ADAPTERS/smollm2_135m-$method-sentiment_movie_reviews-seed$SEED]"
  common=(adapters="$pair" name=$method eval=target threads=$THREADS run.root=runs/sparse_merging_cpu/merges
          report.name=sparse_merging_cpu seed=$SEED)
  merge --multirun "${common[@]}" merge_method=mean,overlap_mean
  merge --multirun "${common[@]}" merge_method=ties density=0.2
  merge --multirun "${common[@]}" merge_method=dare_ties density=0.5
done

TABLE6=runs/sparta_table6_cpu/adapters
merge adapters="[$TABLE6/smollm2_135m-sparta-sentiment_movie_reviews-seed$SEED,$TABLE6/smollm2_135m-sparta-sentiment_tweets-seed$SEED]" \
  name=two_headed merge_method=sum threads=$THREADS run.root=runs/sparta_table6_cpu/merges report.name=sparta_table6_cpu \
  eval=offline "eval.forgetting=[{task: rigsa_prose_bpb, num_fewshot: 0, limit: 20}]" seed=$SEED

step $PYTHON -c 'from rigsa.report import main; main()' runs/sparse_merging_cpu/merges --no-wandb
step $PYTHON -c 'from rigsa.report import main; main()' runs/sparta_table6_cpu/merges --no-wandb
