"""What a run reports: the lines it logs, each epoch's record (the history, log.jsonl), the progress bar and the
plots."""
from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

# The run's time is estimated once, from the steps after the first ETA_WARMUP of this run (which page memory in and
# fill caches) up to ETA_WARMUP + ETA_STEPS.
ETA_WARMUP, ETA_STEPS = 20, 300


class Progress:
    """A tqdm progress bar over the batches of an epoch, or nothing (``enabled=False``). A context manager."""

    def __init__(self, enabled, *, total, initial, desc):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=True, dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, n, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(**postfix)

    def write(self, log, line):
        """``log(line)`` with the bar cleared first and drawn again after, so that the line stands on its own."""
        if self.bar is None:
            log(line)
            return
        from tqdm import tqdm
        with tqdm.external_write_mode():
            log(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def duration(seconds: float) -> str:
    """A duration for people: ``45 s``, ``7.9 min``, ``2.3 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Eta:
    """The estimated time of the whole run, said once: after the first ``ETA_WARMUP + ETA_STEPS`` steps of this run
    (read where the loop reads the loss sums back, so on a GPU after a synchronisation), the remaining steps at the
    measured time per step, plus the time the run has taken so far (resumed parts included). The test passes still
    to come are not in it. ``started``: the perf_counter time the run (including resumed parts) started at."""

    def __init__(self, started: float):
        self.started, self.mark, self.said = started, None, False

    def line(self, t, now: float | None = None, wall: datetime.datetime | None = None) -> str | None:
        """The estimate for trainer ``t`` at time ``now`` (perf_counter), once it can be made; None before and after."""
        if self.said:
            return None
        now = time.perf_counter() if now is None else now
        if self.mark is None:
            if t.steps_this_run >= ETA_WARMUP:
                self.mark = (now, t.steps_this_run)
            return None
        steps = t.steps_this_run - self.mark[1]
        if steps < ETA_STEPS:
            return None
        self.said = True
        nb = len(t.train_loader)
        per_step = (now - self.mark[0]) / steps
        to_go = max(t.cfg.epochs * nb - (t.epoch * nb + t.batch), 0) * per_step
        finish = (wall or datetime.datetime.now().astimezone()) + datetime.timedelta(seconds=to_go)
        return (f"estimated time: {duration(now - self.started + to_go)} in all, {duration(to_go)} to go, finishing "
                f"about {finish:%H:%M %Z} ({per_step * 1e3:.1f} ms per step of {t.cfg.batch_size} images over steps "
                f"{self.mark[1] + 1}-{t.steps_this_run} of this run; test passes not counted)")


def run_lines(t) -> list[str]:
    """What trainer ``t`` says when training starts: the model, data, device and schedule; how data-parallel ranks
    share the work; the towers and the bytes copied between them; a run already trained to ``--epochs``."""
    cfg, ds = t.cfg, t.dataset
    threads = f" ({cfg.threads} threads)" if t.device.synchronous and cfg.threads else ""  # host devices
    if t.device.kind == "cpu" and cfg.cpu_conv != "auto":
        threads += f" ({cfg.cpu_conv} convolutions)"
    lines = [f"training {Path(cfg.model).stem} on {ds.name} ({len(ds.train_x)} train / {len(ds.test_x)} test "
             f"images), device {t.device}{threads}, precision {t.net.precision}, {t.net.num_params():,} parameters, "
             f"{cfg.epochs} epochs of "
             f"{len(t.train_loader)} batches of {cfg.batch_size}; output in {t.out}"]
    if t.resumed_precision not in (None, t.net.precision):
        lines.append(f"resumed from a checkpoint trained in {t.resumed_precision}: its FP32 parameters go on in "
                     f"{t.net.precision}")
    if t.reducer is not None:
        r = t.reducer
        lines.append(f"data-parallel over {t.ranks.size} rank(s), rank 0 on {t.device}: "
                     f"{cfg.batch_size // t.ranks.size} images per rank and step; gradients averaged by "
                     f"{r.transport.name} in {len(r.buckets)} bucket(s) of up to {r.buckets[0].nbytes:,} B")
    plan = t.net.exchange_plan()
    if plan:
        towers = ", ".join(f"{i}={d}" for i, d in enumerate(t.net.devices))
        lines.append(f"towers {towers}; copied between devices per image and training step: "
                     + ", ".join(f"{k} {v:,} B" for k, v in plan.items()))
    if t.epoch >= cfg.epochs:
        lines.append(f"already trained for {t.epoch} epochs (--epochs {cfg.epochs}); pass a larger --epochs to "
                     f"continue")
    return lines


def epoch_record(t, test, clock) -> dict:
    """The entry of trainer ``t``'s epoch ending now in the history (and in log.jsonl). ``test``: (loss, top-1
    error, top-5 error), None where not tested; ``clock``: the (wall, CPU) times the run started at."""
    p = t.partial
    te_loss, te1, te5 = test
    return {"epoch": t.epoch + 1, "step": t.step, "lr": t.lr_now(start_of_epoch=True),
            "train_loss": p["loss"] / p["n"], "train_error": p["err"] / p["n"], "test_loss": te_loss,
            "test_error": te1, "test_top5_error": te5, "train_time_s": p["time"],
            "elapsed_s": time.perf_counter() - clock[0], "cpu_s": time.process_time() - clock[1],
            "images_per_s": p["n"] / p["time"] if p["time"] > 0 else None, "device": str(t.device),
            "precision": t.net.precision, **({"ranks": t.ranks.size} if t.ranks.world is not None else {}),
            **({"exchanged_bytes_per_image": dict(t.exchanged)} if t.exchanged else {})}


def epoch_line(rec, test_every) -> str:
    """The log line of an epoch's record."""
    te1, te5 = rec["test_error"], rec["test_top5_error"]
    t5 = f", top-5 {te5:.2%}" if te5 is not None else ""
    test = (f"test loss {rec['test_loss']:.4f} error {te1:.2%}{t5} (accuracy {1 - te1:.2%})" if te1 is not None
            else f"not tested (every {test_every} epochs)")
    return (f"epoch {rec['epoch']}: train loss {rec['train_loss']:.4f} error {rec['train_error']:.2%}; {test}; "
            f"{rec['images_per_s']:.0f} images/s, lr {rec['lr']:g}, {rec['elapsed_s']:.0f} s")


def plots(out, net, dataset, history, kept, log, final=True):
    """errors.png; at the end also filters.png (the first conv layer's) and predictions.png (of ``kept``). A
    failing plot is logged, never raised."""
    from .. import plots as draw
    first = next((l for l in net.order if l.type == "conv"), None)
    try:
        filters = None if first is None or not final else (net.device.to_numpy(first.params["w"]),
                                                            f"{first.name} filters")
        draw.training_plots(out, history, final=final, filters=filters, kept=kept, images=dataset.test_x,
                            classes=dataset.classes)
    except Exception as e:  # noqa: BLE001 - plots never stop a training run
        log(f"warning: plotting failed: {type(e).__name__}: {e}")
