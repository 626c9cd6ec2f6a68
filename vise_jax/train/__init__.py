"""Training: losses, optimizer, sharded state and steps, checkpoints, the loop (loop.train)."""
