"""`partrain bench`: images/s, speed-up and efficiency against the number of workers (or, with
--kernels, one step's kernels in this process against the machine's GEMM rate)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .bench import BenchConfig, format_table, run_scaling, write_results
from .bench_kernels import run_kernel_bench
from .cli_support import setting_option, user_errors
from .config import parse_model_options
from .errors import PartrainError


def _int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise PartrainError(f"{what} wants comma-separated integers, got {text!r}") from None


@click.command()
@click.option("--workers", default=None, metavar="N,N,...",
              help="Worker counts to measure [default: 1, 2, 4, ... up to the usable cores].")
@click.option("--batch-size", "batch_sizes", default="50,200", show_default=True,
              metavar="B,B,...", help="Global batch sizes to measure.")
@click.option("--reduction", type=click.Choice(["both", "sharded", "parent"]), default="both",
              show_default=True, help="Which reductions to measure.")
@setting_option("model", help="Model name.")
@setting_option("model_options")
@setting_option("optimizer")
@setting_option("micro_batch")
@setting_option("on_worker_failure")
@click.option("--steps", type=int, default=30, show_default=True, help="Timed steps per point.")
@click.option("--warmup", type=int, default=5, show_default=True,
              help="Untimed steps before each point.")
@click.option("--data-dir", default="data", show_default=True, type=click.Path(path_type=Path),
              help="Folder holding cifar10.h5; random images are used if it has none.")
@click.option("--synthetic", type=int, default=None, metavar="N",
              help="Use N random images instead of the data set.")
@click.option("--out-dir", default="bench-out", show_default=True,
              type=click.Path(path_type=Path), help="Where scaling.csv/.json/.png go.")
@click.option("--kernels", is_flag=True,
              help="Instead: time one training step in this process on one BLAS thread "
                   "(forward, backward, optimizer) against the machine's GEMM rate.")
@click.option("--layers", is_flag=True, help="With --kernels: also time every layer.")
@click.option("--backend", type=click.Choice(["local", "mpi"]), default="local", show_default=True,
              help="mpi: under mpiexec, the cross-machine time per step of every rank (with "
                   "the first --workers count each) and an estimate for more machines.")
@click.option("--bandwidth", default="1.25,0.125", show_default=True, metavar="GB/s,...",
              help="With --backend mpi: network bandwidths for the estimate (10 and 1 GbE).")
@user_errors
def bench(workers, batch_sizes, reduction, model, model_options, optimizer, micro_batch,
          on_worker_failure, steps, warmup,
          data_dir, synthetic, out_dir, kernels, layers, backend, bandwidth):
    """Scaling benchmark: images/s, speed-up and efficiency against the number of workers."""

    if kernels:

        res = run_kernel_bench(model, tuple(_int_list(batch_sizes, "--batch-size")), steps,
                               per_layer=layers, echo=click.echo,
                               model_options=parse_model_options(model_options), optimizer=optimizer)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "kernels.json").write_text(json.dumps(res, indent=2) + "\n")
        click.echo(f"wrote {out_dir / 'kernels.json'}")
        return
    store = data_dir / "cifar10.h5"
    cfg = BenchConfig(model=model, model_options=parse_model_options(model_options),
                      optimizer=optimizer, workers=_int_list(workers, "--workers"),
                      batches=_int_list(batch_sizes, "--batch-size"),
                      reductions=["sharded", "parent"] if reduction == "both" else [reduction],
                      steps=steps, warmup=warmup, micro_batch=micro_batch,
                      on_worker_failure=on_worker_failure,
                      data=None if synthetic or not store.exists() else str(store),
                      synthetic=synthetic or 10000)
    if backend == "mpi":
        _bench_on_ranks(cfg, bandwidth, out_dir)
        return
    rows, meta = run_scaling(cfg, echo=click.echo)
    click.echo(format_table(rows))
    for path in write_results(rows, meta, out_dir):
        click.echo(f"wrote {path}")


def _bench_on_ranks(cfg: BenchConfig, bandwidth: str, out_dir: Path) -> None:
    from . import bench_mpi
    from .parallel import mpi
    try:
        bandwidths = [float(x) for x in bandwidth.split(",") if x]
    except ValueError:
        raise PartrainError(f"--bandwidth wants comma-separated GB/s, got {bandwidth!r}") from None
    with mpi.job() as cross:
        rows, meta = bench_mpi.run_across(cfg, cross, echo=click.echo)
        if cross.rank == 0:
            est = bench_mpi.estimates(rows, bandwidths)
            click.echo(bench_mpi.format_rows(rows, est))
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / "mpi.json"
            path.write_text(json.dumps({"meta": meta, "rows": rows, "estimates": est},
                                       indent=1) + "\n")
            click.echo(f"wrote {path}")
