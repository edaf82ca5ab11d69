"""clipn-export --int8 --calibration: static int8 (NNCF, QDQ) calibrated on the user's images, head kept float."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import TinyBundleFactory, make_images
from PIL import Image

from clipn_export import onnx_export as ox
from clipn_export.cli import EXIT_OK, EXIT_USAGE, main
from clipn_export.head import normalize_uint8
from clipn_export.int8_calibration import (
    MIN_CALIBRATION_IMAGES,
    default_hold_out,
    find_calibration_images,
    load_calibration,
)
from clipn_export.parity import parity_images
from clipn_export.precision import ENGINE_FILES, quantized_ops
from clipn_runtime.bundle import INT8_DYNAMIC, INT8_STATIC, Preprocess, load_manifest
from clipn_runtime.engine import EngineSpec, open_engine
from clipn_runtime.errors import UserError
from clipn_runtime.preprocess import Preprocessor, open_image

pytest.importorskip("nncf", reason="static int8 needs NNCF (the `export` extra)")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

QDQ = ("QuantizeLinear", "DequantizeLinear")
PRE = Preprocess(32, (0.48, 0.45, 0.40), (0.26, 0.26, 0.27))


def _fingerprint(files: list[Path]) -> str:
    """The documented fingerprint, computed independently: sha256 of the sorted per-file sha256s."""
    digests = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in files)
    return "sha256:" + hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _run(bundle: Path, precision: str, x: np.ndarray) -> dict[str, np.ndarray]:
    manifest = load_manifest(bundle)
    engine = open_engine(EngineSpec.from_bundle(bundle, manifest.engine(precision)), device="cpu", threads=1)
    try:
        return engine.run({ox.IMAGE_INPUT: x})
    finally:
        engine.close()


def _id_images(folder: Path, n: int, seed: int) -> None:
    """``n`` PNGs img0000.png … drawn like the parity gate's images (other seeds than the gate's): for a random
    tiny model these are its "in-distribution" images, the ones whose ranking the gate checks."""
    folder.mkdir(parents=True)
    for i, crop in enumerate(parity_images(n, 40, seed=seed)):
        Image.fromarray(crop).save(folder / f"img{i:04d}.png")


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """36 calibration images in two class subfolders (the usual ID layout), plus one file that is not an image:
    enough to hold the parity gate's 16 out and calibrate on the other 20."""
    root = tmp_path_factory.mktemp("calib")
    _id_images(root / "cat", 18, seed=101)
    _id_images(root / "dog", 18, seed=102)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


@pytest.fixture(scope="module")
def static_bundle(tiny_bundle_factory: TinyBundleFactory, calib_dir: Path) -> Path:
    # uint8 input: the encoder's input is then the internal 'pixels' edge, the harder case to feed.
    # A single folder may be given as such (export_bundle makes it a one-item tuple).
    return tiny_bundle_factory(scale=100.0, int8=True, uint8_input=True, calibration=calib_dir)


