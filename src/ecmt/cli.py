"""The ``ecmt`` command line.

Subcommands:

* ``ecmt evaluate``: calibrate, convert and evaluate a model (or evaluate a saved SNN):
  ANN top-1 and SNN top-1 at every t ≤ T, energy ratio, firing rates; JSON, CSV, plots; with
  ``--adaptive``, also the top-1 and mean steps when each image stops once settled. For a
  sentence encoder (``--model minilm``, ``--texts FILE``): the cosine similarity of the SNN's
  sentence embeddings to the ANN's and the agreement of their similarity rankings at every t.
* ``ecmt demo``: the same, on the reference model and Fashion-MNIST, with no arguments.
* ``ecmt convert``: calibrate and convert a model (or a sentence encoder) and save the SNN to
  a file.
* ``ecmt sweep``: accuracy against T for several numbers of levels and percentiles from one
  calibration (paper Fig. 5).
* ``ecmt ops``: the theoretical MACs per module of an architecture (paper Table 3).
* ``ecmt generate``: greedy decoding of a causal LM's SNN beside its ANN (:mod:`ecmt.lm`).
* ``ecmt analyze``: the error shares of an SNN at step T by site type and by block, the local
  error of every site and the dominant channels of the worst ones (:mod:`ecmt.analysis`), on
  held-out images, sentences or prose; JSON and a plot of error against depth.

For a causal language model (``--model smollm2``, a ``.gguf`` file or a ``*ForCausalLM``
folder), ``ecmt evaluate --texts FILE`` reads FILE as prose split into sentences and reports
the perplexity and next-token agreement of the SNN at every t beside the ANN's perplexity.

Calibration data is the dataset's training split when it has one (Fashion-MNIST, MNIST);
an image folder has none, so its calibration images are a random sample of the evaluated
images themselves (the first ``--calib-batches`` batches of the seeded random order).

``ecmt evaluate`` (and ``demo``) also runs under ``torchrun``, with the batches shared out
across processes (:mod:`ecmt.distributed`); with ``--out DIR`` it saves its progress after
every batch, and ``--resume`` continues an interrupted run (:mod:`ecmt.progress`).

Conventions: each subcommand takes only the options it uses, and an option that does not
apply to the model given (an image option for a sentence encoder, or the reverse) is refused;
results go to stdout, every message (``ecmt: wrote ...``, progress lines, errors) to stderr.
Progress bars are drawn on terminals; where stderr is a file, plain progress lines are written
instead (:class:`ecmt.evaluation.ProgressLog`). Library progress bars need ``--verbose``.

Bad input of any kind (arguments, models, checkpoints, datasets, files) ends with one line
``ecmt: error: ...`` on stderr and exit status 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from . import __version__, distributed, simulation
from .adaptive import StopRule, mean_energy
from .calibration import ActivationStats, collect_statistics
from .conversion import SpikingModel, convert
from .data import DATASETS, DOWNLOAD_DIR, EvalData, open_dataset
from .energy import energy_report, ops_report, theoretical_ops
from .errors import ConversionError, InvalidInputError, UnsupportedModelError
from .evaluation import Tally, evaluate, images_only, loader, seed_everything, subset
from .models import REFERENCE_MODELS, ModelBundle, load_model, model_names
from .neurons import MAX_LEVELS, RULES, SpikeRule
from .outputs import claim, results_or_stdout
from .progress import PROGRESS_FILE, SNN_FILE, Progress, check_progress, evaluate_dataset, load_progress
from .tuning import tune
from .results import format_table, per_step_rows, steps_within, sweep_rows, table_steps, write_csv, write_json
from . import lm
from .text import (TEXT_MODELS, convert_text, evaluate_text, is_text_model, load_text_model, packaged_texts,
                   read_texts, saved_text_model, text_ops_report)

DEFAULT_T = 16
"""Time steps simulated by default, in every subcommand: the range of the paper's Table 1 and Fig. 5."""
TUNE_AUTO = 0
"""The value of a bare ``--tune``: tune for ``--T`` (see :func:`_resolve_tune`)."""
TUNE_AUTO_MAX = 8
TUNE_DEFAULT = 4
LM_PER_CHANNEL_SEARCH = {"levels": 14, "headroom": 32.0}
"""``--levels`` and ``--tune-headroom`` of a causal LM searched per channel (``--tune --per-channel``)
when they are not given: the best setting measured on SmolLM2 (README, "Measured on SmolLM2": 8 of
10 greedy continuations equal to the ANN's at T = 32, against 2 of 10 with n = 8 and no headroom,
whose top thresholds sit at channel maxima that other texts exceed)."""
PLOT_FORMATS = ("png", "pdf", "svg")

ANALYZE_LIMIT = 64
"""Held-out images or sentences ``ecmt analyze`` simulates by default (once per group of sites)."""
ANALYZE_LM_LIMIT = 8
"""Held-out sentences of a language model ``ecmt analyze`` simulates by default."""

DEMO_MODEL = "fmnist-vit"
DEMO_DATASET = "fashion-mnist"
DEMO_LIMIT = 1000
"""Test images the demo evaluates (a seeded random subset), to finish in minutes on 2 cores."""


