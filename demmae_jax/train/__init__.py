"""Training: one loop (`loop.train`) for every task, its optimiser, checkpoints and metrics."""
