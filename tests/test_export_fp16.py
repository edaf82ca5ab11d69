"""The fp16 converter's clamping is reported as the number of weight values it changed."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from clipn_export.precision import clamped_weights, to_fp16


def _encoder() -> onnx.ModelProto:
    # Three positive and one negative value below 1e-7, one above 1e4, in one tensor; one more tiny value in a
    # Constant node. The converter warns once per tensor and sign (3 warnings here), not once per value.
    w = np.array([[1e-9], [2e-9], [3e-9], [-1e-9], [1.0], [2e4]], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(np.array([1e-8], np.float32))),
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        "enc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fp16_reports_the_weight_values_it_clamped(caplog: pytest.LogCaptureFixture) -> None:
    enc = _encoder()
    with caplog.at_level(logging.INFO, logger="clipn_export.precision"):
        fp16 = to_fp16(enc)
    assert clamped_weights(enc, fp16) == (5, 1)
    assert "set 5 weight values with 0 < |w| < 1e-07 to ±1e-07 and 1 with |w| > 10000 to ±10000" in caplog.text
    w16 = numpy_helper.to_array(next(t for t in fp16.graph.initializer if t.name == "w"))
    assert w16.dtype == np.float16 and w16[0, 0] == np.float16(1e-7) and w16[5, 0] == np.float16(1e4)
