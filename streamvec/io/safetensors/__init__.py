"""safetensors files: headers, checkpoints, the sharded writer, FP8 and quantized weights."""