def test_static_int8_bundle_is_qdq_in_the_encoder_only(static_bundle: Path, calib_dir: Path) -> None:
    manifest = load_manifest(static_bundle)
    assert manifest.parity["passed"] is True
    entry = manifest.engine("int8")
    model = onnx.load(str(static_bundle / entry.path))
    qdq = [n for n in model.graph.node if n.op_type in QDQ]
    assert qdq and all(n.name.startswith(ox.PREFIX_ENCODER) for n in qdq)
    assert not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in model.graph.node)
    # Nothing in the head or the preprocessing reads a dequantised tensor: both stay fp32 by construction.
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    readers = [n for n in model.graph.node if any(i in dq_out for i in n.input)]
    assert readers and all(n.name.startswith(ox.PREFIX_ENCODER) for n in readers)
    assert "Conv" not in {n.op_type for n in readers}  # the patch-embedding convolution stays float
    assert not any(n.op_type in QDQ for n in model.graph.node if n.name.startswith(ox.PREFIX_HEAD))

    q = entry.meta["quantization"]
    assert q["method"] == INT8_STATIC and q["model_type"] == "transformer" and q["nncf"]
    assert q["ignored_scope"]["types"][0] == "Conv"
    assert q["quantized_ops"] == quantized_ops(model) and set(q["quantized_ops"]) == {"MatMul", "Gemm"}

    # Every weight of every encoder MatMul/Gemm is int8 (no float weight left); the one product left in float
    # is attention's softmax × V (NNCF's transformer patterns do not quantise after a Softmax).
    def float_weights(m: onnx.ModelProto) -> int:
        inits = {t.name: t for t in m.graph.initializer}
        return sum(
            inits[i].data_type == onnx.TensorProto.FLOAT
            for n in m.graph.node
            if n.op_type in ("MatMul", "Gemm") and n.name.startswith(ox.PREFIX_ENCODER)
            for i in n.input[:2]
            if i in inits
        )

    assert float_weights(model) == 0
    # The CPU rewrites ran: weights without zero points, asymmetric activations as uint8.
    inits = {t.name: t for t in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weight_dq and all(len(n.input) == 2 for n in weight_dq)
    act_zp = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) == 3]
    assert all(t.data_type == onnx.TensorProto.UINT8 for t in act_zp if onnx.numpy_helper.to_array(t).any())
    assert float_weights(onnx.load(str(static_bundle / manifest.engine("fp32").path))) > 0  # not vacuous
    made_by = {o: n for n in model.graph.node for o in n.output}
    linear = [
        n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.name.startswith(ox.PREFIX_ENCODER)
    ]
    assert sum(q["quantized_ops"].values()) == len(linear) - sum(
        made_by[n.input[0]].op_type == "Softmax" for n in linear if n.input[0] in made_by
    )
    cal = q["calibration"]
    assert (cal["images"], cal["found"], cal["unreadable"], cal["held_out_for_parity"]) == (20, 37, 1, 16)
    assert q["subset_size"] == 20 and q["activations_range"] == "minmax" and q["overflow_fix"] == "enable"
    found = find_calibration_images([str(calib_dir)], hold_out=16)
    used = [Path(f) for f in found.files if not f.endswith("broken.png")]
    assert len(used) == 20 and cal["fingerprint"] == _fingerprint(used)
    # The gate ran on the 16 held-out images (a static int8 engine is checked on the images it is meant for).
    assert manifest.parity["images_from"].startswith("16 --calibration images held out")
    assert all(r["images"] == 16 for r in manifest.parity["engines"].values())
    assert manifest.engine("fp32").meta.get("quantization") is None


def test_hold_out_for_the_gate(calib_dir: Path) -> None:
    found = find_calibration_images([str(calib_dir)], hold_out=16)
    assert len(found.held_out) == 16 and len(found.files) == 37 - 16 and not set(found.held_out) & set(found.files)
    # both classes are in both parts
    for part in (found.files, found.held_out):
        assert {Path(f).parent.name for f in part} == {"cat", "dog"}
    # too few images to hold 30 out and keep the minimum: nothing is held out
    few = find_calibration_images([str(calib_dir)], hold_out=30)
    assert few.held_out == () and len(few.files) == 37
    # by default a quarter of the images found, 16 to 64
    assert [default_hold_out(n) for n in (37, 100, 200, 256, 300, 5000)] == [16, 25, 50, 64, 64, 64]
    assert len(find_calibration_images([str(calib_dir)], hold_out=None).held_out) == 16


def test_held_out_images_are_given_back_when_too_few_decode(tmp_path: Path) -> None:
    """Images are held out by count, before decoding: when an unreadable file then leaves the calibration part
    short, the held-out ones are calibrated on (the gate checks calibration images) instead of a refusal."""
    from clipn_export.int8_calibration import CalibrationFiles

    files = make_images(tmp_path / "id", 2 * MIN_CALIBRATION_IMAGES)
    files[0].write_bytes(b"not an image")
    part, held = files[:MIN_CALIBRATION_IMAGES], files[MIN_CALIBRATION_IMAGES:]
    found = CalibrationFiles(tuple(map(str, part)), len(files), 0, tuple(map(str, held)))
    cal = load_calibration(found, PRE)
    assert len(cal) == 2 * MIN_CALIBRATION_IMAGES - 1 and cal.held_out == () and cal.unreadable == 1


def test_static_int8_scores_like_fp32(static_bundle: Path) -> None:
    crops = parity_images(8, 32, seed=5)
    fp32, int8 = _run(static_bundle, "fp32", crops), _run(static_bundle, "int8", crops)
    # int8 activations on a random tiny model: close, not equal (the parity gate ranks them; here the values).
    for name in ("atd", "ctw", "p_ood"):
        np.testing.assert_allclose(int8[name], fp32[name], atol=5e-2, err_msg=name)
    assert not np.array_equal(int8["atd"], fp32["atd"])  # it really is another engine


