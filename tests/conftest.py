"""Shared fixtures. Tests use tiny open_clip models with random weights: no download ever happens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers import SyntheticBundle, SyntheticBundleFactory, TinyBundleFactory

if TYPE_CHECKING:
    import numpy.typing as npt
    import onnx

    from clipn_train.factory import LoadedCLIPN

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine run several times faster on one thread (no spin-waiting).

    Use per module: ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_config() -> Path:
    """Path to a tiny open_clip model-config JSON (32-px ViT, 1-layer towers, width 32, context 77)."""
    return DATA / "tiny-clip.json"


# ---- runtime fixtures: begin ------------------------------------------------------------------------------
# A *synthetic* bundle for fast runtime unit tests: a fixed random linear "encoder" (flattened image → D
# features) followed by the CLIPN scoring ops, built directly with onnx.helper, plus a manifest. Its numpy twin
# (``helpers.SyntheticBundle.reference``) feeds the same features to clipn_runtime.scoring, so a test can check
# what the runtime reports against the reference math. End-to-end tests use the exporter's ``tiny_bundle``.


def build_synthetic_bundle(
    root: Path,
    classes: list[str],
    *,
    image_size: int = 16,
    dim: int = 8,
    scale: float = 100.0,
    input_dtype: str = "float32",
    input_layout: str = "NCHW",
    full_outputs: bool = False,
    seed: int = 0,
) -> SyntheticBundle:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from clipn_runtime.bundle import (
        BundleFile,
        Manifest,
        ModelIdentity,
        Preprocess,
        Scoring,
        TensorSpec,
        hash_entry,
        write_manifest,
    )
    from clipn_runtime.scoring import FULL_OUTPUTS, SCALAR_OUTPUTS

    rng = np.random.default_rng(seed)
    c, s = len(classes), image_size
    enc = (rng.standard_normal((3 * s * s, dim)) / np.sqrt(3 * s * s)).astype(np.float32)
    bank = rng.standard_normal((c, dim)).astype(np.float32)
    # "no" embeddings near their "yes" twins (as trained CLIPN's are), so that both decisions occur
    bank_no = (bank + 0.7 * rng.standard_normal((c, dim))).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    bank_no /= np.linalg.norm(bank_no, axis=1, keepdims=True)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: npt.ArrayLike) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(kind: str, ins: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(kind, ins, [out], **attrs))
        return out

    def out_shape(name: str) -> list[int | str]:
        return ["batch", c] if name in FULL_OUTPUTS else ["batch"]

    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "uint8": TensorProto.UINT8}[input_dtype]
    shape: list[int | str] = ["batch", 3, s, s] if input_layout == "NCHW" else ["batch", s, s, 3]
    x = "image"
    if input_dtype == "uint8":  # raw crops, normalised inside the graph
        x = op("Cast", [x], "x_f", to=TensorProto.FLOAT)
        x = op("Div", [x, const("c255", np.float32(255.0))], "x_01")
        x = op("Sub", [x, const("mean", np.array(mean, np.float32))], "x_c")
        x = op("Div", [x, const("std", np.array(std, np.float32))], "x_n")
    if input_layout == "NHWC":
        x = op("Transpose", [x], "x_nchw", perm=[0, 3, 1, 2])
    x = op("Flatten", [x], "flat", axis=1)
    if input_dtype == "float16":
        f = op("MatMul", [x, const("enc16", enc.astype(np.float16))], "feat16")
        f = op("Cast", [f], "feat", to=TensorProto.FLOAT)
    else:
        f = op("MatMul", [x, const("enc", enc)], "feat")
    sq = op("ReduceSum", [op("Mul", [f, f], "ff"), const("ax1", np.array([1], np.int64))], "ss", keepdims=1)
    fn = op(
        "Div", [f, op("Max", [op("Sqrt", [sq], "nrm"), const("tiny", np.float32(1.1754944e-38))], "nrm_c")], "fn"
    )
    sc = const("scale", np.float32(scale))
    lg = op("Mul", [op("MatMul", [fn, const("bankT", bank.T.copy())], "cos"), sc], "logits")
    lgn = op("Mul", [op("MatMul", [fn, const("banknoT", bank_no.T.copy())], "cos_no"), sc], "logits_no")
    probs = op("Softmax", [lg], "probs", axis=1)
    p_no_all = op("Sigmoid", [op("Sub", [lgn, lg], "d_no")], "p_no_all")
    p_yes = op("Sigmoid", [op("Sub", [lg, lgn], "d_yes")], "p_yes")
    pred = op("ArgMax", [lg], "pred", axis=1, keepdims=0)
    idx = op("Unsqueeze", [pred, "ax1"], "pred_u")

    def pick(t: str, name: str) -> str:
        return op("Squeeze", [op("GatherElements", [t, idx], name + "_g", axis=1), "ax1"], name)

    pick(probs, "prob")
    p_no = pick(p_no_all, "p_no")
    pick(p_yes, "ctw")
    agree = op("Mul", [p_yes, probs], "agree")
    atd = op("ReduceSum", [agree, "ax1"], "atd", keepdims=0)
    p_ood = op("Sub", [const("one", np.float32(1.0)), atd], "p_ood")
    op("Greater", [p_no, const("half", np.float32(0.5))], "ood_ctw")
    op("Greater", [p_ood, op("ReduceMax", [agree, "ax1"], "agree_max", keepdims=0)], "ood_atd")
    cos = op("Div", [lg, sc], "cos_r")
    msp_l = op("Mul", [cos, const("c100", np.float32(100.0))], "msp_l")
    op("ReduceMax", [op("Softmax", [msp_l], "msp_p", axis=1), "ax1"], "msp", keepdims=0)
    op("ReduceMax", [op("Softmax", [cos], "mcm_p", axis=1), "ax1"], "mcm", keepdims=0)
    op("ReduceMax", [lg, "ax1"], "max_logit", keepdims=0)
    op("ReduceLogSumExp", [lg, "ax1"], "energy", keepdims=0)

    out_names = list(SCALAR_OUTPUTS) + (list(FULL_OUTPUTS) if full_outputs else [])
    dtypes = {"pred": TensorProto.INT64, "ood_ctw": TensorProto.BOOL, "ood_atd": TensorProto.BOOL}
    outs = [helper.make_tensor_value_info(n, dtypes.get(n, TensorProto.FLOAT), out_shape(n)) for n in out_names]
    graph = helper.make_graph(
        nodes, "synthetic_clipn", [helper.make_tensor_value_info("image", elem, shape)], outs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    root.mkdir(parents=True, exist_ok=True)
    precision = "fp16" if input_dtype == "float16" else "fp32"
    onnx.save(model, root / "model.onnx")
    np.savez(root / "text_bank.npz", yes=bank, no=bank_no)
    spec_dtype = {"pred": "int64", "ood_ctw": "bool", "ood_atd": "bool"}
    engine = hash_entry(
        root,
        "model.onnx",
        "image_engine",
        precision=precision,
        inputs=[TensorSpec("image", shape, input_dtype)],
        outputs=[TensorSpec(n, out_shape(n), spec_dtype.get(n, "float32")) for n in out_names],
    )
    pre = Preprocess(s, mean, std, input_layout=input_layout, input_dtype=input_dtype)
    manifest = Manifest(
        model=ModelIdentity("synthetic-linear"),
        preprocess=pre,
        classes=list(classes),
        prompts={"name": "clipn", "yes": ["a photo of a {}."], "no": ["a photo without {}."]},
        scoring=Scoring(scale=scale),
        files=[engine, hash_entry(root, "text_bank.npz", "text_bank")],
        versions={"clipn-ood": "test", "opset": 18},
        # As an export's gate records it: the engine computes its numpy twin (tests check that), on onnxruntime.
        parity={"passed": True, "engines": {precision: {"passed": True}}},
    )
    assert isinstance(engine, BundleFile)
    write_manifest(root, manifest)
    return SyntheticBundle(root, list(classes), enc, bank, bank_no, scale, pre)


@pytest.fixture(scope="session")
def synthetic_bundle(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    """A synthetic fp32 NCHW bundle over five classes (one with a comma, quotes and a newline-free unicode)."""
    classes = ["cat", "dog", 'hot dog, "chili"', "日本の猫", "bird"]
    return build_synthetic_bundle(tmp_path_factory.mktemp("synthetic_bundle"), classes)


@pytest.fixture(scope="session")
def synthetic_bundle_factory(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundleFactory:
    """``make(classes, **options)`` → a fresh :class:`SyntheticBundle` in its own temp dir."""

    def make(classes: list[str], **kw: Any) -> SyntheticBundle:
        return build_synthetic_bundle(tmp_path_factory.mktemp("synthetic_bundle"), classes, **kw)

    return make


# ---- runtime fixtures: end --------------------------------------------------------------------------------


# ---- exporter fixtures: begin -----------------------------------------------------------------------------
# Real tiny CLIPN models exported by clipn_export: what end-to-end tests run. Random init, no download; the
# learnable "no" prompts are randomised (a fresh CLIPN's no tower is an exact copy of the yes tower, which
# would make every p_no exactly 0.5).

TINY_CLASSES = ["cat", "dog", "car"]


def make_tiny_clipn(config: Path, seed: int = 0) -> LoadedCLIPN:
    """A tiny random-init ``LoadedCLIPN`` (learnable variant) whose no tower differs from its yes tower."""
    # A runtime-only install (pip install -e ".[dev]") has no torch: tests of exported bundles skip there and
    # run in the full install; the runtime's own tests use the torch-free synthetic bundles.
    torch = pytest.importorskip("torch", reason="exported test bundles need the `export` extra (torch)")

    from clipn_train.factory import create_clipn

    torch.manual_seed(seed)
    loaded = create_clipn(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        prompt = loaded.model.prompt_no
        assert prompt is not None, "create_clipn's default variant is the learnable-prompt one"
        # Small on purpose: at scale 100 larger prompts saturate every p_no at 1, and the scores of different
        # images would coincide (ATD spread ~1e-5 at 0.5, ~0.1 at 0.003).
        prompt.copy_(torch.randn(prompt.shape, generator=g) * 0.003)
    return loaded


def save_official_checkpoint(loaded: LoadedCLIPN, path: Path) -> Path:
    """Write ``loaded.model`` in the official CLIPN layout: {'epoch','name','state_dict','optimizer'}, keys
    prefixed ``module.``, CLIP keys under their open_clip names, no tower as ``transformer_no.*`` etc."""
    import torch

    state: dict[str, torch.Tensor] = {}
    for k, v in loaded.model.state_dict().items():
        name = k[len("clip.") :] if k.startswith("clip.") else k
        state["module." + name] = v.detach().clone()
    torch.save(
        {"epoch": 10, "name": "tiny", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path
    )
    return path


@pytest.fixture(scope="session")
def tiny_clipn(tiny_config: Path) -> LoadedCLIPN:
    """A session-wide tiny CLIPN (``clipn_train.factory.LoadedCLIPN``); do not modify it."""
    return make_tiny_clipn(tiny_config)


@pytest.fixture(scope="session")
def tiny_official_checkpoint(tiny_clipn: LoadedCLIPN, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_clipn`` saved as an official-layout CLIPN ``.pt`` checkpoint (load with --model tiny_config)."""
    return save_official_checkpoint(tiny_clipn, tmp_path_factory.mktemp("official") / "clipn_tiny_epoch_10.pt")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_clipn: LoadedCLIPN, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fp32 bundle of ``tiny_clipn`` for ["cat", "dog", "car"] exported by clipn_export (NCHW float32
    input, scalar outputs only, 32-px images, scale 100 as the released CLIPN weights). Returns its directory."""
    from clipn_export.exporter import export_bundle

    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    export_bundle(tiny_clipn, TINY_CLASSES, out, scale=100.0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_bundle_factory(tiny_clipn: LoadedCLIPN, tmp_path_factory: pytest.TempPathFactory) -> TinyBundleFactory:
    """``make(classes=TINY_CLASSES, **export_bundle_options)`` → a fresh bundle dir of ``tiny_clipn``
    (e.g. ``make(fp16=True, int8=True, uint8_input=True, full_outputs=True, embeddings=True)``)."""
    from clipn_export.exporter import export_bundle

    def make(classes: list[str] | None = None, **options: Any) -> Path:
        out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
        options.setdefault("progress", False)
        export_bundle(tiny_clipn, classes or TINY_CLASSES, out, **options)
        return out

    return make


# ---- exporter fixtures: end -------------------------------------------------------------------------------


# ---- open vocabulary fixtures: begin ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_ov_bundle(tiny_clipn: LoadedCLIPN, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An open-vocabulary bundle of ``tiny_clipn`` for ["cat", "dog", "car"] (``export_bundle(...,
    open_vocabulary=True)``) with fp32, fp16 and int8 engines, scale 100. Do not modify it: copy it first
    (:func:`copy_bundle`) to write bank caches or tamper with files."""
    from clipn_export.exporter import export_bundle

    out = tmp_path_factory.mktemp("tiny_ov_bundle") / "bundle"
    export_bundle(
        tiny_clipn,
        TINY_CLASSES,
        out,
        scale=100.0,
        open_vocabulary=True,
        fp16=True,
        int8=True,
        progress=False,
    )
    return out


def copy_bundle(src: Path, dst: Path) -> Path:
    """A private copy of a bundle directory (without any cached banks)."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("banks"))
    return dst


# ---- open vocabulary fixtures: end ------------------------------------------------------------------------
