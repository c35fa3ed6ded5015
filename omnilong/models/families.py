"""What each supported model family is: its model class, tokens, chat template and pixel statistics.

Everything here mirrors what the family's published checkpoints carry, so code written against a
`FamilySpec` behaves the same on the tiny demo model and on real weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

if TYPE_CHECKING:  # the model classes import torch and transformers' modelling: only when a model is built
    from transformers import PretrainedConfig, PreTrainedModel

# Qwen2.5-VL's template: a default system turn, one <|vision_start|><|video_pad|><|vision_end|>
# placeholder per video part (expanded to the real token count later), text parts verbatim.
# All output goes through {{ }} so Jinja's whitespace trimming never eats a newline.
_QWEN2_5_VL_CHAT_TEMPLATE = (
    r"{% for message in messages %}"
    r"{% if loop.first and message['role'] != 'system' %}"
    r"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    r"{% endif %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' }}"
    r"{% if message['content'] is string %}"
    r"{{ message['content'] }}"
    r"{% else %}"
    r"{% for part in message['content'] %}"
    r"{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    r"{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    r"{% elif part['type'] == 'text' %}{{ part['text'] }}"
    r"{% else %}{{ raise_exception('unknown content part type: ' ~ part['type']) }}"
    r"{% endif %}"
    r"{% endfor %}"
    r"{% endif %}"
    r"{{ '<|im_end|>\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# LLaVA-OneVision (qwen2)'s template (llava-hf's): the role and a space, then all images, then all
# videos of the turn, then each text part on its own line. Its generation prompt has no space
# (`assistant\n`, ChatML as the original weights were trained); prepare trains answers after it.
_LLAVA_ONEVISION_CHAT_TEMPLATE = (
    r"{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + ' ' }}"
    r"{% if message['content'] is string %}"
    r"{{ '\n' + message['content'] }}"
    r"{% else %}"
    r"{% for part in message['content'] %}"
    r"{% if part['type'] not in ['image', 'video', 'text'] %}"
    r"{{ raise_exception('unknown content part type: ' ~ part['type']) }}"
    r"{% endif %}"
    r"{% endfor %}"
    r"{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    r"{% for part in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    r"{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
    r"{{ '\n' + part['text'] }}"
    r"{% endfor %}"
    r"{% endif %}"
    r"{{ '<|im_end|>\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_type: str
    """`model_type` in the family's config.json."""
    model_class_name: str
    """The transformers class of the whole model (`model_class`)."""
    special_tokens: tuple[str, ...]
    """Special tokens of the family's real tokenizer, in their id order."""
    eos_token: str
    pad_token: str
    image_token: str
    video_token: str
    """The placeholder repeated once per visual token of a video in `input_ids`."""
    chat_template: str
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    """Normalisation the family's vision tower was trained with (after rescaling to [0, 1])."""
    vision_start_token: str | None = None
    vision_end_token: str | None = None

    @property
    def model_class(self) -> type[PreTrainedModel]:
        import transformers

        return getattr(transformers, self.model_class_name)

    def expand_video_placeholder(self, text: str, num_tokens: int) -> str:
        """Repeat the single video placeholder of a rendered chat `num_tokens` times.

        The chat template writes one placeholder per video; the model needs one per visual
        token (see `video_inputs.num_video_tokens`).
        """
        found = text.count(self.video_token)
        if found != 1:
            raise ValueError(
                f"{self.name}: expected exactly one {self.video_token!r} in the rendered chat, found {found}"
            )
        if num_tokens < 1:
            raise ValueError(f"{self.name}: num_tokens must be positive, given {num_tokens}")
        return text.replace(self.video_token, self.video_token * num_tokens)


FAMILIES: dict[str, FamilySpec] = {
    "qwen2_5_vl": FamilySpec(
        name="qwen2_5_vl",
        model_type="qwen2_5_vl",
        model_class_name="Qwen2_5_VLForConditionalGeneration",
        special_tokens=(
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
        chat_template=_QWEN2_5_VL_CHAT_TEMPLATE,
        pixel_mean=tuple(OPENAI_CLIP_MEAN),
        pixel_std=tuple(OPENAI_CLIP_STD),
    ),
    "llava_onevision": FamilySpec(
        name="llava_onevision",
        model_type="llava_onevision",
        model_class_name="LlavaOnevisionForConditionalGeneration",
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        image_token="<image>",
        video_token="<video>",
        chat_template=_LLAVA_ONEVISION_CHAT_TEMPLATE,
        # SigLIP's statistics, as in llava-onevision-qwen2's preprocessor_config.json.
        pixel_mean=(0.5, 0.5, 0.5),
        pixel_std=(0.5, 0.5, 0.5),
    ),
}


def get_family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}") from None


def family_for_config(config: PretrainedConfig) -> FamilySpec:
    """The family of a loaded config.json, by its `model_type`."""
    for spec in FAMILIES.values():
        if spec.model_type == config.model_type:
            return spec
    raise ValueError(
        f"unsupported model_type {config.model_type!r} in config.json; expected one of "
        f"{sorted(spec.model_type for spec in FAMILIES.values())}"
    )
