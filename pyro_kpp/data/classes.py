"""Class-structured episodes (``--episode-classes N``): each episode holds T/N images of each of
N classes (Omniglot characters, MNIST / Fashion-MNIST digits or garments).

The papers' episodes are T random images: the other images of an episode then say nothing about
an image, and a memory can only help it by storing the image itself. The Kanerva Machine's own
demonstrations (KM §4.2, Fig. 4; K++ Fig. 7) condition on episodes of a few classes, where the
other images *do* tell about it; ``Episodes(..., classes=N)`` draws training and test episodes so.

Protocol (``class_split``), chosen so that the data support every N a user may ask for:

* Omniglot: the background / evaluation split by alphabet (``pyro_kpp.data.omniglot.omniglot_by_alphabet``),
  train on the 964 background characters, test on the 659 evaluation characters, 20 drawings of
  each. Not today's random image split, for two reasons: it leaves about 5 test drawings per
  character (1 to 12), so episodes of T = 32 could hold at most a few images per class; and
  every test character has about 15 drawings in the training split, so a decoder could know the
  character without any memory. With new characters at test time, what a memory tells about a
  test image must come from the other drawings its episode holds, as in few-shot generation,
  which tests on new characters.
* MNIST, Fashion-MNIST (and CIFAR-10): the native split and labels (thousands of images per class).

Drawing (``class_episode_index``): each class's images are shuffled and cut into groups of T/N
(the remainder of a class is left out of that draw); episodes are then formed one by one from N
distinct classes drawn with probability proportional to the groups each has left, without
replacement, until fewer than N classes have groups left. Every image appears at most once per
draw, and the episode's images are shuffled. All randomness comes from the generator given, so
test episodes are fixed by ``TEST_SEED`` and training episodes by (seed, epoch), as for random
episodes (``pyro_kpp.data.episodes``).
"""
from __future__ import annotations

import torch

from pyro_kpp.data import DataError, ImageData
from pyro_kpp.data.omniglot import omniglot_by_alphabet


def class_split(data: ImageData) -> ImageData:
    """The train / test split class-structured episodes draw from (module docstring)."""
    if data.train_labels is None or data.test_labels is None:
        raise DataError(f"episode_classes: {data.name} has no class labels, so it has no class-structured episodes")
    return omniglot_by_alphabet(data) if data.name == "omniglot" else data


def check_classes(data: ImageData, classes: int, episode_length: int) -> int:
    """Validate N = ``classes`` for episodes of ``episode_length`` images from ``data`` (a
    ``class_split``): N divides T, and both splits have N classes with T/N images each.
    Returns T/N, the images per class."""
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"episode_classes: expected a positive integer or None, got {classes!r}")
    if episode_length % classes:
        raise DataError(f"episode_classes: {classes} classes must divide the episode length T = {episode_length} "
                        f"(T/N images of each class)")
    per_class = episode_length // classes
    for split in ("train", "test"):
        counts = torch.bincount(getattr(data, f"{split}_labels"))
        eligible = int((counts >= per_class).sum())
        if eligible < classes:
            raise DataError(
                f"episode_classes: an episode of {episode_length} images from {classes} classes needs {per_class} "
                f"images of each, and only {eligible} classes of the {split} split of {data.name} have that many "
                f"(at most {int(counts.max())} images per class); ask for more classes or a shorter episode")
    return per_class


def max_class_episodes(labels: torch.Tensor, classes: int, per_class: int) -> int:
    """Most episodes one draw can form: the groups of ``per_class`` images, N to an episode."""
    return int((torch.bincount(labels) // per_class).sum()) // classes


def class_episode_index(labels: torch.Tensor, classes: int, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Indices (E, classes * per_class) into ``labels`` (N,) of one draw of class episodes (module
    docstring): each row from exactly ``classes`` classes, ``per_class`` images of each, shuffled."""
    counts = torch.bincount(labels)                                        # (n_labels,)
    perm = torch.randperm(len(labels), generator=generator)
    by_class = perm[torch.argsort(labels[perm], stable=True)]             # grouped by label, shuffled within
    starts = torch.cumsum(counts, 0) - counts                              # first position of each label
    left = (counts // per_class).to(torch.float64)                         # groups each class has left
    taken = torch.zeros_like(counts)
    offsets = torch.arange(per_class)
    rows = []
    while int((left > 0).sum()) >= classes:
        chosen = torch.multinomial(left, classes, replacement=False, generator=generator)   # (N,)
        picks = by_class[(starts[chosen] + taken[chosen] * per_class)[:, None] + offsets]  # (N, T/N)
        taken[chosen] += 1
        left[chosen] -= 1
        row = picks.flatten()
        rows.append(row[torch.randperm(len(row), generator=generator)])
    return torch.stack(rows)                                               # (E, T)
