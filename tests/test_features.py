"""The log-mel front end against kaldi-native-fbank (the reference Kaldi implementation)."""

import numpy as np
import pytest
import torch

from nativeq.models.features import N_MELS, SpecAugmentConfig, fbank, num_frames, spec_augment

knf = pytest.importorskip("kaldi_native_fbank")


def kaldi_fbank(samples: np.ndarray) -> np.ndarray:
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = 16000
    opts.mel_opts.num_bins = N_MELS
    extractor = knf.OnlineFbank(opts)
    extractor.accept_waveform(16000, (samples * 32768.0).tolist())
    extractor.input_finished()
    return np.stack([extractor.get_frame(i) for i in range(extractor.num_frames_ready)])


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """A harmonic tone with a moving pitch and formant-like noise bursts, plus background noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 120 + 40 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 20)) * (np.sin(2 * np.pi * 3 * t) > 0)
    return (0.1 * voiced + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize("seconds", [0.5, 1.37, 3.0])
def test_fbank_matches_kaldi_native_fbank(seconds):
    x = speech_like(seconds, seed=int(seconds * 100))
    ours = fbank(torch.from_numpy(x)).numpy()
    ref = kaldi_fbank(x)
    assert ours.shape == ref.shape == (num_frames(x.size), N_MELS)
    assert np.abs(ours - ref).max() < 2e-3


def test_fbank_matches_on_synthesized_speech(tmp_path):
    from nativeq.models.data import SAMPLE_RATE, read_wav
    import shutil
    import subprocess

    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.skip("espeak-ng/sox not installed")
    raw = tmp_path / "raw.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), "seven three nine"], check=True)
    wav = tmp_path / "x.wav"
    subprocess.run(["sox", "-R", str(raw), "-r", str(SAMPLE_RATE), "-b", "16", str(wav)], check=True)  # -R: repeatable dither
    x = read_wav(wav)
    diff = np.abs(fbank(torch.from_numpy(x)).numpy() - kaldi_fbank(x))
    # espeak pads with exact digital silence; there Kaldi's float32 arithmetic and our float64
    # differ in log-energies of ~1e-6, so the worst case is looser than the mean.
    assert diff.mean() < 1e-4 and diff.max() < 1e-2


def test_short_input_has_no_frames():
    assert fbank(torch.zeros(399)).shape == (0, N_MELS)
    assert fbank(torch.zeros(400)).shape == (1, N_MELS)


def test_spec_augment_masks_with_mean_and_is_seeded():
    feats = torch.randn(200, N_MELS)
    cfg = SpecAugmentConfig(freq_masks=2, freq_width=10, time_masks=2, max_time_width=20, time_width_fraction=0.1)
    a = spec_augment(feats, cfg, torch.Generator().manual_seed(1))
    b = spec_augment(feats, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    changed = a != feats
    assert changed.any()
    assert torch.allclose(a[changed], feats.mean().expand(int(changed.sum())))


def test_numpy_front_end_equals_the_torch_one():
    from nativeq.models import frontend_np

    x = speech_like(2.1, seed=7)
    np.testing.assert_allclose(frontend_np.fbank(x), fbank(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=0)
    assert frontend_np.fbank(x[:399]).shape == (0, N_MELS)


@pytest.mark.parametrize("warp", [0.85, 0.9, 0.97, 1.0, 1.04, 1.1, 1.15])
def test_vtln_warped_mel_banks_match_kaldi_native_fbank(warp):
    from nativeq.models.features import mel_banks

    mel_opts = knf.MelBanksOptions()
    mel_opts.num_bins = N_MELS
    frame_opts = knf.FrameExtractionOptions()
    frame_opts.samp_freq = 16000
    ref = np.array(knf.MelBanks(mel_opts, frame_opts, warp).get_matrix())  # [80, 257] incl. the Nyquist bin
    ours = mel_banks(vtln_warp=warp).numpy()
    assert np.all(ref[:, 256] == 0)
    assert np.abs(ref[:, :256].T - ours).max() < 1e-4
    if warp != 1.0:  # the warp moves the filters (a smaller factor moves them up the spectrum)
        bins = np.arange(256)[:, None]
        centroid = (ours * bins).sum(0) / ours.sum(0)
        plain = mel_banks().numpy()
        shift = centroid - (plain * bins).sum(0) / plain.sum(0)
        assert (np.sign(shift[5:75]) == (1 if warp < 1 else -1)).all()


def test_vtln_warp_keeps_the_band_edges_fixed():
    from nativeq.models.features import vtln_warp_hz

    for warp in (0.8, 1.2):
        assert vtln_warp_hz(20.0, warp, 20.0, 8000.0) == pytest.approx(20.0)
        assert vtln_warp_hz(8000.0, warp, 20.0, 8000.0) == pytest.approx(8000.0)
        assert vtln_warp_hz(1000.0, warp, 20.0, 8000.0) == pytest.approx(1000.0 / warp)
    x = speech_like(1.0, seed=3)
    assert torch.equal(fbank(torch.from_numpy(x), vtln_warp=1.0), fbank(torch.from_numpy(x)))
