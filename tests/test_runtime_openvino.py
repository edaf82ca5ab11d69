"""The OpenVINO backend and the engine choice: which engine, backend and precision run, and only ones the export's
parity gate passed (clipn_runtime.ov_engine, clipn_runtime.engine_choice)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import SyntheticBundleFactory, import_blocker, make_images

from clipn_runtime.bundle import INT8_DYNAMIC, INT8_STATIC, MANIFEST_NAME, BundleError, Manifest, load_manifest
from clipn_runtime.detector import Detector
from clipn_runtime.engine import EngineError, EngineSpec, open_engine
from clipn_runtime.engine_choice import (
    NO_GATE,
    NumericPath,
    candidate_paths,
    choose_path,
    cpu_has_amx,
    gate_records,
)
from clipn_runtime.ov_engine import cpu_supports_bf16, onednn_cap_allows_bf16, openvino_importable

needs_openvino = pytest.mark.skipif(
    not openvino_importable(), reason="openvino is not installed (pip install 'clipn-ood[openvino]')"
)


# ---- the choice (pure: a manifest and what the machine offers) ---------------------------------------------------


def _manifest(
    tmp_path: Path, synthetic_bundle_factory: SyntheticBundleFactory, paths: dict[str, Any], *, static: bool = True
) -> Manifest:
    """The synthetic bundle's manifest with fp32/fp16/int8 engine entries (int8 static or dynamic) and ``paths`` as
    the gate's record."""
    m = load_manifest(synthetic_bundle_factory(["a", "b"]).root)
    fp32 = m.engines()[0]
    files = [fp32, replace(fp32, path="model.fp16.onnx", precision="fp16")]
    method = INT8_STATIC if static else INT8_DYNAMIC
    files.append(
        replace(fp32, path="model.int8.onnx", precision="int8", meta={"quantization": {"method": method}})
    )
    return replace(m, files=files, parity={"passed": True, "paths": paths} if paths else {})


PASS: dict[str, Any] = {"passed": True}
ALL_PASSED = {
    k: PASS
    for k in (
        "fp32:onnxruntime",
        "fp16:onnxruntime",
        "int8:onnxruntime",
        "fp32:openvino:f32",
        "fp32:openvino:bf16",
        "int8:openvino:f32",
        "int8:openvino:bf16",
    )
}


def _key(m: Manifest, **kw: Any) -> str:
    return choose_path(m, **kw).path.key


def test_default_is_the_fastest_passed_path_for_the_device(
    tmp_path: Path, synthetic_bundle_factory: SyntheticBundleFactory
) -> None:
    m = _manifest(tmp_path, synthetic_bundle_factory, ALL_PASSED)
    # A CPU with VNNI: static int8 on OpenVINO (bf16 where the CPU runs it) before onnxruntime; `cpu` is onnxruntime.
    assert _key(m, device="auto", openvino=True, bf16=True) == "int8:openvino:bf16"
    assert _key(m, device="auto", openvino=True, bf16=False) == "int8:openvino:f32"
    assert _key(m, device="auto", openvino=False) == "int8:onnxruntime"
    assert _key(m, device="cpu", openvino=True, bf16=True) == "int8:onnxruntime"
    assert _key(m, device="openvino", openvino=True, bf16=True) == "int8:openvino:bf16"
    # Without VNNI/AMX (AVX2 only) OpenVINO's int8 was the slowest engine: onnxruntime's int8 goes first, and on
    # OpenVINO alone its fp32 engine.
    assert _key(m, device="auto", openvino=True, bf16=False, int8_dot=False) == "int8:onnxruntime"
    assert _key(m, device="auto", precision="fp32", openvino=True, int8_dot=False) == "fp32:openvino:f32"
    assert _key(m, device="openvino", openvino=True, int8_dot=False) == "fp32:openvino:f32"
    assert _key(m, device="openvino", precision="int8", openvino=True, int8_dot=False) == "int8:openvino:f32"
    # A GPU: fp16 first, onnxruntime (the gate's onnxruntime record covers its providers).
    assert _key(m, device="auto", gpu=True, openvino=True) == "fp16:onnxruntime"
    assert _key(m, device="cuda") == "fp16:onnxruntime"
    # --precision narrows; bf16 is the fp32 file on OpenVINO.
    # fp32 means fp32 arithmetic: OpenVINO's f32 hint, never its bf16 default.
    assert _key(m, device="auto", precision="fp32", openvino=True, bf16=True) == "fp32:openvino:f32"
    assert _key(m, device="auto", precision="bf16", openvino=True) == "fp32:openvino:bf16"
    assert _key(m, device="cpu", precision="fp32") == "fp32:onnxruntime"