class UsageError(Exception):
    """An invalid command line (reported like any other input error)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)

SEED_RANGE = (0, 2 ** 32 - 1)
"""Seeds numpy accepts (torch and Python accept more)."""


def _int_in(low: int, high: int) -> Callable[[str], int]:
    at_least = _int_at_least(low)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    return parse


_seed = _int_in(*SEED_RANGE)
_levels = _int_in(1, MAX_LEVELS)

LONG_RUN = 1 << 20
"""Image-steps per batch (T x batch size) beyond which a run is warned that it may take hours."""


def _percentile(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 50.0 < value <= 100.0:
        raise argparse.ArgumentTypeError(f"must be in (50, 100], got {value:g}")
    return value


def _headroom(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 1.0):
        raise argparse.ArgumentTypeError(f"must be a number >= 1, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value:g}")
    return value


# --------------------------------------------------------------------------- options


def _base() -> argparse.ArgumentParser:
    """The options of every subcommand."""
    p = _Parser(add_help=False)
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.add_argument("--verbose", action="store_true",
                   help="also show the progress bars of the libraries ecmt uses (transformers' loading bar)")
    return p


def _common(threads: Optional[int] = None) -> argparse.ArgumentParser:
    """The options of the subcommands that run a model on data."""
    p = _Parser(add_help=False, parents=[_base()])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    p.add_argument("--batch-size", type=_positive_int, default=128, metavar="N", help=f"images per batch (default: 128; language models: {LM_BATCH_SIZE} texts)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the image subsets and of torch (default: 0)")
    p.add_argument("--threads", type=_positive_int, default=threads, metavar="N",
                   help=f"CPU threads for torch (default: {threads or 'torch chooses'}; 1 is much faster "
                        "on a machine busy with other work)")
    p.add_argument("--workers", type=_non_negative_int, default=0, metavar="N",
                   help="data loading processes (default: 0, in the main process)")
    p.add_argument("--memory", type=_memory, default=None, metavar="SIZE",
                   help="memory for the temporaries of a chunk of time steps simulated at once (ecmt.simulate), "
                        "e.g. 512M or 8G (default: 2G on CPU, half the free memory on CUDA)")
    p.add_argument("--data-root", metavar="DIR", help="directory holding the Fashion-MNIST/MNIST IDX files")
    p.add_argument("--download", action="store_true",
                   help="fetch Fashion-MNIST/MNIST with torchvision into ~/.cache/ecmt when its IDX files are "
                        "not found locally (needs the network; never done without this flag)")
    return p


def _model_options(p: argparse.ArgumentParser, *, snn_file: bool) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", metavar="NAME", help="reference model (fmnist-vit) or timm model name")
    if snn_file:
        group.add_argument("--snn", metavar="FILE", help="evaluate an SNN saved by 'ecmt convert' (no calibration)")
    p.add_argument("--checkpoint", metavar="FILE", help="weights of a timm model (.safetensors, .pth, .bin)")
    p.add_argument("--dataset", metavar="NAME|DIR",
                   help="fashion-mnist, mnist, or an ImageNet-val-style folder (default: the reference model's)")
    _class_map_option(p)


def _class_map_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--class-map", metavar="FILE",
                   help="image folders: the model's class index of each class directory, as JSON "
                        "({\"dir\": index}) or text (one directory name per line, in class order, or "
                        "'dir index' per line); default: sorted order, or the ImageNet index of "
                        "directories named by WordNet ids (n01440764, ...) for a 1000-class model")


def _calibration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-batches", type=_positive_int, default=8, metavar="N",
                   help="calibration batches (default: 8); from the train split, else the evaluated images")


def _conversion_options(p: argparse.ArgumentParser, *, evaluated: bool = True) -> None:
    p.add_argument("--levels", type=_levels, default=None, metavar="N",
                   help=f"thresholds per side of each MT neuron, n in 1..{MAX_LEVELS} (default: 8; "
                        f"{LM_PER_CHANNEL_SEARCH['levels']} for a language model with --tune --per-channel)")
    p.add_argument("--percentile", type=_percentile, default=None, metavar="P",
                   help="calibration percentile p in (50, 100] (default: 99)")
    p.add_argument("--tune", type=_positive_int, nargs="?", const=TUNE_AUTO, default=None, metavar="T",
                   help="search thresholds per site for the best output at step T, on the "
                        "calibration data only (ecmt.tune), instead of one percentile; a bare --tune "
                        + (f"tunes for --T when it is at most {TUNE_AUTO_MAX}, else for {TUNE_DEFAULT}" if evaluated
                           else f"tunes for T = {TUNE_DEFAULT}"))
    p.add_argument("--tune-budget", type=_positive_int, default=None, metavar="N",
                   help="with --tune: the most simulations of the calibration data the search may run "
                        "(default: 20; each costs about one simulation of the calibration set to step T)")
    p.add_argument("--tune-headroom", type=_headroom, default=None, metavar="H",
                   help="with --tune: keep every top threshold at least H times the largest calibration value "
                        "(per channel with --per-channel), so that larger inputs still pass (default: 1; "
                        f"{LM_PER_CHANNEL_SEARCH['headroom']:g} for a language model with --per-channel)")
    _rule_option(p, tune=True)
    p.add_argument("--per-channel", action="store_true",
                   help="base thresholds per input channel of every Linear layer (scaled by each channel's "
                        "largest activation), for activations with outlier channels (LLMs)")


def _rule_option(p: argparse.ArgumentParser, tune: bool) -> None:
    p.add_argument("--rule", choices=RULES, default=None,
                   help="how MT neurons choose their spike: eq25 (the paper: the largest threshold reached) "
                        "or nearest (the threshold nearest to the membrane; converges faster at low T) "
                        + ("(default: eq25, or nearest with --tune)" if tune else "(default: eq25)"))


def _rule(args: argparse.Namespace) -> SpikeRule:
    """The spike rule asked for: ``--rule``, else ``nearest`` when tuning and ``eq25`` otherwise."""
    if args.rule:
        return SpikeRule(args.rule)
    return SpikeRule.nearest if getattr(args, "tune", None) else SpikeRule.eq25


def _evaluation_options(p: argparse.ArgumentParser, *, out: Optional[str], limit: Optional[int],
                        limit_why: str = "") -> None:
    p.add_argument("--T", type=_positive_int, default=DEFAULT_T, metavar="T",
                   help=f"time steps simulated; results are given after every step 1..T (default: {DEFAULT_T})")
    p.add_argument("--limit", type=_positive_int, default=limit, metavar="N",
                   help="evaluate a seeded random subset of N images (sentence encoders: N sentences) "
                        f"(default: {'all' if limit is None else limit}{limit_why})")
    p.add_argument("--out", metavar="DIR", default=out,
                   help=f"write results JSON, CSV and plots here (default: {out or 'none'})")
    p.add_argument("--json", metavar="FILE", help="write the results JSON to FILE")
    p.add_argument("--plot-format", choices=PLOT_FORMATS, default="png",
                   help="file format of the plots in --out (default: png; pdf and svg for papers)")
    p.add_argument("--energy-batches", type=_non_negative_int, default=1, metavar="N",
                   help="count operations and spikes on the first N batches (default: 1; 0: off)")


def _adaptive_options(p: argparse.ArgumentParser) -> None:
    default = StopRule()
    p.add_argument("--adaptive", action="store_true",
                   help="also report adaptive time steps (ecmt.adaptive): each image stops once its top-1 "
                        "class is settled; accuracy, mean steps and energy, from the same simulation")
    p.add_argument("--patience", type=_non_negative_int, default=None, metavar="K",
                   help=f"with --adaptive: the top-1 class must be unchanged over the last K steps "
                        f"(default: {default.patience})")
    p.add_argument("--margin", type=_fraction, default=None, metavar="M",
                   help=f"with --adaptive: and its softmax probability must exceed the runner-up's by M "
                        f"(default: {default.margin})")


def _resume_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted evaluation whose results are in --out DIR: skip its "
                        "finished batches and reuse its converted SNN")


def _text_options(p: argparse.ArgumentParser, *, energy: bool = True) -> None:
    p.add_argument("--texts", metavar="FILE",
                   help="sentence encoders (--model minilm or a model folder): measure the SNN's sentence "
                        "embeddings on these sentences, one per line (default: the packaged held-out set); "
                        "language models: prose, split into sentences")
    _calib_texts_option(p)
    if energy:
        p.add_argument("--energy-texts", type=_non_negative_int, default=None, metavar="N",
                       help="sentence encoders: count operations and spikes on N of the sentences, spread over "
                            "their lengths, each simulated alone without padding (default: 32, language models: 2; "
                            "0: off)")
    p.add_argument("--max-tokens", type=_positive_int, default=64, metavar="N",
                   help="language models: truncate each evaluated sentence to N tokens (default: 64)")


def _calib_texts_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-texts", metavar="FILE",
                   help="texts to calibrate on, one per line (default: the packaged calibration set; a language model "
                        "in 'ecmt evaluate': the first quarter of --texts, at most 16 sentences)")


def build_parser() -> argparse.ArgumentParser:
    """The ``ecmt`` argument parser."""
    parser = _Parser(prog="ecmt", description="Convert Transformers into multi-threshold spiking networks (ECMT).")
    parser.add_argument("--version", action="version", version=f"ecmt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("evaluate", parents=[_common()], help="calibrate, convert and evaluate a model",
                       description="ANN top-1 and SNN top-1 at every t <= T, from one simulation per batch.")
    _model_options(p, snn_file=True)
    _conversion_options(p)
    _calibration_options(p)
    _evaluation_options(p, out=None, limit=None)
    _resume_options(p)
    _adaptive_options(p)
    _text_options(p)
    _finish(p, run_evaluate)

    p = sub.add_parser("demo", parents=[_common(threads=1)], help="the reference model on Fashion-MNIST, end to end",
                       description=f"Evaluate {DEMO_MODEL} on {DEMO_LIMIT} {DEMO_DATASET} test images at T <= 16.")
    _conversion_options(p)
    _calibration_options(p)
    _evaluation_options(p, out="ecmt-demo", limit=DEMO_LIMIT, limit_why=": the demo finishes in minutes on 2 cores")
    _resume_options(p)
    _adaptive_options(p)
    p.set_defaults(model=DEMO_MODEL, dataset=DEMO_DATASET, checkpoint=None, snn=None, class_map=None)
    _finish(p, run_evaluate)

    p = sub.add_parser("convert", parents=[_common()], help="calibrate, convert and save an SNN",
                       description="Calibrate the thresholds, convert, and save the SNN (load it with --snn).")
    _model_options(p, snn_file=False)
    _conversion_options(p, evaluated=False)
    _calibration_options(p)
    _calib_texts_option(p)
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="the SNN file to write (.safetensors)")
    _finish(p, run_convert)

    p = sub.add_parser("sweep", parents=[_common()], help="accuracy vs T for several levels and percentiles",
                       description="Paper Fig. 5: one calibration, one SNN per (levels, percentile) setting.")
    _model_options(p, snn_file=False)
    _calibration_options(p)
    p.add_argument("--levels", type=_levels, nargs="+", default=[4, 6, 8], metavar="N",
                   help="numbers of levels n (default: 4 6 8)")
    p.add_argument("--percentiles", type=_percentile, nargs="+", default=[99.0, 99.9, 99.99], metavar="P",
                   help="calibration percentiles (default: 99 99.9 99.99)")
    _rule_option(p, tune=False)
    _evaluation_options(p, out=None, limit=DEMO_LIMIT,
                        limit_why=": the sweep simulates one SNN per setting, so it evaluates a subset "
                                  "unless told otherwise")
    _finish(p, run_sweep)

    p = sub.add_parser("ops", parents=[_base()],
                       help="theoretical MACs per module of a timm model or sentence encoder (Table 3)",
                       description="Paper Table 3 for any timm model, from its architecture only "
                                   "(built on the meta device: no weights, no data).")
    p.add_argument("--model", required=True, metavar="NAME",
                   help="timm model name, e.g. eva_giant_patch14_336, the reference model fmnist-vit, or a "
                        "sentence encoder (minilm, a model folder)")
    p.add_argument("--img-size", type=_positive_int, metavar="N", help="input resolution (default: the model's)")
    p.add_argument("--tokens", type=_positive_int, metavar="N",
                   help="sentence encoders (--model minilm or a model folder): sentence length in tokens "
                        "(default: the model's length limit)")
    p.add_argument("--json", metavar="FILE", help="write the counts (plain integers) as JSON")
    _finish(p, run_ops)

    p = sub.add_parser("generate", parents=[_base()], help="greedy text generation by a language model's SNN",
                       description="Each token from a T-step simulation (of its own position, the earlier "
                                   "ones' spiking keys and values cached), beside the ANN's greedy tokens.")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", metavar="NAME", help="smollm2, a .gguf file or a causal LM folder")
    group.add_argument("--snn", metavar="FILE", help="an LM's SNN saved by 'ecmt convert' (no calibration)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--T", type=_positive_int, default=DEFAULT_T, metavar="T", help="time steps per token")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N", help="tokens to generate")
    p.add_argument("--levels", type=_positive_int, default=8, metavar="N", help="thresholds per side (default: 8)")
    p.add_argument("--percentile", type=_percentile, default=99.0, metavar="P", help="calibration percentile")
    _rule_option(p, tune=False)
    p.add_argument("--per-channel", action="store_true", help="base thresholds per input channel of every Linear")
    _calib_texts_option(p)
    p.add_argument("--no-cache", action="store_true",
                   help="run the whole prefix for every token, in the SNN and the ANN (no key-value caches)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="CPU threads for torch")
    _finish(p, run_generate)

    p = sub.add_parser("analyze", parents=[_common(threads=1)], help="which sites, layers and channels cause the error",
                       description="Error shares by site type and by block at step T, local errors per site and the "
                                   "dominant channels of the worst sites (ecmt.analysis), on held-out data.")
    _model_options(p, snn_file=False)
    _conversion_options(p, evaluated=True)
    p.add_argument("--thresholds", metavar="FILE",
                   help="base thresholds to analyse, a JSON file as ecmt.Thresholds.to_json() writes it "
                        "(instead of calibrating: no --percentile, --tune or --per-channel)")
    _calibration_options(p)
    p.add_argument("--T", type=_positive_int, default=TUNE_DEFAULT, metavar="T",
                   help=f"the time step whose output error is analysed (default: {TUNE_DEFAULT})")
    p.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help=f"analyse N held-out inputs (default: {ANALYZE_LIMIT} images or sentences, "
                        f"{ANALYZE_LM_LIMIT} for a language model)")
    _text_options(p, energy=False)
    p.add_argument("--exact", action="store_true",
                   help="also measure each group exact with the rest spiking (the share of the error removed); "
                        "doubles the simulations")
    p.add_argument("--channels", type=_non_negative_int, default=8, metavar="K",
                   help="channels listed at each of the worst sites (default: 8; 0: none)")
    p.add_argument("--json", metavar="FILE", help="write the analysis JSON to FILE")
    p.add_argument("--plot", metavar="FILE", help=f"draw the error against depth to FILE ({', '.join(PLOT_FORMATS)})")
    _finish(p, run_analyze)
    return parser


def _finish(p: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int]) -> None:
    """Set the handler of a subcommand, and record its defaults (to tell which options were given)."""
    p.set_defaults(func=func)
    p.set_defaults(defaults={a.dest: p.get_default(a.dest) for a in p._actions if a.dest != "help"})


def _given(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The options among ``names`` (dests) whose value is not their default, as ``--flags``."""
    defaults = getattr(args, "defaults", {})
    return [f"--{n.replace('_', '-')}" for n in names
            if n in defaults and getattr(args, n, None) != defaults[n]]


