"""Pure-math pieces of the landscape monitors (no Lightning import): losses over fixed batches
at moved weights, sharpness, local entropy, noise statistics, interpolation and projection of
trajectories."""
