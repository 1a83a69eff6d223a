"""Seeded fuzzing of run-time inputs, tampered artifacts and audio files (`fuzz_inputs.py`): every case ends
in a clean one-line NativeqError, in a warning of truncation with exactly the samples present (audio), or in
a result that equals its reference; never a crash, a traceback or a wrong answer.

Default suite: a fixed subset of each seed-0 campaign (every 9th of 360 cases: every category and base),
run in this process, and one regression test for each hole the campaigns found. The whole campaigns (360
cases each, child-process isolated) are marked slow; their figures are in docs/reliability-fuzz.md.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from fuzz_inputs import (BASE_INPUTS, BASES, CATEGORIES, KINDS, OUTCOMES, Bases, base_audio, case_base, case_category,
                         make_case, run_campaign, run_case)

import nativeq
from nativeq.errors import NativeqError
from nativeq.models.audio import AudioTruncatedWarning, read_audio
from nativeq.runtime.manifest import seal_manifest

SEED = 0
CAMPAIGN_CASES = 360
FAST_CASES = list(range(0, CAMPAIGN_CASES, 9))  # 9 is prime to the 8 and 7 categories: all of them, every base
ALLOWED = {"runtime": ("error", "verified"), "manifest": ("error", "verified"),
           "audio": ("error", "warning", "verified")}


@pytest.fixture(scope="session")
def fuzz_bases(tmp_path_factory, matmul_artifact):
    """The compiled bases (the `matmul` one is conftest's `matmul_artifact`), compiled once per session."""
    return Bases(tmp_path_factory.mktemp("fuzz_bases"), prebuilt={"matmul": matmul_artifact})


def _ids(kind):
    return [f"{i:03d}-{case_category(kind, i)}-{case_base(kind, i)}" for i in FAST_CASES]


@pytest.mark.parametrize("index", FAST_CASES, ids=_ids("runtime"))
def test_runtime_input_is_refused_cleanly_or_verified(fuzz_bases, index, tmp_path):
    case = make_case("runtime", index, SEED)
    outcome, mutation = run_case(case, fuzz_bases, tmp_path)
    assert outcome.outcome in ALLOWED["runtime"], f"{case.id} ({mutation}): {outcome.outcome}: {outcome.detail}"


@pytest.mark.parametrize("index", FAST_CASES, ids=_ids("manifest"))
def test_tampered_artifact_is_refused_cleanly_or_verified(fuzz_bases, index, tmp_path):
    case = make_case("manifest", index, SEED)
    outcome, mutation = run_case(case, fuzz_bases, tmp_path)
    assert outcome.outcome in ALLOWED["manifest"], f"{case.id} ({mutation}): {outcome.outcome}: {outcome.detail}"


@pytest.mark.parametrize("index", FAST_CASES, ids=_ids("audio"))
def test_mutated_audio_is_refused_warned_or_read_exactly(index, tmp_path):
    case = make_case("audio", index, SEED)
    outcome, mutation = run_case(case, None, tmp_path)
    assert outcome.outcome in ALLOWED["audio"], f"{case.id} ({mutation}): {outcome.outcome}: {outcome.detail}"


@pytest.mark.parametrize("kind", KINDS)
def test_fast_subset_covers_every_category_and_base(kind):
    assert {case_category(kind, i) for i in FAST_CASES} == set(CATEGORIES[kind])
    assert {case_base(kind, i) for i in FAST_CASES} >= set(BASES[kind])


def test_cases_are_the_same_on_every_run():
    for kind in ("runtime", "audio"):
        first, again = make_case(kind, 77, 3), make_case(kind, 77, 3)
        assert (first.category, first.base, first.mutation) == (again.category, again.base, again.mutation)
    assert make_case("audio", 12, 3).payload["data"] == make_case("audio", 12, 3).payload["data"]
    feeds, again = make_case("runtime", 4, 3).payload["feeds"], make_case("runtime", 4, 3).payload["feeds"]
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)


def test_base_inputs_are_what_the_compiled_bases_declare(fuzz_bases):
    """The runtime generator builds feeds from `BASE_INPUTS`; they must be the artifacts' own input specs."""
    for name, inputs in BASE_INPUTS.items():
        model = fuzz_bases.model(name)
        assert [(s.name, s.dtype, s.shape) for s in model.inputs] == [(n, d, tuple(s)) for n, d, s in inputs]


