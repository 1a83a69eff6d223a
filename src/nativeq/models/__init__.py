"""nativeq.models: the float speech recognizer, its data, training and evaluation.

Public names (import them from their modules; this package imports nothing heavy):

- `conformer`: `ConformerConfig`, `PRESETS` / `preset(name)` ("conformer-tiny", "conformer-small"),
  `ConformerCTC` (forward(feats [B,T,80], lengths=None) -> (logits [B,T',V], lengths')).
  Every matmul/conv is a plain nn.Linear / nn.Conv1d / nn.Conv2d, swappable by name.
- `audio`: `read_audio(path) -> 16 kHz mono float32` (WAV of any width, FLAC, OGG, ... via
  soundfile; polyphase resampling), `audio_info(path)`; damaged files are one-line errors.
- `features`: `fbank(samples) -> [T, 80]` Kaldi-style log-mel (the front end, outside the
  ONNX encoder), `spec_augment`.
- `frontend_np`: the same `fbank` in numpy only, for deployment code that cannot import torch.
- `text`: `VOCAB` (blank = 0, space, a-z, '), `normalize_text`, `encode`, `decode`,
  `ctc_greedy_collapse`.
- `data`: `SynthConfig` / `synthesize_corpus(out, cfg)`, `read_manifest(data_dir, split)
  -> [Utterance]`, `check_audio`, `read_wav`, `build_human_eval(data_dir)`.
- `train`: `TrainConfig`, `train(cfg)` (the CLI command), `train_loop(model, train_utts,
  dev_utts, cfg, run_dir, extra_config=None, after_step=None) -> dev metrics`,
  `save_run(run_dir, model)`, `greedy_decode(logits, lengths)`, `utterance_features(utt)`,
  `collate(feats, targets)`.
- `evaluate`: `evaluate(model, data_dir, split) -> {"wer", "cer", "utterances", ...}`,
  `evaluate_utterances(model, utts)`, `EvalConfig` / `evaluate_run(cfg)`.
- `pretrained`: `load_model(run_dir_or_shipped_name) -> (model, ConformerConfig)`,
  `pretrained_names()`, `resolve_model_dir`.
- `baseline`: `evaluate_pocketsphinx(data_dir, split)` (the off-the-shelf comparison).

This package never imports TVM.
"""