def test_the_order_follows_the_int8_kind_and_the_cpu(
    tmp_path: Path, synthetic_bundle_factory: SyntheticBundleFactory
) -> None:
    static = _manifest(tmp_path, synthetic_bundle_factory, ALL_PASSED)
    dynamic = _manifest(tmp_path, synthetic_bundle_factory, ALL_PASSED, static=False)
    assert static.engine("int8").static_int8 and not dynamic.engine("int8").static_int8
    amx = {"device": "auto", "openvino": True, "bf16": True, "int8_dot": True, "amx": True}
    # AMX: static int8 on OpenVINO, else bf16 on OpenVINO, which outran onnxruntime's dynamic int8.
    assert _key(static, **amx) == "int8:openvino:bf16"
    assert _key(dynamic, **amx) == "fp32:openvino:bf16"
    # OpenVINO's dynamic int8 was slower than every fp32 engine: never the default, even on OpenVINO alone.
    vnni = {**amx, "amx": False}
    assert _key(dynamic, **vnni) == "int8:onnxruntime"
    assert _key(dynamic, **{**vnni, "device": "openvino"}) == "fp32:openvino:bf16"
    assert _key(dynamic, **{**vnni, "device": "openvino", "precision": "int8"}) == "int8:openvino:bf16"

    # The whole order, AMX, static int8: the module docstring's five steps.
    def order(**cpu: bool) -> list[str]:
        return [
            p.key
            for p in candidate_paths(["fp32", "fp16", "int8"], device="auto", gpu=False, openvino=True, **cpu)
        ]

    assert order(bf16=True, amx=True, static_int8=True) == [
        "int8:openvino:bf16", "int8:openvino:f32", "fp32:openvino:bf16", "int8:onnxruntime", "fp32:openvino:f32",
        "fp32:onnxruntime", "fp16:openvino:bf16", "fp16:openvino:f32", "fp16:onnxruntime",
    ]  # fmt: skip
    assert order(bf16=False, int8_dot=False, static_int8=True) == [
        "int8:onnxruntime", "fp32:openvino:f32", "fp32:onnxruntime", "fp16:openvino:f32", "fp16:onnxruntime",
        "int8:openvino:f32",
    ]  # fmt: skip
    # An AMX CPU whose OpenVINO does not run bf16 (oneDNN capped): no bf16 path, onnxruntime's int8 first.
    capped = order(bf16=False, amx=True)
    assert capped[:2] == ["int8:onnxruntime", "fp32:openvino:f32"] and "fp32:openvino:bf16" not in capped
    # An int8 engine written before the record existed is dynamic.
    assert not replace(static.engine("int8"), meta={}).static_int8


def test_a_path_the_gate_did_not_pass_is_skipped_and_alone_is_refused(
    tmp_path: Path, synthetic_bundle_factory: SyntheticBundleFactory
) -> None:
    paths: dict[str, Any] = dict(ALL_PASSED)
    paths["int8:openvino:bf16"] = {"passed": False, "failures": ["ATD rank correlation 0.90 < 0.95"]}
    paths["int8:openvino:f32"] = {"passed": None, "skipped": "the export machine's CPU does not run bf16"}
    m = _manifest(tmp_path, synthetic_bundle_factory, paths)
    choice = choose_path(m, device="auto", openvino=True, bf16=True)
    assert choice.path.key == "int8:onnxruntime" and choice.unchecked is None
    assert "failed the gate (ATD rank correlation 0.90 < 0.95)" in choice.skipped[0]
    with pytest.raises(
        BundleError,
        match=r"no engine of this bundle passed.*--device openvino --precision int8.*--allow-unchecked",
    ):
        choose_path(m, device="openvino", precision="int8", openvino=True, bf16=True)
    forced = choose_path(m, device="openvino", precision="int8", openvino=True, bf16=True, allow_unchecked=True)
    assert forced.path.key == "int8:openvino:bf16" and "failed the gate" in str(forced.unchecked)


