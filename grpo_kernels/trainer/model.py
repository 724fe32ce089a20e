"""Models and tokenizers for the trainer: the built-in tiny model, local HF directories, the LM head.

The built-in model is a small Llama (4 layers, hidden 64, 0.26M parameters) built from
``assets/config.json`` with random weights, and a character-level tokenizer shipped as
``assets/tokenizer.json``: nothing is ever downloaded. ``build_tokenizer`` is how that JSON was
made (a test checks the shipped file against it). The config's ``initializer_range`` is 0.1, not
the usual 0.02: with small weights every prompt looks alike at the answer position, GRPO's only
signal at first is which answer is right most often overall, and the policy collapses onto it
before it learns to read the prompt; larger random weights give prompt-specific features from
step one. Small is also what learns fastest here, per step and per second: at hidden 128 the
same recipe needs about twice the steps.

The trainer never calls the LM head: it runs the model body to get the final hidden states and
hands them, with the head's weight and bias, to the fused kernels. :class:`HeadSpec` carries what
the model does to its logits after the head GEMM (logit scaling, final-logit soft-capping), so
the kernels compute exactly the distribution ``generate`` samples from.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from torch import Tensor, nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel,
                          PreTrainedTokenizerBase)

ASSETS = Path(__file__).resolve().parent / "assets"

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Everything the arithmetic task writes: digits, the operators, the minus sign and "=".
CHARACTERS = "0123456789+-*="


def build_tokenizer() -> Tokenizer:
    """The built-in character-level tokenizer: one token per character, ``<bos>`` prepended.

    Vocabulary: the special tokens (ids 0-3), then :data:`CHARACTERS`. ``decode`` joins the
    characters without spaces.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return tok


def load_model_and_tokenizer(path: Optional[str], seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer, float32, from a local directory or (path None) the built-in tiny model.

    The built-in model's weights are drawn from ``torch.manual_seed(seed)``, so a seed names a model.
    Local directories are read with ``local_files_only``: nothing is fetched from a hub. Every load
    passes ``trust_remote_code=False``: a directory whose config or tokenizer points at its own
    Python code (``auto_map``) is refused, never run, and never prompts "run custom code? [y/N]".

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        ValueError: the directory asks to run its own code (the message says so).
    """
    if path is None:
        tokenizer = AutoTokenizer.from_pretrained(ASSETS, trust_remote_code=False)
        torch.manual_seed(seed)
        config = AutoConfig.from_pretrained(ASSETS, trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    else:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--model: {path!r} is not a directory (a local Hugging Face model directory is expected)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                         trust_remote_code=False)
        except ValueError as exc:
            if "trust_remote_code" not in str(exc):
                raise
            raise ValueError(f"--model: {path} asks to run its own Python code (auto_map in its config or tokenizer "
                             "config); grpo_kernels loads models with trust_remote_code=False, so only architectures "
                             "built into transformers can be trained") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Decoder-only generation appends to the right, so prompts are padded on the left.
    tokenizer.padding_side = "left"
    return model, tokenizer


@dataclass(frozen=True)
class HeadSpec:
    """How a model turns ``z = hidden @ W.T + b`` into its logits: ``softcap(multiplier * z)``.

    ``multiplier`` is Cohere's ``logit_scale`` or Granite's ``1 / logits_scaling`` (1.0 for most
    models); ``softcap`` is Gemma's ``final_logit_softcapping`` (None: off).
    """

    multiplier: float = 1.0
    softcap: Optional[float] = None

    @classmethod
    def of(cls, model: PreTrainedModel) -> "HeadSpec":
        cfg = model.config.get_text_config()
        multiplier = float(getattr(cfg, "logit_scale", None) or 1.0)
        scaling = getattr(cfg, "logits_scaling", None)
        if scaling:
            multiplier /= float(scaling)
        softcap = getattr(cfg, "final_logit_softcapping", None)
        return cls(multiplier, None if not softcap else float(softcap))

    def kernel_options(self, temperature: float) -> tuple[float, Optional[float]]:
        """(temperature, softcap) for the kernels, which compute ``softcap'(z / temperature')``.

        Sampling at temperature T draws from ``softcap_c(s z) / T``. Since
        ``c tanh(s z / c) / T = (c / T) tanh((z / (T / s)) / (c / T))``, that is the kernels'
        formula with temperature' = T / s and softcap' = c / T: exact, no approximation.
        """
        softcap = None if self.softcap is None else self.softcap / temperature
        return temperature / self.multiplier, softcap


def lm_head(model: PreTrainedModel) -> tuple[nn.Parameter, Optional[nn.Parameter]]:
    """The output projection's weight [V, D] and bias [V] (None when it has none).

    With tied embeddings the weight is the input embedding Parameter itself, so its gradient
    from the loss and from the embedding lookup accumulate in one place, as in the HF model.
    """
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no output embedding layer with a weight; it is not a causal LM")
    return head.weight, getattr(head, "bias", None)


def cache_kwargs(model: nn.Module, cache: DynamicCache) -> dict[str, object]:
    """The keyword that hands a KV cache to ``model``'s forward: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def completion_hidden(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                      group_size: int = 1) -> Tensor:
    """Final hidden states at the positions that predict the completion tokens.

    Args:
        input_ids: [B, P + T] left-padded prompts followed by completions.
        attention_mask: [B, P + T], 0 on padding.
        prompt_len: P, the padded prompt length.
        group_size: G; when rows ``i*G .. i*G+G-1`` share their prompt (GRPO's groups), each prompt
            runs through the body once and its KV cache is shared by the group's completions. With
            short completions the prompts are most of the tokens (the main job: 7 prompt tokens, 1
            completion token run per row), so this is most of the forward and backward work.
            Rows that do not share prompts fall back to the full forward. Gradients flow through
            the shared cache to every completion, as in the full forward.

    Returns:
        [B, T, D]: row i, position t predicts ``input_ids[i, P + t]``.
    """
    # The position ids generate() used: count real tokens only, so left padding does not shift them.
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    B, P = input_ids.shape[0], prompt_len
    if group_size > 1 and B % group_size == 0 and _prompts_shared(input_ids[:, :P], attention_mask[:, :P], group_size):
        cache = DynamicCache(config=model.config)
        first = model.base_model(input_ids=input_ids[::group_size, :P], attention_mask=attention_mask[::group_size, :P],
                                 position_ids=positions[::group_size, :P], **cache_kwargs(model.base_model, cache))
        parts = [first.last_hidden_state[:, -1:].repeat_interleave(group_size, dim=0)]
        if input_ids.shape[1] > P + 1:
            cache.batch_repeat_interleave(group_size)
            rest = model.base_model(input_ids=input_ids[:, P:-1], attention_mask=attention_mask[:, :-1],
                                    position_ids=positions[:, P:-1], **cache_kwargs(model.base_model, cache))
            parts.append(rest.last_hidden_state)
        return torch.cat(parts, dim=1)
    # The last token predicts nothing we train on, so the body runs without it.
    out = model.base_model(
        input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=positions[:, :-1], use_cache=False
    )
    return out.last_hidden_state[:, prompt_len - 1 :]


def _prompts_shared(prompt_ids: Tensor, prompt_mask: Tensor, group_size: int) -> bool:
    """Whether every group of ``group_size`` consecutive rows holds one prompt (ids and padding)."""
    ids = prompt_ids.view(-1, group_size, prompt_ids.shape[1])
    mask = prompt_mask.view(-1, group_size, prompt_mask.shape[1])
    return bool((ids == ids[:, :1]).all() and (mask == mask[:, :1]).all())
