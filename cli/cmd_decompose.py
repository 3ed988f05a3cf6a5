"""`onnxmod decompose`: one module per class + manifest.json."""

from __future__ import annotations

import click

from onnxmod.cli.common import device_option, emit, fmt_count, json_option, quiet_option, say
from onnxmod.cli.main import cli
from onnxmod.errors import OnnxmodError


def _floats(value: str | None, name: str) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise OnnxmodError(f"{name}: expected numbers like 0.485,0.456,0.406, got '{value}'") from None


def _size(value: str | None) -> list[int] | None:
    if value is None:
        return None
    parts = value.replace("x", ",").split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise OnnxmodError(f"--input-size: expected H,W like 48,192, got '{value}'")
    return [int(p) for p in parts]


@cli.command("decompose")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", required=True, type=click.Path(), help="Calibration data (CIFAR batches, image folder or .npz).")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output dir [default: <model stem>.modules].")
@click.option("--classes", default=None, help="Comma-separated class names or indices (default: all).")
@click.option("--samples-per-class", default=1000, show_default=True, type=int, help="Calibration images per class.")
@click.option("--split", default="train", show_default=True, type=click.Choice(["train", "test"]))
@click.option("--mean", default=None, help="Source input normalisation mean, e.g. 0.485,0.456,0.406.")
@click.option("--std", default=None, help="Source input normalisation std.")
@click.option("--scale", default=None, type=float, help="Multiply [0,1] pixels by this first (255 for 0..255 models).")
@click.option("--layout", default=None, type=click.Choice(["nchw", "nhwc"]),
              help="Layout of the source's image input [default: NHWC when a Transpose to NCHW follows the "
                   "input, else NCHW]. The modules always take NCHW `input`.")
@click.option("--input-size", default=None,
              help="H,W for a source whose input height/width are dynamic [default: the calibration images' size].")
@click.option("--target-macs", default=None, type=float,
              help="Module MACs as a fraction of the source's: the size/accuracy knob [default: 0.65].")
@click.option("--strategy", default=None, type=click.Choice(["uniform", "global"]),
              help="Per-layer budget: same kept fraction per layer, or global importance per MAC.")
@click.option("--fill", default=None, type=click.Choice(["linear", "mean", "zero"]),
              help="What replaces removed channels in the layers that read them.")
@click.option("--depth-slope", default=None, type=float,
              help="Uniform budget: how much more late layers keep than early ones (0 = same fraction).")
@click.option("--shared-depth", default=None, type=float,
              help="Layers in this first fraction of the depth are chosen once for all classes, so a composed "
                   "model computes them once (1 = every layer shared).")
@click.option("--channel-multiple", default=None, type=int, help="Round kept channel counts to this multiple.")
@click.option("--refit-images", default=None, type=int,
              help="Re-fit each module's class row by least squares on this many calibration images (0: off).")
@click.option("--reconstruct/--no-reconstruct", default=None,
              help="Re-fit every Conv, layer by layer, to reproduce the source's activations (least squares, "
                   "no training): about +2-3 pt composed top-1 at the default size for ~0.5x a plain pass more "
                   "time [default: off].")
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--force", is_flag=True, help="Replace an existing output dir.")
@device_option
@json_option
@quiet_option
def decompose_cmd(model, calib, out_dir, classes, samples_per_class, split, mean, std, scale, layout, input_size,
                  target_macs, strategy,
                  fill, depth_slope, shared_depth, channel_multiple, refit_images, reconstruct, batch_size, seed, force, device, as_json, quiet):
    """Cut MODEL into one physically smaller module per class."""
    from onnxmod.decompose import DecomposeSettings, decompose

    settings = DecomposeSettings(samples_per_class=samples_per_class, split=split, batch_size=batch_size, seed=seed)
    knobs = {"target_macs": target_macs, "strategy": strategy, "fill": fill, "depth_slope": depth_slope,
             "shared_depth": shared_depth,
             "channel_multiple": channel_multiple, "refit_images": refit_images, "reconstruct": reconstruct}
    for name, value in knobs.items():
        if value is not None:
            setattr(settings, name, value)
    manifest = decompose(
        model, calib, out_dir,
        classes=[c for c in classes.split(",") if c.strip()] if classes else None,
        settings=settings, mean=_floats(mean, "--mean"), std=_floats(std, "--std"), scale=scale,
        device=device, force=force, quiet=quiet, layout=layout, input_size=_size(input_size),
    )
    for u in manifest["unsupported"]:
        say(f"warning: {u['op']} node '{u['node']}' is not understood; channels through it are kept ({u['why']})",
            quiet)

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
        lines.append(f"calibration {t['calibration_s']:.1f}s{rec}, total {t['total_s']:.1f}s")
        return "\n".join(lines)

    emit(manifest, as_json, human)