def test_clipn_detect_runs_the_static_engine_on_openvino_where_the_cpu_has_an_int8_dot(
    static_bundle: Path,
) -> None:
    from clipn_runtime import Detector
    from clipn_runtime.engine import CUDA_EP, available_providers
    from clipn_runtime.engine_choice import NumericPath, cpu_has_int8_dot
    from clipn_runtime.ov_engine import cpu_supports_bf16, openvino_importable

    gate = load_manifest(static_bundle).parity["paths"]
    hints = (["bf16"] if cpu_supports_bf16() else []) + ["f32"]
    passed = [f"int8:openvino:{h}" for h in hints if gate.get(f"int8:openvino:{h}", {}).get("passed") is True]
    gpu = CUDA_EP in available_providers()
    if openvino_importable() and cpu_has_int8_dot() and passed and not gpu:
        want = NumericPath.parse(passed[0])
        assert Detector(static_bundle, threads=1).numeric_path == want  # no flags: the default
    else:  # AVX2 only (OpenVINO's int8 was half onnxruntime's speed there), no OpenVINO, or a GPU
        want = NumericPath("int8")
    det = Detector(static_bundle, threads=1, precision="int8")
    assert det.numeric_path == want and det.engine_file == "model.int8.onnx"


def test_calibration_pixels_are_the_runtimes(calib_dir: Path) -> None:
    found = find_calibration_images([str(calib_dir)], size=300)
    cal = load_calibration(found, PRE)
    pre = Preprocessor(PRE)
    ok = [f for f in found.files if not f.endswith("broken.png")]
    want = np.stack([pre(open_image(f)) for f in ok])
    got = np.concatenate(list(cal.batches()))
    np.testing.assert_array_equal(got, want)
    # …also for a uint8-input bundle's preprocessing: the encoder still takes normalised float pixels.
    u8 = load_calibration(found, Preprocess(32, PRE.mean, PRE.std, input_layout="NHWC", input_dtype="uint8"))
    np.testing.assert_array_equal(np.concatenate(list(u8.batches())), want)
    np.testing.assert_allclose(want[:2], normalize_uint8(np.stack(cal.crops[:2]), PRE.mean, PRE.std), atol=1e-6)


def test_fingerprint_is_the_content_not_the_place(calib_dir: Path, tmp_path: Path) -> None:
    moved = shutil.copytree(calib_dir, tmp_path / "elsewhere")
    a = load_calibration(find_calibration_images([str(calib_dir)]), PRE)
    b = load_calibration(find_calibration_images([str(moved)]), PRE)
    assert a.fingerprint == b.fingerprint
    Image.new("RGB", (40, 30), (1, 2, 3)).save(moved / "cat" / "img0003.png")
    c = load_calibration(find_calibration_images([str(moved)]), PRE)
    assert c.fingerprint != a.fingerprint


def test_lists_files_and_a_cap_spread_over_the_list(calib_dir: Path, tmp_path: Path) -> None:
    cats = sorted(str(p) for p in (calib_dir / "cat").glob("*.png"))
    listing = tmp_path / "list.txt"
    listing.write_text("# my ID images\n" + "\n".join(cats) + "\n", encoding="utf-8")
    dog = str(calib_dir / "dog" / "img0000.png")
    found = find_calibration_images([f"@{listing}", dog, str(calib_dir / "dog")], size=300)
    assert found.files[:18] == tuple(cats) and found.files[18] == dog and found.found == 18 + 1 + 19
    picked = find_calibration_images([str(calib_dir)], size=MIN_CALIBRATION_IMAGES)
    assert len(picked.files) == MIN_CALIBRATION_IMAGES
    # both class folders are represented, first and last image included
    assert picked.files[0].endswith("cat/img0000.png") and picked.files[-1].endswith("dog/img0017.png")


def test_too_few_or_missing_images_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file or folder"):
        find_calibration_images([str(tmp_path / "nope")])
    make_images(tmp_path / "few", MIN_CALIBRATION_IMAGES - 1)
    (tmp_path / "few" / "clip.mp4").write_bytes(b"")  # a video is not a calibration image: counted, not used
    with pytest.raises(
        UserError, match=f"{MIN_CALIBRATION_IMAGES - 1} images found, at least {MIN_CALIBRATION_IMAGES}.*1 videos"
    ):
        find_calibration_images([str(tmp_path / "few")])
    # enough files, but too few of them decode
    make_images(tmp_path / "bad", MIN_CALIBRATION_IMAGES - 1)
    (tmp_path / "bad" / "zzz.png").write_bytes(b"")
    found = find_calibration_images([str(tmp_path / "bad")])
    with pytest.raises(UserError, match=f"only {MIN_CALIBRATION_IMAGES - 1} of {MIN_CALIBRATION_IMAGES} images"):
        load_calibration(found, PRE)


