"""The sparse-delta engine and its products, selection rules, targets and budgets, pruning schedules."""
