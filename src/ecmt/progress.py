"""Evaluation of a whole dataset that survives interruption and spreads over processes.

The dataset is cut in order into batches (the last may be short), and the batches are
evaluated in rounds of one batch per process: in the round that starts at batch i, rank k
evaluates batch i + k. After each round the round's tallies are summed across the ranks, and
rank 0 writes the results of the finished batches, which are always the first ``done``, to a
progress file (:class:`Progress`, JSON, replaced atomically). Given that progress, a new run
skips the finished batches and adds the rest.

A batch's counts do not depend on which process evaluates it or when, and all counts are
integers, so the results equal those of one uninterrupted process, whatever the number of
processes and however often the run was resumed (even with a different number of processes).
The operation counts (:class:`ecmt.energy.Measurement`) of the first ``measure_batches``
batches are taken by the rank that evaluates each of them, gathered, added in batch order and
saved with the tally.

Example:
    >>> run = {"model": "vit_base_patch16_224", "T": 8, "batch_size": 64}
    >>> path = Path("out/progress.json")
    >>> evaluate_dataset(ann, snn, dataset, T=8, batch_size=64, fingerprint=run, path=path)  # doctest: +SKIP
    >>> # killed; later, in a new process:
    >>> done = evaluate_dataset(ann, snn, dataset, T=8, batch_size=64, fingerprint=run, path=path,
    ...                         start=load_progress(path))                                 # doctest: +SKIP
    >>> done.tally.snn_top1()[8]                                                           # doctest: +SKIP
    0.905
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .adaptive import StopRule
from .conversion import SpikingModel
from .distributed import Context, all_gather, all_reduce_sum, batch_ids, count_batches, whole_batches
from .energy import Measurement
from .errors import InvalidFileError, OutputError, ResumeError
from .evaluation import ProgressLog, Tally, _running, evaluate
from .serialization import Choice, Int, Json, ListOf, Opt, Record

FORMAT = "ecmt-progress"
PROGRESS_FILE = "progress.json"
"""Name of the progress file in an output directory."""
SNN_FILE = "snn.safetensors"
"""Name of the converted SNN saved in an output directory right after calibration."""
LOCK_FILE = ".ecmt.lock"
"""Name of the lock file by which one run at a time holds an output directory."""
MAX_COUNT = 10 ** 12


@dataclass(frozen=True)
class Progress:
    """The results of the first ``done`` batches of an evaluation.

    Attributes:
        fingerprint: What identifies the run (model, data, batch size, T, thresholds, ...): a
            run can only continue the progress of a run with an equal fingerprint.
        batches: Number of batches in the whole evaluation.
        done: Number of batches finished (always the first ones).
        tally: Their correct counts.
        measurement: Their operation counts, if any were measured.
        info: Anything else the results need that a resumed run does not recompute (e.g. the
            calibration record).
    """

    fingerprint: Mapping[str, Any]
    batches: int
    done: int
    tally: Tally
    measurement: Optional[Measurement] = None
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """True when every batch is done."""
        return self.done >= self.batches

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; the tally as the integers of :meth:`Tally.to_tensor`."""
        return {"format": FORMAT, "fingerprint": dict(self.fingerprint), "batches": self.batches, "done": self.done,
                "tally": self.tally.to_tensor().tolist(),
                "measurement": None if self.measurement is None else self.measurement.to_dict(),
                "info": dict(self.info)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Progress":
        """Inverse of :meth:`to_dict`, also after a round trip through JSON.

        Raises:
            InvalidFileError: ``d`` does not fit :data:`SCHEMA`, or its counts contradict each other.
        """
        SCHEMA(d, "progress")
        T, tally = d["fingerprint"].get("T"), d["tally"]
        if not isinstance(T, int) or len(tally) not in (3 * T + 6, 3 * T + 5, 2 * T + 4, 2 * T + 3):
            raise InvalidFileError(f"progress.tally: expected 3T + 6 counts for T = {T!r} (see Tally.to_tensor; "
                                   f"2T + 3, 2T + 4 or 3T + 5 from earlier versions), got {len(tally)}")
        if d["done"] > d["batches"]:
            raise InvalidFileError(f"progress.done: {d['done']} of only {d['batches']} batches")
        n, ann, snn = tally[0], tally[1], tally[2:2 + T]
        skipped_known = len(tally) in (3 * T + 6, 2 * T + 4)
        if n < 0 or (skipped_known and tally[-1] < 0) or any(not 0 <= c <= n for c in snn) or ann > n:
            raise InvalidFileError("progress.tally: counts outside 0..n")
        m = d["measurement"]
        try:
            measurement = None if m is None else Measurement.from_dict(m)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InvalidFileError("progress.measurement: not a measurement record") from None
        return cls(d["fingerprint"], d["batches"], d["done"], Tally.from_tensor(torch.tensor(tally, dtype=torch.int64), T),
                   measurement, d.get("info", {}))


SCHEMA = Record({
    "format": Choice(FORMAT), "fingerprint": Record({}, extra=Json(1 << 16)), "batches": Int(1, MAX_COUNT),
    "done": Int(0, MAX_COUNT), "tally": ListOf(Int(-1, MAX_COUNT), 5, 3 * 100_000 + 6),
    "measurement": Opt(Json(1 << 26)), "info": Json(1 << 20),
}, required=("format", "fingerprint", "batches", "done", "tally", "measurement"))
"""The progress file, checked like an SNN file's metadata (:mod:`ecmt.serialization`)."""


def save_progress(progress: Progress, path: Path) -> Path:
    """Write ``progress`` to ``path`` atomically: a killed process leaves the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(progress.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def lock_directory(directory: Path) -> IO[str]:
    """Hold ``directory`` for this run (an exclusive ``fcntl`` lock on its lock file) until the returned
    file is closed or the process ends.

    Raises:
        OutputError: Another run holds it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    f = open(directory / LOCK_FILE, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise OutputError(f"another ecmt run (pid {holder}) is writing to {directory}: wait for it to finish, "
                          "or choose another --out") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def load_progress(path: Path) -> Progress:
    """Read a progress file.

    Raises:
        ResumeError: The file is missing or is not an ecmt progress file.
    """
    if not path.is_file():
        raise ResumeError(f"no progress file {path}: nothing to resume (run without --resume to start)")
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError
    except (ValueError, OSError, RecursionError):
        raise ResumeError(f"{path} is not an ecmt progress file; remove it to start again") from None
    try:
        return Progress.from_dict(d)
    except InvalidFileError as e:
        raise ResumeError(f"{path} is damaged ({e}); remove it to start again") from None


def check_progress(progress: Progress, fingerprint: Mapping[str, Any], path: Path, images: Optional[int] = None,
                   batch_size: Optional[int] = None) -> None:
    """Refuse to continue ``progress`` in a run of another fingerprint, or (given ``images`` and
    ``batch_size``) one whose counts do not fit its batches of the dataset.

    Raises:
        ResumeError: Naming the settings that differ, with the old and new values.
    """
    old, new = dict(progress.fingerprint), json.loads(json.dumps(dict(fingerprint)))  # compare as JSON
    diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in {**old, **new} if old.get(k) != new.get(k)]
    if diff:
        raise ResumeError(f"cannot resume {path}: it is the progress of another run ({'; '.join(diff)}); "
                          "run with the same settings, or without --resume in another --out directory")
    if images is not None and batch_size is not None:
        total, seen = -(-images // batch_size), progress.tally.n + progress.tally.skipped
        if progress.batches != total or seen != min(progress.done * batch_size, images):
            raise ResumeError(f"{path} is damaged: {progress.done} of {progress.batches} batches done with {seen} "
                              f"images counted, for {total} batches of {batch_size}; remove it to start again")


@torch.no_grad()
def evaluate_dataset(ann: Optional[nn.Module], snn: SpikingModel, dataset: Dataset, T: int, *, batch_size: int,
                     fingerprint: Mapping[str, Any], ctx: Context = Context(), measure_batches: int = 0,
                     stop_rule: Optional[StopRule] = None, workers: int = 0, start: Optional[Progress] = None,
                     path: Optional[Path] = None, info: Optional[Mapping[str, Any]] = None,
                     progress: Optional[bool] = True, top5: bool = False, compact: bool = False,
                     log: Optional[Callable[[str], None]] = None) -> Progress:
    """Evaluate the ANN and the SNN on every batch of ``dataset``, from where ``start`` ended.

    Under ``torchrun`` every rank calls this with the same arguments; each evaluates its own
    batches and all return the same result.

    Args:
        ann: The ANN (None to evaluate the SNN alone).
        snn: Its spiking form.
        dataset: Items ``(image, label)``, cut in order into batches of ``batch_size``.
        T: Time steps simulated per batch.
        batch_size: Images per batch.
        fingerprint: What identifies the run; saved with the progress, checked against ``start``.
        ctx: This process's place in the job (:func:`ecmt.distributed.init`), and the device
            the batches are moved to.
        measure_batches: Count operations and spikes on this many first batches.
        stop_rule: Also count adaptive time steps (see :func:`ecmt.evaluation.evaluate`).
        workers: Data loading processes.
        start: The progress of an interrupted run to continue.
        path: Where rank 0 writes the progress after every round (None: nowhere).
        info: Saved with the progress (for a fresh start; a resumed run keeps ``start``'s).
        progress: Progress bar on rank 0 (tqdm's ``disable=not progress``; None: on terminals).
        top5: Also count top-5 classifications.
        compact: Settled images leave the simulation (see :func:`ecmt.evaluation.evaluate`).
        log: Where rank 0 writes plain progress lines (:class:`ecmt.evaluation.ProgressLog`),
            for logs that are not terminals; None: none.

    Returns:
        The finished progress: tally and measurement of the whole dataset.

    Raises:
        ResumeError: ``start`` has another fingerprint.
    """
    total = count_batches(dataset, batch_size)
    if start is not None:
        images = len(dataset)  # type: ignore[arg-type]
        check_progress(start, fingerprint, path or Path(PROGRESS_FILE), images, batch_size)
    # the empty tally of this configuration (ANN or not, adaptive or not)
    empty, _ = evaluate(ann, snn, [], T, progress=False, stop_rule=stop_rule, top5=top5)
    state = start or Progress(dict(fingerprint), total, 0, empty, None, dict(info or {}))
    if path is not None and ctx.is_main and start is None:
        save_progress(state, path)
    mine = iter(whole_batches(dataset, batch_size, batch_ids(total, ctx, state.done), workers))
    bar = tqdm(total=total, initial=state.done, desc="evaluating", unit="batch", dynamic_ncols=True,
               disable=True if not ctx.is_main else (None if progress is None else not progress))
    lines = ProgressLog(total, log, start=state.done) if log is not None and ctx.is_main else None
    for first in range(state.done, total, ctx.world_size):
        i = first + ctx.rank
        batch = [next(mine)] if i < total else []
        part, measured = evaluate(ann, snn, batch, T, device=ctx.device, progress=False, stop_rule=stop_rule,
                                  measure_batches=int(bool(batch) and i < measure_batches), top5=top5,
                                  compact=compact)
        part = Tally.from_tensor(all_reduce_sum(part.to_tensor().to(ctx.device)).cpu())
        measurement = state.measurement
        if first < measure_batches:
            for m in all_gather(measured):  # in rank order, which is batch order
                if m is not None:
                    measurement = m if measurement is None else measurement + m
        state = replace(state, done=min(first + ctx.world_size, total), tally=state.tally + part,
                        measurement=measurement)
        if path is not None and ctx.is_main:
            save_progress(state, path)
        bar.update(state.done - bar.n)
        bar.set_postfix_str(_running(state.tally), refresh=False)
        if lines is not None:
            lines.update(state.done, state.tally)
    bar.close()
    return state
