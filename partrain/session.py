"""One call of `fit` with its runner (train.py drives the loop; this is everything around it):
the arrays a checkpoint holds, resuming, history rows, the end of an epoch, the end of the run
and its final test pass."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from .batches import normaliser
from .early_stop import observe, stop_reason, validate
from .ema import AirbenchLookahead
from .errors import PartrainError
from .interrupt import raise_lost_interrupt
from .memory import describe as describe_memory, usage as memory_usage
from .evaluate import accuracy, tta_accuracy
from .nn.models import build_model
from .progress import Phase, Progress, format_duration
from .rundir import RunDir
from .tta import describe

if TYPE_CHECKING:
    from .train import Plan, RunState


class Session:
    """One call of `fit` with its runner: the arrays a checkpoint holds, history rows, the end
    of an epoch and of the run. The loop itself stays in `fit`."""

    def __init__(self, rd: RunDir, plan: Plan, runner, progress: Progress, cross=None):
        self.rd, self.plan, self.runner, self.progress = rd, plan, runner, progress
        self.cross = cross
        self.watchdog = cross.watchdog if cross is not None else None
        cfg = plan.cfg
        self.lookahead = (AirbenchLookahead(runner.params, runner.state,
                                            cfg.epochs * plan.steps_per_epoch)
                          if cfg.lookahead else None)
        # The engine copied the images into shared memory: read validation batches from there
        # and let the parent's own copy go (150 MB for CIFAR-10).
        plan.data.train_images = runner.images
        self.eval_model = build_model(cfg.model, **cfg.model_options)
        self.eval_model.bind(runner.params, None, runner.state)
        self.scale, self.shift = normaliser(plan.mean, plan.std)
        self.t_start, self.images_done = time.perf_counter(), 0
        self._settle_folder = None  # set by resume: see _continue_folder

    def arrays(self) -> dict[str, np.ndarray]:
        """What a checkpoint holds: the runner's flat vectors and the Lookahead's slow copies."""
        arrays = {"params": self.runner.params, "state": self.runner.state}
        arrays.update({f"opt.{k}": v for k, v in self.runner.opt_state.items()})
        if self.lookahead is not None:
            arrays.update(self.lookahead.arrays())
        return arrays

    def resume(self) -> RunState:
        """Restore the last checkpoint into the runner; drop history rows logged after it."""
        from .train import RunState  # noqa: F811 - defined beside the loop that fills it
        cfg, rd, cross = self.plan.cfg, self.rd, self.cross
        if cross is None:
            state = RunState.from_meta(rd.restore(self.arrays()), self.plan.steps_per_epoch)
        else:  # rank 0 reads the checkpoint; every rank starts from its bytes
            meta = cross.bcast(rd.restore(self.arrays()) if cross.rank == 0 else None)
            for arr in self.arrays().values():
                cross.bcast_array(arr)
            cross.same_bits(self.arrays(), "after the resume")
            state = RunState.from_meta(meta, self.plan.steps_per_epoch)
        if state.early_stop is not None:
            raise PartrainError(f"{rd.path} is finished: {state.early_stop} (after epoch "
                                f"{state.epoch}); nothing to resume")
        if state.epoch >= cfg.epochs:
            raise PartrainError(f"{rd.path} has already finished its {state.epoch} epochs"
                                + (" (--epochs N trains it further)"
                                   if cfg.schedule == "constant" else ""))
        if cross is None or cross.rank == 0:  # the writer of the run folder
            t = state.t  # the checkpoint's step (state.t moves on before the folder settles)
            self._settle_folder = lambda: self._continue_folder(t)
        self.progress.line(f"resuming {rd.path} at epoch {state.epoch + 1}, step "
                           f"{state.position}/{self.plan.steps_per_epoch}")
        return state

    def _continue_folder(self, t: int) -> None:
        """The resumed run's folder from step t on: history rows after the checkpoint dropped,
        config.json with this call's settings (e.g. more epochs). Done at the first good step
        or checkpoint, so a resume that fails before (a damaged checkpoint, a NaN loss at once)
        leaves the folder as it was."""
        cfg, rd = self.plan.cfg, self.rd
        rd.truncate_history(t)
        if cfg.to_dict() != rd.meta["config"]:
            rd.write_meta({**rd.meta, "config": cfg.to_dict()})

    def settle(self) -> None:
        if self._settle_folder is not None:
            settle, self._settle_folder = self._settle_folder, None
            settle()

    def after_step(self, t: int, n: int) -> None:
        """Step t (1-based) of n images is done (its loss finite): the resumed folder's update,
        Lookahead's turn, the images/s count."""
        self.settle()
        self.images_done += n
        if self.lookahead is not None:
            self.lookahead.after_step(t)
        if self.watchdog is not None:
            self.watchdog.pet()

    def phase(self, what: str, n: int, tta: str = "none") -> Phase:
        """Progress of a pass over n images (the validation set, the test set with its TTA
        views), shown as fit's own progress is: a bar, plain lines, or nothing."""
        return Phase(describe(what, n, tta), n, "image", self.progress.quiet,
                     self.progress.stream, self.progress.tty)

    def checkpoint(self, state: RunState, which: str = "last") -> None:
        self.settle()
        self.rd.save(which, self.arrays(),
                     state.meta(self.plan.cfg, time.perf_counter() - self.t_start))

    def log_window(self, state: RunState, lr: float) -> None:
        w, ips = state.window, state.window.rate()
        self.rd.append_history({"kind": "step", "epoch": state.epoch + 1, "step": state.t,
                                "loss": w.loss_sum / w.seen, "lr": lr,
                                "images_per_s": round(ips, 1), **w.clip_columns()})
        self.progress.update(state.position, w.loss_sum / w.seen, state.epoch_meter.acc, ips)
        state.window = type(state.window)()

    def end_epoch(self, state: RunState) -> None:
        """Validate, log the epoch, move on, checkpoint (best.h5 too when the --early-stop-on
        value improved; `early_stop`), and with --early-stop decide whether the run ends here
        (state.early_stop: the reason, saved in the checkpoint)."""
        plan, m = self.plan, state.epoch_meter
        if self.cross is not None:  # a collective: still watched
            self.cross.same_bits(self.arrays(), f"after epoch {state.epoch + 1}")
        if self.watchdog is not None:  # validation and checkpoints are no step: not timed
            self.watchdog.pause()
        with self.phase("validation", len(plan.val_idx)) as phase:
            val_acc, val_loss = validate(self.eval_model, plan.data.train_images,
                                         plan.data.train_labels, self.scale, self.shift,
                                         plan.val_idx, phase=phase)
        seconds = m.seconds()
        self.rd.append_history({"kind": "epoch", "epoch": state.epoch + 1, "step": state.t,
                                "loss": m.loss, "train_acc": m.acc, "val_acc": val_acc,
                                "time_s": round(seconds, 2),
                                "images_per_s": round(m.seen / seconds, 1),
                                "val_loss": val_loss if len(plan.val_idx) else None,
                                **m.clip_columns()})
        self.progress.line(f"epoch {state.epoch + 1}/{plan.cfg.epochs}: loss {m.loss:.4f}"
                           f"  train acc {m.acc:.1%}"
                           + (f"  val acc {val_acc:.1%}" if len(plan.val_idx) else "")
                           + f"  {seconds:.1f} s  {m.seen / seconds:.0f} img/s")
        state.epoch, state.position = state.epoch + 1, 0
        improved = observe(state, plan.cfg, val_acc, val_loss)
        state.early_stop = stop_reason(state, plan.cfg)
        self.checkpoint(state)  # first: the file a resume needs (a full disk may stop the next)
        if improved:
            self.checkpoint(state, "best")
        if self.watchdog is not None:  # the next step's collectives are watched again
            self.watchdog.resume()

    def finish(self, state: RunState, stopped: str | None, steps_done: int,
               evaluate_test: bool, stop) -> dict:
        """summary.json, the final test accuracy (with TTA if asked) and the closing lines.

        A Ctrl-C that came during the last epoch's validation skips the test pass; one during
        the test pass ends it at once: training is finished and checkpointed either way."""
        cfg, rd, spe = self.plan.cfg, self.rd, self.plan.steps_per_epoch
        if self.watchdog is not None:
            self.watchdog.pause()
        train_time = time.perf_counter() - self.t_start
        summary = {"run": str(rd.path), "epochs_done": state.epoch, "steps": state.t,
                   "train_time_s": round(train_time, 2),
                   "total_train_time_s": round(state.elapsed_s + train_time, 2),
                   "images_per_s": round(self.images_done / max(train_time, 1e-9), 1),
                   "best_val_acc": state.best_val, "stopped": stopped,
                   "best_epoch": state.best_epoch or None}
        if state.best_val_loss is not None:
            summary["best_val_loss"] = state.best_val_loss
        if state.early_stop is not None and stopped is None:  # finished, by --early-stop
            summary.update(stopped="early_stop", early_stop=state.early_stop)
        where = f"epoch {state.epoch + 1}, step {state.position}/{spe}"
        if stopped == "interrupted":
            raise stop.interrupted(f"interrupted at {where}; checkpoint saved — continue "
                                   f"with: partrain fit --resume {rd.path}")
        skip_test = (f"checkpoint.h5 holds the trained parameters; partrain evaluate {rd.path} "
                     f"measures the test accuracy")
        if stopped is None and stop.requested:
            raise stop.interrupted(f"interrupted after the last epoch, before the test "
                                   f"pass; {skip_test}")
        if stopped is None and evaluate_test:
            stop.stop_now_from_here(f"interrupted during the final test pass; {skip_test}")
            summary.update(self.test())
            raise_lost_interrupt()  # its stop-now, if it landed in a finaliser (interrupt.py)
        # This process (on this machine, under MPI) and its workers, after the test pass too.
        summary["memory"] = memory_usage(getattr(self.runner, "worker_pids", []))
        summary["worker_restarts"] = list(getattr(self.runner, "restarts", []))
        summary["ranks"] = 1 if self.cross is None else self.cross.size
        rd.write_summary(summary)
        if stopped is not None:
            self.progress.line(f"stopped after {steps_done} steps (--max-steps) at {where}; "
                               f"continue with: partrain fit --resume {rd.path}")
            return summary
        tested = ""
        if "test_acc" in summary:
            tested = f", test acc {summary['test_acc']:.2%}"
            if "test_acc_tta" in summary:
                tested += f", with TTA ({cfg.tta}) {summary['test_acc_tta']:.2%}"
            tested += f" (test {format_duration(summary['test_time_s'])})"
        self.progress.line(
            f"done: {state.epoch}" + (f" of {cfg.epochs}" if state.early_stop else "")
            + f" epochs in {format_duration(state.elapsed_s + train_time)} "
            f"({summary['images_per_s']:,.0f} img/s)"
            + (f", best val acc {state.best_val:.1%}" if len(self.plan.val_idx) else "") + tested
            + (f"\n{describe_memory(summary['memory'])}" if describe_memory(summary["memory"])
               else ""))
        return summary  # fit prints the next: line once the run's report.html is written

    def test(self) -> dict:
        """The final test accuracy of the trained parameters, with TTA too if cfg.tta says so."""
        cfg, data, e0 = self.plan.cfg, self.plan.data, time.perf_counter()
        with self.phase("test set", len(data.test_labels), cfg.tta) as phase:
            if cfg.tta != "none":
                plain, with_tta = tta_accuracy(self.eval_model, data.test_images,
                                               data.test_labels, self.scale, self.shift, cfg.tta,
                                               phase=phase)
                out = {"test_acc": plain, "test_acc_tta": with_tta, "tta": cfg.tta}
            else:
                out = {"test_acc": accuracy(self.eval_model, data.test_images,
                                            data.test_labels, self.scale, self.shift,
                                            phase=phase)[0]}
        out["test_time_s"] = round(time.perf_counter() - e0, 2)
        return out
