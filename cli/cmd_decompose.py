"""`onnxmod decompose`: one module per class + manifest.json."""

from __future__ import annotations

import math

import click

from onnxmod.cli.common import (BATCH, FiniteFloat, device_option, emit, float_list, fmt_count, force_option,
                                int_range, json_option, quiet_option, say)
from onnxmod.budget import CAP_ABOVE_MODULES, CAPPED_TARGET, DEFAULT_CAP, TOLERANCE
from onnxmod.cli.main import cli
from onnxmod.decompose import (CALIBRATION_IMAGES, CAPPED_REPAIR_EPOCHS, CAPPED_REPAIR_MIN_STEPS, REPAIR_EPOCHS,
                               REPAIR_MIN_STEPS, SAMPLES_PER_CLASS, DecomposeSettings)
from onnxmod.errors import OnnxmodError
from onnxmod.modelio import MAX_SIDE


_D = DecomposeSettings()  # the defaults shown in --help are the ones decompose uses


def _class_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [c.strip() for c in value.split(",") if c.strip()]
    if not names:
        raise OnnxmodError(f"--classes: no class names or indices in '{value}' (leave it out for all classes)")
    return names


def _class_targets(values: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for v in values:
        name, sep, frac = v.rpartition("=")
        try:
            out[name.strip()] = float(frac)
        except ValueError:
            sep = ""
        if not sep or not name.strip() or not math.isfinite(out.get(name.strip(), 0.0)):
            raise OnnxmodError(f"--class-target: expected NAME=FRACTION like cat=0.6, got '{v}'")
    return out


TARGET_TOLERANCE = 0.05  # of the source's MACs: a module further than this from its target gets a warning


def target_misses(manifest: dict) -> list[str]:
    """One line per module whose MACs are further than TARGET_TOLERANCE from its target, and why."""
    st = manifest["settings"]
    comp = manifest.get("composition") or {}
    if comp.get("budget") is not None or comp.get("cap") is not None:  # the targets are the budget's means to it
        return []
    differ = len({m["target_macs"] for m in manifest["modules"]}) > 1
    why = (f"the layers all modules share (--shared-depth {st['shared_depth']:g}) are chosen once, at the mean target, "
           "so only its class-specific layers follow its own; a lower --shared-depth widens the range"
           if differ and st["shared_depth"] > 0 else "the channel granularity allows no closer size")
    return [f"module '{m['class_name']}' has {m['mac_fraction']:.2f}x the source's MACs, not its target "
            f"{m['target_macs']:g}: {why}" for m in manifest["modules"]
            if abs(m["mac_fraction"] - m["target_macs"]) > TARGET_TOLERANCE]


def _size(value: str | None) -> list[int] | None:
    if value is None:
        return None
    parts = [p.strip() for p in value.replace("x", ",").split(",")]
    # ASCII digits only ('²'.isdigit() is true, int('²') fails), and a size an image can have
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and 0 < int(p) <= MAX_SIDE for p in parts):
        raise OnnxmodError(f"--input-size: expected H,W like 48,192, got '{value}'")
    return [int(p) for p in parts]


@cli.command("decompose")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", required=True, type=click.Path(), help="Calibration data (CIFAR batches, image folder or .npz).")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), default=None,
              show_default="<model stem>.modules in the current dir", help="Output dir.")
@click.option("--classes", default=None, show_default="all", help="Comma-separated class names or indices. On labelled --calib data, repair adds the "
              "sub-task's own cross-entropy (over these classes) to the distillation; unlabelled data: pure "
              "distillation. Repair trains on these classes' images (by label, or by the source's prediction) for "
              "the steps a repair on all calibration images takes. One class alone (a donor for replace) repairs "
              "on every image, as all classes do.")
@click.option("--samples-per-class", default=None, type=int_range(1, 1_000_000),
              show_default=f"{SAMPLES_PER_CLASS}, fewer where the classes decomposed would make it more than "
                           f"{CALIBRATION_IMAGES:,} images in all",
              help="Calibration images per class.")
@click.option("--split", default=_D.split, show_default=True, type=click.Choice(["train", "test"]))
@click.option("--mean", default=None, show_default="the model's onnxmod.preprocess, else 0",
              help="Source input normalisation mean, e.g. 0.485,0.456,0.406.")
@click.option("--std", default=None, show_default="the model's onnxmod.preprocess, else 1",
              help="Source input normalisation std.")
