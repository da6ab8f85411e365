"""DoRA, LoHa and LoKr layers in kohya files, in the keys LyCORIS writes and ComfyUI / A1111 read.

Per adapted layer ``<name>`` (named as ``kohya.kohya_name`` names a LoRA layer):

- DoRA: ``lora_down.weight``, ``lora_up.weight``, ``alpha`` as a LoRA, plus ``dora_scale``:
  peft's trained magnitude, one per output channel, shaped ``(out, 1[, 1, 1])``. That is
  LyCORIS' ``wd_on_output`` layout; a reader tells it from the input-axis one ``(1, in[, 1, 1])``
  by the shape. ``W' = dora_scale * V / ||V||`` with ``V = W + alpha/rank * up @ down`` and the
  norm over each output channel's weights (Liu et al. 2024, eq. 5; peft ``DoraLinearLayer``).
- LoCon with a Tucker core (LyCORIS ``use_tucker``, read only): ``lora_down.weight`` ``(r, in, 1, 1)``,
  ``lora_mid.weight`` ``(r, r, kh, kw)``, ``lora_up.weight`` ``(out, r, 1, 1)``: the layer runs the three convs
  in turn, so ``dW = alpha/r * sum_ij mid[i, j] up[:, i] down[j, :]`` per kernel position.
- LoHa: ``hada_w1_a`` (out x r), ``hada_w1_b`` (r x in*kh*kw), ``hada_w2_a``, ``hada_w2_b``, ``alpha``:
  ``dW = alpha/r * (w1_a @ w1_b) * (w2_a @ w2_b)`` (element-wise), reshaped to the weight.
- LoKr: ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, and ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``,
  ``alpha``: ``dW = scale * kron(w1, w2)``. The UIs take ``scale = alpha / r`` with r the rank of a
  factored part, and 1.0 when both parts are full matrices; peft scales by alpha/r always, so such
  a layer is written with peft's scale multiplied into ``lokr_w2``.

The UIs apply a layer at strength ``m`` as ``W + m * (W' - W)`` (DoRA) or ``W + m * dW``.
"""

from __future__ import annotations

import torch
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer

from sdtune.adapters import ADAPTER

LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha", "lora_mid.weight")  # lora_mid: LoCon's Tucker core
LYCORIS_PARTS = (
    "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
)  # fmt: skip
PARTS = LORA_PARTS + LYCORIS_PARTS


def lycoris_network_args(algorithm: str, use_dora: bool) -> dict[str, str]:
    """LyCORIS' ss_network_args (its ``lycoris.kohya`` network module): ``algo`` and, for DoRA,
    ``dora_wd`` with ``wd_on_output`` (peft's magnitude is per output channel). A plain LoRA: none."""
    if algorithm == "lora" and not use_dora:
        return {}
    return {"algo": algorithm} | ({"dora_wd": "True", "wd_on_output": "True"} if use_dora else {})


