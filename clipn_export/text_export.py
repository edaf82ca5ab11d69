"""The yes and no text towers as ONNX graphs, for open-vocabulary bundles (``clipn-export --open-vocabulary``).

Each graph maps ``tokens`` (batch × sequence int64 token ids, open_clip's layout: SOT … EOT, zero padding) to
``text_features`` (batch × D float32, *not* normalised; the runtime normalises in fp32 like the exporter's text
bank). The no tower has CLIPN's mean learnable prompt folded in: in eval mode ``encode_text_no`` adds
``prompt_no.mean(0)``; the graph holds that mean as one initialiser (1 × context × width, sliced to the
sequence length), not the 16 learned prompts.

Both axes are dynamic. A dynamic sequence axis lets the runtime do exactly what the exporter's text bank does
— sort prompts by token count and cut each batch to its longest prompt — which is exact (causal mask, EOT
pooling; :attr:`CLIPN.truncation_is_exact`) and 4–5× less work than the full 77-token context for typical
prompts. Models for which the cut is not exact are exported the same way and the runtime is told
(``truncation_is_exact: false`` in the manifest) to feed the full context.

fp32 only: a bank must equal the exporter's to 1e-5, and the text towers run once per class list, not per image.
"""

from __future__ import annotations

import logging
import warnings

import onnx
import torch
from torch import Tensor, nn

from clipn_runtime.bundle import TensorSpec

log = logging.getLogger(__name__)

#: Opset of the text-encoder graphs (the dynamo exporter's own; they run in onnxruntime only).
TEXT_OPSET = 18
TOKENS_INPUT = "tokens"
FEATURES_OUTPUT = "text_features"
BATCH_DIM = "batch"
SEQUENCE_DIM = "sequence"
#: Bundle file names of the two towers.
TEXT_ENCODER_FILES: dict[str, str] = {"yes": "text_encoder_yes.onnx", "no": "text_encoder_no.onnx"}
#: Example shape the towers are traced with: batch and sequence ≥ 2 and different from each other and from
#: every model dimension, so that neither can be folded into a constant.
_TRACE_BATCH, _TRACE_SEQUENCE = 3, 7


class TextTowerModule(nn.Module):
    """``tokens → unnormalised text features`` through the yes or the no tower, as at inference.

    The no tower adds CLIPN's *mean* learnable prompt (what ``encode_text_no`` does in eval mode); it is held
    here as one precomputed buffer so the exported graph carries the mean, not the 16 prompts.
    :func:`export_text_encoder` checks that this module equals ``encode_text``/``encode_text_no``.
    """

    #: Declared so that the type checker sees the buffer's type, not nn.Module's ``Tensor | Module`` lookup.
    mean_prompt: Tensor | None

    def __init__(self, model: nn.Module, tower: str) -> None:
        super().__init__()
        if tower not in TEXT_ENCODER_FILES:
            raise ValueError(f"tower must be 'yes' or 'no', got {tower!r}")
        self.model = model
        self.tower = tower
        prompt = getattr(model, "prompt_no", None)
        mean = None if tower == "yes" or prompt is None else prompt.detach().mean(dim=0, keepdim=True).clone()
        self.register_buffer("mean_prompt", mean)

    def forward(self, tokens: Tensor) -> Tensor:
        from clipn_train.model import text_forward

        tower = self.model._tower(no=self.tower == "no")  # type: ignore[operator]
        return text_forward(tower, tokens, self.mean_prompt)


def _reference(model: nn.Module, tower: str, tokens: Tensor) -> Tensor:
    encode = model.encode_text if tower == "yes" else model.encode_text_no
    return encode(tokens, normalize=False)  # type: ignore[operator,no-any-return]


def export_text_encoder(model: nn.Module, tower: str) -> onnx.ModelProto:
    """Export one tower of a CLIPN (in eval mode) with dynamic batch and sequence axes.

    Uses the dynamo exporter (``torch.export``, opset 18): the TorchScript tracer bakes the traced sequence
    length into ``nn.MultiheadAttention``'s reshapes (ONNX shape inference loses the symbolic length at the
    positional-embedding slice and the exporter falls back to the traced sizes), so its graphs only run at the
    length they were traced with. These graphs are separate from the image engine, which keeps opset 17.
    """
    if model.training:
        raise ValueError("export the text towers in eval mode (the no tower then uses its mean prompt)")
    from torch.export import Dim

    device = next(model.parameters()).device
    context = int(model.context_length)  # type: ignore[arg-type]
    # Token ids with SOT first and EOT (the largest id, where argmax pooling reads) last, like real prompts.
    g = torch.Generator().manual_seed(0)
    example = torch.randint(1, 49000, (_TRACE_BATCH, _TRACE_SEQUENCE), generator=g)
    example[:, 0] = 49406
    example[:, -1] = 49407
    example = example.to(device)
    module = TextTowerModule(model, tower).eval()
    with torch.inference_mode():
        diff = (module(example) - _reference(model, tower, example)).abs().max().item()
    if diff > 0:
        raise AssertionError(f"the {tower} text-tower wrapper differs from the model by {diff}")
    shapes = ({0: Dim(BATCH_DIM, min=1), 1: Dim(SEQUENCE_DIM, min=2, max=context)},)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA op has no ONNX decomposition
        try:
            program = torch.onnx.export(
                module,
                (example,),
                input_names=[TOKENS_INPUT],
                output_names=[FEATURES_OUTPUT],
                dynamic_shapes=shapes,
                opset_version=TEXT_OPSET,
                dynamo=True,
                verbose=False,
            )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    assert program is not None
    graph = program.model_proto
    graph.producer_name = "clipn-ood"
    return graph


def signature(embed_dim: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The manifest's (inputs, outputs) of a text encoder."""
    return (
        [TensorSpec(TOKENS_INPUT, [BATCH_DIM, SEQUENCE_DIM], "int64")],
        [TensorSpec(FEATURES_OUTPUT, [BATCH_DIM, int(embed_dim)], "float32")],
    )
