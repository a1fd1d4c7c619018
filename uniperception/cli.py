"""The ``uniperception`` command line: demo, models, predict, train, evaluate, convert, export, benchmark, erf."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Universal perception with large-kernel ConvNets.")
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"uniperception {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # an application, so it may tune the process: glibc keeps freed buffers for reuse instead of returning them
    # and faulting fresh pages in at every call (UniRepLKNet-A at batch 1: no page faults instead of ~1500 per
    # forward; docs/benchmarks.md). UNIPERCEPTION_KEEP_FREED_MEMORY=0 leaves malloc as it is.
    if os.environ.get("UNIPERCEPTION_KEEP_FREED_MEMORY", "1") != "0":
        from ._alloc import keep_freed_memory

        keep_freed_memory()


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="Model of the re-parameterisation part.")] = "unireplknet_a",
    image: Annotated[Path | None, typer.Option(help="An RGB image (default: scikit-learn's china.jpg).")] = None,
    size: Annotated[int, typer.Option(help="Input side in pixels (re-parameterisation part).")] = 224,
    batch: Annotated[int, typer.Option(help="Batch size (re-parameterisation part).")] = 8,
    repeats: Annotated[int, typer.Option(help="Timed repeats (median reported).")] = 5,
    bundles: Annotated[bool, typer.Option(help="Run the shipped bundles on the sample inputs.")] = True,
    forecast: Annotated[bool, typer.Option(help="Fit a Forecaster on the sample series.")] = True,
    reparam: Annotated[bool, typer.Option(help="Show training vs re-parameterised form.")] = True,
) -> None:
    """The main job: shipped bundles on sample inputs, a short forecaster fit, and re-parameterisation."""
    from .errors import UniperceptionError

    ok = True
    try:
        if bundles:
            _demo_bundles()
        if forecast:
            _demo_forecast()
        if reparam:
            ok = _demo_reparam(model, image, size, batch, repeats)
    except UniperceptionError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    if not ok:
        raise typer.Exit(1)


def _demo_bundles() -> None:
    from .demo import run_bundle_demo
    from .perceiver import BUNDLE_DIR, list_bundles

    names = list_bundles()
    if not names:
        console.print(f"[yellow]no bundles ship in {BUNDLE_DIR}[/yellow]")
        return
    console.rule("[bold]1. Shipped bundles on sample inputs none of them saw in training")
    rows = run_bundle_demo(names)
    t = Table()
    for col in ("bundle", "input", "truth", "prediction", "ms"):
        t.add_column(col, justify="right" if col == "ms" else "left")
    for r in rows:
        best = r.predictions[0]
        mark = "[green]✓[/green]" if r.correct else "[red]✗[/red]"
        short = r.bundle.removeprefix("unireplknet-a-")
        t.add_row(short, f"{r.file}\n[dim]{r.note}[/dim]", r.expected, f"{mark} {best.label} {best.score:.2f}",
                  f"{r.seconds * 1e3:.0f}")  # fmt: skip
    console.print(t)
    console.print(f"{sum(r.correct for r in rows)}/{len(rows)} correct. Test metrics, peers and robustness: "
                  "the model cards (`uniperception models --bundles`) and docs/benchmarks.md.")  # fmt: skip


def _demo_forecast() -> None:
    from .demo import run_forecast_demo

    console.rule("[bold]2. Forecaster: monthly airline passengers (1949-1960), next 12 months")
    r = run_forecast_demo()
    fc = r.forecast.iloc[:, 0]
    console.print("forecast: " + ", ".join(f"{ts:%Y-%m} {v:.0f}" for ts, v in fc.items()))
    t = Table(title=f"the last {r.settings['horizon']} months, held out of training")
    t.add_column("method")
    for col in r.backtest.columns:
        t.add_column(str(col), justify="right")
    for method, row in r.backtest.iterrows():
        t.add_row(str(method), *(f"{v:.3f}" for v in row))
    console.print(t)
    console.print(f"fit ({r.settings['epochs']} epochs) + scoring + forecast in {r.seconds:.1f} s, {r.length} points")


def _demo_reparam(model: str, image: Path | None, size: int, batch: int, repeats: int) -> bool:
    from .demo import run_reparam_demo

    console.rule("[bold]3. Structural re-parameterisation")
    r = run_reparam_demo(model, image=image, image_size=size, batch=batch, repeats=repeats)
    t = Table(title=f"{r.model}: training form vs re-parameterised (deploy) form, batch {r.batch} at {r.image_size}²")
    for col in ("form", "parameters", "ms / batch", "images / s"):
        t.add_column(col, justify="right")
    t.add_row("training", f"{r.params_train:,}", f"{r.time_train * 1e3:.1f}", f"{r.batch / r.time_train:.1f}")
    t.add_row("deploy", f"{r.params_deploy:,}", f"{r.time_deploy * 1e3:.1f}", f"{r.batch / r.time_deploy:.1f}")
    console.print(t)
    console.print(
        f"max |logits_train - logits_deploy| = {r.max_abs_diff:.2e} (largest logit {r.max_logit:.2f}); "
        f"speed-up {r.speedup:.2f}x"
    )
    ok = r.max_abs_diff <= 1e-4 * max(1.0, r.max_logit)
    console.print("[green]outputs agree to float32 rounding[/green]" if ok else "[red]outputs DIFFER[/red]")
    return ok


@app.command()
def models(
    pattern: Annotated[str, typer.Argument(help="Shell-style pattern.")] = "*",
    pretrained: Annotated[bool, typer.Option(help="List name.tag entries that have official weights.")] = False,
    bundles: Annotated[bool, typer.Option("--bundles", help="Only the shipped bundles, with their metrics.")] = False,
) -> None:
    """List registered backbones (and the bundles shipped with the package)."""
    import fnmatch
    import json

    from .backbones import get_pretrained_cfg, list_models
    from .perceiver import BUNDLE_DIR, list_bundles

    for name in [] if bundles else list_models(pattern, pretrained=pretrained):
        if pretrained:
            cfg = get_pretrained_cfg(name)
            console.print(f"{name}\t{cfg.filename}\t{cfg.num_classes} classes @ {cfg.input_size[-1]}")
        else:
            console.print(name)
    for b in (b for b in list_bundles() if fnmatch.fnmatchcase(b, pattern)):
        if not bundles:
            console.print(f"{b}\t(bundle)")
            continue
        cfg = json.loads((BUNDLE_DIR / b / "config.json").read_text())
        test = cfg.get("card", {}).get("metrics", {}).get("test", {})
        acc = f"test accuracy {test['acc1']:.1%}" if "acc1" in test else "no test metrics"
        console.print(f"{b}\t{cfg['modality']}\t{len(cfg['labels'])} classes\t{acc}\t{BUNDLE_DIR / b}")


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Official checkpoint (.pth or .safetensors).")],
    dst: Annotated[Path, typer.Argument(help="A directory (→ image-classifier bundle) or a .safetensors/.pth file.")],
    model: Annotated[str, typer.Option(help="Architecture of the checkpoint.")] = "",
    variant: Annotated[str, typer.Option(help="UniRepLKNet variant letter (a f p n t s b l xl), for --model.")] = "",
    num_classes: Annotated[int, typer.Option(help="Classifier size of the checkpoint (file output).")] = 1000,
    deploy: Annotated[bool, typer.Option(help="Re-parameterise before saving.")] = True,
) -> None:
    """Load an official checkpoint (validating every key) and save it as a bundle or a weights file."""
    from .backbones import create_model
    from .checkpoints import load_official, save_state_dict
    from .errors import UniperceptionError
    from .perceiver import Perceiver

    arch = model or (f"unireplknet_{variant}" if variant else "")
    try:
        if dst.suffix in ("", ".bundle"):
            p = Perceiver.from_official(arch, src) if arch else Perceiver.from_pretrained(src)
            if deploy:
                p.reparameterize()
            p.save_pretrained(dst, card={"name": f"{p.backbone_name} (official ImageNet weights)",
                                         "description": f"Converted from the official checkpoint {src.name}."})
            console.print(f"wrote bundle {dst} ({len(p.labels)} classes, {'deploy' if deploy else 'training'} form)")
            return
        net = create_model(arch or "unireplknet_a", num_classes=num_classes)
        report = load_official(net, src)
        if deploy:
            net.reparameterize()
        save_state_dict(net.state_dict(), dst, metadata={"architecture": arch, "form": "deploy" if deploy else "training"})
    except UniperceptionError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    console.print(report.summary())
    console.print(f"wrote {dst} ({'deploy' if deploy else 'training'} form)")


@app.command()
def benchmark(
    model: Annotated[str, typer.Option(help="Registered model name.")] = "unireplknet_a",
    batch: Annotated[int, typer.Option(help="Batch size.")] = 32,
    size: Annotated[int, typer.Option(help="Input side in pixels.")] = 224,
    mode: Annotated[str, typer.Option(help="'inference' or 'training' (forward+backward+AdamW).")] = "inference",
    impl: Annotated[list[str] | None, typer.Option(help="Conv implementations to compare (repeatable).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed rounds (median reported).")] = 5,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
) -> None:
    """Time a model's training and deploy forms with different convolution engines, side by side."""
    from .benchmark import benchmark_model

    impls = impl or ["native", "auto"]
    try:
        results = benchmark_model(model, batch, size, impls=impls, mode=mode, repeats=repeats, threads=threads)
    except (ValueError, RuntimeError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    ref = results[0].median_ms
    t = Table(title=f"{model}, {mode}, batch {batch} at {size}², {threads} threads, median of {repeats}")
    for col in ("form / conv impl", "ms", "images / s", f"speed-up vs {results[0].config}"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(r.config, f"{r.median_ms:.1f}", f"{r.images_per_s:.1f}", f"{ref / r.median_ms:.2f}x")
    console.print(t)


@app.command("export")
def export_cmd(
    target: Annotated[str, typer.Argument(help="Bundle directory/name or registered model name.")],
    out: Annotated[Path, typer.Argument(help="Output file.")],
    format: Annotated[str, typer.Option("--format", "-f", help="onnx, pt2 or torchscript.")] = "onnx",
    training_form: Annotated[bool, typer.Option(help="Export the training form instead of the deploy form.")] = False,
    quantize: Annotated[
        str | None,
        typer.Option(help="int8: dynamic int8 quantisation with onnxruntime (--format onnx only); checked "
                     "against eager float32 with a looser tolerance, reported with the top-1 agreement."),
    ] = None,
) -> None:
    """Export the re-parameterised network and verify the file against eager PyTorch."""
    from .errors import UniperceptionError
    from .export import export

    try:
        report = export(target, out, format=format, training_form=training_form, quantize=quantize)
    except UniperceptionError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    console.print(report.summary())
    console.print(f"processor settings and labels: {report.sidecar}")


_EXTENSIONS = {
    "audio": (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac"),
    "video": (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v"),
    "points": (".ply", ".pcd", ".xyz", ".off", ".obj", ".npy"),
    "image": (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"),
    "series": (".csv",),
}
_DEFAULT_BUNDLES = {"audio": "unireplknet-a-keywords", "points": "unireplknet-a-shapes", "video": "unireplknet-a-motion"}


def modality_of(path: Path) -> str:
    """The modality a file extension implies (raises ``InvalidInputError`` when unknown)."""
    from .errors import InvalidInputError

    ext = path.suffix.lower()
    for modality, exts in _EXTENSIONS.items():
        if ext in exts:
            return modality
    raise InvalidInputError(f"cannot tell the modality of {path.name!r} from its extension; pass --modality")


@app.command()
def predict(
    files: Annotated[list[Path], typer.Argument(help="Input files (audio, video, point cloud, image).")],
    model: Annotated[str | None, typer.Option(help="Bundle directory/name, or official model name.")] = None,
    top_k: Annotated[int, typer.Option(help="Predictions per file.")] = 5,
    modality: Annotated[str | None, typer.Option(help="Override the modality guessed from extensions.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Classify files with a bundle; the modality comes from the file type unless given."""
    import json as _json

    from .errors import UniperceptionError
    from .perceiver import Perceiver

    try:
        mods = {modality or modality_of(f) for f in files}
        if len(mods) != 1:
            raise UniperceptionError(f"files of several modalities ({', '.join(sorted(mods))}); run them separately")
        mod = mods.pop()
        name = model or _DEFAULT_BUNDLES.get(mod)
        if name is None:
            raise UniperceptionError(f"no bundle ships for {mod!r} inputs; pass --model")
        p = Perceiver.from_pretrained(name)
        results = getattr(p, f"classify_{mod}")([str(f) for f in files], top_k=top_k)
    except UniperceptionError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    if as_json:
        out = [{"file": str(f), "predictions": [vars(pr) for pr in preds]} for f, preds in zip(files, results, strict=True)]
        typer.echo(_json.dumps(out, indent=2))
        return
    for f, preds in zip(files, results, strict=True):
        console.print(f"[bold]{f}[/bold]")
        for pr in preds:
            console.print(f"  {pr.score:6.3f}  {pr.label}")


@app.command()
def train(
    recipe: Annotated[str, typer.Option(help="Recipe name (shipped) or TOML file.")],
    out: Annotated[Path | None, typer.Option(help="Output directory (default runs/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from <out>/last.pt.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override, e.g. --set train.epochs=3.")] = None,
) -> None:
    """Train a recipe and write a bundle with its model card (works under torchrun for DDP)."""
    import sys

    from .errors import UniperceptionError
    from .training import run_recipe

    try:
        res = run_recipe(recipe, out, resume=resume, overrides=set_ or [], command="uniperception " + " ".join(sys.argv[1:]))
    except UniperceptionError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    console.print(f"test metrics: {res.test_metrics}")
    console.print(f"bundle written to {res.bundle} ({res.seconds / 60:.1f} min)")


@app.command()
def evaluate(
    bundle: Annotated[str, typer.Argument(help="Bundle directory or name.")],
    recipe: Annotated[str, typer.Option(help="Recipe whose [data] table defines the evaluation data.")],
    split: Annotated[str, typer.Option(help="Dataset split.")] = "test",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override recipe values.")] = None,
) -> None:
    """Evaluate a bundle on a recipe's dataset split."""
    from .errors import UniperceptionError
    from .perceiver import Perceiver
    from .training import AdapterCollate, TrainConfig, Trainer, apply_overrides, build_dataset, load_recipe

    try:
        cfg = apply_overrides(load_recipe(recipe), set_ or [])
        p = Perceiver.from_pretrained(bundle)
        data = build_dataset(cfg["data"], split)
        t = Trainer(p, data, None, TrainConfig(batch_size=cfg.get("train", {}).get("batch_size", 32), progress=False),
                    collate_fn=AdapterCollate(p.adapter))
        metrics = t.evaluate(data)
    except UniperceptionError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    for k, v in metrics.items():
        console.print(f"{k}: {v:.4f}")


@app.command("erf")
def erf_cmd(
    model: Annotated[str, typer.Option(help="Registered model name, or a timm model name (random weights unless --weights).")],
    weights: Annotated[Path | None, typer.Option(help="Official checkpoint (uniperception models) or state-dict file (timm).")] = None,
    images: Annotated[Path | None, typer.Option(help="Directory of images (default: built-in offline inputs).")] = None,
    size: Annotated[int, typer.Option(help="Input side in pixels (images are warped to size x size).")] = 512,
    num_images: Annotated[int, typer.Option(help="Images to average (official: 50).")] = 50,
    out: Annotated[Path, typer.Option(help="Heat-map PNG (a .npy of the raw scores is written beside it).")] = Path("erf.png"),
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Effective receptive field (RepLKNet/SLaK method): heat map and high-contribution area ratios."""
    from .analysis import build_model, erf
    from .errors import UniperceptionError

    try:
        net = build_model(model, weights)
        r = erf(net, images, input_size=size, num_images=num_images, device=device, model_name=model)
        r.save_png(out)
        r.save_npy(out.with_suffix(".npy"))
    except UniperceptionError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    t = Table(title=f"{model}: effective receptive field at {r.input_size}², {r.num_images} images")
    for col in ("threshold", "area ratio", "square side (px)"):
        t.add_column(col, justify="right")
    for th, ratio in r.ratios.items():
        t.add_row(f"{th:.0%}", f"{ratio:.4f}", str(r.sides[th]))
    console.print(t)
    if r.skipped:
        console.print(f"{r.skipped} image(s) skipped (NaN in the contribution map)")
    console.print(f"heat map written to {out}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
