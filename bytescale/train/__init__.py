"""Training: pure train state over ``nnx.split``, jitted steps, the loop, checkpoints and metrics."""
