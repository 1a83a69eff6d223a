"""The zoo matrix (which quantizers apply to which model) and its cache of generated ONNX files.

    ZOO[name] = ZooModel(...)             one float model and the quantizers that make sense for it
    float_model(name, cache_dir)          -> <cache_dir>/<name>.float.onnx
    build(name, quantizer, cache_dir)     -> <cache_dir>/<name>.<quantizer>.onnx
    entries()                             -> [(name, quantizer), ...]

Every file is generated from seeds and written atomically (temporary file + rename). Each file
carries its cache key in `metadata_props` ("nativeq.zoo.key"): a hash of the generator's
sources, GENERATOR_VERSION, the seed, the entry's settings and the library versions (and the
shipped model's weights for `shipped_conformer`). An existing file whose key matches is reused;
anything else is regenerated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from nativeq._fs import sha256_file, write_bytes_atomic
from nativeq.errors import NativeqError

GENERATOR_VERSION = 1  # bump to regenerate every cached file
SEED = 0
KEY_PROP = "nativeq.zoo.key"
SHIPPED = "conformer-tiny"
SAMPLES_PER_FRAME = 160  # 10 ms hop at 16 kHz: a waveform of S = 160 * T samples is "T frames" long
CALIBRATION_FRAMES = (64, 100, 150, 80)  # one calibration input per entry, seeded
PARITY_FRAMES = 123  # the float export is checked against PyTorch at a length other than the example's
EXAMPLE_FRAMES = 100
D_FEATURES = 144  # the HuBERT encoder's input: feature frames of models.D_MODEL channels

ORT_STATIC = ("qdq_u8_pc", "qdq_u8_pt", "qdq_s8_pc", "qoperator")
# quantize_static options (quantize.py): every model with a static entry has them, run only when asked for by name
OPTION_QUANTIZERS = ("qdq_int4", "qdq_a16w8", "qdq_weight_pairs")

# input kind -> (scale, offset) of the seeded normal inputs: log-mel-like, MFCC-like, waveform,
# the shipped model's features (its training statistics: mean ~14, std ~4.4), and feature frames
# (a conv feature encoder's output, unit scale) for an encoder that starts at them.
INPUT_SCALES = {"logmel": (2.0, 0.0), "mfcc": (2.0, 0.0), "waveform": (0.1, 0.0), "shipped_logmel": (4.0, 14.0),
                "features": (1.0, 0.0)}


@dataclass(frozen=True)
class ZooModel:
    """One float model of the zoo.

    builder: key of `models.BUILDERS` (None: the shipped model, exported by `nativeq.export.float_onnx`).
    input_shape: ints and symbolic dim names ("T" frames, "S" samples, "B" batch).
    quantizers: the quantizers of `quantize.QUANTIZERS` that apply to this model.
    """

    description: str
    builder: str | None
    input_name: str
    input_shape: tuple
    output_name: str
    output_axes: dict
    input_kind: str
    quantizers: tuple[str, ...]

    @property
    def symbolic_dims(self) -> tuple[str, ...]:
        return tuple(d for d in self.input_shape if isinstance(d, str))

    def dims(self, frames: int) -> dict[str, int]:
        """Sizes of the symbolic dims for an input `frames` 10 ms frames long (batch 1)."""
        sizes = {"T": frames, "S": frames * SAMPLES_PER_FRAME, "B": 1}
        return {d: sizes[d] for d in self.symbolic_dims}

    def random_input(self, frames: int, rng: np.random.Generator) -> np.ndarray:
        dims = self.dims(frames)
        shape = tuple(dims[d] if isinstance(d, str) else d for d in self.input_shape)
        scale, offset = INPUT_SCALES[self.input_kind]
        return (rng.standard_normal(shape) * scale + offset).astype(np.float32)

    def dynamic_axes(self) -> dict:
        axes = {self.input_name: {i: d for i, d in enumerate(self.input_shape) if isinstance(d, str)}}
        axes[self.output_name] = dict(self.output_axes)
        return {k: v for k, v in axes.items() if v}


def _ctc(description, builder, quantizers, input_kind="logmel"):
    """A CTC model feats [1, T, 80] -> logits [1, T_out, vocab]."""
    return ZooModel(description, builder, "feats", (1, "T", 80), "logits", {1: "T_out"}, input_kind, quantizers)


ZOO: dict[str, ZooModel] = {
    "transformer_postnorm": _ctc("conv stem + 2 nn.TransformerEncoderLayer (post-norm, GELU) + CTC head",
                                 "transformer_postnorm", ORT_STATIC + ("dynamic",)),
    "transformer_prenorm": _ctc("conv stem + 2 nn.TransformerEncoderLayer (norm_first, GELU) + CTC head",
                                "transformer_prenorm", ORT_STATIC + ("dynamic",)),
    "conformer": _ctc("linear stem + 2 Conformer blocks (macaron SiLU FFN, MHSA, GLU/depthwise k15/BN conv) + CTC head",
                      "conformer", ORT_STATIC + ("dynamic",)),
    "relpos_conformer": _ctc("linear stem + 2 Conformer blocks with relative-position MHSA (Transformer-XL / ESPnet: "
                             "2T-1 sinusoidal positions from the input length, content and position biases, einsum "
                             "scores, rel_shift) + CTC head", "relpos_conformer", ORT_STATIC + ("dynamic",)),
    "quartznet": _ctc("QuartzNet/Citrinet: separable Conv1d k33/39/51/63, BN, ReLU, residuals, one squeeze-excite",
                      "quartznet", ORT_STATIC),
    "dscnn_kws": ZooModel("DS-CNN keyword spotting: conv 10x4 /2 + 4 depthwise-separable Conv2d, 12 classes",
                          "dscnn_kws", "mfcc", (1, 1, 49, 10), "logits", {}, "mfcc", ORT_STATIC),
    "lstm_am": _ctc("2-layer LSTM (256) acoustic model + CTC head", "lstm_am", ORT_STATIC + ("dynamic",)),
    "gru_am": _ctc("2-layer GRU (256) acoustic model + CTC head", "gru_am", ("qdq_u8_pc", "qdq_s8_pc", "dynamic")),
    "whisper_encoder": ZooModel("Whisper encoder: 2 Conv1d + GELU, sinusoidal positions, 2 pre-norm blocks, LayerNorm",
                                "whisper_encoder", "feats", (1, "T", 80), "encoded", {1: "T_out"}, "logmel",
                                ORT_STATIC + ("dynamic",)),
    "wav2vec2_fe": ZooModel("wav2vec2 feature encoder: 7 strided Conv1d, GroupNorm, GELU, LayerNorm + projection",
                            "wav2vec2_fe", "waveform", (1, "S"), "features", {1: "T_out"}, "waveform", ORT_STATIC),
    "convtasnet": ZooModel("Conv-TasNet-style separator: Conv1d encoder /8, 4 TCN blocks (PReLU, GroupNorm with one "
                           "group, dilated depthwise), sigmoid mask, ConvTranspose1d decoder", "convtasnet", "waveform",
                           (1, "S"), "separated", {1: "S_out"}, "waveform", ORT_STATIC),
    "resnet_speaker": ZooModel("ResNet speaker embedding: Conv2d stem + MaxPool, 3 basic blocks (stride 2, 1x1 "
                               "shortcuts), mean over time, Linear", "resnet_speaker", "feats", (1, "T", 80),
                               "embedding", {}, "logmel", ORT_STATIC),
    "mobilenetv3_kws": ZooModel("MobileNetV3 keyword spotting on log-mel [T, 40]: Conv2d /2 + Hardswish, 4 inverted "
                                "residual blocks (1x1 expand, depthwise 3x3, Hardsigmoid squeeze-excite, ReLU or "
                                "Hardswish, linear 1x1 projection), global average pool, 12 classes", "mobilenetv3_kws",
                                "feats", (1, 1, "T", 40), "logits", {}, "logmel", ORT_STATIC),
    "silero_vad": ZooModel("Silero-VAD-style detector: STFT as a Conv1d with a fixed DFT basis (256 taps, hop 128), "
                           "magnitude, 4 Conv1d + ReLU, 1-layer LSTM (64), Linear + sigmoid per frame", "silero_vad",
                           "waveform", (1, "S"), "speech_prob", {1: "T_out"}, "waveform", ORT_STATIC),
    "hubert_encoder": ZooModel("HuBERT/wav2vec2 transformer encoder on feature frames: LayerNorm + Linear projection, "
                               "grouped Conv1d k31 positional embedding + GELU, LayerNorm, 2 post-norm "
                               "nn.TransformerEncoderLayer, Linear head", "hubert_encoder", "features", (1, "T", D_FEATURES),
                               "logits", {1: "T_out"}, "features", ORT_STATIC + ("dynamic",)),
    "unet_enhancer": ZooModel("U-Net speech enhancer on 128-frame chunks of a 64-bin magnitude spectrogram: 3 stride-2 "
                              "Conv2d, 3 ConvTranspose2d k4 s2 (BatchNorm, PReLU), channel-concatenated skips, sigmoid "
                              "mask", "unet_enhancer", "spec", (1, 1, 128, 64), "enhanced", {}, "logmel", ORT_STATIC),
    "ecapa_tdnn": ZooModel("ECAPA-TDNN speaker embedding on [80, T]: Conv1d k5, 3 SE-Res2Net blocks (channel "
                           "chunks, dilated Conv1d, concat), multi-layer feature concat, attentive statistics pooling, "
                           "Linear", "ecapa_tdnn", "feats", (1, 80, "T"), "embedding", {}, "mfcc", ORT_STATIC),
    "shipped_conformer": ZooModel(f"nativeq's shipped {SHIPPED} (float export: nativeq.export.float_onnx)", None,
                                  "feats", ("B", "T", 80), "logits", {0: "B", 1: "T_out"}, "shipped_logmel",
                                  ("qat", "qdq_u8_pc", "qdq_s8_pc", "dynamic", "qoperator")),
}


# ----------------------------------------------------------------------------- lookup
def get_model(name: str) -> ZooModel:
    if name not in ZOO:
        raise NativeqError(f"unknown zoo model {name!r}; choose one of {', '.join(ZOO)}")
    return ZOO[name]


def check_entry(name: str, quantizer: str) -> ZooModel:
    from benchmarks.zoo.quantize import get_quantizer

    model = get_model(name)
    get_quantizer(quantizer)
    if quantizer not in _quantizers(model, asked=True):
        raise NativeqError(f"zoo model {name!r} has no {quantizer!r} variant; its quantizers: "
                           f"{', '.join(_quantizers(model, asked=True))}")
    return model


def _quantizers(model: ZooModel, asked: bool) -> tuple[str, ...]:
    """The model's quantizers, and the `OPTION_QUANTIZERS` when they are asked for by name and it has static ones."""
    static = any(q in ORT_STATIC for q in model.quantizers)
    return model.quantizers + (OPTION_QUANTIZERS if asked and static else ())


