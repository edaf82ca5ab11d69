"""The CLIPN model: a frozen open_clip CLIP plus a trainable "no" text tower (the ``nn.Module`` only).

Facts from the official CLIPN code (xmed-lab/CLIPN, commit e465074): the no tower is a full copy of the text
tower (``transformer_no``, ``token_embedding_no``, ``positional_embedding_no``, ``ln_final_no``,
``text_projection_no``) initialised from the yes tower; the learnable variant adds one of 16 zero-initialised
prompts ``prompt_no`` (16, context, width) element-wise to the no tower's token + positional embedding (training
draws one of 17 options per sample: a prompt or their mean; evaluation uses the mean). The attribute names are
the official ones so an official checkpoint maps onto :meth:`CLIPN.trainable_state_dict` one to one.

Building a model from names and files (base weights, checkpoints, tokenizer, transforms) is
:mod:`clipn_train.factory`'s job: this module imports neither it nor :mod:`clipn_train.checkpoint`, so the
checkpoint code can depend on the model without a cycle (the layout of open_clip's ``model``/``factory``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

from clipn_runtime.errors import UserError

VARIANTS: tuple[str, ...] = ("learnable", "handcrafted")
#: Number of learnable "no" prompts in the official model.
NUM_PROMPTS = 16
#: The official CLIP clamp of exp(logit_scale) (ln 100).
MAX_SCALE = 100.0

SUPPORTED_MODELS_HINT = (
    "clipn-ood supports open_clip models built as open_clip.CLIP with the built-in text transformer "
    "(e.g. ViT-B-16, ViT-B-32, ViT-L-14, ViT-H-14, RN50, convnext_base, or a model-config JSON of that kind)"
)


@dataclass(frozen=True)
class TextTower:
    """The parts of one text tower; the yes and the no tower differ only in which tensors fill these slots."""

    token_embedding: nn.Embedding
    positional_embedding: Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: Tensor | nn.Module | None
    attn_mask: Tensor | None
    pool_type: str
    eos_id: int | None


def text_forward(tower: TextTower, tokens: Tensor, extra_embedding: Tensor | None = None) -> Tensor:
    """open_clip's ``CLIP.encode_text`` (unnormalised) for any context length L ≤ the model's.

    ``extra_embedding`` (B or 1, ≥L, width) is added to the token + positional embedding (CLIPN's "no" prompt).
    Cutting the context to the longest prompt is exact for argmax/eos pooling with a causal mask: no position
    attends to a later one, and pooling reads the EOT position, which is kept.
    """
    length = tokens.shape[1]
    if length > tower.positional_embedding.shape[0]:
        raise ValueError(f"{length} tokens exceed the context length {tower.positional_embedding.shape[0]}")
    cast_dtype = tower.transformer.get_cast_dtype()  # type: ignore[operator]
    x = tower.token_embedding(tokens).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    if extra_embedding is not None:
        x = x + extra_embedding[:, :length].to(cast_dtype)
    mask = None if tower.attn_mask is None else tower.attn_mask[:length, :length]
    x = tower.transformer(x, attn_mask=mask)
    x = tower.ln_final(x)
    x = text_global_pool(x, tokens, tower.pool_type, eos_token_id=tower.eos_id)
    if isinstance(tower.text_projection, nn.Linear):
        x = tower.text_projection(x)
    elif tower.text_projection is not None:
        x = x @ tower.text_projection
    return x


def _unit(x: Tensor) -> Tensor:
    # Normalised in fp32 even under autocast: bf16 unit vectors can have dot products above 1, which the
    # TSO term's sqrt(2 - 2<g, g_no>) turns into NaN.
    return F.normalize(x.float(), dim=-1)


class CLIPN(nn.Module):
    """A frozen open_clip CLIP (image tower, yes text tower, logit scale) plus the trainable CLIPN no tower."""

    def __init__(self, clip: CLIP, variant: str = "learnable", num_prompts: int = NUM_PROMPTS) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise UserError(f"unknown CLIPN variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if not isinstance(clip, CLIP):
            raise UserError(f"{type(clip).__name__} is not supported. {SUPPORTED_MODELS_HINT}")
        self.clip = clip
        self.variant = variant
        self.clip.requires_grad_(False)
        self.clip.eval()
        # The no tower starts as an exact copy of the yes tower (official initialisation).
        self.transformer_no = copy.deepcopy(clip.transformer)
        self.token_embedding_no = copy.deepcopy(clip.token_embedding)
        self.positional_embedding_no = nn.Parameter(clip.positional_embedding.detach().clone())
        self.ln_final_no = copy.deepcopy(clip.ln_final)
        if isinstance(clip.text_projection, nn.Module):
            self.text_projection_no: nn.Module | nn.Parameter | None = copy.deepcopy(clip.text_projection)
        elif clip.text_projection is not None:
            self.text_projection_no = nn.Parameter(clip.text_projection.detach().clone())
        else:
            self.text_projection_no = None
        self.prompt_no: nn.Parameter | None = None
        if variant == "learnable":
            self.prompt_no = nn.Parameter(torch.zeros(num_prompts, self.context_length, self.width))
        for p in self.trainable_parameters():
            p.requires_grad_(True)

    # -- shape facts ------------------------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return int(self.clip.context_length)

    @property
    def width(self) -> int:
        return int(self.clip.transformer.width)

    @property
    def embed_dim(self) -> int:
        proj = self.clip.text_projection
        if isinstance(proj, nn.Linear):
            return int(proj.out_features)
        if proj is None:
            return self.width
        return int(proj.shape[1])

    @property
    def num_prompts(self) -> int:
        return 0 if self.prompt_no is None else int(self.prompt_no.shape[0])

    @property
    def scale(self) -> float:
        """exp(logit_scale) of the base CLIP, clamped at 100 as open_clip trains it (100 for released CLIPN)."""
        return float(self.clip.logit_scale.detach().float().exp().clamp(max=MAX_SCALE).reshape(-1)[0])

    @property
    def truncation_is_exact(self) -> bool:
        """Whether encoding at a context shorter than ``context_length`` gives the full-context result."""
        return self.clip.attn_mask is not None and self.clip.text_pool_type in ("argmax", "eos")

    def needed_context(self, tokens: Tensor) -> int:
        """The shortest context that encodes ``tokens`` exactly: up to the pooled (EOT) position of the longest.

        The full context when cutting is not exact for this model (no causal mask, or 'first'/'last' pooling).
        """
        if not self.truncation_is_exact:
            return int(tokens.shape[1])
        if self.clip.text_pool_type == "argmax":
            pooled = tokens.argmax(dim=-1)
        else:
            pooled = (tokens == self.clip.text_eos_id).int().argmax(dim=-1)
        return int(pooled.max()) + 1

    # -- modes and parameters ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> CLIPN:
        super().train(mode)
        # The frozen base always runs as at inference (no patch dropout, frozen BatchNorm statistics).
        self.clip.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("clip.")]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The no-tower tensors under their official names (what a CLIPN checkpoint holds)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    # -- towers -----------------------------------------------------------------------------------------------
    def _tower(self, no: bool) -> TextTower:
        c = self.clip
        return TextTower(
            token_embedding=self.token_embedding_no if no else c.token_embedding,
            positional_embedding=self.positional_embedding_no if no else c.positional_embedding,
            transformer=self.transformer_no if no else c.transformer,
            ln_final=self.ln_final_no if no else c.ln_final,
            text_projection=self.text_projection_no if no else c.text_projection,
            attn_mask=c.attn_mask,
            pool_type=c.text_pool_type,
            eos_id=getattr(c, "text_eos_id", None),
        )

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        x = self.clip.encode_image(images)
        return _unit(x) if normalize else x

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        """The (frozen) yes tower; ``tokens`` may be cut to any length ≤ ``context_length``."""
        x = text_forward(self._tower(no=False), tokens)
        return _unit(x) if normalize else x

    def prompt_options(self) -> Tensor:
        """The 17 additive prompts a sample can receive: the 16 learned ones, then their mean (index 16)."""
        if self.prompt_no is None:
            raise ValueError("the hand-crafted variant has no learnable prompts")
        return torch.cat([self.prompt_no, self.prompt_no.mean(dim=0, keepdim=True)], dim=0)

    def sample_prompt_index(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """One of the 17 options per sample, uniformly (the official training draw)."""
        return torch.randint(0, self.num_prompts + 1, (batch,), generator=generator)

    def encode_text_no(self, tokens: Tensor, normalize: bool = True, prompt_index: Tensor | None = None) -> Tensor:
        """The no tower. ``prompt_index`` (B,) in [0, 16] picks a learned prompt (16 = their mean).

        ``None``: in training mode a random draw per sample, in eval mode the mean prompt (official inference).
        """
        extra = None
        if self.prompt_no is not None:
            if prompt_index is None and self.training:
                prompt_index = self.sample_prompt_index(tokens.shape[0])
            if prompt_index is None:
                extra = self.prompt_no.mean(dim=0, keepdim=True)
            else:
                extra = self.prompt_options()[prompt_index.to(self.prompt_no.device)]
        elif prompt_index is not None:
            raise ValueError("prompt_index given, but the hand-crafted variant has no learnable prompts")
        x = text_forward(self._tower(no=True), tokens, extra)
        return _unit(x) if normalize else x

    def forward(
        self,
        images: Tensor | None = None,
        tokens: Tensor | None = None,
        tokens_no: Tensor | None = None,
        prompt_index: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Normalised (image, yes-text, no-text) features; a part is ``None`` when its input is.

        The frozen towers run without autograd. Training goes through here so DDP sees one forward.
        """
        with torch.no_grad():
            image_features = None if images is None else self.encode_image(images)
            text_features = None if tokens is None else self.encode_text(tokens)
        text_features_no = None if tokens_no is None else self.encode_text_no(tokens_no, prompt_index=prompt_index)
        return image_features, text_features, text_features_no
