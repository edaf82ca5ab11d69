"""The CLIPN model: a frozen open_clip CLIP plus a trainable "no" text tower, and how to build one.

Facts from the official CLIPN code (xmed-lab/CLIPN, commit e465074; see ../shared/DESIGN.md §4): the no
tower is a full copy of the text tower (``transformer_no``, ``token_embedding_no``, ``positional_embedding_no``,
``ln_final_no``, ``text_projection_no``) initialised from the yes tower; the learnable variant adds one of 16
zero-initialised prompts ``prompt_no`` (16, context, width) element-wise to the no tower's token + positional
embedding (training draws one of 17 options per sample: a prompt or their mean; evaluation uses the mean). The
attribute names are the official ones so an official checkpoint maps onto :meth:`CLIPN.trainable_state_dict`
one to one.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

from clipn_runtime.errors import InputFileError, UserError
from clipn_train import checkpoint as ckpt

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """Where a CLIPN model came from and how its images must be preprocessed (goes into manifests and logs)."""

    model_name: str
    model_config: dict[str, Any]
    pretrained: str | None
    weights_sha256: str | None
    checkpoint_sha256: str | None
    checkpoint_kind: str | None
    variant: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    resize_mode: str
    context_length: int


@dataclass
class LoadedCLIPN:
    model: CLIPN
    tokenizer: Any
    preprocess_train: Any
    preprocess_val: Any
    info: ModelInfo
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)


def _check_supported(name: str, cfg: dict[str, Any]) -> None:
    text_cfg = cfg.get("text_cfg", {})
    reason = None
    if "multimodal_cfg" in cfg:
        reason = "it is a CoCa model (captioning decoder)"
    elif isinstance(text_cfg, dict) and text_cfg.get("hf_model_name"):
        reason = f"its text tower is the Hugging Face model {text_cfg['hf_model_name']!r}"
    elif cfg.get("custom_text"):
        reason = "it uses a custom text tower (CustomTextCLIP, e.g. SigLIP, MobileCLIP, EVA)"
    if reason:
        raise UserError(f"--model {name}: not supported because {reason}. {SUPPORTED_MODELS_HINT}.")


def resolve_model_config(model: str | Path) -> tuple[str, dict[str, Any]]:
    """An open_clip model name or a path to an open_clip model-config JSON → (name, config dict).

    A JSON may be a bare model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) or open_clip's
    ``open_clip_config.json`` layout (``model_cfg`` plus ``preprocess_cfg``, kept under ``"preprocess_cfg"``).
    """
    spec = str(model)
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        if not path.is_file():
            raise UserError(f"--model {spec}: no such model-config file")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputFileError(path, e.lineno, f"not valid JSON: {e.msg}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InputFileError(path, None, f"cannot read model config: {e}") from None
        if not isinstance(raw, dict):
            raise InputFileError(path, 1, "a model config must be a JSON object")
        cfg = dict(raw["model_cfg"]) if isinstance(raw.get("model_cfg"), dict) else dict(raw)
        if isinstance(raw.get("preprocess_cfg"), dict):
            cfg["preprocess_cfg"] = raw["preprocess_cfg"]
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise InputFileError(
                path,
                None,
                f"not an open_clip model config: missing {', '.join(missing)} (see open_clip's model_configs)",
            )
        name = path.stem
    else:
        found = open_clip.get_model_config(spec)
        if found is None:
            raise UserError(
                f"--model {spec}: not an open_clip model name nor a model-config JSON file. "
                "Run `python -c 'import open_clip; print(open_clip.list_models())'` for the names."
            )
        cfg, name = copy.deepcopy(found), spec
    _check_supported(name, cfg)
    return name, cfg


def _clip_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in ("preprocess_cfg", "custom_text")}


def _is_builtin(model: str | Path) -> bool:
    return open_clip.get_model_config(str(model)) is not None and not Path(str(model)).is_file()


def _build_base(
    model: str | Path, name: str, cfg: dict[str, Any], pretrained: str | Path | None
) -> tuple[CLIP, str | None, str | None]:
    """The base CLIP with its weights → (clip, open_clip tag or None, sha256 of a local weights file or None)."""
    tag: str | None = None
    sha: str | None = None
    if pretrained is not None and not Path(str(pretrained)).is_file():
        tag = str(pretrained)
        if not _is_builtin(model):
            raise UserError(
                f"--pretrained {tag}: not a file, and open_clip tags only exist for built-in model names "
                f"(--model {model} is a config file); pass a local weights file"
            )
        tags = open_clip.list_pretrained_tags_by_model(name)
        if tag not in tags:
            raise UserError(
                f"--pretrained {tag}: not a file and not an open_clip tag for {name} "
                f"(tags: {', '.join(tags) or 'none'})"
            )
        try:
            clip = open_clip.create_model(name, pretrained=tag)
        except RuntimeError as e:
            raise UserError(
                f"--pretrained {tag}: could not fetch the weights ({e}); on an offline machine pass "
                "a local weights file"
            ) from None
    else:
        clip = CLIP(**_clip_kwargs(cfg))
        pp = open_clip.transform.PreprocessCfg(size=clip.visual.image_size)
        pp_dict = {**pp.__dict__, **cfg.get("preprocess_cfg", {})}
        open_clip.model.set_model_preprocess_cfg(clip, pp_dict)
        if pretrained is not None:
            path = Path(str(pretrained))
            sha = ckpt.sha256_file(path)
            try:
                open_clip.load_checkpoint(clip, str(path), strict=True)
            except RuntimeError as e:
                raise UserError(f"--pretrained {path}: these weights do not fit --model {name}: {e}") from None
            except Exception as e:  # unreadable/corrupt files surface as many exception types
                raise UserError(f"--pretrained {path}: cannot read weights ({type(e).__name__}: {e})") from None
    if not isinstance(clip, CLIP):
        raise UserError(f"--model {name}: built {type(clip).__name__}. {SUPPORTED_MODELS_HINT}.")
    return clip, tag, sha


def _tokenizer(model: str | Path, name: str, cfg: dict[str, Any]) -> Any:
    if _is_builtin(model):
        return open_clip.get_tokenizer(name)
    text_cfg = cfg["text_cfg"]
    ctx = int(text_cfg.get("context_length", 77))
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(
            text_cfg["hf_tokenizer_name"], context_length=ctx, **text_cfg.get("tokenizer_kwargs", {})
        )
    return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)


def create_clipn(
    model: str | Path,
    pretrained: str | Path | None = None,
    *,
    variant: str | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> LoadedCLIPN:
    """Build a CLIPN model, its tokenizer and transforms.

    * ``model``: open_clip model name or model-config JSON path.
    * ``pretrained``: base CLIP weights: an open_clip tag (downloads where possible) or a local weights file
      (open_clip checkpoint, state dict or safetensors). ``None``: random init, or what ``checkpoint`` says.
    * ``checkpoint``: a clipn-ood no-tower checkpoint (``.safetensors``) or an official CLIPN checkpoint
      (torch pickle, read with ``weights_only=True``). The official one carries the whole CLIP, so it
      conflicts with ``pretrained``. Both are loaded strictly.
    * ``variant``: ``learnable`` | ``handcrafted``; ``None`` means what the checkpoint holds (else learnable);
      a value that contradicts the checkpoint is an error.
    """
    name, cfg = resolve_model_config(model)
    contents = ckpt.read_checkpoint(checkpoint) if checkpoint is not None else None
    base_from_checkpoint = contents is not None and contents.base_state is not None
    if base_from_checkpoint and pretrained is not None:
        raise UserError(
            f"--checkpoint {checkpoint} is an official CLIPN checkpoint and carries the whole CLIP; "
            f"drop --pretrained {pretrained}"
        )
    if contents is not None and contents.kind == "clipn-ood":
        pretrained = ckpt.check_base_matches(contents, name, cfg, pretrained)

    if variant is not None and variant not in VARIANTS:
        raise UserError(f"--variant {variant}: choose one of {', '.join(VARIANTS)}")
    resolved_variant = variant or (contents.variant if contents is not None else "learnable")
    if contents is not None and contents.variant != resolved_variant:
        raise UserError(
            f"--checkpoint {checkpoint} holds a {contents.variant} CLIPN model but --variant {variant} was asked"
        )

    clip, tag, weights_sha = _build_base(model, name, cfg, None if base_from_checkpoint else pretrained)
    if contents is not None and contents.base_state is not None:
        ckpt.load_strict(clip.state_dict(keep_vars=True), contents.base_state, str(checkpoint), "the CLIP part")
    clipn = CLIPN(clip, resolved_variant)
    if contents is not None:
        ckpt.load_no_tower(clipn, contents.no_state, source=str(checkpoint))
        if contents.kind == "clipn-ood":
            tag = contents.metadata.get("pretrained") or tag
    clipn.to(device)
    clipn.eval()

    pp = dict(clip.visual.preprocess_cfg)
    pp_cfg = open_clip.transform.PreprocessCfg(**pp)
    size = pp_cfg.size if isinstance(pp_cfg.size, int) else int(pp_cfg.size[0])
    info = ModelInfo(
        model_name=name,
        model_config=cfg,
        pretrained=tag,
        weights_sha256=weights_sha if not base_from_checkpoint else None,
        checkpoint_sha256=None if contents is None else contents.sha256,
        checkpoint_kind=None if contents is None else contents.kind,
        variant=resolved_variant,
        image_size=int(size),
        mean=tuple(float(v) for v in pp_cfg.mean),
        std=tuple(float(v) for v in pp_cfg.std),
        interpolation=str(pp_cfg.interpolation),
        resize_mode=str(pp_cfg.resize_mode),
        context_length=clipn.context_length,
    )
    if contents is not None and contents.kind == "clipn-ood" and contents.metadata.get("weights_sha256"):
        info.weights_sha256 = contents.metadata["weights_sha256"]
    return LoadedCLIPN(
        model=clipn,
        tokenizer=_tokenizer(model, name, cfg),
        preprocess_train=open_clip.transform.image_transform_v2(pp_cfg, is_train=True),
        preprocess_val=open_clip.transform.image_transform_v2(pp_cfg, is_train=False),
        info=info,
        preprocess_cfg=pp,
    )