def test_older_bundles_and_bundles_without_a_gate(
    tmp_path: Path, synthetic_bundle_factory: SyntheticBundleFactory
) -> None:
    m = _manifest(tmp_path, synthetic_bundle_factory, {})
    # Exported with --no-parity: onnxruntime as before, flagged; OpenVINO is not guessed at.
    choice = choose_path(m, device="auto", openvino=True, bf16=True)
    assert choice.path.key == "int8:onnxruntime" and choice.unchecked == NO_GATE
    with pytest.raises(BundleError, match="no engine of this bundle passed"):
        choose_path(m, device="openvino", openvino=True)
    # Written before paths were recorded: its onnxruntime engines were checked.
    old = replace(m, parity={"passed": True, "engines": {"fp32": PASS, "int8": {"passed": False}}})
    assert set(gate_records(old)) == {"fp32:onnxruntime", "int8:onnxruntime"}
    assert _key(old, device="auto", openvino=True) == "fp32:onnxruntime"


def test_requests_that_cannot_be_met_say_why(
    tmp_path: Path, synthetic_bundle_factory: SyntheticBundleFactory
) -> None:
    m = _manifest(tmp_path, synthetic_bundle_factory, ALL_PASSED)
    with pytest.raises(BundleError, match="bf16 runs on OpenVINO only, not on --device cpu"):
        choose_path(m, device="cpu", precision="bf16")
    with pytest.raises(BundleError, match="OpenVINO, which is not installed"):
        choose_path(m, device="auto", precision="bf16", openvino=False)
    only_fp32 = replace(m, files=[m.engines()[0]])
    with pytest.raises(BundleError, match=r"no engine that runs as int8.*clipn-export --int8"):
        choose_path(only_fp32, device="cpu", precision="int8")
    assert NumericPath.parse("int8:openvino:bf16") == NumericPath("int8", "openvino", "bf16")
    with pytest.raises(ValueError):
        NumericPath.parse("int8")


def test_open_vocabulary_bundles_stay_on_onnxruntime(
    tmp_path: Path, synthetic_bundle_factory: SyntheticBundleFactory
) -> None:
    from clipn_runtime.bundle import OpenVocabulary

    m = _manifest(tmp_path, synthetic_bundle_factory, ALL_PASSED)
    ov = replace(m, open_vocabulary=OpenVocabulary.__new__(OpenVocabulary))
    assert _key(ov, device="auto", openvino=True, bf16=True) == "int8:onnxruntime"
    with pytest.raises(BundleError, match="folds their class-bank inputs"):
        choose_path(ov, device="openvino", openvino=True)


# ---- the OpenVINO engine -------------------------------------------------------------------------------------------


@needs_openvino
def test_openvino_engine_matches_onnxruntime(
    synthetic_bundle_factory: SyntheticBundleFactory, tmp_path: Path
) -> None:
    sb = synthetic_bundle_factory(["a", "b", "c"])
    x = (
        np.random.default_rng(0)
        .standard_normal((5, 3, sb.preprocess.image_size, sb.preprocess.image_size))
        .astype(np.float32)
    )
    ort = open_engine(sb.root / "model.onnx", device="cpu").run({"image": x})
    ov = open_engine(sb.root / "model.onnx", device="openvino", threads=1, cache_dir=tmp_path / "ovcache")
    assert ov.backend == "openvino" and ov.input_names == ("image",)
    assert set(ov.output_names) == set(ort)
    got = ov.run({"image": x})
    for name, want in ort.items():
        assert got[name].dtype == want.dtype, name
        if want.dtype == np.bool_ or want.dtype.kind == "i":
            assert np.array_equal(got[name], want), name
        else:  # two fp32 kernels (oneDNN vs MLAS): rounding-level differences only
            np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5, err_msg=name)
    assert ov.input_specs()["image"].shape[0] == "batch"
    assert "hint f32, 1 threads" in ov.describe()
    # The second start finds the compiled blob in the model cache.
    assert any((tmp_path / "ovcache").iterdir())
    with pytest.raises(EngineError, match="no input 'bank_yes'"):
        ov.run({"image": x, "bank_yes": np.zeros((3, 4), np.float32)})


