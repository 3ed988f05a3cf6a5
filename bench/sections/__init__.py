"""One file per bench section; each exposes ``run(b: Bench) -> dict`` (the section's results JSON),
and ``NEEDS_DATA = False`` when it needs no ``--data`` (CIFAR-10 and the checkpoints).

Sections whose results are per model return ``{"models": {key: ...}, ...}`` and are merged
into the existing JSON by model, so ``--models`` runs of one model combine with earlier ones."""

from bench.sections import cifar100, cost, cuda, curve, manyclasses, replace, reuse, serving, subset, time

SECTIONS = {"cost": cost, "curve": curve, "subset": subset, "reuse": reuse, "replace": replace,
            "time": time, "serving": serving, "manyclasses": manyclasses, "cifar100": cifar100, "cuda": cuda}
