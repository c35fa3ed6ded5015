"""Answer a chat, with or without a video, with any model the pipeline produced.

The prompt is the one training saw: the family's chat template (with the video before the
first user turn's text) and the generation prompt, the video placeholder expanded to the
clip's token count. Frames are sampled and decoded as in training (omnilong/data/video_frames.py),
and the video enters the decoder through the same embedding path (omnilong/parallel/vision.py),
so LLaVA-OneVision's configurable pooling and Qwen2.5-VL's mRoPE ids (computed on the whole
prompt) are those of training. Decoding is greedy, with the model's KV cache.

Given a sequence-parallel group of P > 1 ranks, the prompt is prefilled as training runs a row
(omnilong/infer/prefill.py): each rank encodes its share of the video's frames and runs the
decoder on its zigzag shard with ring attention; the group's first rank decodes the answer from
the gathered cache and every rank returns it. Every rank of the group makes the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import DynamicCache

from omnilong.config import Family, RingBackend, VideoTokenParams
from omnilong.data.prepare import template_messages
from omnilong.data.schemas import Message
from omnilong.data.shards import VideoClip
from omnilong.data.video_frames import sample_frames, video_info
from omnilong.eval.answering import Question
from omnilong.infer.prefill import PromptSplit, from_first_rank
from omnilong.models.families import family_for_config, get_family
from omnilong.models.loading import load_model, load_tokenizer
from omnilong.models.positions import next_text_position, position_ids_for_document
from omnilong.models.video_inputs import seconds_per_grid, video_grid_thw, video_span
from omnilong.parallel.hf_adapter import register_ring_attention
from omnilong.parallel.vision import NOT_VIDEO, VideoShard, split_frames, video_sources
from omnilong.train.batches import load_video_pieces, video_token_id
from omnilong.train.training_module import language_model_positions


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt with its video (if any) preprocessed, ready for prefill."""

    input_ids: torch.Tensor  # [L]
    position_ids: torch.Tensor  # [L], or [3, L] for Qwen2.5-VL
    video: VideoShard | None
    """This rank's frames, and the video sources of its tokens (its shard's, under a group)."""


@dataclass(frozen=True)
class Prefill:
    """What greedy decoding starts from: the prompt's cache and the logits after its last token."""

    cache: DynamicCache | None
    """Every layer's keys and values of the whole prompt; None on a group's other ranks."""
    logits: torch.Tensor  # [vocab]
    length: int
    next_position: int
    """The answer's first position (mRoPE's three alike): `next_text_position` of the prompt's,
    where training's document puts the answer after the same prompt."""


