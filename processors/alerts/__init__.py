"""Alert evaluation on closed windows (stage 2): rules, the per-key state machine, budgets."""