# ----------------------------------------------------------------------------- run-time inputs: regressions
def test_read_only_input_runs_like_a_writeable_one(fuzz_bases):
    """A read-only array (np.frombuffer of bytes, a read-only memmap) crashed: numpy refuses to export it through
    the DLPack version tvm-ffi asks for (BufferError; runtime campaign seed 0, cases 077 and 285)."""
    model = fuzz_bases.model("two_io")
    feeds = {"x": np.random.default_rng(0).uniform(-6, 6, (1, 9, 16)).astype(np.float32),
             "z": np.frombuffer(np.random.default_rng(1).uniform(-6, 6, 72).astype(np.float32).tobytes(),
                                np.float32).reshape(1, 9, 8)}
    assert not feeds["z"].flags.writeable
    got = model.run(feeds)
    expected = model.run({name: array.copy() for name, array in feeds.items()})
    assert all(np.array_equal(got[name], expected[name]) for name in expected)


def test_huge_zero_stride_input_is_refused_before_any_element_is_read(fuzz_bases):
    """A broadcast of 10^12 rows (4 bytes of memory) to an artifact whose memory bound does not grow with the input
    (its graph fixes the length) was summed element by element for the finiteness check, for hours, before the
    shape condition refused it (runtime campaign seed 2, case 028); at 3·10^9 rows, the sum took 79 s and the
    contiguous copy then failed to allocate 89 GiB (seed 3, case 188)."""
    model = fuzz_bases.model("traced")
    huge = np.broadcast_to(np.zeros((1, 1, 8), np.float32), (1, 10**12, 8))
    started = time.perf_counter()
    with pytest.raises(NativeqError, match=r"^input sizes T=1000000000000 do not fit Reshape node 'traced_reshape'"):
        model.run({"x": huge})
    assert time.perf_counter() - started < 1.0


def test_copies_of_strided_inputs_count_towards_the_memory_limit(fuzz_bases):
    """The runtime copies a strided input before the call: its bytes are part of what the call needs."""
    from nativeq.runtime.model import aligned

    _, artifact = fuzz_bases.paths("traced")
    bound = nativeq.load(artifact).memory_needed({})  # static after the traced Reshape: 4800 bytes
    model = nativeq.load(artifact, max_memory=bound + 1000)
    x = aligned(np.random.default_rng(0).uniform(-1, 1, (1, 50, 8)).astype(np.float32))  # 1600 bytes, not copied
    assert model.run({"x": x})["y"].shape == (1, 50, 8)
    with pytest.raises(NativeqError, match=r"a call with T=50, 1.6 kB of input copies needs up to 6.4 kB \(6400 bytes, "
                                           r"estimated\) and the limit is 5.8 kB"):
        model.run({"x": np.asfortranarray(x)})


# ----------------------------------------------------------------------------- tampered artifacts: regressions
@pytest.fixture
def matmul_copy(matmul_artifact, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(matmul_artifact[1], copy)
    return copy


def _resealed(artifact, edit) -> None:
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(seal_manifest(manifest), indent=1))


_READ_MANIFEST = "import sys\nfrom nativeq.runtime import read_manifest\nread_manifest(sys.argv[1])\n"


