"""What every recipe section shares: the base model class (unknown keys, inf and nan
refused) and the limits the sections check against."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# The six CLIP text-encoder layer kinds both UIs can address (shared/DESIGN.md, rule 3).
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PREDICTION_ALIASES = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
MAX_LEARNING_RATE = 10.0  # far above any real one (prodigy wants 1.0); larger ones only diverge
MAX_RESOLUTION = 4096
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
MAX_TRAIN_SEED = 2**31 - 1  # accelerate seeds process N with train.seed + N, which must stay a numpy seed


class _Section(BaseModel):
    # inf and nan are refused in every float field: no setting means "infinitely" here.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _not_blank(value: str | None, field: str) -> str | None:
    if value is not None and not value.strip():  # "" would scan the working directory
        raise ValueError(f"{field} is empty; give a folder, a file or a dataset name")
    return value
