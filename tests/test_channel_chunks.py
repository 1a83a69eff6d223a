"""Channel chunks between int8 convs run channels-last (`channels_last.py`): a BatchNorm after a conv's activation
(conv -> ReLU -> BN, which cannot fold into the conv), a slice of the channels (Res2Net's chunks) and a concat
along them (the chunks joined again) rewrite to the channels-last twin, so no transpose kernel is left between
the convs of a Res2Net block (ECAPA-TDNN's: 63 -> 46 kernels, 0.84x the time).

A Res2Net-style block exported by torch and quantized by ONNX Runtime's `quantize_static` (QDQ, u8, per channel):
compared with ONNX Runtime on x86 (and on the Pi 5 under qemu), and its kernels counted."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from kernel_rules import schedule_rules

from nativeq.compile import CompileConfig, compile_model
from nativeq.verify import VerifyConfig, verify_artifact


def _res2net_block(channels: int = 32, scale: int = 4):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            width = channels // scale
            self.conv_in = nn.Conv1d(channels, channels, 1)
            self.bn_in = nn.BatchNorm1d(channels)
            self.convs = nn.ModuleList(nn.Conv1d(width, width, 3, padding=1) for _ in range(scale - 1))
            self.bns = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(scale - 1))
            self.conv_out = nn.Conv1d(channels, channels, 1)

        def forward(self, x):
            x = self.bn_in(torch.relu(self.conv_in(x)))
            chunks = torch.chunk(x, scale, dim=1)
            out, previous = [], None
            for i, chunk in enumerate(chunks):
                if i == 0:
                    out.append(chunk)
                    continue
                y = chunk if previous is None else chunk + previous
                previous = self.bns[i - 1](torch.relu(self.convs[i - 1](y)))
                out.append(previous)
            return self.conv_out(torch.cat(out, dim=1))

    return Block


@pytest.fixture(scope="module")
def block_model(tmp_path_factory):
    import torch

    from benchmarks.zoo.models import OnnxIO, export_float_onnx, seeded
    from benchmarks.zoo.quantize import quantize_model

    root = tmp_path_factory.mktemp("chunks")
    module = seeded(_res2net_block(), 3)
    io_names = OnnxIO("x", "y", {"x": {2: "T"}, "y": {2: "T"}})
    float_path = root / "float.onnx"
    float_path.write_bytes(export_float_onnx(module, torch.randn(1, 32, 40), io_names))
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 32, 40)).astype(np.float32)} for _ in range(4)]
    path = root / "block.onnx"
    onnx.save(quantize_model("qdq_u8_pc", float_path, feeds), path)
    return path


def test_no_transpose_between_the_convs_of_a_res2net_block(block_model, tmp_path):
    rules = schedule_rules(onnx.load(block_model), tmp_path)
    transposes = [name for name in rules if "transpose" in name]
    assert len(transposes) <= 2, transposes  # the input's and the output's
    assert not any("batch_norm" in name and "transpose" in name for name in rules), rules


@pytest.mark.parametrize("target", ["host", pytest.param("rpi5", marks=pytest.mark.arm)])
def test_res2net_block_matches_onnxruntime(block_model, target, tmp_path):
    compile_model(block_model, tmp_path / target, CompileConfig(target=target, use_tuning=False), progress=False)
    report = verify_artifact(tmp_path / target, block_model, VerifyConfig(runs=2, dims={"T": 37}, accept_ties=True))
    assert report.passed, report.table()
