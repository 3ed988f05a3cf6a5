"""`onnxmod compose`, `onnxmod replace` and `onnxmod predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np

from onnxmod import modelio, outputs
from onnxmod.cli.common import device_option, emit, fmt_count, force_option, json_option, quiet_option
from onnxmod.cli.main import cli
from onnxmod.errors import OnnxmodError


def _summary(model, out: Path) -> dict[str, Any]:
    from onnxmod.compose import compose_info

    info = compose_info(model)
    classes = modelio.get_meta(model, modelio.CLASSES) or []
    return {"output": str(out), "classes": classes, **info}


def _human(r: dict[str, Any]) -> str:
    lines = [f"wrote {r['output']}: {len(r['classes'])} classes from {len(r['sources'])} source(s)",
             f"  scores  {r['rule']}"]
    macs, total = r.get("macs"), r.get("module_macs_sum")
    if macs is not None and total:
        lines.append(f"  MACs    {fmt_count(macs)} composed vs {fmt_count(total)} summed over members "
                     f"({1 - macs / total:.1%} shared)")
    lines.append(f"  nodes   {r.get('nodes')} composed vs {r.get('module_nodes_sum')} summed over members")
    for s in r.get("shared", []):  # a source member: what it computes once with the modules
        lines.append(f"  shared  {s['source']} (source): {s['shared_nodes']} of its {s['nodes']} nodes, "
                     f"{fmt_count(s['shared_macs'])} of its {fmt_count(s['macs'])} MACs, computed once with "
                     f"{len(s['shared_with'])} other member(s)")
    lines.append("  classes " + ", ".join(c["name"] for c in r["classes"]))
    return "\n".join(lines)


# a source member (onnxmod.sourcemember): its class names when it has no onnxmod.classes, and its temperature
classes_file_help = ("Class names (one per line, output order) of a source INPUT without onnxmod.classes metadata; "
                     "{}")
calib_option = click.option(
    "--calib", type=click.Path(path_type=Path), default=None, show_default="none",
    help="Labelled images (as decompose --calib) to fit a source member's temperature on, needed when it is "
         "composed with other sources and none of its modules is a member.")


@cli.command("compose")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Composed model (.onnx).")
@click.option("--rename", is_flag=True,
              help="Call a class that several sources have NAME@SOURCE instead of failing.")
@click.option("--classes-file", "classes_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              show_default="none", help=classes_file_help.format("repeat for several, in argument order."))
@calib_option
@device_option
@force_option
@json_option
@quiet_option
def compose_cmd(inputs: tuple[Path, ...], out: Path, rename: bool, classes_files: tuple[Path, ...], calib: Path | None,
                device: str, force: bool, as_json: bool, quiet: bool) -> None:
    """Compose one classifier from modules (files, or dirs = all their modules) and source classifiers (all
    their classes, computed by the source graph). Class order = argument order.

    \b
    Example:
      onnxmod compose r8.modules/module_003_cat.onnx r8.modules/module_005_dog.onnx -o catdog.onnx
      onnxmod compose r8.modules -o r8_composed.onnx        # every module of the dir
      onnxmod compose r20.onnx r56.modules/module_003_cat.onnx --rename --calib cifar10/ -o both.onnx
    """
    from onnxmod.cli.cmd_export import _read_classes
    from onnxmod.compose import compose, expand_inputs

    files = expand_inputs(inputs)
    extra = [*classes_files, *([calib] if calib is not None else [])]
    outputs.check_output(out, inputs=[*inputs, *files, *extra], force=force)
    model = compose(files, rename=rename, source_classes=[_read_classes(str(f)) for f in classes_files], calib=calib,
                    device=device)
    modelio.save_model(model, out)
    emit(_summary(model, out), as_json, _human)


@cli.command("replace")
@click.argument("base", type=click.Path(path_type=Path))
@click.option("--class", "which", required=True, help="Class to replace: name or output index.")
@click.option("--with", "module", required=True, type=click.Path(path_type=Path), help="The module serving it now.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Composed model (.onnx).")
@click.option("--rename", is_flag=True, help="As for compose.")
@click.option("--classes-file", type=click.Path(dir_okay=False, path_type=Path), show_default="none",
              help=classes_file_help.format("for a source BASE."))
@calib_option
@device_option
@force_option
@json_option
@quiet_option
def replace_cmd(base: Path, which: str, module: Path, out: Path, rename: bool, classes_file: Path | None,
                calib: Path | None, device: str, force: bool, as_json: bool, quiet: bool) -> None:
    """BASE (module dir, composed model or source classifier) with one class served by MODULE, as a composed
    model. On a source, every other class is computed by the source graph unchanged.

    \b
    Example:
      onnxmod replace r20.modules --class cat --with r56.modules/module_003_cat.onnx -o fixed.onnx
      onnxmod replace r20.onnx --class cat --with r56.modules/module_003_cat.onnx --calib cifar10/ -o fixed.onnx
    """
    from onnxmod.cli.cmd_export import _read_classes
    from onnxmod.compose import module_files, replace

    if not base.exists():
        raise OnnxmodError(f"{base}: no such file or directory")
    if not module.exists():
        raise OnnxmodError(f"{module}: no such file")
    extra = [p for p in (classes_file, calib) if p is not None]
    outputs.check_output(out, inputs=[base, module, *extra, *(module_files(base) if base.is_dir() else [])],
                         force=force)
    model = replace(base, which, module, rename=rename,
                    source_classes=_read_classes(str(classes_file)) if classes_file else None, calib=calib,
                    device=device)
    modelio.save_model(model, out)
    emit(_summary(model, out), as_json, _human)


# --------------------------------------------------------------------------- predict
def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict(model_path: Path, images: Sequence[Path], top: int = 3, device: str = "auto") -> dict[str, Any]:
    """Label and top probabilities per image for a source, module or composed model."""
    from onnxmod import runtime
    from onnxmod.data import load_images

    model = modelio.load_model(model_path, check=True)
    c, h, w = image_input_chw(model, model_path)
    x = load_images(list(images), c, (h, w))
    sess = runtime.make_session(model, device=device, name=str(model_path))
    outputs = runtime.run(sess, x, prediction_outputs(model, [o.name for o in sess.get_outputs()]))
    preds = rank_predictions(model, outputs, [str(p) for p in images], top, str(model_path))
    return {"model": str(model_path), "kind": modelio.model_kind(model), "predictions": preds,
            "device": runtime.session_device(sess)}


def image_input_chw(model, model_path: Path | str) -> tuple[int, int, int]:
    """(C, H, W) images are loaded at for ``model``: its input's fixed dims, else its preprocess metadata."""
    from onnxmod.evaluate import input_chw

    c, h, w = input_chw(model)
    if c is None or h is None or w is None:
        pre = modelio.get_meta(model, modelio.PREPROCESS) or {}
        size = pre.get("input_size") if isinstance(pre, dict) else None
        if c is None or not size:
            raise OnnxmodError(f"{model_path}: input size is not fixed; cannot size the images")
        h, w = int(size[0]), int(size[1])
    return int(c), int(h), int(w)


