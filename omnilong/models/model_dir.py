"""`model.path` checked against the parameters before any work: the family, the files, the
tokenizer's special tokens, the LoRA targets and the room each video phase has for its frames,
each failure naming the key and what was expected.

A model directory of the wrong family or without its special tokens would otherwise tokenise a
whole corpus wrongly, or fail deep inside a training stage; a LoRA target that matches nothing
would only fail once every rank had built its engine.
"""

from __future__ import annotations

import json
from pathlib import Path

from omnilong.config import STAGE_NAMES, ConfigError, Params

# Files every model directory we load holds besides its weights (transformers' own names).
NEEDED_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json")
WEIGHTS_INDEX = "model.safetensors.index.json"


def check_model_dir(params: Params, base: Path = Path(".")) -> None:
    """Raise ConfigError unless `model.path` is a complete model of `model.family` that the
    stages' LoRA targets fit. `base`: where relative paths start (the params file's folder)."""
    model_dir = base / params.model.path
    given = f"given {params.model.path!r}"
    missing = [name for name in NEEDED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise ConfigError(f"model.path: expected a complete model directory, {given}: {', '.join(missing)} "
                          f"missing from {model_dir}")
    _check_weights(model_dir, given)
    from omnilong.models.families import get_family  # imports transformers: after the file checks

    family = get_family(params.model.family)
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    if model_type != family.model_type:
        raise ConfigError(
            f"model.path: expected a {family.name} model (model_type {family.model_type!r} in config.json), "
            f"{given}, whose config.json says model_type {model_type!r}; set model.family to the model's family or "
            "point model.path at a model of this one"
        )
    vocabulary = _vocabulary(model_dir)
    lacking = [token for token in family.special_tokens if token not in vocabulary]
    if lacking:
        raise ConfigError(f"model.path: expected a tokenizer with the {family.name} special tokens, {given}: "
                          f"its tokenizer lacks {', '.join(lacking)}")
    _check_lora_targets(params, model_dir)
    _check_frames_fit(params, model_dir)


def _check_weights(model_dir: Path, given: str) -> None:
    """Safetensors only: a pickled checkpoint (`pytorch_model.bin`) could run code when loaded."""
    index = model_dir / WEIGHTS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [shard for shard in shards if not (model_dir / shard).is_file()]
        if absent:
            raise ConfigError(f"model.path: {given}: {WEIGHTS_INDEX} lists weight files missing from {model_dir}: "
                              f"{', '.join(absent)}")
    elif not (model_dir / "model.safetensors").is_file():
        pickled = sorted(path.name for pattern in ("*.bin", "*.pt", "*.pth") for path in model_dir.glob(pattern))
        found = f"; found only {', '.join(pickled)}, which OmniLong does not load (pickle)" if pickled else ""
        raise ConfigError(f"model.path: expected weights as model.safetensors or {WEIGHTS_INDEX} and its shards, "
                          f"{given}: none in {model_dir}{found}")


def _vocabulary(model_dir: Path) -> dict[str, int]:
    """The tokenizer's tokens, added ones included; from tokenizer.json alone when there is one
    (the `tokenizers` library reads it in milliseconds), else as transformers loads it."""
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)
    from omnilong.models.loading import load_tokenizer

    return load_tokenizer(model_dir).get_vocab()


def _check_lora_targets(params: Params, model_dir: Path) -> None:
    lora_stages = [name for name in STAGE_NAMES if params.stages[name].train.finetune == "lora"]
    if not lora_stages:
        return
    from omnilong.models.lora_targets import target_pattern, targetable_module_names

    names = targetable_module_names(model_dir)
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    for stage in lora_stages:
        lora = params.stages[stage].train.lora
        for position, target in enumerate(lora.target_modules):
            pattern = target_pattern([target])
            if not any(pattern.fullmatch(name) for name in names):
                raise ConfigError(
                    f"stages.{stage}.train.lora.target_modules.{position}: {target!r} matches no module of the "
                    f"language model in {params.model.path}; expected one of {', '.join(suffixes)}"
                )


def _check_frames_fit(params: Params, model_dir: Path) -> None:
    """Each phase of a video stage has room for its frames, at the fewest tokens a frame can take
    (the smallest frame `model.video` allows); the packer checks each video's exact count."""
    from transformers import AutoConfig

    from omnilong.models.video_inputs import fewest_video_tokens  # imports transformers

    model_config = None
    for name in STAGE_NAMES:
        stage = params.stages[name]
        phases = [(f"stages.{name}.context_schedule.{i}", entry.seq_len, entry.video_frames or stage.video_frames)
                  for i, entry in enumerate(stage.context_schedule)] or [(f"stages.{name}", stage.seq_len,
                                                                          stage.video_frames)]
        for field, seq_len, sampling in phases:
            if sampling is None or sampling.most_frames is None:
                continue
            model_config = model_config or AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
            tokens = fewest_video_tokens(params.model.family, model_config, params.model.video, sampling.most_frames)
            if tokens > seq_len:
                raise ConfigError(
                    f"{field}.seq_len: expected room for {sampling.most_frames} frames ({sampling.name}), which take "
                    f"at least {tokens} video tokens with model.video's settings, given {seq_len}; raise seq_len "
                    f"or sample fewer frames"
                )