def entries(models=None, quantizers=None) -> list[tuple[str, str]]:
    """(model, quantizer) pairs of the matrix, optionally restricted to some models / quantizers."""
    from benchmarks.zoo.quantize import get_quantizer

    for name in models or ():
        get_model(name)
    for q in quantizers or ():
        get_quantizer(q)
    return [(name, q) for name, spec in ZOO.items() if not models or name in models
            for q in _quantizers(spec, asked=bool(quantizers)) if not quantizers or q in quantizers]


def calibration_feeds(name: str, seed: int = SEED) -> list[dict]:
    """The seeded inputs static quantizers calibrate on."""
    spec = get_model(name)
    rng = np.random.default_rng(seed)
    return [{spec.input_name: spec.random_input(frames, rng)} for frames in CALIBRATION_FRAMES]


# ----------------------------------------------------------------------------- cache keys
def _generator_sources_hash() -> str:
    digest = hashlib.sha256()
    for source in ("models.py", "quantize.py", "registry.py"):
        digest.update((Path(__file__).parent / source).read_bytes())
    return digest.hexdigest()


def _library_versions() -> dict:
    import onnxruntime
    import torch

    import nativeq

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "nativeq": getattr(nativeq, "__version__", "?")}


def _shipped_weights_hash() -> str:
    from nativeq.models.pretrained import resolve_model_dir

    return sha256_file(resolve_model_dir(SHIPPED) / "model.safetensors")