@pytest.mark.parametrize("replace", ["fifo", "/dev/zero"])
def test_manifest_that_is_not_a_regular_file_is_refused_at_once(matmul_copy, replace):
    """manifest.json a FIFO blocked `load` for ever; a symlink to /dev/zero or /dev/urandom read until memory ran
    out (manifest campaign seed 0, cases 039 and 023; seed 3, case 015). In a child process: the failure being a
    hang."""
    (matmul_copy / "manifest.json").unlink()
    if replace == "fifo":
        os.mkfifo(matmul_copy / "manifest.json")
    else:
        (matmul_copy / "manifest.json").symlink_to(replace)
    result = subprocess.run([sys.executable, "-c", _READ_MANIFEST, str(matmul_copy)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.endswith("manifest.json is not a regular file (a symlink, directory, FIFO or device)"), last


def test_manifest_with_a_number_too_long_to_convert_is_invalid_json(matmul_copy):
    """Python refuses to convert an int literal of more than 4300 digits: a ValueError that is not a JSONDecodeError
    escaped `read_manifest` (manifest campaign seed 0, cases 068, 116, 220 and 316)."""
    path = matmul_copy / "manifest.json"
    path.write_text(path.read_text().replace('"schema": 1', '"schema": ' + "9" * 5000, 1))
    with pytest.raises(NativeqError, match=r"manifest.json is not valid JSON: Exceeds the limit \(4300 digits\)"):
        nativeq.load(matmul_copy)


@pytest.mark.parametrize("checks, message", [
    (-1, r"manifest field 'shape_checks' must be a list of conditions or null, got -1"),
    ([{"node": "n", "op": "Reshape", "lhs": "T" + " * T" * 3000, "rhs": "T"}],
     r"manifest field 'shape_checks' holds an invalid condition .*: maximum recursion depth exceeded"),
    ([{"node": "n", "op": "Add", "lhs": "T" + " * T" * 100, "rhs": "T"}],
     r"manifest field 'shape_checks' holds an invalid condition .*: T \* T .* is beyond int64"),
], ids=["not-a-list", "nested-too-deep", "beyond-int64"])
def test_resealed_shape_checks_that_cannot_be_evaluated_are_refused(matmul_copy, checks, message):
    """`shape_checks: -1` crashed `load` (TypeError, manifest campaign seed 1, case 097; NaN, inf, true: seed 2,
    cases 025, 049, 185); an expression nested deeper than Python's parser goes crashed `run` (RecursionError,
    seed 1, case 226)."""
    _resealed(matmul_copy, lambda m: m.update(shape_checks=checks))
    x = np.zeros((1, 5, 64), np.float32)
    with pytest.raises(NativeqError, match=message) as caught:
        nativeq.load(matmul_copy).run({"x": x})
    assert "\n" not in str(caught.value)


def test_file_name_with_a_line_break_is_shown_on_one_line(matmul_copy):
    """(manifest campaign seed 0, case 287: the message of an unlisted file broke into two lines)"""
    (matmul_copy / "line\nbreak").write_text("hi")
    with pytest.raises(NativeqError, match=r"contains 'line\\nbreak', which its manifest does not list$"):
        nativeq.load(matmul_copy)


@pytest.mark.parametrize("edit, feeds, message", [
    (lambda m: m["inputs"][0].update(dtype="int8"), {"x": np.zeros((1, 5, 64), np.int8)},
     r"calling 'main' failed: .*expect Tensor with dtype float32 but get int8"),
    (lambda m: m["inputs"].clear(), {}, r"calling 'main' failed: .*expects 1 arguments \(x\), but 0 arguments"),
    (lambda m: m["outputs"][0].update(dtype="int4"), {"x": np.zeros((1, 5, 64), np.float32)},
     r"its library returned 'y' as float32\[1, 5, 48\], its manifest declares y: int4\[1, T, 48\]; recompile it"),
    (lambda m: m["outputs"][0]["shape"].__setitem__(2, 40), {"x": np.zeros((1, 5, 64), np.float32)},
     r"its library returned 'y' as float32\[1, 5, 48\], its manifest declares y: float32\[1, T, 40\]"),
], ids=["input-dtype", "no-inputs", "output-dtype", "output-size"])
def test_manifest_resealed_to_describe_another_library_is_refused_at_the_call(matmul_copy, edit, feeds, message):
    """The VM checks its arguments and raised TVM's own errors (manifest campaign seed 0, cases 034, 098 and 194);
    outputs were returned under dtypes and sizes their manifest did not declare (seed 0, cases 050, 226, 338;
    seed 2, case 066), and one declared int4 would have been converted to int4 values."""
    _resealed(matmul_copy, edit)
    with pytest.raises(NativeqError, match=message) as caught:
        nativeq.load(matmul_copy).run(feeds)
    assert "\n" not in str(caught.value)


def test_memory_formula_beyond_float_range_refuses_the_call(matmul_copy):
    """A coefficient of 1.7e308 times T overflowed `math.ceil` (OverflowError; manifest campaign seed 1, case 282),
    T to the power 10^6 overflowed a float (seed 1, case 114)."""
    _resealed(matmul_copy, lambda m: m["memory"]["bytes"].append({"coef": 1.7e308, "dims": {"T": 2}}))
    with pytest.raises(NativeqError, match=r"a call with T=5(, [0-9.]+ kB of input copies)? needs up to 9.22e\+06 TB"):
        nativeq.load(matmul_copy, max_memory="1GB").run({"x": np.zeros((1, 5, 64), np.float32)})


_CHECK_BFLOAT16 = """
import sys
import numpy as np
from nativeq.runtime import check_inputs
from nativeq.runtime.manifest import TensorSpec
assert "ml_dtypes" not in sys.modules
check_inputs((TensorSpec("a", "bfloat16", ("N",)),), {"a": np.zeros(3, np.float32)})
"""


def test_bfloat16_input_is_checked_without_ml_dtypes_imported():
    """A manifest may declare bfloat16, float8 or 4-bit inputs; numpy knows those names only once ml_dtypes is
    imported, which a process that has not loaded tvm-ffi (verify's checks, `TVM_USE_RUNTIME_LIB=1`) has not done:
    `np.dtype("bfloat16")` raised TypeError there. Found next to the campaign's re-sealed dtype edits, whose process
    had ml_dtypes imported."""
    result = subprocess.run([sys.executable, "-c", _CHECK_BFLOAT16], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "nativeq.errors.NativeqError: input 'a': expected dtype bfloat16, got float32"), result.stderr[-2000:]


_LOAD = "import sys, nativeq\nnativeq.load(sys.argv[1])\n"


def test_truncated_library_with_its_sha256_rerecorded_is_refused_not_loaded(matmul_copy):
    """dlopen maps segments past the end of a cut library, and the first access kills the process with SIGBUS
    (manifest campaign seed 0, cases 214 and 278). In a child process: the failure being the process's death."""
    library = matmul_copy / "model.so"
    library.write_bytes(library.read_bytes()[:2923])
    from nativeq._fs import sha256_file

    _resealed(matmul_copy, lambda m: m["files"].update({"model.so": sha256_file(library)}))
    result = subprocess.run([sys.executable, "-c", _LOAD, str(matmul_copy)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"})
    assert result.returncode == 1, result.stderr[-2000:]
    assert "model.so is cut short: a loadable segment ends at byte" in result.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- audio: regressions
def _flac_with_total_samples(total: int) -> bytes:
    data = bytearray(base_audio("flac16_mono")[1])
    word = int.from_bytes(data[21:26], "big") & ~(2**36 - 1) | total  # STREAMINFO's 36-bit total samples
    data[21:26] = word.to_bytes(5, "big")
    return bytes(data)


@pytest.mark.parametrize("total, warns", [(0, False), (4001, True), (2**36 - 1, True), (100, False)])
def test_flac_length_in_streaminfo_is_not_trusted_for_an_allocation(tmp_path, total, warns):
    """A FLAC stream of unknown length (STREAMINFO total 0, what streaming encoders write) crashed `read_audio`
    (ValueError: array is too big; audio campaign seed 0, case 048), one claiming 2^36 - 1 samples tried to allocate
    256 GiB (MemoryError; seed 1, case 013), one claiming a few more than it holds was refused as corrupt. Now every
    frame present is read; a claim of more is a truncation."""
    import soundfile as sf

    original, _ = sf.read(str(_write(tmp_path / "original.flac", base_audio("flac16_mono")[1])), dtype="float32")
    path = _write(tmp_path / "claims.flac", _flac_with_total_samples(total))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = read_audio(path)
    expected = original[:total] if 0 < total < len(original) else original
    np.testing.assert_array_equal(x, expected)
    truncations = [w for w in caught if issubclass(w.category, AudioTruncatedWarning)]
    assert len(truncations) == (1 if warns else 0) and len(caught) == len(truncations), [str(w.message) for w in caught]
    if warns:
        assert f"promises {total} frames but only {len(original)} decode" in str(truncations[0].message)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_wav_data_size_that_overshoots_by_less_than_a_frame_is_not_a_truncation(tmp_path):
    """A data size one byte more than the data warned "promises 4000 frames but holds 4000: truncated" (audio
    campaign seed 0, cases 148 and 218): only missing whole frames are a truncation."""
    pcm = (np.arange(4000) % 200 - 100).astype("<i2")
    for channels, bits in ((2, 16), (1, 12)):  # 12 bits are stored in 2 bytes
        frames = pcm.reshape(-1, channels) if channels == 2 else pcm
        fmt = struct.pack("<HHIIHH", 1, channels, 16000, 16000 * 2 * channels, 2 * channels, bits)
        body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", pcm.nbytes + 1) + pcm.tobytes()
        path = _write(tmp_path / f"odd{channels}.wav", b"RIFF" + struct.pack("<I", len(body)) + body)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x = read_audio(path)
        assert len(x) == len(frames)


# ----------------------------------------------------------------------------- the whole campaigns
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_campaign(kind, tmp_path):
    records = run_campaign(kind, CAMPAIGN_CASES, SEED, tmp_path / "fuzz.jsonl", tmp_path / "work")
    assert len(records) == CAMPAIGN_CASES >= 300
    bad = [f"{r['outcome']}: {r['id']} ({r['mutation']}): {r['detail']}" for r in records
           if r["outcome"] not in ALLOWED[kind]]
    assert not bad, "\n".join(bad)
    counts = {o: sum(r["outcome"] == o for r in records) for o in OUTCOMES}
    assert counts["error"] and counts["verified"], counts
