"""Reading and writing checkpoint files and stores: bytes and offsets, no arithmetic."""