def cache_key(name: str, variant: str, seed: int = SEED) -> str:
    """Hash of everything the file `<name>.<variant>.onnx` is generated from."""
    from benchmarks.zoo.quantize import describe, get_quantizer

    spec = get_model(name)
    inputs = {
        "generator": GENERATOR_VERSION, "sources": _generator_sources_hash(), "seed": seed, "name": name,
        "variant": variant, "model": dataclasses.asdict(spec), "versions": _library_versions(),
        "quantizer": None if variant == "float" else describe(get_quantizer(variant)),
        "shipped_weights": _shipped_weights_hash() if spec.builder is None else None,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _stored_key(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001  (a truncated or foreign file is regenerated)
        return None
    return next((p.value for p in model.metadata_props if p.key == KEY_PROP), None)


def _write_with_key(model: onnx.ModelProto, path: Path, key: str, name: str, variant: str, seed: int) -> Path:
    props = {p.key: p.value for p in model.metadata_props}
    props.update({KEY_PROP: key, "nativeq.zoo.model": name, "nativeq.zoo.variant": variant,
                  "nativeq.zoo.seed": str(seed)})
    onnx.helper.set_model_props(model, props)
    write_bytes_atomic(path, model.SerializeToString())
    return path


def _cached(path: Path, key: str) -> bool:
    return _stored_key(path) == key


# ----------------------------------------------------------------------------- generation
def _export_zoo_float(name: str, spec: ZooModel, seed: int) -> onnx.ModelProto:
    """The seeded PyTorch module exported to ONNX, checked by onnx.checker and against PyTorch in ORT."""
    import torch

    from benchmarks.zoo import models

    module = models.seeded(models.BUILDERS[spec.builder], seed)
    rng = np.random.default_rng(seed)
    example = torch.from_numpy(spec.random_input(EXAMPLE_FRAMES, rng))
    data = models.export_float_onnx(module, example, models.OnnxIO(spec.input_name, spec.output_name,
                                                                   spec.dynamic_axes()))
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    _check_parity(name, module, data, spec.random_input(PARITY_FRAMES if spec.symbolic_dims else EXAMPLE_FRAMES, rng))
    return model


def _check_parity(name: str, module, data: bytes, x: np.ndarray, tol: float = 1e-3) -> None:
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    if got.shape != ref.shape:
        raise NativeqError(f"zoo model {name}: ONNX export gives shape {got.shape}, PyTorch {ref.shape}")
    diff = float(np.abs(got - ref).max())
    if not diff <= tol * max(1.0, float(np.abs(ref).max())):
        raise NativeqError(f"zoo model {name}: ONNX export differs from PyTorch by {diff:.2e}")


def _export_shipped_float() -> onnx.ModelProto:
    """The shipped model through `nativeq export-float`'s library function (parity-checked there)."""
    from nativeq.export.float_onnx import export_float

    with tempfile.TemporaryDirectory(prefix="nativeq-zoo-float-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        path = Path(tmp) / "float.onnx"
        export_float(SHIPPED, path)
        return onnx.load(str(path))


def float_model(name: str, cache_dir, seed: int = SEED) -> Path:
    """`<cache_dir>/<name>.float.onnx`, generated unless a file with the same cache key is there."""
    spec = get_model(name)
    path = Path(cache_dir) / f"{name}.float.onnx"
    key = cache_key(name, "float", seed)
    if _cached(path, key):
        return path
    model = _export_shipped_float() if spec.builder is None else _export_zoo_float(name, spec, seed)
    return _write_with_key(model, path, key, name, "float", seed)


def build(name: str, quantizer: str, cache_dir, seed: int = SEED) -> Path:
    """`<cache_dir>/<name>.<quantizer>.onnx`, generated unless a file with the same cache key is there."""
    from benchmarks.zoo.quantize import quantize_model

    check_entry(name, quantizer)
    path = Path(cache_dir) / f"{name}.{quantizer}.onnx"
    key = cache_key(name, quantizer, seed)
    if _cached(path, key):
        return path
    source = float_model(name, cache_dir, seed)
    model = quantize_model(quantizer, source, calibration_feeds(name, seed))
    return _write_with_key(model, path, key, name, quantizer, seed)
