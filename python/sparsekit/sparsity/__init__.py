"""Dynamic sparse training: DynamicSparsity, schedules, distributions."""