@click.option("--scale", default=None, type=FiniteFloat(0, 1e6, min_open=True),
              show_default="the model's onnxmod.preprocess, else 1",
              help="Multiply [0,1] pixels by this first (255 for 0..255 models).")
@click.option("--layout", default=None, type=click.Choice(["nchw", "nhwc"]),
              show_default="NHWC when a Transpose to NCHW follows the input, else NCHW",
              help="Layout of the source's image input. The modules always take NCHW `input`.")
@click.option("--input-size", default=None, show_default="the calibration images' size",
              help="H,W for a source whose input height/width are dynamic.")
@click.option("--target-macs", default=None, show_default=f"{_D.target_macs:g}", type=FiniteFloat(0, 1, min_open=True),
              help="Module MACs as a fraction of the source's: the per-module size/accuracy knob.")
@click.option("--composed-macs", default=None, type=FiniteFloat(0, 1000, min_open=True),
              show_default=f"none; more than {CAP_ABOVE_MODULES} modules are capped at {DEFAULT_CAP:g}",
              help="Budget of the model composed from all modules written (with --classes: those classes' model), "
                   f"as a fraction of the source's MACs, met within {TOLERANCE:g}: decompose chooses the per-module "
                   "targets and how deep modules share (--shared-depth is then the least sharing). Not with "
                   "--target-macs or --class-target. Without either, more than "
                   f"{CAP_ABOVE_MODULES} modules whose composition at --target-macs would cost more than "
                   f"{DEFAULT_CAP:g}x the source share every layer at a per-module target of {CAPPED_TARGET:g} instead "
                   "(said in one line and in the manifest's \"composition\").")
@click.option("--class-target", "class_targets", multiple=True, metavar="NAME=FRACTION",
              show_default="none: every class gets --target-macs",
              help="A different --target-macs for one class (repeatable), e.g. --class-target cat=0.6: "
                   "a hard class can get a bigger module, an easy one a smaller. Layers --shared-depth "
                   "shares stay shared (chosen at the mean target): the difference goes to class-specific layers.")
@click.option("--strategy", default=_D.strategy, show_default=True, type=click.Choice(["uniform", "global"]),
              help="Per-layer budget: same kept fraction per layer, or global importance per MAC.")
@click.option("--fill", default=_D.fill, show_default=True, type=click.Choice(["linear", "mean", "zero"]),
              help="What replaces removed channels in the layers that read them.")
@click.option("--depth-slope", default=_D.depth_slope, show_default=True,
              type=FiniteFloat(-2, 2, min_open=True, max_open=True),
              help="Uniform budget: how much more late layers keep than early ones (0 = same fraction; in (-2, 2)).")
@click.option("--shared-depth", default=_D.shared_depth, show_default=True, type=FiniteFloat(0, 1),
              help="Layers in this first fraction of the depth are chosen once for all classes, so a composed "
                   "model computes them once (1 = every layer shared).")
@click.option("--channel-multiple", default=_D.channel_multiple, show_default=True, type=int_range(1, 4096),
              help="Round kept channel counts to this multiple.")
@click.option("--refit-images", default=_D.refit_images, show_default=True, type=int_range(0, 10_000_000),
              help="Re-fit each module's class row by least squares on this many calibration images (0: off).")
@click.option("--reconstruct/--no-reconstruct", default=_D.reconstruct, show_default=True,
              help="Re-fit every Conv, layer by layer, to reproduce the source's activations (least squares, "
                   "no training): about +2-3 pt composed top-1 at the default size for ~0.5x a plain pass more "
                   "time.")
@click.option("--repair/--no-repair", default=_D.repair, show_default=True,
              help="Distil the pruned modules against the source on the calibration images (torch; CUDA when "
                   "--device allows). --no-repair keeps the training-free path.")
@click.option("--repair-epochs", default=None, show_default=f"{REPAIR_EPOCHS:g}; {CAPPED_REPAIR_EPOCHS:g} where the default cap shares one trunk",
              type=FiniteFloat(0, 10_000, min_open=True),
              help=f"Repair budget: passes over the repair images (at least {REPAIR_MIN_STEPS} optimiser steps, "
                   f"{CAPPED_REPAIR_MIN_STEPS} under the default cap, but no more than 20 passes for that minimum).")
@click.option("--repair-batch-size", default=None, type=BATCH, show_default="256 on CUDA, 128 on CPU",
              help="Images per repair step.")