def _refuse(args: argparse.Namespace, names: Sequence[str], why: str) -> None:
    """Refuse, in one line, the options among ``names`` that were given but do not apply.

    Raises:
        UsageError: One of them was given.
    """
    given = _given(args, names)
    if given:
        raise UsageError(f"{', '.join(given)}: {why}")


LM_BATCH_SIZE = 8
"""Texts per batch of a language model when ``--batch-size`` is not given: its logits alone are
``batch x tokens x vocabulary`` floats (49,152 tokens for SmolLM2), and every step keeps the state
of 30 layers."""

IMAGE_ONLY = ("checkpoint", "dataset", "class_map", "calib_batches", "energy_batches", "workers", "data_root",
              "download")
"""Options (dests) that only image classifiers use."""
TEXT_ONLY = ("calib_texts", "energy_texts")
"""Options (dests) that only sentence encoders use."""


def _tune_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of the threshold search (``ecmt.tune``) that the command line sets:
    ``--tune-budget`` and ``--tune-headroom``.

    Raises:
        UsageError: One of them without ``--tune``.
    """
    options = {}
    for flag, dest, key, what in (("--tune-budget", "tune_budget", "budget", "the budget"),
                                  ("--tune-headroom", "tune_headroom", "headroom", "the headroom")):
        value = getattr(args, dest, None)
        if value is None:
            continue
        if not getattr(args, "tune", None):
            raise UsageError(f"{flag} sets {what} of --tune: add --tune")
        options[key] = value
    return options


def _lm_search(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """A causal LM's ``levels`` and the options of its threshold search: those given, else
    :data:`LM_PER_CHANNEL_SEARCH` when it is searched per channel, else n = 8 and no options."""
    options = _tune_options(args)
    if args.tune and args.per_channel and getattr(args, "snn", None) is None:
        options.setdefault("headroom", LM_PER_CHANNEL_SEARCH["headroom"])
        return args.levels or LM_PER_CHANNEL_SEARCH["levels"], options
    return args.levels or 8, options


def _resolve_tune(args: argparse.Namespace) -> None:
    """A bare ``--tune``: tune for ``--T`` when it is at most 8, else (and without ``--T``) for 4."""
    _tune_options(args)  # --tune-budget or --tune-headroom without --tune fails here, before any loading
    if getattr(args, "tune", None) == TUNE_AUTO:
        T = getattr(args, "T", None)
        args.tune = T if T is not None and T <= TUNE_AUTO_MAX else TUNE_DEFAULT


def _check_model_name(name: Optional[str]) -> None:
    """Refuse an unknown model name with the closest known names, whatever the subcommand.

    Raises:
        UnsupportedModelError: ``name`` is no reference model, sentence encoder, timm name or folder.
    """
    if (name is None or name in REFERENCE_MODELS or is_text_model(name) or lm.is_language_model(name)
            or Path(name).exists()):
        return
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, [*REFERENCE_MODELS, *TEXT_MODELS, *model_names()], n=3, cutoff=0.6)
    hint = (f"did you mean {', '.join(close)}?" if close else
            f"give {', '.join([*REFERENCE_MODELS, *TEXT_MODELS])}, a model folder or a timm architecture name "
            "(see timm.list_models())")
    raise UnsupportedModelError(f"unknown model {name!r}; {hint}")


# --------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class Setup:
    """What every subcommand starts from: the model, its ANN, the data and the device."""

    bundle: ModelBundle
    ann: Optional[nn.Module]
    data: EvalData
    device: torch.device


def _setup(args: argparse.Namespace, bundle: ModelBundle, ann: Optional[nn.Module],
           device: Optional[torch.device] = None) -> Setup:
    device = torch.device(args.device) if device is None else device
    dataset = args.dataset or bundle.dataset
    if dataset is None:
        raise UsageError(f"--dataset is required for {bundle.name}")
    if getattr(args, "download", False):
        if dataset not in DATASETS:
            raise UsageError(f"--download is for {' and '.join(sorted(DATASETS))}; {dataset} is a folder")
        _log(f"ecmt: --download: {dataset} is fetched with torchvision into {DOWNLOAD_DIR} if its IDX files "
             "are not found locally")
    data = open_dataset(dataset, bundle.data_config, bundle.num_classes, args.data_root,
                        class_map=getattr(args, "class_map", None), download=getattr(args, "download", False))
    return Setup(bundle, None if ann is None else ann.to(device), data, device)


def _calibration_images(setup: Setup, args: argparse.Namespace) -> Any:
    return subset(setup.data.calibration, args.calib_batches * args.batch_size, args.seed)


def _calibrate(setup: Setup, args: argparse.Namespace,
               ctx: distributed.Context = distributed.Context()) -> tuple[ActivationStats, dict[str, Any]]:
    """Activation statistics of the calibration images; under torchrun each rank reads its share."""
    start = time.perf_counter()
    images = _calibration_images(setup, args)
    ids = distributed.batch_ids(distributed.count_batches(images, args.batch_size), ctx)
    batches = images_only(distributed.whole_batches(images, args.batch_size, ids, args.workers))
    stats = collect_statistics(setup.bundle.model.to(setup.device), batches, progress=_progress(),
                               per_channel=getattr(args, "per_channel", False))
    info = {"source": setup.data.calibration_source, "images": len(images),
            "batches": distributed.count_batches(images, args.batch_size),
            "seconds": round(time.perf_counter() - start, 1)}
    return stats, info


def _calibrated_snn(setup: Setup, args: argparse.Namespace,
                    ctx: distributed.Context = distributed.Context()) -> tuple[SpikingModel, dict[str, Any]]:
    """Thresholds at one percentile, or searched for the best output at step ``--tune``."""
    levels = args.levels or 8
    options = _tune_options(args)
    if not args.tune:
        stats, info = _calibrate(setup, args, ctx)
        return _convert(setup, stats, levels, args.percentile or 99.0, _rule(args)), info
    if args.percentile is not None:
        raise UsageError("--tune chooses the percentiles itself; drop --percentile")
    if ctx.world_size > 1:
        raise UsageError("--tune runs in one process: run 'ecmt convert --tune' first, then evaluate its file "
                         "with --snn under torchrun")
    start = time.perf_counter()
    images = _calibration_images(setup, args)
    th = tune(setup.bundle.model.to(setup.device), images_only(loader(images, args.batch_size, args.workers)),
              T=args.tune, levels=levels, progress=_progress(), rule=_rule(args), per_channel=args.per_channel,
              log=_progress_log(), **options)
    snn = convert(setup.bundle.model, th, levels=levels)
    snn.spec = setup.bundle.spec
    info = {"source": setup.data.calibration_source, "images": len(images),
            "batches": distributed.count_batches(images, args.batch_size),
            "seconds": round(time.perf_counter() - start, 1), "tuned": dict(th.meta)}
    return snn, info


def _convert(setup: Setup, stats: ActivationStats, levels: int, percentile: float, rule: SpikeRule) -> SpikingModel:
    snn = convert(setup.bundle.model, stats.thresholds(percentile), levels=levels, rule=rule)
    snn.spec = setup.bundle.spec
    return snn


def _progress() -> Optional[bool]:
    """Progress bars on terminals only (tqdm's ``disable=None``), and only in rank 0."""
    return None if sys.stderr.isatty() and distributed.is_main() else False


def _progress_log() -> Optional[Callable[[str], None]]:
    """Plain progress lines where stderr is no terminal (a log file), only in rank 0; else None."""
    return _log if not sys.stderr.isatty() and distributed.is_main() else None


def _search_log() -> Optional[Callable[[str], None]]:
    """One line per simulation of a threshold search (``--tune``), on terminals and in log files
    alike (a text model's search has no bar), in rank 0 only."""
    return _log if distributed.is_main() else None


def _quiet_libraries(args: argparse.Namespace) -> None:
    """transformers' progress bars (\"Loading weights\") and warnings only with ``--verbose``."""
    from transformers.utils import logging as hf_logging

    if getattr(args, "verbose", False):
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _batches(setup: Setup, args: argparse.Namespace) -> Any:
    return loader(subset(setup.data.test, args.limit, args.seed), args.batch_size, args.workers)


def _log(message: str) -> None:
    if distributed.is_main():
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- subcommands


def run_evaluate(args: argparse.Namespace) -> int:
    """``ecmt evaluate`` and ``ecmt demo``."""
    stop_rule = _stop_rule(args)
    _check_model_name(args.model)
    _resolve_tune(args)
    if lm.is_language_model(args.model) or _is_lm_snn(args.snn):
        _refuse(args, [*IMAGE_ONLY, "adaptive", "resume"], "these options are not available for a language model")
        return run_lm_evaluate(args)
    _refuse(args, ["max_tokens"], "--max-tokens is for language models")
    if getattr(args, "texts", None) is not None or is_text_model(args.model) or _is_text_snn(args.snn):
        if stop_rule is not None:
            raise UsageError("--adaptive needs a classifier: a sentence encoder has no top-1 class to settle")
        if args.resume or distributed.launched():
            raise UsageError("a sentence encoder is evaluated in one go, in one process: no --resume, no torchrun")
        _refuse(args, IMAGE_ONLY, "these options are for image classifiers, not for a sentence encoder "
                                  "(its sentences: --texts, --calib-texts, --energy-texts)")
        if args.energy_texts is None:
            args.energy_texts = 32
        return run_text_evaluate(args)
    _refuse(args, TEXT_ONLY, "these options are for sentence encoders (--model minilm or a model folder)")
    start = time.perf_counter()
    ctx = distributed.init(args.device)
    seed_everything(args.seed)
    out = None if args.out is None else Path(args.out)
    resumed = _interrupted_run(args, out)
    calibration: Optional[dict[str, Any]] = None
    if args.snn is not None or resumed is not None:
        if args.snn is not None and (args.levels is not None or args.percentile is not None or args.rule):
            raise UsageError("--levels, --percentile and --rule are fixed by the --snn file; "
                             "convert again to change them")
        if args.snn is not None:
            _refuse(args, ("tune", "calib_batches"), "the --snn file is calibrated already; convert again "
                                                     "to change its thresholds")
        from .serialization import read

        saved = read(args.snn or out / SNN_FILE)  # type: ignore[operator]
        setup = _setup(args, saved.bundle, saved.ann, ctx.device)
        snn = saved.snn.to(setup.device)
        if resumed is not None:
            calibration = resumed.info.get("calibration")
        if setup.ann is None:
            _log("ecmt: this SNN file holds no ANN; ANN accuracy is not reported")
    else:
        bundle = load_model(args.model, args.checkpoint)
        setup = _setup(args, bundle, bundle.model, ctx.device)
        snn, calibration = _calibrated_snn(setup, args, ctx)
        if out is not None and ctx.is_main:  # a resumed run reuses it instead of calibrating again
            _save_atomically(snn, bundle.model, out / SNN_FILE)
    images = subset(setup.data.test, args.limit, args.seed)
    fingerprint = _fingerprint(args, setup, snn, len(images))
    if resumed is not None:
        check_progress(resumed, fingerprint, out / PROGRESS_FILE,  # type: ignore[operator]
                       len(images), args.batch_size)
    _log(f"ecmt: evaluating {setup.bundle.name} on {setup.data.name} "
         f"(T = {args.T}, n = {snn.levels}, p = {snn.thresholds.percentile}, rule {snn.thresholds.rule}"
         f"{'' if ctx.world_size == 1 else f', {ctx.world_size} processes'})")
    if resumed is not None:
        _log(f"ecmt: resuming after {resumed.done} of {resumed.batches} batches")
    done = evaluate_dataset(setup.ann, snn, images, args.T, batch_size=args.batch_size, ctx=ctx,
                            fingerprint=fingerprint,
                            measure_batches=args.energy_batches, stop_rule=stop_rule, workers=args.workers,
                            start=resumed, path=None if out is None else out / PROGRESS_FILE,
                            info={"calibration": calibration}, progress=_progress(),
                            top5=_has_top5(setup), compact=stop_rule is not None, log=_progress_log())
    if not ctx.is_main:
        return 0
    tally, measurement = done.tally, done.measurement
    record = _record(args, setup, snn, tally, calibration)
    energy = None
    if measurement is not None and measurement.steps:
        energy = energy_report(measurement)
        record.update(energy_ratio=energy["energy_ratio"], energy_ratio_full=energy["energy_ratio_full"],
                      energy_images=energy["samples"],
                      firing_rates={k: energy["firing_rates"][k] for k in ("levels", "mean", "layers")})
    if stop_rule is not None:
        record["adaptive"] = _adaptive_record(tally, stop_rule, energy)
    record["seconds"] = round(time.perf_counter() - start, 1)
    _write_evaluation(args, record, energy)
    print(format_table([record], args.T, setup.bundle.name))
    print(f"{record['n_images']} images; {_within(record)}")
    return 0


def _has_top5(setup: Setup) -> bool:
    """Top-5 is reported for classifiers of more than 5 classes (below, it is trivially 100 %)."""
    return setup.bundle.num_classes > 5


def _is_lm_snn(path: Optional[str]) -> bool:
    """True when ``path`` is an SNN file of a causal LM (``ecmt convert --model smollm2``)."""
    if path is None:
        return False
    from .serialization import read_info

    return lm.is_lm_spec(read_info(path)["spec"])


def _saved_lm(args: argparse.Namespace, fixed: Sequence[str]) -> tuple[lm.LanguageModel, SpikingModel]:
    """The language model and SNN of ``--snn FILE``; the options in ``fixed`` are refused (the file fixes them)."""
    from .serialization import read

    _refuse(args, fixed, "the --snn file fixes its conversion; convert again to change it")
    saved = read(args.snn)
    return lm.saved_lm(saved, args.device, max_length=getattr(args, "max_tokens", None)), saved.snn.to(args.device)


def _lm_batch_size(args: argparse.Namespace) -> int:
    return args.batch_size if _given(args, ["batch_size"]) else LM_BATCH_SIZE


def _is_text_snn(path: Optional[str]) -> bool:
    """True when ``path`` is an SNN file of a sentence encoder (``ecmt convert --model minilm``)."""
    if path is None:
        return False
    from .serialization import read_info

    return "text" in read_info(path)["spec"]


def run_text_evaluate(args: argparse.Namespace) -> int:
    """``ecmt evaluate`` on a sentence encoder: cosine and rank agreement of SNN to ANN embeddings."""
    start = time.perf_counter()
    seed_everything(args.seed)
    _quiet_libraries(args)
    texts = _text_subset(packaged_texts("heldout") if args.texts is None else read_texts(args.texts),
                         args.limit, args.seed)
    calib_texts = None if args.calib_texts is None else read_texts(args.calib_texts)
    if args.tune and args.percentile is not None:
        raise UsageError("--tune chooses the percentiles itself; drop --percentile")
    snn = None
    if args.snn is not None:
        if args.levels is not None or args.percentile is not None or args.tune or args.rule:
            raise UsageError("--levels, --percentile, --tune and --rule are fixed by the --snn file; "
                             "convert again to change them")
        if calib_texts is not None:
            raise UsageError("--calib-texts: an SNN file is already calibrated")
        from .serialization import read

        saved = read(args.snn)
        model = saved_text_model(saved.bundle.spec, saved.ann, args.device)
        snn = saved.snn.to(args.device)
    else:
        model = load_text_model(args.model, args.device)
    _log(f"ecmt: evaluating {args.snn or args.model} on {args.texts or 'the packaged held-out sentences'} "
         f"(T = {args.T})")
    record = evaluate_text(model, texts, calib_texts, T=args.T, levels=args.levels or 8,
                           percentile=args.percentile or 99.0, batch_size=args.batch_size, device=args.device,
                           tune=args.tune, snn=snn, energy_texts=args.energy_texts,
                           rule=None if snn is not None else _rule(args), per_channel=args.per_channel,
                           search_log=_search_log(), tune_options=_tune_options(args))
    energy = record.pop("energy", None)
    record.update(snn_file=args.snn, limit=args.limit, seed=args.seed, seconds=round(time.perf_counter() - start, 1))
    try:
        written = [write_json(record, args.json)] if args.json else []
        if args.out:
            from . import plots  # matplotlib is imported only when plotting

            out, ext = Path(args.out), args.plot_format
            written += [write_json(record, out / "results.json"),
                        plots.plot_text_fidelity(record, out / f"fidelity.{ext}")]
            if energy is not None:
                written += [write_json(energy, out / "energy.json"), *_energy_plots(record, energy, out, ext)]
    except OSError as e:
        raise results_or_stdout(record, e) from None
    for path in written:
        _log(f"ecmt: wrote {path}")
    ratio = record.get("energy_ratio")
    print(f"{'T':>4} {'cosine':>9} {'min cos':>9} {'rank agr.':>9}" + (f" {'E ratio':>8}" if ratio else ""))
    for t in table_steps(args.T):
        k = str(t)
        print(f"{t:>4} {record['cosine'][k]:>9.5f} {record['cosine_min'][k]:>9.5f} {record['rank_agreement'][k]:>9.5f}"
              + (f" {ratio[k]:>8.3f}" if ratio else ""))
    setting = f"tuned for T = {record['tuned']['tuned_T']}" if record.get("tuned") else f"p = {record['percentile']}"
    print(f"{record['n_texts']} sentences; n = {record['levels']}, {setting}, rule {record['rule']}"
          + (f"; energy ratio (Eq. 30) on {record['energy_texts']} of them, each alone" if ratio else ""))
    return 0


def run_lm_evaluate(args: argparse.Namespace) -> int:
    """``ecmt evaluate`` on a causal LM: perplexity and next-token agreement of the SNN per T."""
    from tqdm import tqdm

    start = time.perf_counter()
    seed_everything(args.seed)
    _quiet_libraries(args)
    if args.texts is None:
        raise UsageError("--texts FILE is required for a language model (prose, e.g. /usr/share/common-licenses/GPL-3)")
    if args.tune and args.percentile is not None:
        raise UsageError("--tune chooses the percentiles itself; drop --percentile")
    given = None if args.calib_texts is None else read_texts(args.calib_texts)
    # an SNN file was calibrated when it was converted: none of the sentences is set apart
    calib, texts = lm.split_texts(lm.prose_sentences(args.texts), [] if args.snn else given, args.limit)
    snn = None
    if args.snn is not None:
        model, snn = _saved_lm(args, ["levels", "percentile", "rule", "per_channel", "calib_texts", "tune"])
        calibrated = f"calibrated when {args.snn} was converted"
    else:
        model = lm.load_lm(args.model, args.device, max_length=args.max_tokens)
        calibrated = f"{'tuned for T = %d' % args.tune if args.tune else 'calibrated'} on {len(calib)} others"
    _log(f"ecmt: evaluating {args.snn or args.model} on {len(texts)} sentences of {args.texts}, {calibrated} "
         f"(T = {args.T})")
    with tqdm(total=1, desc="batches", disable=_progress(), file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        levels, options = _lm_search(args)
        record = lm.evaluate_lm(model, texts, calib, T=args.T, levels=levels,
                                percentile=args.percentile or 99.0, batch_size=_lm_batch_size(args), snn=snn,
                                energy_texts=2 if args.energy_texts is None else args.energy_texts,
                                rule=None if snn is not None else _rule(args), per_channel=args.per_channel,
                                tune=None if snn is not None else args.tune, progress=progress,
                                search_log=_search_log(), tune_options=options)
    energy = record.pop("energy", None)
    record.update(texts=args.texts, snn_file=args.snn, limit=args.limit, seconds=round(time.perf_counter() - start, 1))
    written = [write_json(record, args.json)] if args.json else []
    if args.out:
        from . import plots

        out, ext = Path(args.out), args.plot_format
        written += [write_json(record, out / "results.json"), plots.plot_perplexity(record, out / f"perplexity.{ext}")]
        if energy is not None:
            written += [write_json(energy, out / "energy.json"), *_energy_plots(record, energy, out, ext)]
    for path in written:
        _log(f"ecmt: wrote {path}")
    print(lm.summary(record, table_steps(args.T)))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    """``ecmt generate``: the SNN's greedy continuation, streamed, then the ANN's and the agreement."""
    _quiet_libraries(args)
    if args.snn is not None:
        model, snn = _saved_lm(args, ["levels", "percentile", "rule", "per_channel", "calib_texts"])
    else:
        model = lm.load_lm(args.model, args.device)
        calib = packaged_texts("calibration")[:16] if args.calib_texts is None else read_texts(args.calib_texts)
        snn = lm.convert_lm(model, calib, args.levels, args.percentile, rule=_rule(args), per_channel=args.per_channel)
    print(f"SNN (T = {args.T}): {args.prompt}", end="", flush=True)
    g = lm.generate(model, snn, args.prompt, args.T, args.max_new_tokens,
                    on_text=lambda piece: print(piece, end="", flush=True), cache=not args.no_cache)
    print(f"\nANN:          {args.prompt}{g.ann_text}")
    caches = "both with a key-value cache" if g.cached else "both without a key-value cache"
    print(f"{g.common_prefix} of {len(g.ann_tokens)} leading tokens identical ({g.agreeing} equal by position); "
          f"cost per token {g.cost_ratio:.1f}x the ANN's ({g.snn_seconds:.3f} s against {g.ann_seconds:.3f} s, {caches})")
    return 0


def _text_subset(texts: list[str], limit: Optional[int], seed: int) -> list[str]:
    """All ``texts``, or a random subset of ``limit`` of them drawn with ``seed`` (as for images)."""
    if limit is None or limit >= len(texts):
        return texts
    g = torch.Generator().manual_seed(seed)
    return [texts[i] for i in torch.randperm(len(texts), generator=g)[:limit].tolist()]


def run_text_convert(args: argparse.Namespace) -> int:
    """``ecmt convert`` on a sentence encoder: calibrate (or tune) on sentences and save the SNN."""
    from .serialization import save

    _refuse(args, IMAGE_ONLY, "these options are for image classifiers; a sentence encoder is calibrated "
                              "on --calib-texts")
    if args.tune and args.percentile is not None:
        raise UsageError("--tune chooses the percentiles itself; drop --percentile")
    seed_everything(args.seed)
    _quiet_libraries(args)
    calib_texts = None if args.calib_texts is None else read_texts(args.calib_texts)
    tm = load_text_model(args.model, args.device)
    snn = convert_text(tm, calib_texts, args.levels or 8, args.percentile or 99.0, tune=args.tune,
                       batch_size=args.batch_size, rule=_rule(args), per_channel=args.per_channel,
                       search_log=_search_log(), tune_options=_tune_options(args))
    path = save(snn, args.output, ann=tm.model)
    setting = f"tuned for T = {args.tune}" if args.tune else f"p = {snn.thresholds.percentile}"
    _log(f"ecmt: wrote {path}: {args.model}, {len(snn.thresholds)} MT neuron sites, n = {snn.levels}, {setting}, "
         f"rule {snn.thresholds.rule}, calibrated on {args.calib_texts or 'the packaged calibration sentences'}")
    return 0


def run_lm_convert(args: argparse.Namespace) -> int:
    """``ecmt convert`` on a causal LM: calibrate on texts and save the SNN with its ANN."""
    from .serialization import save

    _refuse(args, IMAGE_ONLY, "these options are not available for a language model; it is "
                              "calibrated on --calib-texts")
    if args.tune and args.percentile is not None:
        raise UsageError("--tune chooses the percentiles itself; drop --percentile")
    seed_everything(args.seed)
    _quiet_libraries(args)
    calib = packaged_texts("calibration")[:16] if args.calib_texts is None else read_texts(args.calib_texts)
    model = lm.load_lm(args.model, args.device)
    levels, options = _lm_search(args)
    snn = lm.convert_lm(model, calib, levels, args.percentile or 99.0, _lm_batch_size(args),
                        rule=_rule(args), per_channel=args.per_channel, tune=args.tune, search_log=_search_log(),
                        tune_options=options)
    path = save(snn, args.output, ann=model.model)
    setting = f"tuned for T = {args.tune}" if args.tune else f"p = {snn.thresholds.percentile}"
    _log(f"ecmt: wrote {path}: {args.model}, {len(snn.thresholds)} MT neuron sites, n = {snn.levels}, "
         f"{setting}, rule {snn.thresholds.rule}"
         f"{', per channel' if args.per_channel else ''}, calibrated on "
         f"{args.calib_texts or 'the first 16 packaged calibration sentences'}")
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    """``ecmt analyze``: error shares by site type and block at step T, local errors, dominant channels."""
    from .analysis import analyze

    start = time.perf_counter()
    _check_model_name(args.model)
    _resolve_tune(args)
    seed_everything(args.seed)
    if args.plot is not None and Path(args.plot).suffix.lstrip(".") not in PLOT_FORMATS:
        raise UsageError(f"--plot {args.plot}: the file must end in .{', .'.join(PLOT_FORMATS)}")
    if args.tune and args.percentile is not None:
        raise UsageError("--tune chooses the percentiles itself; drop --percentile")
    if args.thresholds is not None:
        _refuse(args, ("percentile", "tune", "per_channel"), "--thresholds gives the thresholds; drop these options")
    if lm.is_language_model(args.model):
        _refuse(args, IMAGE_ONLY, "these options are not available for a language model")
        loaded = _lm_for_analysis(args)
    elif args.texts is not None or is_text_model(args.model):
        _refuse(args, [*IMAGE_ONLY, "max_tokens"], "these options are for image classifiers or language models, "
                                                   "not for a sentence encoder")
        loaded = _text_for_analysis(args)
    else:
        _refuse(args, ["calib_texts", "max_tokens"], "these options are for text models")
        loaded = _images_for_analysis(args)
    snn, error, info = loaded
    _log(f"ecmt: analysing {args.model} at T = {args.T} on {info['n_inputs']} held-out {info['inputs']} "
         f"(n = {snn.levels}, p = {snn.thresholds.percentile}, rule {snn.thresholds.rule})")
    result = analyze(snn, error, T=args.T, views=("alone", "removed") if args.exact else ("alone",),
                     channels=args.channels, progress=_progress(), log=_progress_log())
    record = {"model": args.model, **info, **result, "thresholds_file": args.thresholds, "seed": args.seed,
              "seconds": round(time.perf_counter() - start, 1), "ecmt_version": __version__}
    try:
        written = [write_json(record, args.json)] if args.json else []
        if args.plot:
            from . import plots  # matplotlib is imported only when plotting

            written.append(plots.plot_error_depth(record, args.plot))
    except OSError as e:
        raise results_or_stdout(record, e) from None
    for path in written:
        _log(f"ecmt: wrote {path}")
    print(_analysis_summary(record))
    return 0


def _analysis_summary(record: dict[str, Any]) -> str:
    """The dominant site types, blocks and channels of an analysis, in a few lines."""
    view = "share" if "alone" in record["views"] else "removed"
    lines = [f"{record['metric']} at T = {record['T']}: {record['error']:.6g} with every site spiking "
             f"({record['all_exact_error']:.2g} with every site exact); {view} of the error:"]
    for name, e in list(record["site_types"].items())[:5]:
        lines.append(f"  {100 * e[view]:6.1f} %  {name} ({e['sites']} sites, local error {e['local_error']:.4f})")
    blocks = " ".join(f"{e['index']}:{100 * e[view]:.0f}%" for e in record["layers"])
    outside = record.get("outside")
    lines.append(f"  by block: {blocks}" + (f", outside blocks {100 * outside[view]:.0f}%" if outside else ""))
    worst = max(record["sites"], key=lambda n: record["sites"][n]["local_error"])
    lines.append(f"  largest local error: {worst} ({record['sites'][worst]['local_error']:.4f})")
    for site in record["worst_sites"][:3]:
        top = ", ".join(f"{c['channel']} ({100 * c['share']:.0f}%, {c['rms_over_median']:.1f}x median)"
                        for c in site.get("top", [])[:3])
        lines.append(f"  worst Linear input {site['site']}: local error {site['local_error']:.4f}"
                     + (f"; channels {top}" if top else ""))
    return "\n".join(lines)


def _thresholds_file(args: argparse.Namespace, model: nn.Module) -> SpikingModel:
    """The SNN of ``model`` with the thresholds of ``--thresholds FILE``."""
    from .errors import InvalidFileError
    from .thresholds import Thresholds

    try:
        th = Thresholds.from_json(Path(args.thresholds).read_text())
    except OSError as e:
        raise InvalidFileError(f"cannot read --thresholds {args.thresholds}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidFileError(f"--thresholds {args.thresholds} is not a thresholds file "
                               f"(as ecmt.Thresholds.to_json() writes): {type(e).__name__}: {e}") from None
    return convert(model, th, levels=args.levels or 8, rule=args.rule)


def _images_for_analysis(args: argparse.Namespace) -> tuple[SpikingModel, Any, dict[str, Any]]:
    """An image classifier's SNN, its error on held-out images (never its calibration images), and what they are."""
    from torch.utils.data import Subset

    from .analysis import output_error_of

    bundle = load_model(args.model, args.checkpoint)
    setup = _setup(args, bundle, bundle.model)
    if args.thresholds is not None:
        snn, calibration = _thresholds_file(args, bundle.model), None
    else:
        snn, calibration = _calibrated_snn(setup, args)
    test = setup.data.test
    candidates = list(range(len(test)))
    if setup.data.calibration is test:  # an image folder: its calibration images are left out
        calib = _calibration_images(setup, args)
        used = set(calib.indices) if isinstance(calib, Subset) else set(candidates)
        candidates = [i for i in candidates if i not in used]
    if not candidates:
        raise UsageError(f"no images of {setup.data.name} are left after the calibration images: "
                         "lower --calib-batches or --batch-size")
    g = torch.Generator().manual_seed(args.seed + 1)
    chosen = [candidates[i] for i in torch.randperm(len(candidates), generator=g)[:args.limit or ANALYZE_LIMIT]]
    images = Subset(test, chosen)
    batches = list(images_only(loader(images, args.batch_size, args.workers)))
    info = {"task": "image", "metric": "relative squared error of the output", "inputs": "images",
            "n_inputs": len(images), "dataset": setup.data.name, "calibration": calibration}
    return snn, output_error_of(bundle.model.to(setup.device), batches, args.T), info


def _text_for_analysis(args: argparse.Namespace) -> tuple[SpikingModel, Any, dict[str, Any]]:
    """A sentence encoder's SNN, its embedding error on held-out sentences (none calibrated on), and what they are."""
    from .text import embedding_error

    _quiet_libraries(args)
    calib = packaged_texts("calibration") if args.calib_texts is None else read_texts(args.calib_texts)
    seen = set(calib)
    texts = [t for t in (packaged_texts("heldout") if args.texts is None else read_texts(args.texts)) if t not in seen]
    if not texts:
        raise UsageError("every sentence to analyse is also a calibration sentence: give other --texts")
    texts = sorted(_text_subset(texts, args.limit or ANALYZE_LIMIT, args.seed), key=len)
    tm = load_text_model(args.model, args.device)
    if args.thresholds is not None:
        snn = _thresholds_file(args, tm.model)
    else:
        snn = convert_text(tm, calib, args.levels or 8, args.percentile or 99.0, tune=args.tune,
                           batch_size=args.batch_size, rule=_rule(args), per_channel=args.per_channel,
                           search_log=_search_log(), tune_options=_tune_options(args))
    info = {"task": "text", "metric": "1 - mean cosine of the sentence embeddings", "inputs": "sentences",
            "n_inputs": len(texts), "texts": args.texts, "calibration": {"texts": args.calib_texts, "n": len(calib)}}
    return snn, embedding_error(tm, texts, args.T, args.batch_size), info


def _lm_for_analysis(args: argparse.Namespace) -> tuple[SpikingModel, Any, dict[str, Any]]:
    """A causal LM's SNN, its next-token KL on held-out sentences (none calibrated on), and what they are."""
    _quiet_libraries(args)
    if args.texts is None:
        raise UsageError("--texts FILE is required for a language model (prose, e.g. /usr/share/common-licenses/GPL-3)")
    calib, texts = lm.split_texts(lm.prose_sentences(args.texts),
                                  None if args.calib_texts is None else read_texts(args.calib_texts),
                                  args.limit or ANALYZE_LM_LIMIT)
    model = lm.load_lm(args.model, args.device, max_length=args.max_tokens)
    if args.thresholds is not None:
        snn = _thresholds_file(args, model.model)
    else:
        levels, options = _lm_search(args)
        snn = lm.convert_lm(model, calib, levels, args.percentile or 99.0, _lm_batch_size(args),
                            _rule(args), args.per_channel, tune=args.tune, search_log=_search_log(),
                            tune_options=options)
    info = {"task": "language model", "metric": "mean next-token KL(ANN || SNN)", "inputs": "sentences",
            "n_inputs": len(texts), "texts": args.texts, "max_tokens": args.max_tokens,
            "calibration": {"texts": args.calib_texts, "n": len(calib)}}
    return snn, lm.next_token_kl(model, texts, args.T, _lm_batch_size(args)), info


def _stop_rule(args: argparse.Namespace) -> Optional[StopRule]:
    """The stopping rule of ``--adaptive`` (None without it)."""
    given = {k: v for k, v in (("patience", args.patience), ("margin", args.margin)) if v is not None}
    if not args.adaptive:
        if given:
            raise UsageError(f"--{next(iter(given))} sets the stopping rule of --adaptive; add --adaptive")
        return None
    return StopRule(**given)


def _adaptive_record(tally: Tally, rule: StopRule, energy: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, mean steps and energy with adaptive time steps; energy exact per stop step."""
    stops = tally.adaptive_stops or ()
    record = {"top1": tally.adaptive_top1, "mean_steps": tally.mean_steps, "patience": rule.patience,
              "margin": rule.margin, "stops": {str(t): c for t, c in enumerate(stops, start=1)}}
    if energy is not None:
        for key in ("energy_ratio", "energy_ratio_full"):
            record[key] = mean_energy(stops, {int(t): v for t, v in energy[key].items()})
    return record


def _interrupted_run(args: argparse.Namespace, out: Optional[Path]) -> Optional[Progress]:
    """The progress that ``--resume`` continues; None for a fresh run.

    Raises:
        UsageError: ``--resume`` without ``--out``, or a fresh run in a directory that holds an
            unfinished evaluation (its work is not overwritten).
        ResumeError: ``--resume`` and no readable progress file in ``--out``.
    """
    if args.resume:
        if out is None:
            raise UsageError("--resume needs --out DIR, the output directory of the interrupted run")
        return load_progress(out / PROGRESS_FILE)
    if out is not None and (out / PROGRESS_FILE).is_file():
        old = load_progress(out / PROGRESS_FILE)
        if not old.finished:
            raise UsageError(f"{out} holds an unfinished evaluation ({old.done} of {old.batches} batches): "
                             "add --resume to continue it, or choose another --out")
    return None


def _fingerprint(args: argparse.Namespace, setup: Setup, snn: SpikingModel, images: int) -> dict[str, Any]:
    """Everything the counts of an evaluation depend on: a run resumes only a run with the same."""
    stop_rule = _stop_rule(args)
    return {"model": args.model, "snn_file": args.snn, "checkpoint": args.checkpoint, "dataset": setup.data.name,
            "class_map": getattr(args, "class_map", None),
            "images": images, "limit": args.limit, "seed": args.seed, "batch_size": args.batch_size, "T": args.T,
            "levels": args.levels, "percentile": args.percentile, "tune": args.tune, "rule": args.rule,
            "calib_batches": args.calib_batches, "energy_batches": args.energy_batches,
            "adaptive": None if stop_rule is None else asdict(stop_rule), "device": setup.device.type,
            "thresholds": hashlib.sha256(snn.thresholds.to_json().encode()).hexdigest()[:16],
            "ecmt_version": __version__}


def _save_atomically(snn: SpikingModel, ann: nn.Module, path: Path) -> None:
    """Save ``snn`` (with ``ann``) so that a killed process leaves no half-written file."""
    from .serialization import save

    tmp = save(snn, path.with_name(f".{path.name}.{os.getpid()}.tmp"), ann=ann)
    os.replace(tmp, path)


def _within(record: dict[str, Any]) -> str:
    """When the SNN reaches the ANN's accuracy, in words."""
    if record["ann_top1"] is None:
        return "no ANN to compare with"
    t = record["steps_within_1pt"]
    return f"within 1 point of the ANN from T = {t}" if t else f"not within 1 point of the ANN by T = {record['T']}"


def _record(args: argparse.Namespace, setup: Setup, snn: SpikingModel, tally: Tally,
            calibration: Optional[dict[str, Any]]) -> dict[str, Any]:
    snn_top1 = {str(t): acc for t, acc in tally.snn_top1().items()}
    top5 = tally.snn_top5()
    return {
        "model": setup.bundle.name,
        "dataset": setup.data.name,
        "ann_top1": tally.ann_top1,
        "snn_top1": snn_top1,
        "ann_top5": tally.ann_top5,
        "snn_top5": None if top5 is None else {str(t): acc for t, acc in top5.items()},
        "T": args.T,
        "levels": snn.levels,
        "percentile": snn.thresholds.percentile,
        "rule": snn.thresholds.rule.value,
        "per_channel": bool(snn.thresholds.per_channel()),
        "n_images": tally.n,
        "skipped": tally.skipped,
        "steps_within_1pt": steps_within(snn_top1, tally.ann_top1),
        "seed": args.seed,
        "limit": args.limit,
        "calibration": calibration,
        "snn_file": args.snn,
        "device": str(setup.device),
        "ecmt_version": __version__,
    }


def _write_record(args: argparse.Namespace, record: dict[str, Any], stem: str, rows: list[dict[str, Any]],
                  plots: Callable[[Path, str], list[Path]]) -> None:
    """Write ``--json FILE`` and, in ``--out DIR``, ``<stem>.json``, ``<stem>.csv`` and the ``plots(out, ext)``;
    if a write fails, print ``record`` to stdout and raise OutputError."""
    try:
        written = [write_json(record, args.json)] if args.json else []
        if args.out:
            out = Path(args.out)
            written += [write_json(record, out / f"{stem}.json"), write_csv(rows, out / f"{stem}.csv"),
                        *plots(out, args.plot_format)]
    except OSError as e:
        raise results_or_stdout(record, e) from None
    for path in written:
        _log(f"ecmt: wrote {path}")


def _setting(record: dict[str, Any]) -> str:
    """The threshold setting of a record, in words, for plot titles."""
    tuned = (record.get("calibration") or {}).get("tuned") or record.get("tuned")
    setting = f"tuned for T = {tuned['tuned_T']}" if tuned else f"p = {record.get('percentile')}"
    return f"n = {record.get('levels')}, {setting}, rule {record.get('rule')}"


def _energy_plots(record: dict[str, Any], energy: dict[str, Any], out: Path, ext: str) -> list[Path]:
    """The energy figures of an evaluation: ratio against T, per module, firing rates."""
    from . import plots  # matplotlib is imported only when plotting

    title = f"{record.get('model')}, T = {record.get('T')}, {_setting(record)}"
    return [plots.plot_energy_ratio(energy, out / f"energy_ratio.{ext}"),
            plots.plot_energy_breakdown(energy, out / f"energy_breakdown.{ext}", title=str(record.get("model"))),
            plots.plot_firing_rates(energy, out / f"firing_rates.{ext}", title=title)]


def _write_evaluation(args: argparse.Namespace, record: dict[str, Any], energy: Optional[dict[str, Any]]) -> None:
    from . import plots  # matplotlib is imported only when plotting

    def figures(out: Path, ext: str) -> list[Path]:
        labelled = {**record, "label": f"SNN, {_setting(record)}"}
        written = [plots.plot_accuracy(labelled, out / f"accuracy.{ext}")]
        if energy is None:
            return written
        return [*written, plots.plot_accuracy_energy(labelled, out / f"accuracy_energy.{ext}",
                                                     title=f"{record['model']} on {record['dataset']}"),
                write_json(energy, out / "energy.json"), *_energy_plots(record, energy, out, ext)]

    _write_record(args, record, "results", per_step_rows(record), figures)


def run_convert(args: argparse.Namespace) -> int:
    """``ecmt convert``."""
    from .serialization import save

    _check_model_name(args.model)
    _resolve_tune(args)
    if lm.is_language_model(args.model):
        return run_lm_convert(args)
    if is_text_model(args.model) or args.calib_texts is not None:
        return run_text_convert(args)
    seed_everything(args.seed)
    bundle = load_model(args.model, args.checkpoint)
    setup = _setup(args, bundle, bundle.model)
    snn, calibration = _calibrated_snn(setup, args)
    path = save(snn, args.output, ann=bundle.model)
    _log(f"ecmt: wrote {path}: {bundle.name}, {len(snn.thresholds)} MT neuron sites, n = {snn.levels}, "
          f"p = {snn.thresholds.percentile}, rule {snn.thresholds.rule}, calibrated on {calibration['images']} images "
          f"({calibration['source']})")
    return 0


def run_ops(args: argparse.Namespace) -> int:
    """``ecmt ops``: MACs per module of one block and of the whole model, per sample."""
    _check_model_name(args.model)
    if is_text_model(args.model):
        if args.img_size is not None:
            raise UsageError("--img-size is for image models; give a sentence encoder's length with --tokens")
        _quiet_libraries(args)
        report = text_ops_report(args.model, args.tokens)
    else:
        if args.tokens is not None:
            raise UsageError("--tokens is for sentence encoders (--model minilm or a model folder)")
        report = _reference_ops(args.model, args.img_size) if args.model in REFERENCE_MODELS else \
            ops_report(args.model, args.img_size)
    dims = report["dims"]
    print(f"{report['model']}: N = {dims['tokens']}, C = {dims['channels']}, N_h = {dims['heads']}, "
          f"C_h = {dims['hidden']}, {dims['blocks']} blocks, input {tuple(report['input_size'])}")
    name, block = next(iter(report["blocks"].items()))
    rows = {f"{name}.{module}": macs for module, macs in block.items()}
    rows.update(report["outside"])
    width = max(23, *map(len, rows))  # long module paths (BERT) widen the column
    for module, macs in rows.items():
        print(f"  {module:<{width}} {macs / 1e6:12.2f} M")
    print(f"  {'total':<{width}} {report['total_macs'] / 1e6:12.2f} M")
    if args.json:
        try:
            _log(f"ecmt: wrote {write_json(report, args.json)}")
        except OSError as e:
            raise results_or_stdout(report, e) from None
    return 0


def _reference_ops(name: str, img_size: Optional[int]) -> dict[str, Any]:
    """``ecmt ops`` for a reference model: its own architecture, at its own input size."""
    if img_size is not None:
        raise UsageError(f"--img-size: {name} takes its training input size only")
    bundle = load_model(name)
    size = tuple(bundle.data_config["input_size"])
    return {"model": name, "input_size": list(size),
            **theoretical_ops(bundle.model, torch.zeros(1, *size)).to_dict()}


def run_sweep(args: argparse.Namespace) -> int:
    """``ecmt sweep``: every (levels, percentile) setting from one calibration's histograms."""
    start = time.perf_counter()
    seed_everything(args.seed)
    _check_model_name(args.model)
    if is_text_model(args.model):
        raise UsageError("ecmt sweep is for image classifiers; evaluate a sentence encoder at each setting "
                         "with ecmt evaluate --percentile P --levels N")
    bundle = load_model(args.model, args.checkpoint)
    setup = _setup(args, bundle, bundle.model)
    stats, calibration = _calibrate(setup, args)
    runs, ann_top1, n_images = [], None, 0
    for levels in args.levels:
        for percentile in args.percentiles:
            snn = _convert(setup, stats, levels, percentile, _rule(args))
            ann = setup.ann if not runs else None  # the ANN is evaluated once
            label = f"n={levels} p={percentile:g}"
            tally, measurement = evaluate(ann, snn, _batches(setup, args), args.T, device=setup.device,
                                          progress=_progress(), desc=label, measure_batches=args.energy_batches,
                                          log=_progress_log())
            ann_top1 = tally.ann_top1 if ann is not None else ann_top1
            n_images = tally.n
            run = {"levels": levels, "percentile": percentile, "label": label,
                   "snn_top1": {str(t): a for t, a in tally.snn_top1().items()}}
            if measurement is not None and measurement.steps:
                energy = energy_report(measurement)
                run.update(energy_ratio=energy["energy_ratio"], energy_ratio_full=energy["energy_ratio_full"])
            runs.append(run)
            _log(f"ecmt: n = {levels}, p = {percentile:g}: SNN top-1 at T = {args.T}: "
                 f"{100 * tally.snn_top1()[args.T]:.2f}%")
    for run in runs:
        run["ann_top1"] = ann_top1
        run["steps_within_1pt"] = steps_within(run["snn_top1"], ann_top1)
    record = {"model": bundle.name, "dataset": setup.data.name, "ann_top1": ann_top1, "T": args.T,
              "rule": _rule(args).value,
              "n_images": n_images, "seed": args.seed, "limit": args.limit, "calibration": calibration,
              "runs": runs, "seconds": round(time.perf_counter() - start, 1), "ecmt_version": __version__}
    from . import plots  # matplotlib is imported only when plotting

    title = f"{bundle.name} on {setup.data.name}"

    def figures(out: Path, ext: str) -> list[Path]:
        written = [plots.plot_sweep(record, out / f"sweep.{ext}", title=title)]
        if all(run.get("energy_ratio") for run in runs):
            written.append(plots.plot_accuracy_energy(record, out / f"accuracy_energy.{ext}", title=title))
        return written

    _write_record(args, record, "sweep", sweep_rows(record), figures)
    print(format_table(runs, args.T, bundle.name))
    for run in runs:
        print(f"{run['label']}: {_within({**run, 'T': args.T})}")
    return 0


# --------------------------------------------------------------------------- entry point


def _memory(text: str) -> int:
    try:
        return simulation.parse_memory(text)
    except InvalidInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _warn_long(args: argparse.Namespace) -> None:
    """Warn when T x batch size makes every batch so long that the run may take hours."""
    T, batch = getattr(args, "T", None), getattr(args, "batch_size", None)
    if T is not None and batch is not None and T * batch > LONG_RUN:
        _log(f"ecmt: warning: --T {T} x --batch-size {batch} = {T * batch:,} image-steps per batch; "
             "this may run for hours (the paper's results need T <= 16)")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``ecmt`` command line; returns the exit status.

    Example:
        >>> main(["evaluate", "--model", "fmnist-vit", "--T", "8", "--limit", "1000"])   # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: CUDA is not available on this machine; use --device cpu")
        if getattr(args, "threads", None) is not None:
            torch.set_num_threads(args.threads)
        simulation.set_memory(getattr(args, "memory", None))
        handler: Callable[[argparse.Namespace], int] = args.func
        if distributed.launched() and handler is not run_evaluate:
            raise UsageError(f"'ecmt {args.command}' runs in one process; under torchrun use 'ecmt evaluate'")
        _warn_long(args)
        with claim(getattr(args, "json", None), getattr(args, "out", None), getattr(args, "output", None),
                   lock=os.environ.get("RANK", "0") == "0"):
            return handler(args)
    except (UsageError, ConversionError) as e:
        if debug:
            raise
        print(f"ecmt: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ecmt: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
