"""Speech corpus: synthesis from offline TTS engines, manifests, audio reading (`audio`).

A data directory holds one manifest per split, `<split>.tsv`, each line
`relative/path.wav<TAB>duration_seconds<TAB>transcript`, and the WAVs (16 kHz mono 16-bit).
Users can evaluate on their own recordings by writing such a file.

`synthesize_corpus` builds the splits from Debian TTS engines, deterministically from a seed:

- train: espeak-ng (8 English accents x ~80 voice variants) and flite (awb, rms, slt);
- dev / test: espeak-ng voice variants that never occur in train (disjoint sets);
- other: festival's diphone voices (ked, kal): an engine and speakers absent from train.
  flite's kal16 shares its diphone database with festival's kal, so it is kept out of
  train too. Holding out a whole engine (instead of only voices) is the closest
  synthetic stand-in for "a voice the model never heard".

`SynthConfig.engines` picks the engines (default espeak-ng, flite, festival: the corpus
above). `kokoro` (neural Kokoro-82M, `models/kokoro.py`, the optional `tts` extra) adds
blends of its five voice styles to train, dev and test, disjoint between the splits.

Every utterance is augmented: speed perturbation, reverberation, telephone band (8 kHz),
gain, additive white/pink/brown noise at 5-30 dB SNR, and padded with noise plus dither
(never digital silence, which stalled CTC training in a trial).
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from nativeq._fs import atomic_directory, write_bytes_atomic, write_text_atomic
from nativeq.errors import NativeqError
from nativeq.models import kokoro
from nativeq.models.audio import audio_info, read_audio, resample  # noqa: F401 (resample: public name)
from nativeq.models.text import normalize_text

SAMPLE_RATE = 16000

ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
# espeak-ng voice variants ("speakers"). Novelty voices (Demonic, whisper, fast) are left out.
ESPEAK_VARIANTS = tuple(
    """adam Alex Alicia Andrea Andy Annie antonio aunty belinda benjamin boris caleb david Denis Diogo ed
    edward edward2 Gene Gene2 gustave announcer Henrique Hugo iven iven2 iven3 iven4 Jacky john kaukovalta Lee
    linda marcelo Marco Mario max Michael michel miguel Mike Mr Nguyen pablo paul pedro quincy RicishayMax
    RicishayMax2 RicishayMax3 rob robert robosoft robosoft2 robosoft3 robosoft4 robosoft5 robosoft6 robosoft7
    robosoft8 steph steph2 steph3 Storm Tweaky UniRobot zac anika anikaRobot AnxiousAndy f1 f2 f3 f4 f5 grandpa
    klatt klatt2 klatt3 klatt4 klatt5 klatt6 m1 m2 m3 m4 m5 m6 m7 m8 norbert sandro shelby travis victor croak
    grandma""".split()
)
TEST_VARIANTS = ("f2", "m3", "klatt2", "Andy", "belinda", "john", "max", "steph2", "travis", "grandma", "iven3", "Gene2")
DEV_VARIANTS = ("f4", "m5", "klatt4", "Annie", "edward", "paul", "linda", "robosoft3")
TRAIN_VARIANTS = tuple(v for v in ESPEAK_VARIANTS if v not in TEST_VARIANTS and v not in DEV_VARIANTS)
FLITE_TRAIN_VOICES = ("awb", "rms", "slt")
FESTIVAL_OTHER_VOICES = ("ked_diphone", "kal_diphone")

KOKORO_VOICES = kokoro.split_voices()  # {train, dev, test}: blends of the packaged styles, disjoint

ENGINES = ("espeak-ng", "flite", "festival", "kokoro")
DEFAULT_ENGINES = ("espeak-ng", "flite", "festival")  # the corpus before kokoro, unchanged byte for byte

# Which voices each split draws from: (engine, voice) pairs; a corpus uses those of its engines.
SPLIT_VOICES: dict[str, tuple[tuple[str, str], ...]] = {
    "train": tuple(("espeak-ng", v) for v in TRAIN_VARIANTS) + tuple(("flite", v) for v in FLITE_TRAIN_VOICES)
    + tuple(("kokoro", v) for v in KOKORO_VOICES["train"]),
    "dev": tuple(("espeak-ng", v) for v in DEV_VARIANTS) + tuple(("kokoro", v) for v in KOKORO_VOICES["dev"]),
    "test": tuple(("espeak-ng", v) for v in TEST_VARIANTS) + tuple(("kokoro", v) for v in KOKORO_VOICES["test"]),
    "other": tuple(("festival", v) for v in FESTIVAL_OTHER_VOICES),
}


def split_voices(split: str, engines=DEFAULT_ENGINES) -> tuple[tuple[str, str], ...]:
    """The (engine, voice) pairs `split` draws from with these engines, in table order."""
    return tuple(ev for ev in SPLIT_VOICES[split] if ev[0] in engines)


_INSTALL = {
    "espeak-ng": "apt-get install espeak-ng",
    "flite": "apt-get install flite",
    "text2wave": "apt-get install festival festvox-kdlpc16k festvox-kallpc16k",
    "sox": "apt-get install sox",
}

# ----------------------------------------------------------------------------- text
_DIGIT_WORDS = "zero one two three four five six seven eight nine".split()
_COMMANDS = """yes|no|stop|go|up|down|left|right|on|off|play|pause|next|back|cancel|okay|help|repeat|start|finish
turn on the lights|turn off the lights|volume up|volume down|open the door|close the door|lock the door
play some music|stop the music|next song|previous song|call home|answer the call|hang up|take a picture
start recording|stop recording|what time is it|set an alarm|cancel the alarm|turn left|turn right|go forward
go back|move up|move down|show the map|read my messages|send a message|mute|unmute|louder|quieter|open settings
switch on the fan|switch off the fan|make it warmer|make it cooler|find my phone|good morning|good night""".replace(
    "\n", "|"
).split("|")
_SUBJECTS = "the cat|the dog|my friend|the teacher|a small bird|the old man|her brother|the children|our team|the driver|my sister|the farmer".split("|")
_VERBS = "found|saw|wanted|carried|painted|opened|bought|cleaned|dropped|followed|liked|moved|called|fixed|washed".split("|")
_OBJECTS = "a red box|the blue car|some fresh bread|the heavy bag|a green apple|the window|the front door|an old book|the yellow kite|a warm coat|the wooden chair|the map|a cup of tea|the bright lamp".split("|")
_PLACES = "in the kitchen|near the river|at the station|under the table|by the window|in the garden|on the hill|at school|in the city|after dinner|before lunch|on monday|in the morning|at night".split("|")
_NOUNS = "minutes|hours|seconds|days|people|apples|miles|degrees|dollars|pages".split("|")
_CITIES = "london|paris|boston|tokyo|berlin|madrid|chicago|sydney|toronto|dublin|seattle|denver".split("|")


def _random_text(rng: np.random.Generator) -> str:
    kind = rng.random()
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    if kind < 0.3:  # digit strings (phone numbers, PINs)
        return " ".join(pick(_DIGIT_WORDS) for _ in range(int(rng.integers(2, 8))))
    if kind < 0.55:
        return pick(_COMMANDS)
    if kind < 0.7:
        n = int(rng.integers(1, 100)) if rng.random() < 0.7 else int(rng.integers(100, 2000))
        templates = [
            f"set a timer for {n} {pick(_NOUNS)}",
            f"what is the weather in {pick(_CITIES)}",
            f"call {pick(_SUBJECTS).split()[-1]} at {n}",
            f"there are {n} {pick(_NOUNS)} left",
            f"book a table for {n % 12 + 1} in {pick(_CITIES)}",
            f"turn the volume to {n % 100}",
        ]
        return normalize_text(pick(templates))
    sentence = f"{pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)}"
    if rng.random() < 0.6:
        sentence += " " + pick(_PLACES)
    return sentence


# ----------------------------------------------------------------------------- audio
def _require_tool(tool: str) -> None:
    if shutil.which(tool) is None:
        raise NativeqError(f"missing tool {tool!r} for speech synthesis (install with: {_INSTALL[tool]})")


def _run(cmd: list[str], what: str, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(cmd, input=stdin, capture_output=True)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise NativeqError(f"{what} failed ({cmd[0]} exit {proc.returncode}): {err[-1] if err else ''}")
    return proc.stdout


def _synthesize_raw(engine: str, voice: str, text: str, rng: np.random.Generator, tmp: Path) -> Path:
    raw = tmp / "tts.wav"
    if engine == "espeak-ng":
        accent = ESPEAK_ACCENTS[int(rng.integers(len(ESPEAK_ACCENTS)))]
        cmd = ["espeak-ng", "-v", f"{accent}+{voice}", "-s", str(int(rng.integers(120, 200))),
               "-p", str(int(rng.integers(25, 75))), "-g", str(int(rng.integers(0, 6))), "-w", str(raw), text]
        _run(cmd, f"espeak-ng voice {accent}+{voice}")
    elif engine == "flite":
        stretch = rng.uniform(0.85, 1.25)
        _run(["flite", "-voice", voice, "--setf", f"duration_stretch={stretch:.3f}", "-t", text, "-o", str(raw)],
             f"flite voice {voice}")
    elif engine == "kokoro":
        speech = kokoro.synthesize(text, voice, speed=rng.uniform(0.85, 1.2), rate=SAMPLE_RATE)
        speech = speech.astype(np.float64) / max(1.0, float(np.abs(speech).max(initial=0.0)))
        pcm = np.round(speech * 32767.0).astype(np.int16)
        write_wav(raw, pcm)  # through the same sox effects as the other engines
    elif engine == "festival":
        stretch = rng.uniform(0.85, 1.2)
        script = tmp / "text.txt"
        script.write_text(text + "\n")
        _run(["text2wave", "-eval", f"(voice_{voice})", "-eval", f"(Parameter.set 'Duration_Stretch {stretch:.3f})",
              "-o", str(raw), str(script)], f"festival voice {voice}")
    else:
        raise NativeqError(f"unknown TTS engine {engine!r}")
    return raw


def _sox_effects(rng: np.random.Generator) -> list[str]:
    effects: list[str] = []
    if rng.random() < 0.5:
        effects += ["speed", f"{rng.uniform(0.88, 1.12):.3f}"]
    if rng.random() < 0.2:
        effects += ["tempo", "-s", f"{rng.uniform(0.85, 1.15):.3f}"]
    if rng.random() < 0.3:
        effects += ["reverb", str(int(rng.integers(20, 80))), "50", str(int(rng.integers(20, 100)))]
    if rng.random() < 0.15:  # telephone band: 300-3400 Hz through an 8 kHz channel
        effects += ["sinc", "300-3400", "rate", "8000"]
    effects += ["rate", str(SAMPLE_RATE)]
    return effects


def _colored_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    white = rng.standard_normal(n)
    color = rng.integers(3)
    if color == 0:
        return white
    spectrum = np.fft.rfft(white)
    freqs = np.maximum(np.fft.rfftfreq(n), 1.0 / max(n, 1))
    spectrum /= freqs ** (0.5 if color == 1 else 1.0)  # pink (1/f) or brown (1/f^2) power
    noise = np.fft.irfft(spectrum, n)
    return noise / (noise.std() + 1e-12)


def _augment(speech: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gain, noise padding, additive noise at 5-30 dB SNR, dither; returns int16."""
    peak = np.abs(speech).max() + 1e-9
    speech = speech / peak * (10 ** (rng.uniform(-18, -1) / 20))
    pad_l, pad_r = (int(rng.uniform(0.05, 0.5) * SAMPLE_RATE) for _ in range(2))
    x = np.concatenate([np.zeros(pad_l), speech, np.zeros(pad_r)])
    power = float(np.mean(speech**2)) + 1e-12
    snr_db = rng.uniform(5, 30) if rng.random() < 0.7 else rng.uniform(35, 50)
    x = x + _colored_noise(rng, len(x)) * np.sqrt(power / 10 ** (snr_db / 10))
    x = x * 32767.0 + rng.uniform(-1, 1, len(x))  # dither: never exact digital silence
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def write_wav(path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write int16 mono samples to a path inside an atomic directory, or to a file object."""
    with wave.open(path if hasattr(path, "write") else str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def _make_utterance(task: tuple) -> tuple[int, str, float, str, str]:
    split, index, seed, engine, voice, out_dir = task
    rng = np.random.default_rng([seed, _SPLIT_SALT[split], index])
    text = _random_text(rng)
    with tempfile.TemporaryDirectory(prefix="nativeq-tts-") as tmp:
        raw = _synthesize_raw(engine, voice, text, rng, Path(tmp))
        pcm = _run(["sox", "-D", "-R", str(raw), "-t", "f32", "-c", "1", "-", *_sox_effects(rng)], "sox")
    speech = np.frombuffer(pcm, dtype=np.float32).astype(np.float64)
    if speech.size < SAMPLE_RATE // 10:
        raise NativeqError(f"{engine} voice {voice} produced no audio for {text!r}")
    samples = _augment(speech, rng)
    rel = f"wav/{split}/{split}-{index:06d}.wav"
    write_wav(Path(out_dir) / rel, samples)
    return index, rel, len(samples) / SAMPLE_RATE, text, f"{engine}:{voice}"


_SPLIT_SALT = {"train": 1, "dev": 2, "test": 3, "other": 4}


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """How many utterances per split, the seed, and the number of parallel workers."""

    train: int = 6000
    dev: int = 300
    test: int = 300
    other: int = 300
    seed: int = 0
    jobs: int = 2
    engines: tuple[str, ...] = DEFAULT_ENGINES


def synthesize_corpus(out: str | os.PathLike, cfg: SynthConfig, force: bool = False, progress: bool = True) -> dict:
    """Synthesize all splits into `out` (atomically); returns {split: (utterances, hours)}."""
    import multiprocessing

    from nativeq._log import Bar

    counts = {"train": cfg.train, "dev": cfg.dev, "test": cfg.test, "other": cfg.other}
    for split, n in counts.items():
        if n < 0:
            raise NativeqError(f"--{split} must be >= 0, got {n}")
    unknown = [e for e in cfg.engines if e not in ENGINES]
    if unknown or not cfg.engines:
        raise NativeqError(f"unknown TTS engine(s) {', '.join(map(repr, unknown)) or '(none given)'} "
                           f"(engines: {', '.join(ENGINES)})")
    for split, n in counts.items():
        if n and not split_voices(split, cfg.engines):
            have = sorted({e for e, _ in SPLIT_VOICES[split]})
            raise NativeqError(f"split {split!r} has no voices among engines {','.join(cfg.engines)} "
                               f"(its engines: {', '.join(have)}); pass --{split} 0 or add one")
    engines = {engine for split, n in counts.items() if n for engine, _ in split_voices(split, cfg.engines)}
    if "kokoro" in engines:
        kokoro.prepare()  # the extra is there; the model file is assembled once, before the workers fork
    tools = {"sox"} | {"text2wave" if e == "festival" else "espeak-ng" if e == "kokoro" else e for e in engines}
    for tool in sorted(tools):
        _require_tool(tool)
    summary = {}
    with atomic_directory(out, force=force) as tmp_dir:
        tasks = []
        for split, n in counts.items():
            if not n:
                continue
            (tmp_dir / "wav" / split).mkdir(parents=True)
            voices = split_voices(split, cfg.engines)
            for i in range(n):
                engine, voice = voices[int(np.random.default_rng([cfg.seed, _SPLIT_SALT[split], i, 7]).integers(len(voices)))]
                tasks.append((split, i, cfg.seed, engine, voice, str(tmp_dir)))
        rows: dict[str, list] = {s: [] for s in counts}
        with multiprocessing.get_context("fork").Pool(max(1, cfg.jobs)) as pool:
            it = pool.imap_unordered(_make_utterance_tagged, tasks, chunksize=8)
            for split, row in Bar(it, total=len(tasks), desc="synthesizing", enabled=progress):
                rows[split].append(row)
        for split, split_rows in rows.items():
            if not counts[split]:
                continue
            split_rows.sort()
            lines = [f"{rel}\t{dur:.3f}\t{text}" for _, rel, dur, text, _ in split_rows]
            write_text_atomic(tmp_dir / f"{split}.tsv", "\n".join(lines) + "\n")
            write_text_atomic(tmp_dir / f"{split}.voices.tsv",
                              "\n".join(f"{rel}\t{voice}" for _, rel, _, _, voice in split_rows) + "\n")
            summary[split] = (len(split_rows), sum(r[2] for r in split_rows) / 3600)
    return summary


def merge_corpora(out: str | os.PathLike, sources: list[str | os.PathLike], force: bool = False) -> dict:
    """Write corpus `out` whose splits are the union of the sources' (e.g. a synthesized corpus and
    one of another engine or of recordings); returns {split: utterances}.

    No audio is copied: manifest paths are rewritten relative to `out`, so the sources must stay
    where they are. Every split any source has is merged; the voices files too, where present.
    """
    out = Path(out)
    sources = [Path(s) for s in sources]
    if len(sources) < 2:
        raise NativeqError(f"merging needs at least two corpora, got {len(sources)}")
    for src in sources:
        if not src.is_dir() or not any(p.suffix == ".tsv" for p in src.iterdir()):
            raise NativeqError(f"{src}: not a corpus directory (no <split>.tsv)")
        if src.resolve() == out.resolve():
            raise NativeqError(f"{src}: a source cannot be the output")
    splits = sorted({p.stem for src in sources for p in src.glob("*.tsv") if "." not in p.stem})
    counts = {}
    with atomic_directory(out, force=force) as tmp_dir:
        for split in splits:
            have = [src for src in sources if (src / f"{split}.tsv").is_file()]
            utts = [u for src in have for u in read_manifest(src, split)]  # also validates every row
            rel = [os.path.relpath(os.path.abspath(u.path), os.path.abspath(out)) for u in utts]
            lines = [f"{r}\t{u.duration:.3f}\t{u.text}" for r, u in zip(rel, utts)]
            write_text_atomic(tmp_dir / f"{split}.tsv", "\n".join(lines) + "\n")
            if all((src / f"{split}.voices.tsv").is_file() for src in have):
                voices = [line.split("\t", 1)[1] for src in have
                          for line in (src / f"{split}.voices.tsv").read_text(encoding="utf-8").splitlines() if line]
                if len(voices) == len(utts):
                    write_text_atomic(tmp_dir / f"{split}.voices.tsv",
                                      "\n".join(f"{r}\t{v}" for r, v in zip(rel, voices)) + "\n")
            counts[split] = len(utts)
    return counts


def _make_utterance_tagged(task):
    return task[0], _make_utterance(task)


# ----------------------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class Utterance:
    path: Path
    duration: float
    text: str


def read_manifest(data_dir: str | os.PathLike, split: str) -> list[Utterance]:
    """Parse `<data_dir>/<split>.tsv`; transcripts are normalized and checked against the vocabulary."""
    data_dir = Path(data_dir)
    manifest = data_dir / f"{split}.tsv"
    if not manifest.is_file():
        have = sorted(p.stem for p in data_dir.glob("*.tsv") if "." not in p.stem) if data_dir.is_dir() else []
        raise NativeqError(f"no manifest {manifest} (splits in {data_dir}: {', '.join(have) or 'none'})")
    out = []
    for lineno, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        where = f"{manifest}:{lineno}"
        if len(parts) != 3:
            raise NativeqError(f"{where}: expected 'path<TAB>duration<TAB>transcript', got {len(parts)} field(s)")
        rel, dur, text = parts
        try:
            duration = float(dur)
        except ValueError:
            raise NativeqError(f"{where}: duration {dur!r} is not a number") from None
        out.append(Utterance(data_dir / rel, duration, normalize_text(text, where)))
    if not out:
        raise NativeqError(f"{manifest} lists no utterances")
    return out


def read_wav(path: str | os.PathLike) -> np.ndarray:
    """16 kHz mono float32 samples in [-1, 1] of an audio file (WAV of any width, FLAC, OGG, ...; `audio.read_audio`)."""
    return read_audio(path, SAMPLE_RATE)


def check_audio(utts: list[Utterance], skip_bad: bool = False) -> list[Utterance]:
    """Check every audio file's header once: a missing or corrupt file is an error naming it, or skipped with `skip_bad`."""
    import warnings

    good = []
    for u in utts:
        try:
            audio_info(u.path)
        except NativeqError as e:
            if not skip_bad:
                raise NativeqError(f"{e} (pass --skip-bad to skip such files)") from None
            warnings.warn(f"skipping: {e}", stacklevel=2)
            continue
        good.append(u)
    if not good:
        raise NativeqError("no readable utterances left after skipping bad audio files")
    return good


