"""sdtune: fine-tune Stable Diffusion 1.x/2.x into files ComfyUI and AUTOMATIC1111 load."""

__version__ = "0.1.0"
