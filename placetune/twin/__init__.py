"""The machine twin: a calibrated, simulated GPU machine for judging placetune's search at real scale.

A benchmark and test instrument only. Nothing here measures anything, `placetune --runner` never
offers it, and every figure it produces is labelled SIMULATED. Modules, in pipeline order:
machine (TwinMachine and presets), shape (a model's Anatomy and per-layer arrays from a synth spec),
capacity (placetune's memory model plus a hidden error), model (pp and tg), truth (one placement's
noise-free verdict), grid (the exhaustive optimum over a fixed reference space), runner (TwinRunner),
calibration (published figures), scenarios, baselines, drive (the one adapter to placetune.search)
and bench (`python -m placetune.twin.bench`).
"""