# ----------------------------------------------------------------------------- recorded human speech
# Small sets of recorded human speech shipped in Debian packages, with their transcripts.
# Used ONLY for evaluation (never training or tuning): the only check on real voices here.
_PS_DATA = Path("/usr/share/pocketsphinx/test/data")
_ALSA_SOUNDS = Path("/usr/share/sounds/alsa")
HUMAN_SOURCES: tuple[tuple[str, Path, str], ...] = (
    *((f"cards-{i:03d}", _PS_DATA / f"cards/{i:03d}.wav", text) for i, text in enumerate(
        ["ten of clubs", "four queen of clubs", "seven of clubs", "five five",
         "eight of spades four of clubs seven of hearts"], 1)),
    ("goforward", _PS_DATA / "goforward.raw", "go forward ten meters"),
    ("tidigits-2934z", _PS_DATA / "tidigits/dhd.2934z.raw", "two nine three four zero"),
    *((f"alsa-{name.lower()}", _ALSA_SOUNDS / f"{name}.wav", name.replace("_", " ").lower()) for name in
      ("Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left", "Rear_Right", "Side_Left", "Side_Right")),
    *((f"librivox-{n}", _PS_DATA / f"librivox/sense_and_sensibility_01_austen_64kb-{n}.wav", text) for n, text in (
        ("0870", "and mister john dashwood had then leisure to consider how much there might be prudently in his power to do for them"),
        ("0880", "he was not an ill disposed young man"),
        ("0890", "unless to be rather cold hearted and rather selfish is to be ill disposed"),
        ("0920", "had he married a more a amiable woman he might have been made still more respectable than he was"),
        ("0930", "he might even have been made amiable himself"),
    )),
)
HUMAN_PACKAGES = "apt-get install pocketsphinx-testdata alsa-utils"


