"""`partrain export RUN --onnx FILE`: the trained network of a run as an ONNX graph, with the
run's normalisation inside (export_onnx.py says what the graph takes and gives)."""
from __future__ import annotations

from pathlib import Path

import click

from .cli_support import CHECKPOINT, DATA_DIR, RUN, user_errors
from .export_onnx import export_run, format_result


@click.command()
@RUN
@click.option("--onnx", "onnx_path", required=True, type=click.Path(path_type=Path),
              metavar="FILE", help="The ONNX file to write (replaced atomically if it exists).")
@CHECKPOINT
@DATA_DIR
@user_errors
def export(run, onnx_path, checkpoint, data_dir):
    """Write the run's network as an ONNX graph (opset 17) that takes images as they are.

    \b
    input  "pixels": float32 (N, 3, H, W), pixel values 0..255, RGB, channels first;
           N any, H x W the model's input size (32 x 32 for CIFAR-10)
    output "logits": float32 (N, classes); the class names are in the file's metadata
    The run's normalisation and the network in evaluation mode (batch norm with its running
    statistics) are inside the graph. Needs the onnx package: pip install 'partrain[onnx]'.

    \b
    partrain export runs/NAME --onnx model.onnx
    """

    click.echo(format_result(export_run(run, onnx_path, checkpoint=checkpoint,
                                        data_dir=data_dir)))