# ---- the command line ---------------------------------------------------------------------------------------


@pytest.fixture()
def cli_args(tiny_official_checkpoint: Path, tiny_config: Path, tmp_path: Path) -> list[str]:
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\ncar\n", encoding="utf-8")
    out = tmp_path / "bundle"
    return ["-c", str(tiny_official_checkpoint), "--model", str(tiny_config), "--classes", str(classes), "-o", str(out), "--no-cache"]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--int8", "--calibration", "missing/"], "--calibration missing/: no such file or folder"),
        (["--int8", "--calibration", "EMPTY"], f"0 images found, at least {MIN_CALIBRATION_IMAGES} are needed"),
        (["--calibration", "EMPTY"], "--calibration calibrates the int8 engine; add --int8"),
        (["--int8", "--calibration", "EMPTY", "--calibration-size", "4"], "--calibration-size must be ≥"),
        (["--int8", "--calibration", "@nolist.txt"], "nolist.txt: cannot read this list"),
    ],
)
def test_cli_calibration_mistakes_exit_2_in_one_line(
    cli_args: list[str], tmp_path: Path, extra: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").mkdir()
    r = CliRunner().invoke(main, [*cli_args, *extra])
    assert r.exit_code == EXIT_USAGE, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "bundle").exists()


def test_cli_static_and_dynamic_int8(cli_args: list[str], calib_dir: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, [*cli_args, "--int8", "--calibration", str(calib_dir)])
    assert r.exit_code == EXIT_OK, r.output
    manifest = load_manifest(tmp_path / "bundle")
    assert manifest.engine("int8").meta["quantization"]["method"] == INT8_STATIC
    assert "int8: dynamic quantisation" not in r.output
    # Without --calibration: today's dynamic int8, and the log says so in one line.
    r = CliRunner().invoke(main, [*cli_args, "--int8", "--no-parity", "--overwrite"])
    assert r.exit_code == EXIT_OK, r.output
    assert sum("int8: dynamic quantisation; add --calibration" in line for line in r.output.splitlines()) == 1
    entry = load_manifest(tmp_path / "bundle").engine("int8")
    assert entry.meta["quantization"]["method"] == INT8_DYNAMIC and entry.path == ENGINE_FILES["int8"]
    model = onnx.load(str(tmp_path / "bundle" / entry.path))
    assert not any(n.op_type in QDQ for n in model.graph.node)
    assert any(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node)


def _qdq_matmul(act_zero_point: int) -> onnx.ModelProto:
    """x → QuantizeLinear/DequantizeLinear (int8, ``act_zero_point``) → MatMul with an int8 weight whose
    DequantizeLinear has an explicit zero zero point: the pattern NNCF's ONNX backend writes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.integers(-64, 64, (6, 4), dtype=np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(act_zero_point, np.int8), "zp"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(4, np.int8), "wzp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _unfused(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the QDQ arithmetic as written
    out = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    return np.asarray(out[0])


@pytest.mark.parametrize("zero_point", [-37, 0])
def test_cpu_rewrites_of_the_qdq_graph_are_exact(zero_point: int) -> None:
    from onnx import numpy_helper

    from clipn_export.precision import drop_zero_weight_zero_points, uint8_activations

    x = np.random.default_rng(1).normal(0, 2, (3, 6)).astype(np.float32)  # some values clip: the edges too
    before = _qdq_matmul(zero_point)
    want = _unfused(before, x)
    after = _qdq_matmul(zero_point)
    assert uint8_activations(after) == (1 if zero_point else 0)  # symmetric activations stay int8
    assert drop_zero_weight_zero_points(after) == 1
    onnx.checker.check_model(after)
    zp = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    assert "wzp" not in zp  # the dropped zero point is gone from the file too
    if zero_point:
        assert zp["zp"].dtype == np.uint8 and int(zp["zp"]) == zero_point + 128
    np.testing.assert_array_equal(_unfused(after, x), want)
