"""sdtune: fine-tune Stable Diffusion 1.x/2.x into files ComfyUI and AUTOMATIC1111 load."""

import logging

__version__ = "0.1.0"

# Library notices that say nothing a user of sdtune can act on, silenced at their
# source (each library's own logger) before those libraries are imported:
# - transformers says, when diffusers' pipelines import the CLIP image processor,
#   that torchvision is missing and it uses the PIL processor (sdtune never uses it);
# - bitsandbytes (imported by diffusers whenever it is installed) tries at import to
#   fetch a CPU 4-bit kernel from a hub and logs the failure; sdtune uses only its
#   8-bit AdamW, which does not need that kernel.
for _name in ("transformers.utils.import_utils", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# - DeepSpeed, where installed, is imported by accelerate whenever a model is unwrapped
#   or saved, and says on every machine without a GPU that it sets its accelerator to
#   the CPU (on stdout, at a level its own logger resets, so it is filtered by text).
logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())
