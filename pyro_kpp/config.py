"""The run configuration: one flat, self-describing dataclass saved in every checkpoint.

Defaults are the paper's where it gives a value (K = 2 reads, a 3 x 64 x 64 memory, key
dimension 3) and otherwise chosen so an Omniglot epoch takes well under a minute on a
2-core CPU (see the README's "Choices" section for the reasons).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

from pyro_kpp.maths.likelihoods import LIKELIHOODS
from pyro_kpp.maths.spatial import KEY_MAPS

CONFIG_VERSION = 6

#: Training precisions: "auto" (the default) is bf16 where the device computes it natively
#: (``pyro_kpp.train.speed.bf16_native``) and float32 elsewhere; "fp32" and "bf16" force one.
PRECISIONS = ("auto", "fp32", "bf16")
#: Explicit upgrades of saved configs: MIGRATIONS[v] maps a version-v dict to a version-(v + 1)
#: one, e.g. adding a new field with the value that reproduces what older code did. A field a
#: saved config lacks is otherwise an error, never filled in silently with today's default.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {
    # 1 -> 2: the K++ memory-use options; a version-1 run wrote with f_mem alone, read through
    # tanh keys and trained its keys at the full KL weight.
    1: lambda d: {"kpp_write": "pooled", "key_map": "tanh", "key_kl_start": 1.0, "key_kl_hold": 0,
                  "key_kl_ramp": 0, "key_free_nats": 0.0, "kpp_posterior": "x", "kpp_block_res": 0,
                  "key_std_floor": 0.0, "kl_weight": 1.0, "valid_images": 0,
                  "key_scale_min": 0.5, "key_scale_max": 1.5, "memory_blur": 0.0,
                  **d,
                  "version": 2},
    # 2 -> 3: the speed options; earlier runs trained eager in float32.
    2: lambda d: {"compile": False, "precision": "fp32", **d, "version": 3},
    # 3 -> 4: channels-last networks; earlier runs kept PyTorch's default layout. (Version 3 runs
    # stored their precision, so the new default "auto" touches none of them.)
    3: lambda d: {"channels_last": False, **d, "version": 4},
    # 4 -> 5: class-structured episodes; earlier runs drew random episodes.
    4: lambda d: {"episode_classes": None, **d, "version": 5},
    # 5 -> 6: the held-out objective; earlier runs trained on their paper's bound.
    5: lambda d: {"objective": "paper", "held_out_folds": 2, **d, "version": 6},
}
#: Likelihood by data set when none is given: 8-bit colour sets get the discretized logistic
#: mixture; the grey sets default to binarized data with a Bernoulli likelihood (K++ Table 1).
DEFAULT_LIKELIHOOD = {"cifar10": "dmol"}
#: KM / DKM memory rows K when none is given: KM §4 uses a 64 x 100 memory on Omniglot; the DKM
#: paper's Omniglot memory (DeepMind's dynamic-kanerva-machines module) has 32 rows.
DEFAULT_SLOTS = {"dkm": 32}
#: The key KL's training-only schedule when none is given: K++ trains its keys at weight 0.02 for
#: its first 1000 steps, the phase in which the addressed write organises the memory (README
#: "Memory use"); the other models train theirs at the honest weight throughout.
KEY_KL_DEFAULTS = {"kpp": {"key_kl_start": 0.02, "key_kl_hold": 1000}}
#: Upper bounds of options whose larger values are absurd rather than big (the help of each says why).
MAX_DKM_WRITE_ITERATIONS = 10
MAX_LR = 1.0
KM_READ_WRITE = ("mean", "distribution")
ELBOS = ("trace", "meanfield")
#: Training objectives (``pyro_kpp.inference.bound.training_loss``): "paper" = each model's paper's
#: bound (K++ and KM: every image read from the memory its own episode wrote, itself included);
#: "held-out" = each image read from the memory written without it (``held_out`` folds).
OBJECTIVES = ("paper", "held-out")
KPP_WRITES = ("pooled", "addressed", "addressed-mean", "blocks", "solved")
#: Network presets (``pyro_kpp.nets.build.build_encoder``): "cpu" = small conv stacks; "paper" = K++
#: Appendix E (TSM-ResNet18 encoder, EvoNormS0 decoder, spectral-norm dense nets, LARS(Adam) with
#: a one-cycle cosine schedule and weight decay). Sizes a preset sets when they are not given:
PRESET_DEFAULTS = {
    "cpu": {"hidden": 256, "writer_channels": 64},
    "paper": {"hidden": 512, "writer_channels": 256},   # App. E: dense nets of 512, writer base 256
}


#: How a type annotation of a Config field reads in an error message.
_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "True or False",
               "None": "None", "tuple[int,int,int]": "three integers"}


def _has_type(value, kind: str) -> bool:
    """Whether ``value`` fits the annotation ``kind`` of a Config field (bools are not numbers;
    numpy's integers and floats are)."""
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, numbers.Integral)
    if kind == "float":
        return isinstance(value, numbers.Real)
    if kind == "str":
        return isinstance(value, str)
    if kind == "tuple[int,int,int]":
        return (isinstance(value, (tuple, list)) and len(value) == 3
                and all(_has_type(v, "int") for v in value))
    raise TypeError(f"Config: no type check for the annotation {kind!r}")