@needs_openvino
def test_openvino_never_runs_another_precision_than_asked(
    synthetic_bundle_factory: SyntheticBundleFactory,
) -> None:
    sb = synthetic_bundle_factory(["a", "b"])
    spec = EngineSpec(sb.root / "model.onnx", inference_precision="bf16")
    if cpu_supports_bf16():
        engine = open_engine(spec, device="openvino")
        assert "hint bf16" in engine.describe()
    elif not onednn_cap_allows_bf16():  # ONEDNN_MAX_CPU_ISA below bf16: refused before compiling
        with pytest.raises(EngineError, match="cannot run bf16 with oneDNN capped"):
            open_engine(spec, device="openvino")
    else:  # OpenVINO would quietly run f32: a path the gate did not check as such
        with pytest.raises(EngineError, match="runs model.onnx in f32 on this CPU, not the bf16"):
            open_engine(spec, device="openvino")
    with pytest.raises(EngineError, match="unknown OpenVINO inference precision"):
        open_engine(replace(spec, inference_precision="f16"), device="openvino")


def test_a_onednn_cap_below_bf16_means_no_bf16(
    monkeypatch: pytest.MonkeyPatch, synthetic_bundle_factory: SyntheticBundleFactory
) -> None:
    """ONEDNN_MAX_CPU_ISA=AVX2 (CI's numerics pass) leaves OpenVINO reporting BF16 while its bf16 layers crash:
    the runtime treats such a machine as one without bf16 and refuses a bf16 engine before compiling it."""
    from clipn_runtime import ov_engine

    for cap, allows in (("AVX2", False), ("avx512_core_vnni", False), ("AVX512_CORE_BF16", True),
                        ("AVX512_CORE_AMX", True), ("ALL", True), ("", True)):  # fmt: skip
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert ov_engine.onednn_cap_allows_bf16() is allows, cap
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")  # oneDNN's older name
    assert not ov_engine.onednn_cap_allows_bf16()
    ov_engine.cpu_supports_bf16.cache_clear()
    try:
        assert not ov_engine.cpu_supports_bf16()
        if openvino_importable():
            spec = EngineSpec(synthetic_bundle_factory(["a", "b"]).root / "model.onnx", inference_precision="bf16")
            with pytest.raises(EngineError, match="cannot run bf16 with oneDNN capped at AVX2"):
                open_engine(spec, device="openvino")
    finally:
        ov_engine.cpu_supports_bf16.cache_clear()


# ---- end to end: the gate's records decide ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle_factory: Any) -> Path:
    path: Path = tiny_bundle_factory(int8=True)
    return path


def _paths(bundle: Path) -> dict[str, Any]:
    return dict(json.loads((bundle / MANIFEST_NAME).read_text())["parity"]["paths"])


def test_the_gate_records_every_path_it_ran(int8_bundle: Path) -> None:
    paths = _paths(int8_bundle)
    assert paths["fp32:onnxruntime"]["passed"] is True and paths["int8:onnxruntime"]["passed"] is True
    for key in ("fp32:openvino:bf16", "int8:openvino:bf16"):
        assert key in paths
    if not openvino_importable():
        assert paths["fp32:openvino:f32"]["passed"] is None
        assert "not installed" in paths["fp32:openvino:f32"]["skipped"]
        return
    f32 = paths["int8:openvino:f32"]
    assert f32["passed"] is True and f32["precision"] == "int8" and f32["path"] == "int8:openvino:f32"
    assert paths["fp32:openvino:f32"]["max_abs"]["atd"] <= 1e-4  # gated as fp32
    if not cpu_supports_bf16():
        assert "does not run bf16" in paths["fp32:openvino:bf16"]["skipped"]
    else:
        assert paths["fp32:openvino:bf16"]["precision"] == "bf16"