class ModelAnswerer:
    """An `Answerer` backed by a model directory (HF format, as every stage exports)."""

    def __init__(self, model_dir: str | Path, video: VideoTokenParams, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, sp_group: dist.ProcessGroup | None = None,
                 ring_backend: RingBackend = "torch"):
        """`device` None: the first GPU when there is one, else the CPU. `sp_group` (every rank
        of it builds an answerer and asks the same questions): prefill sequence-parallel over it,
        with `ring_backend` (`parallel.ring_attention`)."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(model_dir, dtype=dtype).to(self.device).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.family: Family = family_for_config(self.model.config).name
        self.video = video
        stop = self.model.generation_config.eos_token_id
        self.stop_ids = {*(stop if isinstance(stop, list) else [stop] if stop is not None else []),
                         *([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])}
        self.sp_group = sp_group if sp_group is not None and dist.get_world_size(sp_group) > 1 else None
        self.ring_backend = ring_backend
        if self.sp_group is not None:
            register_ring_attention()

    def split(self, length: int) -> PromptSplit | None:
        """How a prompt of `length` tokens is shared by the group; None without one."""
        return None if self.sp_group is None else PromptSplit.over(length, self.sp_group, self.ring_backend)

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
        """The question's prompt; under a group, with this rank's share of the frames only."""
        ids = self.chat_ids(question.messages, with_video=question.video is not None)
        if question.video is None:
            input_ids = torch.tensor(ids)
            return Prompt(input_ids, position_ids_for_document(self.model.config, input_ids), None)
        config, query = self.model.config, question.video
        info = video_info(query.path)
        sample = sample_frames(info, query.sampling, query.start_s, query.end_s)
        span = video_span(self.family, config, self.video, len(sample.indices), info.height, info.width)
        input_ids = self.expand_video(ids, span.num_tokens)
        grid = seconds = None
        if self.family == "qwen2_5_vl":  # what preprocess_video gives, known before decoding
            grid = torch.tensor([video_grid_thw(config, self.video, len(sample.indices), info.height, info.width)])
            seconds = torch.tensor([seconds_per_grid(config, sample.sampled_fps)])
        positions = position_ids_for_document(config, input_ids, grid, seconds)
        token_id = video_token_id(self.family, config)
        clip = VideoClip(doc_id="prompt", path=str(query.path), frame_indices=sample.indices,
                         timestamps=sample.timestamps, fps=info.fps, sampled_fps=sample.sampled_fps,
                         height=info.height, width=info.width, token_offset=ids.index(token_id),
                         num_tokens=span.num_tokens)
        source = video_sources(input_ids[None], token_id, [span])
        split = self.split(len(input_ids))
        if split is None:
            frames = split_frames([span])
        else:
            frames = split_frames([span], split.layout.sp_size, split.rank)
            source = split.shard(source, dim=1, fill=NOT_VIDEO)
        pieces = load_video_pieces([clip], [span], frames, self.family, config, self.video)
        return Prompt(input_ids, positions, VideoShard(pieces, frames.tokens_per_rank, source, self.sp_group))

    def embeddings(self, prompt: Prompt) -> torch.Tensor:
        """[1, L, hidden] input embeddings of the prompt, its video merged in; under a group,
        [1, L_local, hidden] those of this rank's shard."""
        split = self.split(len(prompt.input_ids))
        input_ids = prompt.input_ids[None] if split is None else split.shard(prompt.input_ids[None], dim=1)
        input_ids = input_ids.to(self.device)
        if prompt.video is None:
            return self.model.get_input_embeddings()(input_ids)
        return prompt.video.to(self.device).embed(self.model, self.family, self.video, input_ids)

    def own_share(self, embeds: torch.Tensor) -> torch.Tensor:
        """This rank's share of a whole prompt's embeddings [1, L, hidden], as `embeddings` gives it."""
        split = self.split(embeds.shape[1])
        return embeds if split is None else split.shard(embeds, dim=1)

    @torch.no_grad()
    def answer(self, question: Question) -> str:
        prompt = self.prompt(question)
        tokens = self.decode(self.prefill(self.embeddings(prompt), prompt.position_ids), question.max_new_tokens)
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, position_ids: torch.Tensor, max_new_tokens: int,
                 stop_ids: set[int] | None = None) -> list[int]:
        """Greedy decoding after a prompt given as its whole embeddings [1, L, hidden] and its
        position ids ([L], or [3, L] for Qwen2.5-VL): the new token ids, up to a stop token
        (default: the model's end-of-turn and end-of-text tokens), which is not returned."""
        return self.decode(self.prefill(self.own_share(embeds), position_ids), max_new_tokens, stop_ids)

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> Prefill:
        """The prompt through the decoder: `embeds` as `embeddings` gives them (this rank's share
        under a group), `position_ids` the whole prompt's."""
        length = position_ids.shape[-1]
        next_position = next_text_position(position_ids)
        split = self.split(length)
        cache = DynamicCache(config=self.model.config)
        if split is None:
            positions = language_model_positions(self.family, position_ids.unsqueeze(-2), [[length]])
            hidden = self.model.model(inputs_embeds=embeds, position_ids=positions.to(self.device), cache=cache,
                                      use_cache=True).last_hidden_state
            return Prefill(cache, self.model.lm_head(hidden[0, -1]), length, next_position)
        hidden = split.decoder(self.model, embeds, split.positions(self.family, position_ids), cache)
        last = split.rows(hidden[0], length - 1, length)[0]
        return Prefill(split.gather_cache(cache, self.model.config), self.model.lm_head(last), length, next_position)

    @torch.no_grad()
    def decode(self, prefill: Prefill, max_new_tokens: int, stop_ids: set[int] | None = None) -> list[int]:
        """Greedy decoding from `prefill` (see `generate`); under a group, by its first rank,
        whose tokens every rank returns."""
        stop_ids = self.stop_ids if stop_ids is None else stop_ids
        split = self.split(prefill.length)
        if split is None:
            return self._greedy(prefill, max_new_tokens, stop_ids)
        return from_first_rank(self._greedy(prefill, max_new_tokens, stop_ids) if split.is_first else None, split.group)

    def _greedy(self, prefill: Prefill, max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        logits, cache, length = prefill.logits, prefill.cache, prefill.length
        new_tokens: list[int] = []
        for step in range(max_new_tokens):
            token = int(logits.argmax())
            if token in stop_ids:
                break
            new_tokens.append(token)
            if len(new_tokens) == max_new_tokens:
                break
            embeds = self.model.get_input_embeddings()(torch.tensor([[token]], device=self.device))
            position = torch.tensor([[prefill.next_position + step]])
            positions = position if self.family == "llava_onevision" else \
                torch.cat([torch.tensor([[[length + step]]]), position.expand(3, 1, 1)])
            hidden = self.model.model(inputs_embeds=embeds, position_ids=positions.to(self.device), cache=cache,
                                      use_cache=True).last_hidden_state
            logits = self.model.lm_head(hidden[0, -1])
        return new_tokens

    @torch.no_grad()
    def teacher_forced_argmax(self, embeds: torch.Tensor, position_ids: torch.Tensor, answer_ids: list[int]) -> list[int]:
        """The model's argmax at each answer position when the prompt and the answer are fed
        whole (LongVA's V-NIAH scoring: every one must equal the answer's token); `embeds` the
        whole prompt's, on every rank of a group."""
        answer = torch.tensor([answer_ids], device=self.device)
        full = torch.cat([embeds, self.model.get_input_embeddings()(answer)], dim=1)
        next_position = next_text_position(position_ids)
        answer_positions = torch.arange(next_position, next_position + len(answer_ids))
        if position_ids.dim() == 2:
            answer_positions = answer_positions.expand(3, -1)
        positions = torch.cat([position_ids, answer_positions], dim=-1)
        # The token at position i predicts i + 1: the answer's tokens are predicted from the
        # last prompt position through the second-to-last answer position.
        start = embeds.shape[1] - 1
        split = self.split(full.shape[1])
        if split is None:
            kwargs = language_model_positions(self.family, positions.unsqueeze(-2), [[full.shape[1]]])
            hidden = self.model.model(inputs_embeds=full, position_ids=kwargs.to(self.device),
                                      use_cache=False).last_hidden_state[0, start : start + len(answer_ids)]
        else:
            local = split.decoder(self.model, split.shard(full, dim=1), split.positions(self.family, positions))
            hidden = split.rows(local[0], start, start + len(answer_ids))
        return self.model.lm_head(hidden).argmax(-1).tolist()