def prediction_outputs(model, output_names: Sequence[str]) -> list[str]:
    """The one graph output predictions are read from: module ``score``, composed ``probs``, else the first."""
    from onnxmod.modulespec import SCORE

    kind = modelio.model_kind(model)
    return [SCORE] if kind == "module" else ["probs"] if kind == "composed" else [output_names[0]]


def rank_predictions(model, outputs: Sequence[np.ndarray], image_labels: Sequence[str], top: int,
                     model_path: Path | str) -> list[dict[str, Any]]:
    """Per image: label and top probabilities, from the :func:`prediction_outputs` of one run."""
    kind = modelio.model_kind(model)
    (out,) = outputs
    preds = []
    if kind == "module":
        from onnxmod.modulespec import ModuleSpec

        spec = ModuleSpec.from_model(model, str(model_path))
        for p, s in zip(image_labels, np.asarray(out).reshape(len(image_labels), -1)[:, 0]):
            s = float(s)
            preds.append({"image": p, "label": spec.class_name if s >= 0.5 else f"not {spec.class_name}",
                          "top": [{"class": spec.class_name, "prob": s}, {"class": f"not {spec.class_name}", "prob": 1 - s}]})
        return preds
    from onnxmod.evaluate import model_class_names

    if kind == "composed":
        probs = out
    else:
        if out.ndim != 2:
            raise OnnxmodError(f"{model_path}: first output must be [N, K], got {list(out.shape)}")
        probs = _softmax(out)
    names = model_class_names(model) or [str(i) for i in range(probs.shape[1])]
    if len(names) != probs.shape[1]:
        names = [str(i) for i in range(probs.shape[1])]
    k = max(1, min(int(top), probs.shape[1]))
    for p, row in zip(image_labels, probs):
        order = np.argsort(-row, kind="stable")[:k]
        preds.append({"image": p, "label": names[int(order[0])],
                      "top": [{"class": names[int(j)], "prob": float(row[j])} for j in order]})
    return preds


def _predict_human(r: dict[str, Any]) -> str:
    lines = []
    for p in r["predictions"]:
        tops = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in p["top"])
        lines.append(f"{p['image']}: {p['label']}  ({tops})")
    return "\n".join(lines)


@cli.command("predict")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True, help="Probabilities shown per image.")
@device_option
@json_option
@quiet_option
def predict_cmd(model: Path, images: tuple[Path, ...], top: int, device: str, as_json: bool, quiet: bool) -> None:
    """Label and top probabilities of each IMAGE (source, module or composed MODEL).

    Images are converted to RGB and resized (bilinear) to the model's input size.

    \b
    Example:
      onnxmod predict r8_composed.onnx cat1.png dog2.jpg --top 2
    """
    emit(predict(model, images, top=top, device=device), as_json, _predict_human)
