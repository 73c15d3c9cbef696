"""One trainer for every model (trainer) with its optimiser, schedule and checkpoints (optim, adamw), next-token
evaluation (evaluation), the figures of a run (plots), one tracked training run (run), and the pinned
reference loop the benchmark compares against (reference_loop)."""
