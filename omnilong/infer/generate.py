"""Answer a chat, with or without a video, with any model the pipeline produced.

The prompt is the one training saw: the family's chat template (with the video before the
first user turn's text) and the generation prompt, the video placeholder expanded to the
clip's token count. Frames are sampled and decoded as in training (omnilong/data/video_frames.py),
and the video enters the decoder through the same embedding path (omnilong/parallel/vision.py,
one rank), so LLaVA-OneVision's configurable pooling and Qwen2.5-VL's mRoPE ids (computed on the
whole prompt) are those of training. Decoding is greedy, with the model's KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from omnilong.config import Family, VideoTokenParams
from omnilong.data.prepare import template_messages
from omnilong.data.schemas import Message
from omnilong.data.video_frames import read_frames, sample_frames, video_info
from omnilong.eval.answering import Question
from omnilong.models.families import family_for_config, get_family
from omnilong.models.loading import load_model, load_tokenizer
from omnilong.models.positions import position_ids_for_document
from omnilong.models.video_inputs import VideoSpan, frame_size, preprocess_video, video_span
from omnilong.parallel.vision import VideoShard, split_frames, video_sources
from omnilong.train.batches import video_token_id
from omnilong.train.training_module import language_model_positions


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt with its video (if any) preprocessed, ready for prefill."""

    input_ids: torch.Tensor  # [L]
    position_ids: torch.Tensor  # [L], or [3, L] for Qwen2.5-VL
    video: VideoShard | None


class ModelAnswerer:
    """An `Answerer` backed by a model directory (HF format, as every stage exports)."""

    def __init__(self, model_dir: str | Path, video: VideoTokenParams, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        """`device` None: the first GPU when there is one, else the CPU."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(model_dir, dtype=dtype).to(self.device).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.family: Family = family_for_config(self.model.config).name
        self.video = video
        stop = self.model.generation_config.eos_token_id
        self.stop_ids = {*(stop if isinstance(stop, list) else [stop] if stop is not None else []),
                         *([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])}

    def chat_ids(self, messages: list[dict[str, str]], with_video: bool) -> list[int]:
        """The chat in the family's template with the generation prompt, tokenised; with one
        video placeholder before the first user turn's text when `with_video`."""
        rendered = self.tokenizer.apply_chat_template(
            template_messages([Message(**message) for message in messages], with_video=with_video),
            tokenize=False, add_generation_prompt=True,
        )
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    def expand_video(self, ids: list[int], num_tokens: int) -> torch.Tensor:
        """[L] the prompt with its one video placeholder repeated for the video's `num_tokens`."""
        placeholder = video_token_id(self.family, self.model.config)
        if ids.count(placeholder) != 1:
            raise ValueError(
                f"{get_family(self.family).video_token!r}: expected the rendered prompt to hold the video "
                f"placeholder once, found {ids.count(placeholder)} (does the question's text contain it?)"
            )
        at = ids.index(placeholder)
        return torch.tensor(ids[:at] + [placeholder] * num_tokens + ids[at + 1 :])

    def prompt(self, question: Question) -> Prompt:
        ids = self.chat_ids(question.messages, with_video=question.video is not None)
        if question.video is None:
            input_ids = torch.tensor(ids)
            return Prompt(input_ids, position_ids_for_document(self.model.config, input_ids), None)
        config, query = self.model.config, question.video
        info = video_info(query.path)
        sample = sample_frames(info, query.sampling, query.start_s, query.end_s)
        span: VideoSpan = video_span(self.family, config, self.video, len(sample.indices), info.height, info.width)
        frames = read_frames(query.path, sample.indices,
                             size=frame_size(self.family, config, self.video, info.height, info.width))
        inputs = preprocess_video(self.family, frames, config, self.video, fps=sample.sampled_fps)
        input_ids = self.expand_video(ids, span.num_tokens)
        positions = position_ids_for_document(config, input_ids, inputs.get("video_grid_thw"),
                                              inputs.get("second_per_grid_ts"))
        shard = VideoShard([inputs], split_frames([span]).tokens_per_rank,
                           video_sources(input_ids[None], video_token_id(self.family, config), [span]))
        return Prompt(input_ids, positions, shard)

    def embeddings(self, prompt: Prompt) -> torch.Tensor:
        """[1, L, hidden] input embeddings of the prompt, its video merged in."""
        input_ids = prompt.input_ids[None].to(self.device)
        if prompt.video is None:
            return self.model.get_input_embeddings()(input_ids)
        return prompt.video.to(self.device).embed(self.model, self.family, self.video, input_ids)

    @torch.no_grad()
    def answer(self, question: Question) -> str:
        prompt = self.prompt(question)
        tokens = self.generate(self.embeddings(prompt), prompt.position_ids, question.max_new_tokens)
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, position_ids: torch.Tensor, max_new_tokens: int,
                 stop_ids: set[int] | None = None) -> list[int]:
        """Greedy decoding after a prompt given as embeddings [1, L, hidden] and its position ids
        ([L], or [3, L] for Qwen2.5-VL): the new token ids, up to a stop token (default: the
        model's end-of-turn and end-of-text tokens), which is not returned."""
        from transformers import DynamicCache

        stop_ids = self.stop_ids if stop_ids is None else stop_ids
        length = embeds.shape[1]
        positions = language_model_positions(self.family, position_ids.unsqueeze(-2), [[length]])
        cache = DynamicCache(config=self.model.config)
        # After the prompt, every position index (mRoPE's three alike) continues from its largest.
        next_position = int(position_ids.max()) + 1
        new_tokens: list[int] = []
        for step in range(max_new_tokens):
            hidden = self.model.model(inputs_embeds=embeds, position_ids=positions.to(self.device), cache=cache,
                                      use_cache=True).last_hidden_state
            token = int(self.model.lm_head(hidden[0, -1]).argmax())
            if token in stop_ids:
                break
            new_tokens.append(token)
            embeds = self.model.get_input_embeddings()(torch.tensor([[token]], device=self.device))
            position = torch.tensor([[next_position + step]])
            positions = position if self.family == "llava_onevision" else \
                torch.cat([torch.tensor([[[length + step]]]), position.expand(3, 1, 1)])
        return new_tokens

    @torch.no_grad()
    def teacher_forced_argmax(self, embeds: torch.Tensor, position_ids: torch.Tensor, answer_ids: list[int]) -> list[int]:
        """The model's argmax at each answer position when the prompt and the answer are fed
        whole (LongVA's V-NIAH scoring: every one must equal the answer's token)."""
        answer = torch.tensor([answer_ids], device=self.device)
        full = torch.cat([embeds, self.model.get_input_embeddings()(answer)], dim=1)
        next_position = int(position_ids.max()) + 1
        answer_positions = torch.arange(next_position, next_position + len(answer_ids))
        if position_ids.dim() == 2:
            answer_positions = answer_positions.expand(3, -1)
        positions = torch.cat([position_ids, answer_positions], dim=-1)
        kwargs = language_model_positions(self.family, positions.unsqueeze(-2), [[full.shape[1]]])
        hidden = self.model.model(inputs_embeds=full, position_ids=kwargs.to(self.device), use_cache=False).last_hidden_state
        # The token at position i predicts i + 1: the answer's tokens are predicted from the
        # last prompt position through the second-to-last answer position.
        start = embeds.shape[1] - 1
        return self.model.lm_head(hidden[0, start : start + len(answer_ids)]).argmax(-1).tolist()
