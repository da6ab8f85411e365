"""Files for the tools people generate with: kohya LoRA files, diffusers folders."""
