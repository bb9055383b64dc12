"""Adapter merging: task adapters read from their run folders (`rigsa.adapters.read`) combined into one adapter.

- `combine`: the merge methods over one parameter's task deltas, stacked (PEFT's `merge_utils` tensor functions
  where their semantics are the ones documented there);
- `deltas`: adapters of every kind as per-parameter deltas, merged, and the result as an `Adapter` in the inputs'
  form where the method allows (sparse inputs: a sparse adapter on the union of their positions), written like a
  trained one;
- `heads`: the merged model's readouts, one per source task, scored from one forward pass;
- `sources`: the adapters' run folders read and checked against each other before any model loads;
- `run`: `rigsa-merge`, one merge as a run folder (results.json read by `rigsa-report`).
"""
