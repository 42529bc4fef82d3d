"""Episodes drawn from a data set (``pyro_kpp.data.sets``).

:class:`Episodes` draws episodes of T images at random from a split, without class structure
(the Kanerva Machine / Kanerva++ protocol), dynamically binarized for training and binarized
once, with a fixed seed, for testing; ``make_episodes`` builds those of a run's config and
``test_batches`` caps its test episodes. :func:`class_episodes` draws episodes from a few
classes (KM §4.2's one-shot generation).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from pyro_kpp.config import Config
from pyro_kpp.data.base import DataError, ImageData
from pyro_kpp.data.classes import check_classes, class_episode_index, class_split, max_class_episodes
from pyro_kpp.data.sets import DATASETS, TEST_SEED, load_dataset
from pyro_kpp.maths.likelihoods import LIKELIHOODS
from pyro_kpp.train.device import resolve_device

if TYPE_CHECKING:                                           # for the annotation only: no import at run time
    from pyro_kpp.models.base import EpisodicModel

# Domain tags so that the seeds of different random streams never coincide.
_TRAIN_ORDER, _TRAIN_BITS, _TEST_ORDER, _TEST_BITS = 1, 2, 3, 4
_VALID_SPLIT, _VALID_ORDER, _VALID_BITS = 6, 7, 8


def _generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded from integer keys, mixed by numpy's SeedSequence (so that,
    unlike ``seed * 100003 + epoch``, distinct keys never collide)."""
    entropy = [int(k) % 2**64 for k in keys]
    seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(seed)


