"""The Python API: a detector by name or file, boxes for category names or the phrases of a
free-text prompt, COCO AP on a dataset.

    from glip_transfer import load
    detector = load("glip-t")                      # or a .pth / .safetensors path
    detections = detector.predict("photo.jpg", classes=["person", "dog"])

:meth:`Detector.predict` returns, per image, the objects ``glip predict --json`` writes:
``{"box": [x1, y1, x2, y2], "score": float, "label": str}``; ``glip predict`` runs this code
(:meth:`Detector.detect`). :meth:`Detector.evaluate` is ``glip zeroshot eval`` without the run
folder (:mod:`glip_transfer.zeroshot`).

Cheap checks come first: :func:`load` loads the tokenizer and reads an adapter's header before
the weights; a prompt is tokenized and checked before any image runs. Each prompt's text
features are computed once and kept (keyed by the prompt).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .checkpoint import config_from_metadata, load_model, read_safetensors_metadata
from .config import MAX_QUERY_LEN, InputConfig, check_inference_settings, variant_config
from .data import DataError, ImageFiles, default_workers, make_loader
from .hub import weights_spec
from .inference import EncodedPrompt, detect_batch, to_original_size
from .model.glip import GLIP
from .prompts import PromptError, build_detection_prompt, phrase_prompt
from .runtime import progress_bar, resolve_device
from .tokenizer import DEFAULT_TOKENIZER, default_tokenizer, load_tokenizer

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]
"""An image file, a PIL image already in memory (used as it is: no EXIF rotation), or an array
of uint8 pixels ``[H, W, 3]`` (RGB), ``[H, W, 4]`` (RGBA) or ``[H, W]`` (gray)."""

DEFAULT_THRESHOLD = 0.5
"""Score a detection needs to be returned (``glip predict --threshold``)."""


def as_image(image: ImageInput, index: int = 0) -> str | os.PathLike | Image.Image:
    """A file or PIL image as it is; an array as a PIL image (a :class:`DataError` for an array
    that is not 8-bit gray or RGB(A) pixels)."""
    if not isinstance(image, np.ndarray):
        return image
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        raise DataError(
            f"image {index}: an array of shape {tuple(image.shape)} and dtype {image.dtype}; expected uint8 pixels "
            "[H, W, 3] (RGB), [H, W, 4] (RGBA) or [H, W] (gray)"
        )
    return Image.fromarray(np.ascontiguousarray(image))


# --------------------------------------------------------------------------- prompts


@dataclass
class LabelledPrompt:
    """A prompt ready to run: its encoded chunks (their text features computed on first use and
    kept), the display name of each label (``names[label - 1]``) and notes for the user
    (automatic chunking of a long list of categories)."""

    encoded: EncodedPrompt
    names: list[str]
    notices: list[str]

    @property
    def captions(self) -> list[str]:
        return self.encoded.captions


def class_names(classes: str | Sequence[str]) -> list[str]:
    """Category names from ``"person, dog"`` (comma separated) or ``["person", "dog"]``, stripped,
    empty ones left out; :class:`PromptError` when none is left."""
    items = classes.split(",") if isinstance(classes, str) else list(classes)
    names = [str(name).strip() for name in items if str(name).strip()]
    if not names:
        raise PromptError(f'classes {classes!r} names no category: give names separated by commas, e.g. "person,dog"')
    return names


def build_prompt(
    tokenizer,
    *,
    classes: str | Sequence[str] | None = None,
    prompt: str | None = None,
    phrases: Sequence[str] | None = None,
    max_len: int = MAX_QUERY_LEN,
) -> LabelledPrompt:
    """The prompt of category names (the caption built as the official detection evaluation
    builds it, split into chunks when longer than ``max_len`` tokens) or of a free-text
    ``prompt`` whose ``phrases`` are grounded (default: the prompt split at periods). Every
    problem is a one-line :class:`PromptError`; nothing is run."""
    if (classes is None) == (prompt is None):
        raise PromptError("give exactly one of classes (category names) or prompt (free text)")
    if phrases and prompt is None:
        raise PromptError("phrases go with a free-text prompt, not with classes")
    if classes is not None:
        names = class_names(classes)
        detection_prompt = build_detection_prompt(tokenizer, list(enumerate(names, start=1)), max_len=max_len)
        encoded = EncodedPrompt.from_chunks(tokenizer, detection_prompt.chunks, max_len)
        return LabelledPrompt(encoded, [names[cid - 1] for cid in encoded.label_ids], list(detection_prompt.notices))
    chunk = phrase_prompt(tokenizer, prompt, list(phrases) if phrases else None, max_len)
    encoded = EncodedPrompt.from_chunks(tokenizer, [chunk], max_len)
    return LabelledPrompt(encoded, encoded.names, [])


# --------------------------------------------------------------------------- loading


def weights_tokenizer(weights: str | os.PathLike | None) -> str:
    """The tokenizer a weights file's own config names (a ``.safetensors`` this package wrote
    records its config; only the header is read), else ``bert-base-uncased`` (every official
    checkpoint)."""
    path = Path(os.fspath(weights)) if weights is not None else None
    spec = weights_spec(os.fspath(weights)) if path is not None and not path.exists() else None
    if spec is not None:  # a weights name: its variant's tokenizer (glip-nano: the installed MiniLM package)
        return variant_config(spec.variant).language.tokenizer
    if path is not None and path.suffix == ".safetensors" and path.is_file():
        cfg = config_from_metadata(read_safetensors_metadata(path))
        if cfg is not None:
            return cfg.language.tokenizer
    return DEFAULT_TOKENIZER


def resolve_tokenizer(tokenizer: Any, weights: str | os.PathLike | None, variant: str | None = None):
    """A loaded tokenizer: ``tokenizer`` itself when it is one, else the one it names (a folder
    with ``vocab.txt`` or a hub id), else ``$GLIP_TOKENIZER``, else the weights' own
    (:func:`weights_tokenizer`; without weights, the ``variant``'s). A one-line
    :class:`PromptError` when it cannot be loaded."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    given = os.fspath(tokenizer) if tokenizer is not None else None
    own = variant_config(variant).language.tokenizer if weights is None and variant else weights_tokenizer(weights)
    return load_tokenizer(default_tokenizer(given, own))


def check_weights(weights: str | os.PathLike | None) -> None:
    """The cheap part of resolving ``--weights``: an unknown name or a missing file fails now,
    before anything is downloaded or loaded."""
    from .checkpoint import CheckpointError
    from .hub import check_weights_name

    if check_weights_name(weights) is None and not Path(os.fspath(weights)).exists():
        raise CheckpointError(
            f"{os.fspath(weights)}: file not found (pass --weights PATH to an official GLIP .pth or a .safetensors)"
        )


def check_adapter(adapter: str | os.PathLike, captions: list[str] | None = None) -> tuple:
    """The cheap checks of an adapter (a ``glip finetune`` artifact or run folder): its header is
    read (no tensor), and with ``captions`` it must fit the prompt (a prompt offset fits only the
    caption it was trained for). Returns the header, ``(metadata, file, kind)``."""
    from .training.artifacts import check_adapter_caption, read_artifact_header

    header = read_artifact_header(adapter)
    if captions is not None:
        check_adapter_caption(*header, captions)
    return header


def load(
    weights: str | os.PathLike = "glip-t",
    device: str = "auto",
    tokenizer: Any = None,
    adapter: str | os.PathLike | None = None,
    variant: str | None = None,
    *,
    amp: bool = False,
) -> "Detector":
    """A :class:`Detector`: ``weights`` by name (``glip-t``, ``glip-l``...: ``glip weights list``;
    fetched into the Hugging Face cache on first use) or a file (official ``.pth`` or
    ``.safetensors``); ``device`` ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; ``tokenizer`` a
    folder with ``vocab.txt``, a hub id or a loaded tokenizer (default: ``$GLIP_TOKENIZER``, else
    bert-base-uncased); ``adapter`` a ``glip finetune`` artifact or run folder; ``variant``
    forces the model variant (detected from the weights otherwise); ``amp``: CUDA mixed precision.

    The device, the weights name, the tokenizer and the adapter are checked before the weights
    are read."""
    from .training.artifacts import apply_adapter

    dev = resolve_device(device)
    check_weights(weights)
    tok = resolve_tokenizer(tokenizer, weights)
    header = check_adapter(adapter) if adapter is not None else None
    if isinstance(tokenizer, (str, os.PathLike)):
        name = os.fspath(tokenizer)
    else:  # a loaded tokenizer (or the default one): the model's config records where it came from
        name = getattr(tok, "name_or_path", None) or None
    model, _ = load_model(weights, variant=variant, tokenizer=name)
    if adapter is not None:
        model = apply_adapter(model, adapter, weights=weights)
    return Detector(model, tok, dev, weights=weights, adapter=header, amp=amp)


# --------------------------------------------------------------------------- the detector


class Detector:
    """A GLIP model ready to detect: the model on its device, its tokenizer, the prompts seen so
    far (text features computed once per prompt) and the adapter it carries, if any.

    Made by :func:`load`; ``Detector(model, tokenizer, device)`` wraps a model built otherwise."""

    max_cached_prompts = 32

    def __init__(
        self,
        model: GLIP,
        tokenizer,
        device: torch.device | str = "cpu",
        *,
        weights: str | os.PathLike | None = None,
        adapter: tuple | None = None,
        amp: bool = False,
    ) -> None:
        self.device = torch.device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.weights = weights
        self.amp = amp
        self._adapter = adapter  # (metadata, file, kind) of an applied adapter: its caption is checked per prompt
        self._prompts: OrderedDict[tuple, LabelledPrompt] = OrderedDict()

    def __repr__(self) -> str:
        return f"Detector({self.model.cfg.variant}, weights={str(self.weights)!r}, device={self.device})"

    # ------------------------------------------------------------------ prompts

    def prompt(
        self,
        classes: str | Sequence[str] | None = None,
        prompt: str | None = None,
        phrases: Sequence[str] | None = None,
    ) -> LabelledPrompt:
        """The :class:`LabelledPrompt` of these arguments (see :func:`build_prompt`), built once and
        kept with its text features for the next call with the same prompt; its notices are given
        as warnings when it is built."""
        key = (
            ("classes", tuple(class_names(classes)))
            if classes is not None and prompt is None
            else ("prompt", prompt, tuple(phrases or ()))
        )
        found = self._prompts.get(key)
        if found is not None:
            self._prompts.move_to_end(key)
            return found
        labelled = build_prompt(self.tokenizer, classes=classes, prompt=prompt, phrases=phrases, max_len=self.max_len)
        for notice in labelled.notices:
            warnings.warn(notice, stacklevel=3)
        self.check_captions(labelled.captions)
        self._prompts[key] = labelled
        while len(self._prompts) > self.max_cached_prompts:
            self._prompts.popitem(last=False)
        return labelled

    @property
    def max_len(self) -> int:
        return self.model.cfg.language.max_query_len

    def check_captions(self, captions: list[str]) -> None:
        """Refuse a prompt the applied adapter cannot serve (a prompt offset fits only the caption
        it was trained for)."""
        if self._adapter is not None:
            from .training.artifacts import check_adapter_caption

            check_adapter_caption(*self._adapter, captions)

    # ------------------------------------------------------------------ detection

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        classes: str | Sequence[str] | None = None,
        prompt: str | None = None,
        phrases: Sequence[str] | None = None,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        max_detections: int | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        batch_size: int = 1,
    ) -> list[list[dict]] | list[dict]:
        """Detections of ``classes`` (category names) or of the phrases of a free-text ``prompt``
        (``phrases``: the parts to ground; default: the prompt split at periods).

        Returns, for each image, a list of ``{"box": [x1, y1, x2, y2], "score": float, "label":
        str}`` by descending score: boxes in the original image's pixels, scores at least
        ``threshold`` (in [0, 1]). A single image (not in a list) gives its list alone.
        ``max_detections`` per image (default 100), ``min_size`` / ``max_size`` the test resize
        (default 800 / 1333) override the model's settings for this call. An image that cannot be
        read raises :class:`~glip_transfer.data.DataError`."""
        single = isinstance(images, (str, os.PathLike, Image.Image, np.ndarray))
        items = [as_image(image, i) for i, image in enumerate([images] if single else images)]
        check_inference_settings(
            threshold=threshold, max_detections=max_detections, min_size=min_size, max_size=max_size, cli=False
        )
        labelled = self.prompt(classes, prompt, phrases)
        records: dict[int, list[dict]] = {}
        for record in self.detect(
            items,
            labelled,
            threshold=threshold,
            max_detections=max_detections,
            min_size=min_size,
            max_size=max_size,
            batch_size=batch_size,
            workers=0,
        ):
            if "error" in record:
                raise DataError(record["error"])
            records[record["index"]] = record["detections"]
        out = [records[i] for i in range(len(items))]
        return out[0] if single else out

    def input_config(self, min_size: int | None = None, max_size: int | None = None) -> InputConfig:
        """The model's test transform with ``min_size`` / ``max_size`` replaced where given."""
        changes = {k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v is not None}
        return dataclasses.replace(self.model.cfg.input, **changes)

    def detect(
        self,
        images: Sequence[ImageInput],
        labelled: LabelledPrompt,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        max_detections: int | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        batch_size: int = 1,
        workers: int | None = 0,
    ) -> Iterator[dict]:
        """The records ``glip predict --json`` writes, one per image as its batch finishes (images
        of one padded size are batched together, so not in input order; a record's ``"index"`` is
        the image's position): ``{"index", "image" (the file, None for an in-memory image),
        "width", "height", "detections"}``, or ``{"index", "image", "error"}`` for an image that
        cannot be read. Detections are rounded as written (boxes to 0.01 pixel, scores to 1e-4).
        ``workers``: image loading processes (None: :func:`~glip_transfer.data.default_workers`)."""
        check_inference_settings(
            threshold=threshold, max_detections=max_detections, min_size=min_size, max_size=max_size, cli=False
        )
        self.check_captions(labelled.captions)
        dataset = ImageFiles(images, self.input_config(min_size, max_size))
        workers = default_workers(self.device) if workers is None else workers
        loader = make_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=self.device.type == "cuda")
        names = labelled.names
        for batch, image_sizes, infos in loader:
            good = [info for info in infos if "error" not in info]
            for info in infos:
                if "error" in info:
                    yield {"index": info["index"], "image": info["file"], "error": info["error"]}
            if not good:
                continue
            with self._detections_per_image(max_detections):
                dets = detect_batch(
                    self.model, batch.to(self.device, non_blocking=True), image_sizes, labelled.encoded, amp=self.amp
                )
            for d, info in zip(dets, good):
                height, width = info["loaded_size"]
                d = to_original_size(d.to("cpu"), info["resized_size"], (height, width))
                detections = [
                    {"box": [round(v, 2) for v in box], "score": round(score, 4), "label": names[label - 1]}
                    for box, score, label in zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist())
                    if score >= threshold
                ]
                yield {
                    "index": info["index"],
                    "image": info["file"],
                    "width": width,
                    "height": height,
                    "detections": detections,
                }

    @contextlib.contextmanager
    def _detections_per_image(self, limit: int | None) -> Iterator[None]:
        """The model's per-image limit set to ``limit`` (None: kept) while a batch runs: the
        post-processor reads it from the config at run time."""
        saved = self.model.cfg.postprocess
        if limit is not None:
            self.model.cfg.postprocess = dataclasses.replace(saved, detections_per_img=limit)
        try:
            yield
        finally:
            self.model.cfg.postprocess = saved

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self,
        recipe_or_ann: str | os.PathLike,
        images: str | os.PathLike | None = None,
        data_root: str | os.PathLike | None = None,
        split: str | None = "test",
        *,
        overrides: Sequence[str] = (),
        batch_size: int | None = None,
        workers: int | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """COCO metrics (``AP``, ``AP50``, ``AP75``, ``APs``/``APm``/``APl``, ``AR1``... and
        ``per_category``; LVIS metrics for the LVIS recipes) of zero-shot detection on a dataset,
        as ``glip zeroshot eval`` computes them: the same prompt, and the recipe's evaluation
        settings (resize, detections kept per image, batch size: 1 on a CPU, 4 on CUDA).

        ``recipe_or_ann``: a recipe name (``glip recipes list``) or YAML file, whose files are
        under ``data_root`` (default ``$GLIP_DATA``, else ``./DATASET``) and ``split`` (None: the
        recipe's evaluation split); or, with ``images`` (the image folder), a COCO annotation file.
        ``overrides``: the recipe's settings as ``glip zeroshot eval --set`` takes them
        (``["evaluation.min_size=600"]``). Images missing on disk are left out of the metrics
        (``num_skipped_images`` says how many)."""
        from .config import ConfigError, split_overrides
        from .datasets import default_data_root
        from .evaluation import crowded_images
        from .zeroshot import evaluation_recipe, in_dataset_order, prepare_task, run_task, task_metrics

        by = split_overrides(list(overrides), ("model",))
        if by["model"]:
            raise ConfigError(
                f"overrides: 'model.{by['model'][0]}': model settings are fixed when load() builds the model; "
                "evaluation.* keys (sizes, detections_per_img) apply here"
            )
        if images is not None:
            recipe = evaluation_recipe(ann=Path(recipe_or_ann), images=Path(images), overrides=by["recipe"])
            split = None
        else:
            recipe = evaluation_recipe(os.fspath(recipe_or_ann), overrides=by["recipe"])
        root = Path(data_root) if data_root is not None else default_data_root()
        task = prepare_task(recipe, split=split, data_root=root)
        detection_prompt, notes = task.prompt(self.tokenizer)
        for note in notes:
            warnings.warn(note, stacklevel=2)
        self.check_captions(detection_prompt.captions)
        encoded = EncodedPrompt.from_chunks(self.tokenizer, detection_prompt.chunks, self.max_len)
        ev = recipe.evaluation
        dataset = task.dataset(self.input_config(ev.min_size, ev.max_size))
        crowded = crowded_images(dataset, ev.detections_per_img)
        if crowded:
            warnings.warn(crowded, stacklevel=2)
        with progress_bar() as bar, self._detections_per_image(ev.detections_per_img):
            job = bar.add_task("evaluate", total=len(dataset), info="", unit="img", visible=progress)
            results = run_task(
                self.model,
                dataset,
                encoded,
                device=self.device,
                batch_size=batch_size or ev.batch_size_on(self.device),
                workers=workers,
                amp=self.amp or ev.amp,
                progress=lambda n: bar.update(job, advance=n),
            )
        return task_metrics(task, dataset, in_dataset_order(results, dataset), encoded.captions, ev.detections_per_img)