def check_folds(T: int, folds, argname: str = "folds") -> int:
    """``folds`` if it cuts an episode of T images into equal folds of at least one image, from 2
    to T (T = one image per fold, the leave-one-out bound); else a ValueError naming ``argname``."""
    if not isinstance(folds, int) or isinstance(folds, bool) or not 2 <= folds <= T or T % folds:
        raise ValueError(f"{argname}: expected a divisor of the episode length T = {T} from 2 to T, got {folds!r}")
    return folds


def opt(default, help: str, *, flags: tuple[str, ...] = (), default_text: str | None = None, **argparse_kwargs):
    """A field that is also a command-line option ``--field-name`` (``pyro_kpp.cliargs.add_config_options``):
    its help, extra ``flags`` (e.g. ``-T``), the default as the help shows it (``default_text``;
    else the default itself) and further ``argparse`` keywords such as ``choices``."""
    return field(default=default, metadata={"help": help, "flags": flags, "default_text": default_text,
                                            **argparse_kwargs})


@dataclass
class Config:
    # what to train
    model: str = opt("kpp", "model")
    preset: str = opt("cpu", "networks and optimiser: cpu = small conv nets and Adam; paper = K++ Appendix E "
                      "(TSM-ResNet18, EvoNorm decoder, LARS(Adam), one-cycle cosine)", choices=sorted(PRESET_DEFAULTS))
    data: str = opt("omniglot", "data set")
    data_dir: str | None = opt(None, "data root", default_text="$PYRO_KPP_DATA, else a per-user cache folder")
    # "bernoulli": dynamically binarized data; "dmol": 8-bit data (k/255, no binarization) under a
    # discretized mixture of logistics (K++ §4). None = by data set (DEFAULT_LIKELIHOOD).
    likelihood: str | None = opt(None, "bernoulli: binarized data; dmol: 8-bit data under a discretized mixture of "
                                 "logistics", choices=sorted(LIKELIHOODS), default_text="dmol for cifar10, else bernoulli")
    image_shape: tuple[int, int, int] = (1, 28, 28)   # filled in from the data set
    # episodes
    episode_length: int = opt(32, "images per episode T (KM/DKM use 32 on Omniglot)", flags=("-T",))
    batch_size: int = opt(8, "episodes per step B (the global batch under torchrun)", flags=("-B",))
    episode_classes: int | None = opt(None, "draw every episode (training and test) from N classes, T/N images each "
                                      "(Omniglot: background alphabets for training, the evaluation alphabets' new "
                                      "characters for testing; pyro_kpp.data.classes)",
                                      default_text="none: T random images (the papers' episodes)")
    # K++ memory and reads
    reads: int = opt(2, "K++ reads per image K (paper: 2)", flags=("-K",))
    memory_shape: tuple[int, int, int] = opt((3, 64, 64), "K++ memory C,H,W (paper: 3,64,64)")
    window: int = opt(16, "K++ read window h = w")
    # K++ write and keys (models/kpp.py, pyro_kpp/maths/spatial.py). The defaults make the memory carry
    # its episode (README "Memory use"): the addressed write alone ("blocks"), written at 4 x 4,
    # read through the uniform key map at nearly one scale, the prior reading it blurred by 2 pixels.
    # The paper's literal reading is
    # --kpp-write pooled --key-map tanh --kpp-block-res 0 --key-kl-start 1 --key-kl-hold 0 --memory-blur 0.
    kpp_write: str = opt("blocks", "K++ write: pooled = f_mem(mean e) (§3.3, literal); addressed = also each image's "
                         "block where its mean keys read; addressed-mean = the same, overlaps averaged; blocks = "
                         "the addressed part alone; solved = each image's code A mu_z, written so that the read at "
                         "its mean keys returns it (a least-squares solve)", choices=KPP_WRITES)
    key_map: str = opt("uniform", "K++ keys -> windows: tanh = each component squashed by tanh; uniform = the key "
                       "prior spread uniformly over the memory at scales near window/memory", choices=KEY_MAPS)
    kpp_block_res: int = opt(4, "K++ addressed write: resolution of each written block, upsampled to the window "
                             "(0: the window's)")
    key_scale_min: float = opt(0.5, "K++ uniform key map: smallest window scale, in memory pixels per window pixel")
    key_scale_max: float = opt(0.6, "K++ uniform key map: largest window scale, in memory pixels per window pixel")
    memory_blur: float = opt(2.0, "K++: the prior reads the memory blurred by a Gaussian of this many memory pixels "
                             "(0: no blur; at most the memory's larger side: a wider blur spreads every cell over "
                             "the whole memory, and its kernel of 6 sigma + 1 taps outgrows the memory)")
    key_std_floor: float = opt(0.0, "K++: added to every standard deviation of q(y|X)", default_text="0, the paper's family")
    kpp_posterior: str = opt("x", "K++ code posterior: x = q(z|X) (§3.5); read = q(z|X,M,y), also given the mean of "
                             "p(z|M,y) at the sampled keys", choices=("x", "read"))
    writer_channels: int | None = opt(None, "base channels of f_mem", default_text="by preset: cpu 64, paper 256")
    # KM / DKM matrix-normal memory, K x code_size (KM §3.1; DKM)
    slots: int | None = opt(None, "KM/DKM memory rows K", default_text="KM 64, DKM 32")
    address_size: int = opt(50, "KM size S of y_t and of the key b_t = f(y_t) (KM §4: 64 x 50 addresses)")
    # KM: "mean" = write samples of q(y|x), q(z|x) and read the mean-field memory R (KM §3.3-3.4);
    # "distribution" = Appendix F, write the codes' distributions and read p(z | y, R, U)
    km_read_write: str = opt("mean", "KM memory access: mean = sampled codes written, mean-field memory read "
                             "(KM §3.3-3.4); distribution = KM Appendix F", choices=KM_READ_WRITE)
    dkm_write_iterations: int = opt(1, "DKM solves of w per written image (1: against the memory before it; at most "
                                    f"{MAX_DKM_WRITE_ITERATIONS}, DKM.md's 'a few': each costs a ridge solve and "
                                    "a rank-1 update per image, so the write slows linearly with it)")
    # sizes shared by all models
    code_size: int = opt(64, "dimension L of z")
    embed_size: int = opt(256, "dimension D of the embedding e_t")
    hidden: int | None = opt(None, "units of the dense heads", default_text="by preset: cpu 256, paper 512")
    # optimisation
    elbo: str = opt("trace", "Pyro ELBO: trace = Trace_ELBO, meanfield = TraceMeanField_ELBO (analytic KLs)",
                    choices=ELBOS)
    # What a memory model learns is decided by its objective (docs/memory-use-log.md, session 8):
    # under the papers' conditional bound an image stores itself and reads itself back; under the
    # held-out objective it can only gain from what the *other* images of its episode stored.
    objective: str = opt("paper", "training objective: paper = the paper's bound (K++, KM: every image read from "
                         "the memory written from its episode, itself included); held-out = the episode cut into "
                         "--held-out-folds folds, each read from the memory the other folds wrote (reported bounds "
                         "are unchanged; evaluation adds the leave-one-out bound)", choices=OBJECTIVES)
    held_out_folds: int = opt(2, "folds of --objective held-out, a divisor of T from 2 to T (T = leave-one-out, "
                              "T memories per episode)")
    lr: float = opt(1e-3, f"Adam learning rate (at most {MAX_LR:g}: Adam moves each weight by up to about lr per "
                    "step, so a larger rate rewrites the weights at every step)")
    kl_warmup: int = opt(1000, "steps over which the KL weight rises linearly from 0 to 1 (0 = none)")
    kl_weight: float = opt(1.0, "training-only constant weight of every KL after the warm-up, for experiments; "
                           "reported bounds use 1")
    # Training-only weight of the key / address KL (K++ keys, KM y, DKM w), on top of the warm-up:
    # key_kl_start for key_kl_hold steps, then a cosine ramp to 1 over key_kl_ramp steps
    # (pyro_kpp.inference.schedules). Every reported bound weights it 1.
    key_kl_start: float | None = opt(None, "training-only weight of the key/address KL at the start (1 = none)",
                                     default_text="K++ 0.02, other models 1")
    key_kl_hold: int | None = opt(None, "steps the key KL weight stays at --key-kl-start",
                                  default_text="K++ 1000, other models 0")
    key_kl_ramp: int = opt(0, "steps of the cosine ramp of the key KL weight to 1")
    key_free_nats: float = opt(0.0, "training-only free nats of the key/address KL per image through the hold, "
                               "falling to 0 over the ramp")
    # Speed (pyro_kpp.train.speed): neither changes the model or a reported bound (evaluation is float32).
    compile: bool = opt(False, "compile the networks with torch.compile (eager, with a message, where unavailable)")
    precision: str = opt("auto", "training precision: bf16 = the networks under bf16 autocast in the training "
                         "loss; fp32; auto = bf16 where the device computes it natively (AVX512-BF16, AMX, "
                         "CUDA), else fp32. Evaluation is always float32", choices=PRECISIONS)
    channels_last: bool = opt(True, "the networks' weights and feature maps in channels-last (NHWC) layout "
                              "(faster on CPUs with oneDNN; docs/benchmarks.md has measured ratios)")
    clip_norm: float = opt(100.0, "global gradient-norm clip, 0 = off")
    max_nonfinite: int = opt(10, "stop after this many non-finite losses or gradients in a row, each skipped")
    # Pyro's validation (shape and argument checks) and our input value checks run on the first
    # step of every training process; later steps skip them (each costs host syncs) unless True.
    validate_every_step: bool = opt(False, "run Pyro's validation and the input value checks on every training step",
                                    default_text="on the first step of the run or resume only; they cost host syncs")
    epochs: int = opt(100, "epochs")
    max_steps: int | None = opt(None, "stop after this many optimizer steps in total", default_text="none")
    max_minutes: float | None = opt(None, "stop after this much training time (minutes, evaluation excluded), "
                                    "counted over the whole run, resumes included; for equal-budget comparisons", default_text="none")
    seed: int = opt(0, "seed")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    valid_images: int = opt(0, "hold this many training images out as validation episodes; each epoch's figures "
                            "are then on them, not on the test split")
    eval_episodes: int | None = opt(None, "test episodes evaluated each epoch", default_text="all")
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self):
        self.check_types()
        self.image_shape = tuple(self.image_shape)
        self.memory_shape = tuple(self.memory_shape)
        if self.likelihood is None:
            self.likelihood = DEFAULT_LIKELIHOOD.get(self.data, "bernoulli")
        if self.slots is None:
            self.slots = DEFAULT_SLOTS.get(self.model, 64)
        for name, value in KEY_KL_DEFAULTS.get(self.model, {"key_kl_start": 1.0, "key_kl_hold": 0}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.preset not in PRESET_DEFAULTS:
            raise ValueError(f"preset: expected one of {sorted(PRESET_DEFAULTS)}, got {self.preset!r}")
        for name, value in PRESET_DEFAULTS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.validate()

    def check_types(self) -> None:
        """Each field's value has its annotated type (``int | None``: an integer or None), before
        any value is compared: a config read from a damaged checkpoint (a string ``lr``) is an
        error naming the field, not a failed comparison deep inside ``validate``."""
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), str(f.type).replace(" ", "").split("|")
            if value is None and "None" in allowed:
                continue
            if not any(_has_type(value, kind) for kind in allowed if kind != "None"):
                raise ValueError(f"{f.name}: expected {' or '.join(_TYPE_NAMES.get(k, k) for k in allowed)}, "
                                 f"got {value!r}")

    def validate(self) -> None:
        positive = ["max_nonfinite", "episode_length", "batch_size", "reads", "window", "writer_channels", "slots",
                    "address_size", "dkm_write_iterations", "code_size", "embed_size", "hidden", "epochs"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.kl_warmup, int) or self.kl_warmup < 0:
            raise ValueError(f"kl_warmup: expected a non-negative integer number of steps, got {self.kl_warmup!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps: expected a positive integer or None, got {self.max_steps!r}")
        if self.max_minutes is not None and not 0 < self.max_minutes < math.inf:
            raise ValueError(f"max_minutes: expected a positive number of minutes or None, got {self.max_minutes!r}")
        if self.eval_episodes is not None and self.eval_episodes < 1:
            raise ValueError(f"eval_episodes: expected a positive integer or None, got {self.eval_episodes!r}")
        if self.episode_classes is not None and self.episode_classes < 1:
            raise ValueError(f"episode_classes: expected a positive integer or None, got {self.episode_classes!r}")
        if not (0 < self.lr <= MAX_LR):
            raise ValueError(f"lr: expected a positive learning rate of at most {MAX_LR:g} (Adam moves each weight "
                             f"by up to about lr per step), got {self.lr!r}")
        if self.dkm_write_iterations > MAX_DKM_WRITE_ITERATIONS:
            raise ValueError(f"dkm_write_iterations: expected at most {MAX_DKM_WRITE_ITERATIONS} (DKM.md: 'a few'; "
                             f"each costs a solve per written image), got {self.dkm_write_iterations!r}")
        if not (0 <= self.clip_norm < math.inf):
            raise ValueError(f"clip_norm: expected a finite norm >= 0 (0 disables clipping), got {self.clip_norm!r}")
        if len(self.memory_shape) != 3 or min(self.memory_shape) < 1:
            raise ValueError(f"memory_shape: expected three positive sizes C,H,W, got {self.memory_shape!r}")
        _, mh, mw = self.memory_shape
        if self.window % 4:
            raise ValueError(f"window: expected a multiple of 4 (the prior net halves it twice), got {self.window}")
        if self.window > min(mh, mw):
            raise ValueError(f"window: {self.window} is larger than the memory {mh}x{mw}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: expected one of {sorted(LIKELIHOODS)}, got {self.likelihood!r}")
        if self.key_map not in KEY_MAPS:
            raise ValueError(f"key_map: expected one of {KEY_MAPS}, got {self.key_map!r}")
        if not isinstance(self.kpp_block_res, int) or not 0 <= self.kpp_block_res <= self.window:
            raise ValueError(f"kpp_block_res: expected 0 (the window) or a resolution 1..{self.window}, "
                             f"got {self.kpp_block_res!r}")
        if self.key_map == "uniform" and not (
                0 < self.key_scale_min <= self.key_scale_max <= min(self.memory_shape[1:]) / self.window):
            raise ValueError(f"key_scale_min, key_scale_max: expected 0 < min <= max <= memory / window = "
                             f"{min(self.memory_shape[1:]) / self.window:g}, got {self.key_scale_min!r}, "
                             f"{self.key_scale_max!r}")
        if not 0 <= self.memory_blur <= max(self.memory_shape[1:]):
            raise ValueError(f"memory_blur: expected a number of memory pixels from 0 to {max(self.memory_shape[1:])} "
                             f"(the memory's larger side: a wider blur spreads every cell over the whole memory), "
                             f"got {self.memory_blur!r}")
        if not 0 <= self.key_std_floor < float("inf"):
            raise ValueError(f"key_std_floor: expected a non-negative finite number, got {self.key_std_floor!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        for name in ("compile", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if self.kpp_posterior not in ("x", "read"):
            raise ValueError(f"kpp_posterior: expected 'x' or 'read', got {self.kpp_posterior!r}")
        if self.kpp_write not in KPP_WRITES:
            raise ValueError(f"kpp_write: expected one of {KPP_WRITES}, got {self.kpp_write!r}")
        if self.kpp_write == "solved":
            block = self.reads * self.memory_shape[0] * (self.kpp_block_res or self.window) ** 2
            if self.kpp_posterior != "x":
                raise ValueError("kpp_posterior: the solved write stores the mean of q(z|X), so it needs "
                                 f"--kpp-posterior x, got {self.kpp_posterior!r}")
            if block < self.code_size:
                raise ValueError(f"kpp_block_res: the solved write stores a code of {self.code_size} numbers in "
                                 f"reads x channels x res^2 = {block}; choose a larger --kpp-block-res")
            if self.window % (self.kpp_block_res or self.window):
                raise ValueError(f"kpp_block_res: expected a divisor of the window ({self.window}), "
                                 f"got {self.kpp_block_res}")
        for name in ("key_kl_hold", "key_kl_ramp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative integer number of steps, got {value!r}")
        if not 0 <= self.key_free_nats < float("inf"):
            raise ValueError(f"key_free_nats: expected a non-negative finite number, got {self.key_free_nats!r}")
        if not isinstance(self.valid_images, int) or self.valid_images < 0:
            raise ValueError(f"valid_images: expected a non-negative integer, got {self.valid_images!r}")
        if not 0 < self.kl_weight <= 1:
            raise ValueError(f"kl_weight: expected a weight in (0, 1], got {self.kl_weight!r}")
        if not 0 < self.key_kl_start <= 1:
            raise ValueError(f"key_kl_start: expected a weight in (0, 1], got {self.key_kl_start!r}")
        if self.km_read_write not in KM_READ_WRITE:
            raise ValueError(f"km_read_write: expected one of {KM_READ_WRITE}, got {self.km_read_write!r}")
        if self.elbo not in ELBOS:
            raise ValueError(f"elbo: expected 'trace' or 'meanfield', got {self.elbo!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "held-out":
            if self.model == "vae":
                raise ValueError("objective: 'held-out' scores images on a memory written without them; "
                                 "the VAE has no memory (use --objective paper)")
            check_folds(self.episode_length, self.held_out_folds, "held_out_folds")

    @property
    def training_folds(self) -> int | None:
        """The folds the training loss scores with ``--objective held-out``; None for the paper's bound."""
        return self.held_out_folds if self.objective == "held-out" else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """The config saved in a checkpoint, upgraded by ``MIGRATIONS``; every field must be present."""
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a dict of fields, got a {type(d).__name__}")
        while d.get("version") in MIGRATIONS:
            d = MIGRATIONS[d["version"]](dict(d))
        if d.get("version") != CONFIG_VERSION:
            raise ValueError(
                f"config: this checkpoint's config has version {d.get('version')!r}, "
                f"this pyro_kpp reads version {CONFIG_VERSION}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown} (written by another pyro_kpp version?)")
        missing = sorted(known - set(d))
        if missing:
            raise ValueError(f"config: missing fields {missing}; a version-{CONFIG_VERSION} config must have every "
                             f"field (a damaged checkpoint?)")
        return cls(**d)