def _check_count(argname: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{argname}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


class Episodes:
    """Episodes of T images drawn at random from a split, no class structure (KM/K++ protocol).

    Every batch is a float32 tensor (B, T, C, H, W) on ``device``:

    * ``binarize=True`` (default): pixels are 0/1. Training batches are binarized dynamically (a
      fresh Bernoulli draw with p = grey/255 at every step); test episodes are binarized once.
    * ``binarize=False``: grey/255 floats in [0, 1].
    * ``binarize=False, as_uint8=True``: the raw uint8 grey levels 0..255 (dtype uint8), for
      8-bit likelihoods.

    Randomness is a function of (seed, epoch, step) only, so a run resumed at any step sees
    exactly the batches an uninterrupted run would have seen.

    ``classes`` = N draws every episode, training and test, from N classes, T/N images each, from
    the split ``pyro_kpp.data.classes`` describes (Omniglot: background / evaluation alphabets);
    None (the default) keeps the random episodes above.
    """

    def __init__(
        self,
        data: ImageData,
        episode_length: int,
        batch_size: int,
        *,
        seed: int,
        binarize: bool = True,
        as_uint8: bool = False,
        device: torch.device | str = "cpu",
        valid_images: int = 0,
        classes: int | None = None,
    ) -> None:
        self.episode_length = _check_count("episode_length", episode_length)
        self.batch_size = _check_count("batch_size", batch_size)
        self.seed = _check_count("seed", seed, minimum=0)
        self.classes = classes
        if classes is not None:
            data = class_split(data)
            self.per_class = check_classes(data, classes, self.episode_length)
            if valid_images:
                raise DataError("valid_images: class-structured episodes (episode_classes) hold no validation "
                                "images out; use valid_images=0")
        for split in ("train", "test"):
            n = len(getattr(data, split))
            if self.episode_length > n:
                raise DataError(
                    f"episode_length: {episode_length} asks for an episode longer than the {split} split "
                    f"of {data.name} ({n} images)"
                )
        if binarize and as_uint8:
            raise ValueError("as_uint8: raw uint8 grey levels need binarize=False")
        self.data = data
        self.binarize = bool(binarize)
        self.as_uint8 = bool(as_uint8)
        self.device = resolve_device(str(device))      # "cuda" without a GPU: refused, by name
        train, self._valid_images = self._carve_validation(data.train, _check_count("valid_images", valid_images, 0))
        self._train = train.to(self.device)
        self._test: torch.Tensor | None = None   # (E, T, C, H, W) uint8, built on first use
        self._test_index: torch.Tensor | None = None   # (E, T): where each test image is in data.test
        self._valid: torch.Tensor | None = None  # the same for the validation images

    def _carve_validation(self, train: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold out ``n`` training images for validation: the last n of a permutation of the train
        split fixed by TEST_SEED (not the run's seed), so every run holds out the same images."""
        if n == 0:
            return train, train[:0]
        if n < self.episode_length or len(train) - n < self.episode_length:
            raise DataError(f"valid_images: {n} must leave at least one episode of {self.episode_length} images "
                            f"for validation and for training (train split: {len(train)} images)")
        perm = torch.randperm(len(train), generator=_generator(_VALID_SPLIT, TEST_SEED))
        return train[perm[:-n]], train[perm[-n:]]

    @property
    def images_per_step(self) -> int:
        return self.batch_size * self.episode_length

    def steps_per_epoch(self) -> int:
        """ceil(N_train / (batch_size * episode_length)); for class episodes ceil(E / batch_size)
        with E the most episodes one draw of the train split forms (``max_class_episodes``)."""
        if self.classes is not None:
            return math.ceil(max_class_episodes(self.data.train_labels, self.classes, self.per_class) / self.batch_size)
        return math.ceil(len(self._train) / self.images_per_step)

    # ---- training ------------------------------------------------------------------------

    def train_epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Batches of epoch ``epoch``, from step ``start_step`` to ``steps_per_epoch() - 1``.

        Order: a permutation of the train split drawn from a generator seeded by (seed, epoch),
        cut into episodes of T; the last episodes of the epoch are completed by wrapping around
        to the start of the permutation, so every image is seen at least once per epoch.
        Binarization of step s uses a generator seeded by (seed, epoch, s).
        """
        epoch = _check_count("epoch", epoch, minimum=0)
        steps = self.steps_per_epoch()
        start_step = _check_count("start_step", start_step, minimum=0)
        if start_step > steps:
            raise ValueError(f"start_step: expected 0..{steps} (steps per epoch), got {start_step}")
        order = self.train_order(epoch)
        return self._train_batches(order, epoch, start_step)

    def train_order(self, epoch: int) -> torch.Tensor:
        """Train-split indices (steps_per_epoch, B, T) of epoch ``epoch``. Class episodes: one draw
        (``class_episode_index``) seeded by (seed, epoch), completed by wrapping to its first episodes."""
        steps, gen = self.steps_per_epoch(), _generator(_TRAIN_ORDER, self.seed, epoch)
        if self.classes is not None:
            drawn = class_episode_index(self.data.train_labels, self.classes, self.per_class, gen)   # (E, T)
            wrapped = drawn[torch.arange(steps * self.batch_size) % len(drawn)]
        else:
            n = len(self._train)
            perm = torch.randperm(n, generator=gen)
            wrapped = perm[torch.arange(steps * self.images_per_step) % n]
        return wrapped.view(steps, self.batch_size, self.episode_length).to(self.device)

    def _train_batches(self, order: torch.Tensor, epoch: int, start_step: int) -> Iterator[torch.Tensor]:
        for step in range(start_step, len(order)):
            grey = self._train[order[step]]  # (B, T, C, H, W) uint8
            if self.as_uint8:
                yield grey
                continue
            p = grey.to(torch.float32) / 255.0
            if self.binarize:
                yield torch.bernoulli(p, generator=_generator(_TRAIN_BITS, self.seed, epoch, step, device=self.device))
            else:
                yield p

    # ---- testing -------------------------------------------------------------------------

    def num_test_episodes(self) -> int:
        """floor(N_test / T): the remainder that does not fill an episode is dropped; class episodes:
        as many as the fixed draw formed."""
        if self.classes is not None:
            return len(self._test_data())
        return len(self.data.test) // self.episode_length

    def test_labels(self) -> torch.Tensor:
        """The class labels (E, T) of the fixed test episodes' images, in their order."""
        if self.data.test_labels is None:
            raise DataError(f"data: {self.data.name} has no class labels")
        self._test_data()
        return self.data.test_labels[self._test_index]

    def test_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every test-split image as the test episodes present it (the same bits), (N, C, H, W),
        and its label (N,): what random-key samples are matched against (``pyro_kpp.inference.memory_use``)."""
        if self.data.test_labels is None:
            raise DataError(f"data: {self.data.name} has no class labels")
        return self._present_test(self._binarized(self.data.test, _TEST_BITS).to(self.device)), self.data.test_labels

    def test_episodes(self, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        """The fixed test episodes, in batches of ``batch_size`` episodes (default
        ``self.batch_size``; the last batch may be smaller).

        Identical for every call, every Episodes object and every run, whatever the seed: each
        test image is binarized once with a generator seeded by TEST_SEED (before any
        shuffling, so an image's bits do not depend on T), then the split is permuted with
        TEST_SEED and cut into episodes of T. The remainder that does not fill an episode is
        dropped: e.g. Omniglot's 8,115 test images give 253 episodes of 32 and 19 unused images.
        """
        batch_size = self.batch_size if batch_size is None else _check_count("batch_size", batch_size)
        test = self._test_data()
        return (self._present_test(test[i : i + batch_size]) for i in range(0, len(test), batch_size))

    def valid_episodes(self, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        """The fixed validation episodes (``valid_images`` held out of the train split), built and
        batched as ``test_episodes``: for choosing designs without looking at the test split."""
        if len(self._valid_images) == 0:
            raise ValueError("valid_images: no validation images were held out (valid_images=0)")
        batch_size = self.batch_size if batch_size is None else _check_count("batch_size", batch_size)
        if self._valid is None:
            self._valid = self._fixed_episodes(self._valid_images, _VALID_BITS, _VALID_ORDER)[0]
        return (self._present_test(self._valid[i: i + batch_size]) for i in range(0, len(self._valid), batch_size))

    def _test_data(self) -> torch.Tensor:
        if self._test is None:
            labels = self.data.test_labels if self.classes is not None else None
            self._test, self._test_index = self._fixed_episodes(self.data.test, _TEST_BITS, _TEST_ORDER, labels)
        return self._test

    def _binarized(self, images: torch.Tensor, bits_tag: int) -> torch.Tensor:
        """Images (CPU, so the bits do not depend on the device) binarized once with a generator
        fixed by TEST_SEED (kept as they are for 8-bit data)."""
        if not self.binarize:
            return images
        bits = torch.bernoulli(images.to(torch.float32) / 255.0, generator=_generator(bits_tag, TEST_SEED))
        return bits.to(torch.uint8)

    def _fixed_episodes(self, images: torch.Tensor, bits_tag: int, order_tag: int,
                        labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images binarized once (``_binarized``), permuted and cut into episodes of T with a
        generator fixed by TEST_SEED, the remainder dropped; with ``labels``, one draw of class
        episodes instead. Returns the episodes (E, T, C, H, W) and their indices (E, T) into ``images``."""
        images, gen = self._binarized(images, bits_tag), _generator(order_tag, TEST_SEED)
        if labels is not None:
            index = class_episode_index(labels, self.classes, self.per_class, gen)        # (E, T)
        else:
            perm = torch.randperm(len(images), generator=gen)
            n_ep, t = len(images) // self.episode_length, self.episode_length
            index = perm[: n_ep * t].view(n_ep, t)
        return images[index].to(self.device), index

    def _present_test(self, batch: torch.Tensor) -> torch.Tensor:
        if self.binarize:
            return batch.to(torch.float32)  # already 0/1
        if self.as_uint8:
            return batch
        return batch.to(torch.float32) / 255.0


# ---- class-structured episodes ---------------------------------------------------------------

_CLASS_EPISODES = 5  # domain tag of the class-structured episodes' random stream


def class_episodes(
    data: ImageData,
    classes: int,
    episode_length: int,
    episodes: int = 1,
    *,
    split: str = "test",
    seed: int = 0,
    binarize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Episodes of T images from exactly ``classes`` classes (Omniglot: characters), for the
    one-shot generation of KM §4.2 ("episodes with samples from only 2, 4 or 12 classes").

    Each episode draws ``classes`` distinct classes uniformly among those with at least
    ceil(T / classes) images in ``split``, shares the T images among them as evenly as possible
    (the first T mod classes classes get one more), draws each class's images without
    replacement and shuffles the episode. Omniglot's random split leaves about 5 test images per
    character (1 to 12), so e.g. 2 characters fill episodes of T <= 24 only; KM conditions on
    T = 12. Binarized with a Bernoulli draw (``binarize=True``) or grey/255 floats; all
    randomness comes from ``seed``.

    Returns x (E, T, C, H, W) float32 and labels (E, T) int64.
    """
    classes = _check_count("classes", classes)
    episode_length = _check_count("episode_length", episode_length)
    episodes = _check_count("episodes", episodes)
    seed = _check_count("seed", seed, minimum=0)
    if split not in ("train", "test"):
        raise DataError(f"split: expected 'train' or 'test', got {split!r}")
    images, labels = getattr(data, split), getattr(data, f"{split}_labels")
    if labels is None:
        raise DataError(f"data: {data.name} has no class labels, so it has no class-structured episodes")
    if classes > episode_length:
        raise DataError(f"classes: {classes} classes cannot all appear in an episode of {episode_length} images")
    per_class = -(-episode_length // classes)  # ceil
    counts = torch.bincount(labels)
    eligible = torch.nonzero(counts >= per_class).flatten()
    if len(eligible) < classes:
        raise DataError(
            f"classes: only {len(eligible)} classes of the {split} split of {data.name} have the {per_class} "
            f"images an episode of {episode_length} images from {classes} classes needs; ask for fewer images "
            f"or more classes"
        )
    gen = _generator(_CLASS_EPISODES, seed)
    shares = [episode_length // classes + (c < episode_length % classes) for c in range(classes)]
    index = torch.empty(episodes, episode_length, dtype=torch.int64)
    for e in range(episodes):
        chosen = eligible[torch.randperm(len(eligible), generator=gen)[:classes]]
        picks = []
        for label, share in zip(chosen.tolist(), shares):
            members = torch.nonzero(labels == label).flatten()
            picks.append(members[torch.randperm(len(members), generator=gen)[:share]])
        picked = torch.cat(picks)
        index[e] = picked[torch.randperm(episode_length, generator=gen)]
    grey = images[index].to(torch.float32) / 255.0  # (E, T, C, H, W)
    x = torch.bernoulli(grey, generator=gen) if binarize else grey
    return x, labels[index]


def make_episodes(cfg: Config, data: ImageData, device: torch.device, *, random_episodes: bool = False) -> Episodes:
    """The run's episodes: binarized for a binary likelihood, 8-bit grey levels k/255 otherwise.

    ``random_episodes``, for a run with class-structured episodes (``cfg.episode_classes``): the
    same split (``class_split``: Omniglot's background / evaluation alphabets) cut into random
    episodes instead, T images with no class structure, as the papers' protocol draws them. The
    contrast isolates what the class structure gives: the same weights and test split (not the
    identical images: the two draws leave out different remainders), and episodes whose other
    images say little about each image."""
    binarize = LIKELIHOODS[cfg.likelihood].binarized
    classes = cfg.episode_classes
    if random_episodes:
        if classes is None:
            raise ValueError("random_episodes: the run's episodes are random already (it has no episode_classes)")
        data, classes = class_split(data), None
    return Episodes(data, cfg.episode_length, cfg.batch_size, seed=cfg.seed, binarize=binarize, device=device,
                    valid_images=cfg.valid_images, classes=classes)


def test_batches(episodes: Episodes, max_episodes: int | None, split: str = "test"):
    """The fixed test (or, ``split="valid"``, validation) episodes, capped at ``max_episodes`` episodes."""
    fixed = episodes.valid_episodes() if split == "valid" else episodes.test_episodes()
    if max_episodes is None:
        yield from fixed
        return
    left = max_episodes
    for x in fixed:
        if left <= 0:
            return
        yield x[:left]
        left -= x.shape[0]


SPLITS = ("train", "test", "valid")


def load_episodes(data: str | None = None, split: str = "test", T: int | None = None, B: int | None = None, *,
                  run: EpisodicModel | str | os.PathLike | None = None, data_dir: str | None = None,
                  likelihood: str | None = None,
                  valid_images: int | None = None, seed: int | None = None,
                  classes: int | None = None, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Ready batches (B, T, C, H, W) of a data set's episodes, as a run sees them; also callable as
    ``pyro_kpp.episodes(...)``. So a user needs no knowledge of ``load_dataset`` and ``Episodes``.

    ``split``: "test" (the fixed test episodes every run is evaluated on), "valid" (the episodes
    of ``valid_images`` images held out of the train split) or "train" (epoch 0 of training with
    ``seed``). Binarized for a Bernoulli likelihood (the default for grey data sets), 8-bit
    levels k/255 for ``likelihood="dmol"`` (the default for cifar10). ``data_dir`` as ``--data-dir``;
    ``classes`` as ``--episode-classes`` (N classes per episode, T/N images each).

    ``run``: a loaded model (``pyro_kpp.load``) or a run directory. Its config supplies every
    argument left as None: the data set, its data root (the one the run trained on, so no
    ``$PYRO_KPP_DATA`` is needed), the likelihood, T, B, ``valid_images`` and the seed. Without
    ``run`` the defaults are Omniglot, T = 32, B = 8, no validation images, seed 0, and the data
    root is ``data_dir``, else ``$PYRO_KPP_DATA``, else the per-user cache.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    device = resolve_device(str(device))                       # before the data set is loaded
    if data is not None and data not in DATASETS:
        raise ValueError(f"data: expected one of {', '.join(DATASETS)}, got {data!r}")
    base = _run_config(run) if run is not None else Config(data=data or "omniglot")
    chosen = {"data": data, "data_dir": data_dir, "likelihood": likelihood, "episode_length": T, "batch_size": B,
              "valid_images": valid_images, "seed": seed, "episode_classes": classes}
    fields = {k: v for k, v in chosen.items() if v is not None}
    if data is not None and data != base.data:               # another data set: its own default likelihood
        fields["likelihood"] = likelihood
    try:
        cfg = dataclasses.replace(base, **fields)
    except (TypeError, ValueError) as exc:                   # name this function's arguments, not Config's
        raise type(exc)(_ARGUMENT_NAMES.sub(lambda m: _ARGUMENTS[m.group(1)] + ":", str(exc))) from None
    episodes = make_episodes(cfg, load_dataset(cfg.data, cfg.data_dir), device)
    if split == "train":
        return episodes.train_epoch(0)
    return episodes.valid_episodes() if split == "valid" else episodes.test_episodes()


#: Config fields -> the ``load_episodes`` arguments that set them, for its error messages.
_ARGUMENTS = {"episode_length": "T", "batch_size": "B", "episode_classes": "classes"}
_ARGUMENT_NAMES = re.compile(r"^(" + "|".join(_ARGUMENTS) + r"):")


def _run_config(run) -> Config:
    """The config of ``run``: a model (its ``cfg``) or a run directory / checkpoint file."""
    if isinstance(getattr(run, "cfg", None), Config):
        return run.cfg
    if isinstance(run, (str, os.PathLike)):
        from pyro_kpp.train.checkpoint import load_checkpoint            # here: checkpoint imports the models

        return Config.from_dict(load_checkpoint(run)["config"])
    raise TypeError(f"run: expected a model from pyro_kpp.load or a run directory, got {type(run).__name__}")


class _CallableModule(types.ModuleType):
    """This module, callable: ``pyro_kpp.episodes(...)`` is ``load_episodes(...)``, while
    ``pyro_kpp.data.episodes.class_episodes`` and the other names stay reachable."""

    def __call__(self, *args, **kwargs) -> Iterator[torch.Tensor]:
        return load_episodes(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
