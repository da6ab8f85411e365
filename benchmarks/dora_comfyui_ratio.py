"""How far today's ComfyUI DoRA rule is from what was trained, per output channel: ||W+dW|| / ||W||.

    python benchmarks/dora_comfyui_ratio.py OUT_DIR     # after `bash launch.sh` set up .venv

Trains the demo recipe as a DoRA (200 steps) into OUT_DIR and prints the ratio's range over
the UNet's adapted output channels (docs/recipes.md, "DoRA, LoHa, LoKr").
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, not an installed copy

import torch

from sdtune.export.kohya import addressable_layers, read_lora
from sdtune.models import load_components
from sdtune.recipe import load_recipe
from sdtune.train import main

out = sys.argv[1]
r = main(["--recipe", "recipes/tiny_demo.yaml", "--set", f"output.dir={out}", "--set", "lora.use_dora=true",
          "--set", "train.max_steps=200", "--set", "preview.prompts=[]", "--set", "train.logger=none",
          "--set", "export.dtype=fp32", "--set", "validation.every_steps=1000", "--set", f"data.cache_dir={out}/cache"])
tensors, _ = read_lora(r.output)
model = load_recipe(r.output.with_suffix(".recipe.yaml")).model  # the base the DoRA was trained on
parts = load_components(model.path, model.prediction_type, model.zero_terminal_snr, torch.float32)
layers = addressable_layers("lora_unet_", parts.unet)
ratios = []
for key in tensors:
    if key.endswith(".dora_scale"):
        name = key.split(".")[0]
        W = layers[name].weight.float()
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        V = W + tensors[f"{name}.alpha"].item() / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(W.shape)
        ratios.append((V.flatten(1).norm(dim=1) / W.flatten(1).norm(dim=1)))
allr = torch.cat(ratios)
print(f"layers {len(ratios)}, channels {allr.numel()}, ratio ||W+dW||/||W||: min {allr.min():.4f} median {allr.median():.4f} max {allr.max():.4f}")