@click.option("--batch-size", default=_D.batch_size, show_default=True, type=BATCH)
@click.option("--seed", default=_D.seed, show_default=True, type=int_range(0, 2**32 - 1))
@force_option
@device_option
@json_option
@quiet_option
def decompose_cmd(model, calib, out_dir, classes, samples_per_class, split, mean, std, scale, layout, input_size,
                  target_macs, composed_macs, class_targets, strategy,
                  fill, depth_slope, shared_depth, channel_multiple, refit_images, reconstruct, repair, repair_epochs,
                  repair_batch_size, batch_size, seed, force, device, as_json, quiet):
    """Cut MODEL into one physically smaller module per class.

    Writes DIR/module_<kkk>_<name>.onnx per class and DIR/manifest.json.

    \b
    Example:
      onnxmod decompose sample_graphs/resnet8_cifar10.onnx \\
          --calib sample_graphs/cifar10_calib.npz -o r8.modules
      onnxmod decompose resnet56.onnx --calib cifar10/ --classes cat,dog
      onnxmod decompose resnet56.onnx --calib cifar10/ --no-repair   # training-free, fast
      onnxmod decompose resnet56.onnx --calib cifar10/ --composed-macs 1.0  # all 10 compose to 1x
      onnxmod decompose resnet20_c100.onnx --calib cifar100/train   # 100 modules, composed <= 2x
    """
    from onnxmod.decompose import decompose

    if composed_macs is not None and target_macs is not None:
        raise OnnxmodError("--composed-macs and --target-macs cannot be combined: --composed-macs sizes the "
                           "composed model (decompose chooses the per-module targets), --target-macs each module")
    settings = DecomposeSettings(samples_per_class=samples_per_class, split=split, batch_size=batch_size, seed=seed,
                                 composed_macs=composed_macs)
    if target_macs is not None or class_targets:  # sizes asked for per module: no default cap
        settings.composed_cap = None
    knobs = {"target_macs": target_macs, "strategy": strategy, "fill": fill, "depth_slope": depth_slope,
             "shared_depth": shared_depth,
             "channel_multiple": channel_multiple, "refit_images": refit_images, "reconstruct": reconstruct,
             "repair": repair, "repair_epochs": repair_epochs, "repair_batch_size": repair_batch_size}
    settings.class_targets = _class_targets(class_targets)
    for name, value in knobs.items():
        if value is not None:
            setattr(settings, name, value)
    manifest = decompose(
        model, calib, out_dir,
        classes=_class_list(classes),
        settings=settings, mean=float_list(mean, "--mean"), std=float_list(std, "--std"), scale=scale,
        device=device, force=force, quiet=quiet, layout=layout, input_size=_size(input_size),
    )
    # the same "onnxmod: warning:" lines as the logger's warnings (cli/main.py)
    for u in manifest["unsupported"]:
        say(f"onnxmod: warning: {u['op']} node '{u['node']}' is not understood; channels through it are kept "
            f"({u['why']})", quiet)
    for line in target_misses(manifest):
        say(f"onnxmod: warning: {line}", quiet)
    if manifest["composition"]["note"]:
        say(f"onnxmod: note: {manifest['composition']['note']}", quiet)

    def human(m: dict) -> str:
        src = m["source"]
        lines = [f"wrote {len(m['modules'])} modules + manifest.json to {m['output']}",
                 f"source {src['name']}: {fmt_count(src['params'])} params, {fmt_count(src['macs'])} MACs",
                 f"{'class':<16}{'params':>10}{'MACs':>10}{'MAC frac':>10}"]
        for mod in m["modules"]:
            lines.append(f"{mod['class_name']:<16}{fmt_count(mod['params']):>10}{fmt_count(mod['macs']):>10}"
                         f"{mod['mac_fraction']:>10.3f}")
        t = m["timings"]
        rec = f", reconstruction {t['reconstruct_s']:.1f}s" if t.get("reconstruct_s") else ""
        rec += f", repair {t['repair_s']:.1f}s" if t.get("repair_s") else ""
        comp = m["composition"]
        asked = (f" (--composed-macs {comp['budget']:g})" if comp["budget"] is not None
                 else f" (capped at {comp['cap']:g})" if comp["cap"] is not None else "")
        lines.append(f"composed from all {len(m['modules'])}: {comp['fraction']:.3f}x the source's MACs{asked}, "
                     f"shared depth {comp['shared_depth']:.3g}")
        lines.append(f"calibration {t['calibration_s']:.1f}s{rec}, total {t['total_s']:.1f}s")
        return "\n".join(lines)

    emit(manifest, as_json, human)