def layer_tensors(layer: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One peft layer (LoRA, DoRA, LoHa or LoKr) as ``{key suffix: tensor}``, weights in ``dtype``
    and alpha in fp32 (any trained alpha survives exactly)."""
    def w(param) -> torch.Tensor:
        return param.detach().to(dtype)

    if isinstance(layer, LoraLayer):
        out = {"lora_down.weight": w(layer.lora_A[ADAPTER].weight), "lora_up.weight": w(layer.lora_B[ADAPTER].weight),
               "alpha": torch.tensor(float(layer.lora_alpha[ADAPTER]), dtype=torch.float32)}
        if layer.use_dora[ADAPTER]:
            weight = layer.get_base_layer().weight
            magnitude = layer.lora_magnitude_vector[ADAPTER].weight
            out["dora_scale"] = w(magnitude).reshape(weight.shape[0], *[1] * (weight.ndim - 1))
        return out
    alpha = torch.tensor(float(layer.alpha[ADAPTER]), dtype=torch.float32)
    if isinstance(layer, LoHaLayer):
        return {name: w(getattr(layer, name)[ADAPTER]) for name in LYCORIS_PARTS[1:7] if ADAPTER in getattr(layer, name)} | {"alpha": alpha}
    if isinstance(layer, LoKrLayer):
        out = {name: w(getattr(layer, name)[ADAPTER]) for name in LYCORIS_PARTS[7:] if ADAPTER in getattr(layer, name)}
        if "lokr_w1" in out and "lokr_w2" in out:  # the UIs then scale by 1.0
            out["lokr_w2"] = w(getattr(layer, "lokr_w2")[ADAPTER] * layer.scaling[ADAPTER])
        return out | {"alpha": alpha}
    raise TypeError(f"{type(layer).__name__} is not a LoRA, LoHa or LoKr layer")


def algorithm(parts: dict[str, torch.Tensor]) -> str:
    """``lora``, ``dora``, ``loha`` or ``lokr``, from a layer's keys; ``unknown`` for anything else."""
    if "hada_w1_a" in parts:
        return "loha"
    if any(key.startswith("lokr_") for key in parts):
        return "lokr"
    if "lora_up.weight" in parts and "lora_down.weight" in parts:
        return "dora" if "dora_scale" in parts else "lora"
    return "unknown"


def rank(parts: dict[str, torch.Tensor]) -> int | None:
    """The rank the UIs divide alpha by (None: a LoKr of two full matrices, scaled by 1.0)."""
    kind = algorithm(parts)
    if kind in ("lora", "dora"):
        return parts["lora_down.weight"].shape[0]
    if kind == "loha":
        return parts["hada_w1_b"].shape[0]
    factored = [parts[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in parts]
    return factored[-1] if factored else None


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A conv weight ``(out, in, kh, kw)`` from a Tucker core ``t`` ``(r, r, kh, kw)``, ``a`` ``(r, out)``, ``b`` ``(r, in)``."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, b, a)


def weight_delta(parts: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """``W' - W`` (fp32) for one layer at strength 1, by the rules in the module docstring."""
    kind = algorithm(parts)
    p = {key: value.float() for key, value in parts.items()}
    r = rank(parts)
    scale = float(p["alpha"]) / r if "alpha" in p and r is not None else 1.0
    if kind in ("lora", "dora"):
        up, down = p["lora_up.weight"].flatten(1), p["lora_down.weight"].flatten(1)
        delta = _tucker(p["lora_mid.weight"], up.T, down) if "lora_mid.weight" in p else up @ down
    elif kind == "loha":
        w1 = _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) if "hada_t1" in p else p["hada_w1_a"] @ p["hada_w1_b"]
        w2 = _tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"]) if "hada_t2" in p else p["hada_w2_a"] @ p["hada_w2_b"]
        delta = w1 * w2
    elif kind == "lokr":
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        else:
            w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]) if "lokr_t2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2)
    else:
        raise ValueError(f"a layer with keys {sorted(parts)} is none of LoRA, DoRA, LoHa, LoKr")
    delta = scale * delta.reshape(weight.shape)
    if "dora_scale" not in p:
        return delta
    base = weight.float()
    return dora_weight(base + delta, p["dora_scale"]) - base


def dora_weight(v: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """``dora_scale * V / ||V||``: the norm per output channel when dora_scale is shaped (out, 1, ...)
    (peft, LyCORIS wd_on_output), else per input channel (1, in, ...) (LyCORIS' original, kohya)."""
    if dora_scale.shape[0] == v.shape[0] and dora_scale.numel() == v.shape[0]:
        norm = v.flatten(1).norm(dim=1).reshape(v.shape[0], *[1] * (v.ndim - 1))
    else:
        norm = v.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, v.shape[1], *[1] * (v.ndim - 2))
    return v * (dora_scale.reshape(norm.shape) / norm)
