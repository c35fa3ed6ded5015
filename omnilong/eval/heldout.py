"""Held-out loss and perplexity of models on each stage's held-out documents.

They are the `eval.heldout_documents` the packer split off before packing and packed into the
stage's `heldout/` shards, so no training row of any length holds any of their tokens. Every
model is scored on every stage with the same rows and the same loss code as training, so the
base model, each stage's model and an ablation compare directly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from omnilong.config import STAGE_NAMES, Params
from omnilong.data.pack import heldout_dir
from omnilong.data.shards import PackedShards
from omnilong.models.loading import load_model
from omnilong.train.batches import collate
from omnilong.train.training_module import TrainingModule, model_inputs


@torch.no_grad()
def heldout_loss(params: Params, module: TrainingModule, stage: str) -> dict[str, float]:
    dataset = PackedShards(heldout_dir(Path(params.data.packed_dir) / stage))
    loss_sum = tokens = 0.0
    for row in dataset:
        batch = collate([row], family=params.model.family, model_config=module.model.config,
                        video_params=params.model.video)
        row_loss, row_tokens = module(**model_inputs(batch, params.model.family))
        loss_sum += float(row_loss)
        tokens += float(row_tokens)
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def evaluate_models(params: Params, models: dict[str, Path]) -> dict[str, dict[str, dict[str, float]]]:
    """{model label: {stage: {loss, perplexity, tokens}}} for every model on every stage."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for label in tqdm(models, desc="held-out loss", unit="model"):
        model = load_model(models[label], dtype=torch.float32).eval()
        # Each stage has its own loss settings; the model is loaded once for all of them.
        results[label] = {
            stage: heldout_loss(params, TrainingModule(model, params.model.family, params.stages[stage].loss, params.model.video), stage)
            for stage in STAGE_NAMES
        }
    return results
