"""The sparse-delta engine, selection rules, targets and budgets, and sparse adapters on disk."""