def build_human_eval(data_dir: str | os.PathLike, split: str = "eval-human") -> tuple[int, float]:
    """Write `<data_dir>/<split>.tsv` from the recorded speech in Debian packages; returns (n, hours)."""
    data_dir = Path(data_dir)
    available = [(name, path, text) for name, path, text in HUMAN_SOURCES if path.is_file()]
    if not available:
        raise NativeqError(f"no recorded speech found under {_PS_DATA} or {_ALSA_SOUNDS} (install with: {HUMAN_PACKAGES})")
    wav_dir = data_dir / "wav" / split
    wav_dir.mkdir(parents=True, exist_ok=True)
    lines, seconds = [], 0.0
    for name, path, text in available:
        if path.suffix == ".raw":  # headerless 16 kHz 16-bit little-endian mono (pocketsphinx test data)
            samples = np.frombuffer(path.read_bytes(), dtype="<i2").astype(np.float32) / 32768.0
        else:
            samples = read_wav(path)
        pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)
        rel = f"wav/{split}/{name}.wav"
        buf = io.BytesIO()
        write_wav(buf, pcm)
        write_bytes_atomic(data_dir / rel, buf.getvalue())
        lines.append(f"{rel}\t{len(pcm) / SAMPLE_RATE:.3f}\t{normalize_text(text)}")
        seconds += len(pcm) / SAMPLE_RATE
    write_text_atomic(data_dir / f"{split}.tsv", "\n".join(lines) + "\n")
    return len(lines), seconds / 3600
