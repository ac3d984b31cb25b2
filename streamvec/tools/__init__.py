"""Tools around the engine: synthetic checkpoints, the demo, info, verify, bench."""