@needs_openvino
def test_detector_runs_the_fastest_checked_path(int8_bundle: Path, tmp_path: Path) -> None:
    imgs = make_images(tmp_path / "imgs", 6)
    auto = Detector(int8_bundle)
    # A dynamic int8 bundle: onnxruntime's int8, unless AMX runs the fp32 engine in bf16 and the gate passed it.
    assert not auto.manifest.engine("int8").static_int8
    bf16_passed = _paths(int8_bundle)["fp32:openvino:bf16"]["passed"] is True
    if cpu_has_amx() and cpu_supports_bf16() and bf16_passed:
        assert auto.numeric_path == NumericPath("fp32", "openvino", "bf16")
    else:
        assert auto.numeric_path == NumericPath("int8") and auto.engine_file == "model.int8.onnx"
    cpu = Detector(int8_bundle, device="cpu")
    assert cpu.engine.backend == "onnxruntime" and cpu.engine_file == "model.int8.onnx"
    fp32 = Detector(int8_bundle, device="openvino", precision="fp32")
    assert fp32.engine_file == "model.onnx" and fp32.numeric_path == NumericPath("fp32", "openvino", "f32")
    ref = Detector(int8_bundle, device="cpu", precision="fp32")
    a = {d.path: float(d.atd or 0) for d in fp32.detect(imgs)}
    b = {d.path: float(d.atd or 0) for d in ref.detect(imgs)}
    assert a.keys() == b.keys()
    assert all(abs(a[k] - b[k]) <= 1e-4 for k in a)  # the fp32 gate's tolerance


@needs_openvino
def test_cli_refuses_an_unchecked_path_unless_allowed(int8_bundle: Path, tmp_path: Path) -> None:
    from clipn_runtime.cli import main

    bundle = tmp_path / "b"
    shutil.copytree(int8_bundle, bundle)
    raw = json.loads((bundle / MANIFEST_NAME).read_text())
    for key in raw["parity"]["paths"]:
        if "openvino" in key:
            raw["parity"]["paths"][key] = {"passed": None, "skipped": "OpenVINO was not installed at export"}
    (bundle / MANIFEST_NAME).write_text(json.dumps(raw))
    make_images(tmp_path / "imgs", 3)
    args = [str(tmp_path / "imgs"), "-e", str(bundle), "-o", str(tmp_path / "r.jsonl"), "--device", "openvino"]
    refused = CliRunner().invoke(main, args)
    assert (
        refused.exit_code == 2 and "no engine of this bundle passed clipn-export's parity gate" in refused.output
    )
    assert "Traceback" not in refused.output and not (tmp_path / "r.jsonl").exists()
    forced = CliRunner().invoke(main, [*args, "--allow-unchecked"])
    assert forced.exit_code == 0, forced.output
    assert "parity gate did not pass" in forced.output and "not installed at export" in forced.output
    run = json.loads((tmp_path / "r.jsonl.run.json").read_text())
    # a dynamic int8 bundle: OpenVINO's first path is its fp32 engine (its dynamic int8 ran slower than fp32)
    assert run["engine"] == "model.onnx" and "fp32 engine on openvino" in forced.output, run
    # auto: the unchecked OpenVINO paths are skipped, onnxruntime runs.
    auto = Detector(bundle)
    assert auto.engine.backend == "onnxruntime"


def test_without_openvino_a_bundle_runs_on_onnxruntime(int8_bundle: Path, tmp_path: Path) -> None:
    """A machine without the extra: clipn-detect's default runs the best onnxruntime engine, and asking for
    OpenVINO says how to install it."""
    make_images(tmp_path / "imgs", 3)
    out = tmp_path / "r.jsonl"
    code = import_blocker(("openvino",)) + (
        "from clipn_runtime.cli import main\n"
        f"import sys; sys.exit(main([{str(tmp_path / 'imgs')!r}, '-e', {str(int8_bundle)!r}, '-o', {str(out)!r}, "
        "'-v'], standalone_mode=False))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "onnxruntime CPUExecutionProvider (model.int8.onnx" in r.stderr
    code = import_blocker(("openvino",)) + (
        "from clipn_runtime.detector import Detector\n"
        f"Detector({str(int8_bundle)!r}, device='openvino', allow_unchecked=True)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "pip install 'clipn-ood[openvino]'" in r.stderr
