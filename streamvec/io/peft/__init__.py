"""PEFT LoRA adapters: module naming, row-block readers of B @ A, the writer."""
