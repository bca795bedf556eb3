"""Run configuration: built-in defaults < YAML file < --set overrides < dedicated flags.

Each section is a frozen dataclass whose defaults are documented where they are declared.
`build_config` merges the layers, checks every key, type and range, and returns a frozen
`Config`; an error names the file or --set it comes from, the key path and, for a typo or a
key put in the wrong section, the key meant.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import struct
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError, shell_path, shown
from .files import read_at_most
from .mnist import C, D

ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "gelu")
INITS = ("he", "xavier")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
DTYPES = ("float32", "float64")
NORMALIZE = ("unit", "standard")
MAX_DEPTH = 100       # hidden layers: a plain MLP deeper than this hardly trains (decisions.md)
MAX_WIDTH = 2 ** 40   # units per hidden layer: 3.5 PB of first-layer weights, beyond any machine
KEY_PARTS = 3         # the most parts a config key has: data.augment.shift
MAX_SIGMA = 28.0      # elastic smoothing, pixels: wider than the image, the field is a plain shift
MAX_ALPHA = 1000.0    # elastic strength, pixels: far beyond any image's content
MAX_CONFIG_BYTES = 2 ** 20  # a config is a few hundred bytes; a larger file is not one


@dataclass(frozen=True)
class ModelConfig:
    hidden: int | tuple[int, ...] = 256  # hidden width, or one width per hidden layer
    activation: str = "relu"             # one of ACTIVATIONS (phi in the seed)
    init: str = "he"                     # he (for relu-like) or xavier (for sigmoid/tanh)
    dropout: float = 0.0                 # inverted-dropout drop probability on hidden layers
    max_norm: float | None = None        # cap on the L2 norm of each unit's incoming weights

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        """The hidden widths as a tuple, whether `hidden` is an int or a list."""
        return (self.hidden,) if isinstance(self.hidden, int) else tuple(self.hidden)

    @property
    def layer_widths(self) -> tuple[int, ...]:
        """(d, h_1, ..., c): MNIST's 784 inputs, the hidden widths, its 10 classes."""
        return (D, *self.hidden_widths, C)


@dataclass(frozen=True)
class AugmentConfig:
    shift: float = 0.0                   # max random translation, pixels
    rotate: float = 0.0                  # max random rotation, degrees
    scale: float = 0.0                   # max relative random scaling (0.1 = +-10%)
    elastic_alpha: float = 0.0           # elastic distortion strength, pixels (0 = off)
    elastic_sigma: float = 6.0           # Gaussian smoothing of the displacement field, pixels


@dataclass(frozen=True)
class DataConfig:
    val_size: int = 0                    # training examples held out for validation
    limit: int | None = None             # use only the first N training examples
    shuffle: bool = True                 # reshuffle the training set every epoch
    normalize: str = "unit"              # unit: x/255 in [0, 1]; standard: (x/255 - mean)/std
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10                     # passes over the training set
    batch_size: int = 128                # m in the seed
    seed: int = 0                        # seeds init, shuffling, dropout and augmentation
    dtype: str = "float32"               # float32, or float64 for exactness checks
    eval_batch_size: int = 10000         # rows per evaluation forward pass
    checkpoint_every: int = 0            # also checkpoint every N steps (0: once per epoch)
    label_smoothing: float = 0.0         # mass spread uniformly over the c classes
    tf32: bool = False                   # allow TF32 matrix products on the GPU


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"                    # sgd, adam or adamw
    lr: float = 0.1                      # peak learning rate
    momentum: float = 0.9                # SGD momentum (0 = plain SGD)
    nesterov: bool = False               # SGD with Nesterov momentum
    weight_decay: float = 0.0            # L2 (sgd, adam) or decoupled (adamw) weight decay
    beta1: float = 0.9                   # Adam first-moment decay
    beta2: float = 0.999                 # Adam second-moment decay
    eps: float = 1e-8                    # Adam denominator guard
    schedule: str = "constant"           # constant, step or cosine
    warmup_epochs: float = 0.0           # linear warm-up from 0 to lr over this many epochs
    step_epochs: float = 10.0            # step schedule: multiply lr by gamma every N epochs
    gamma: float = 0.1                   # step schedule factor
    min_lr: float = 0.0                  # cosine schedule floor


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


SECTIONS = {"model": "hidden", "data": "limit", "train": "epochs", "optim": "lr",
            "data.augment": "shift"}  # each section, and a key of it for examples


def as_float32(value: float) -> float:
    """`value` rounded to float32, as NumPy compares a float32 array with it."""
    return struct.unpack("f", struct.pack("f", value))[0]


# key path -> (check, message); a failed check is a ConfigError naming the key
RANGES: dict[str, tuple[Any, str]] = {
    "model.hidden": (lambda v: v != () and all(1 <= w <= MAX_WIDTH
                                               for w in ((v,) if isinstance(v, int) else v)),
                     f"must be a width from 1 to 2^{MAX_WIDTH.bit_length() - 1} or a non-empty "
                     "list of them"),
    "model.activation": (lambda v: v in ACTIVATIONS, f"must be one of {', '.join(ACTIVATIONS)}"),
    "model.init": (lambda v: v in INITS, f"must be one of {', '.join(INITS)}"),
    "model.dropout": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "model.max_norm": (lambda v: v is None or v > 0, "must be positive or null"),
    "data.val_size": (lambda v: v >= 0, "must be >= 0"),
    "data.limit": (lambda v: v is None or v >= 1, "must be >= 1 or null"),
    "data.normalize": (lambda v: v in NORMALIZE, f"must be one of {', '.join(NORMALIZE)}"),
    "data.augment.shift": (lambda v: 0 <= v <= 14, "must be in [0, 14] pixels"),
    "data.augment.rotate": (lambda v: 0 <= v <= 180, "must be in [0, 180] degrees"),
    "data.augment.scale": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "data.augment.elastic_alpha": (lambda v: 0 <= v <= MAX_ALPHA,
                                   f"must be in [0, {MAX_ALPHA:g}] pixels"),
    "data.augment.elastic_sigma": (lambda v: 0 < v <= MAX_SIGMA,
                                   f"must be in (0, {MAX_SIGMA:g}] pixels"),
    "train.epochs": (lambda v: v >= 1, "must be >= 1"),
    "train.batch_size": (lambda v: v >= 1, "must be >= 1"),
    "train.seed": (lambda v: v >= 0, "must be >= 0"),
    "train.dtype": (lambda v: v in DTYPES, f"must be one of {', '.join(DTYPES)}"),
    "train.eval_batch_size": (lambda v: v >= 1, "must be >= 1"),
    "train.checkpoint_every": (lambda v: v >= 0, "must be >= 0"),
    "train.label_smoothing": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "optim.name": (lambda v: v in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
    "optim.lr": (lambda v: v > 0, "must be > 0"),
    "optim.momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "optim.weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "optim.beta1": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "optim.beta2": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "optim.eps": (lambda v: v > 0, "must be > 0"),
    "optim.schedule": (lambda v: v in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
    "optim.warmup_epochs": (lambda v: v >= 0, "must be >= 0"),
    "optim.step_epochs": (lambda v: v > 0, "must be > 0"),
    "optim.gamma": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "optim.min_lr": (lambda v: v >= 0, "must be >= 0"),
}


class KeyProblem(ConfigError):
    """A ConfigError about the value at one key path; `keys` is that path, a tuple of keys."""

    def __init__(self, keys: tuple, message: str, others: tuple = ()):
        super().__init__(message)
        self.keys = keys
        self.others = others  # other key paths the problem is about (a check of two keys)


def _where(prefix: str) -> str:
    """The section at `prefix` in words: 'data.augment' (quoted) for "data.augment.", or the
    top level."""
    return f"'{prefix.rstrip('.')}'" if prefix else "the top level"


def _key_paths(cls: type = Config, prefix: str = "") -> list[str]:
    """Every key path of `cls`, sections included: model, model.hidden, ..., data.augment.shift."""
    paths = []
    for f in fields(cls):
        paths.append(f"{prefix}{f.name}")
        if dataclasses.is_dataclass(f.default_factory):
            paths += _key_paths(f.default_factory, f"{prefix}{f.name}.")
    return paths


def _elsewhere(prefix: str, key: str) -> list[str]:
    """The key paths outside the section at `prefix` named `key`, or else named closest to it."""
    every = _key_paths()
    paths = [p for p in every if p.rpartition(".")[0] != prefix.rstrip(".")]
    if any(p.rpartition(".")[2] == key for p in paths):
        return [p for p in paths if p.rpartition(".")[2] == key]   # 'model.augment': data.augment
    if prefix:  # a key inside a section is not taken for a section's name ('model.extra')
        paths = [p for p in paths if not any(q.startswith(f"{p}.") for q in every)]
    names = list(dict.fromkeys(p.rpartition(".")[2] for p in paths))
    close = _near(key, names, cutoff=0.75 if prefix else 0.6)  # not 'optim.beta2' for 'extra'
    return [p for p in paths if p.rpartition(".")[2] in close]


def _near(key: str, names: list[str], cutoff: float = 0.6) -> list[str]:
    """The names of `names` that hold `key` or that `key` holds ('warmup': warmup_epochs;
    'elastic': elastic_alpha and elastic_sigma; two at most), or else the closest one."""
    part = [n for n in names if min(len(n), len(key)) >= 4 and (key in n or n in key)]
    return part[:2] or difflib.get_close_matches(key, names, n=1, cutoff=cutoff)


def key_named(name: str) -> str | None:
    """The config key (not a section) that `name` names: a whole key path, a key's last part
    ('epochs': train.epochs), or the start of exactly one key's last part, 4 letters or more
    ('batch': train.batch_size); None for anything else (a guess would be pasted as it is)."""
    every = _key_paths()
    keys = [p for p in every if not any(q.startswith(f"{p}.") for q in every)]
    if name in keys:
        return name
    for match in (lambda last: last == name,
                  lambda last: len(name) >= 4 and last.startswith(name)):
        found = [p for p in keys if match(p.rpartition(".")[2])]
        if found:
            return found[0] if len(found) == 1 else None
    return None


def _unknown_key(prefix: str, key: str, known: list[str], keys: tuple) -> ConfigError:
    where = _where(prefix)
    if not key.strip():
        return KeyProblem(keys, f"empty config key under {where}; "
                                f"known keys there: {', '.join(known)}")
    close = [f"{prefix}{name}" for name in _near(key, known)]
    elsewhere = _elsewhere(prefix, key)
    exact = [p for p in elsewhere if p.rpartition(".")[2] == key]  # the key, in another section
    meant = " or ".join(f"'{p}'" for p in (exact + close[:1] if exact else close or elsewhere))
    hint = (f"; did you mean {meant}?" if meant
            else f"; known keys under {where}: {', '.join(known)}")
    return KeyProblem(keys, f"unknown config key {shown(prefix + key)}{hint}")


def expected_words(path: str, annotation: str) -> str:
    """What a value of `path` (declared `annotation`) must be, in words."""
    if path == "model.hidden":
        return "an integer or a list of integers"
    kinds = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
    words = next((words for kind, words in kinds.items() if annotation.startswith(kind)), None)
    if words is None:
        raise AssertionError(f"no coercion for {annotation}")  # pragma: no cover
    return words


def is_number(text: str) -> bool:
    """Whether `text` reads as a number (not '0.1.2' or '.', which only look like one)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _coerce(path: str, value: Any, annotation: str, keys: tuple) -> Any:
    """Check `value` against the declared type of `path`; ints are accepted for floats."""
    def wrong(expected: str) -> ConfigError:
        quoted = isinstance(value, str) and re.fullmatch(r"\s*[-+]?[0-9.]+([eE][-+]?[0-9]+)?\s*",
                                                         value, re.ASCII) and is_number(value)
        odd_space = isinstance(value, str) and is_number(value) and any(
            ch.isspace() and not ch.isascii() for ch in value)
        if value is not None and "None" in annotation:          # model.max_norm, data.limit
            expected += " or null"
        tip = (" (a number in quotes is text: drop the quotes)" if quoted else
               " (a number beside a non-breaking or other Unicode space, as pasted from a web "
               "page, is text: type the number again)" if odd_space else "")
        got = "null (an empty value, ~ and null all mean none)" if value is None else shown(value)
        return KeyProblem(keys, f"config key '{path}' must be {expected}, got {got}{tip}")

    whole = isinstance(value, int) and not isinstance(value, bool)
    if value is None:
        if "None" in annotation:
            return None
    elif path == "model.hidden":
        if whole:
            return value
        if isinstance(value, (list, tuple)) and all(
                isinstance(w, int) and not isinstance(w, bool) for w in value):
            return value[0] if len(value) == 1 else tuple(value)
    elif annotation.startswith("bool"):
        if isinstance(value, bool):
            return value
    elif annotation.startswith("int"):
        if whole:
            return value
    elif annotation.startswith("float"):
        if whole or isinstance(value, float):
            try:
                number = float(value)
            except OverflowError:                                 # an integer past 1.8e308
                number = math.inf
            if not math.isfinite(number):                         # YAML's .inf and .nan too
                raise wrong("a finite number")
            return number
    elif annotation.startswith("str") and isinstance(value, str):
        return value
    raise wrong(expected_words(path, annotation))


def _is_section(f: dataclasses.Field) -> bool:
    """Whether a config field is a section (model, data.augment, ...), not a key."""
    return (f.default_factory is not dataclasses.MISSING
            and dataclasses.is_dataclass(f.default_factory))


def _check_mapping(values: Any, prefix: str, keys: tuple) -> None:
    if not isinstance(values, Mapping) and not (values is None and prefix):  # None: no keys
        section = f"config section {_where(prefix)}" if prefix else "the top level of a config"
        raise KeyProblem(keys, f"{section} must be a mapping, got {shown(values)}")


def _check_sections(values: Any, cls: type | None = None, prefix: str = "",
                    keys: tuple = ()) -> None:
    """A KeyProblem where one layer of a config (a file, a --set) gives a section as something
    other than a mapping: checked before the layers merge, where a later layer's mapping would
    replace it unseen (a file's `optim: [...]` lost to --set optim.lr=...)."""
    _check_mapping(values, prefix, keys)
    for f in fields(cls or Config):
        if f.name in values and values[f.name] is not None and _is_section(f):
            _check_sections(values[f.name], f.default_factory, f"{prefix}{f.name}.",
                            (*keys, f.name))


def _build(cls: type, values: Mapping[str, Any], prefix: str, keys: tuple = ()) -> Any:
    """Instantiate dataclass `cls` from a mapping, recursing into nested sections; `keys` is
    the path of `values` as a tuple (for KeyProblem), `prefix` as text ("data.augment.")."""
    _check_mapping(values, prefix, keys)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path, at = f"{prefix}{key}", (*keys, key)
        if key not in known:
            raise _unknown_key(prefix, str(key), list(known), at)
        f = known[key]
        if _is_section(f):  # a header with its keys commented out (None): the defaults
            kwargs[key] = _build(f.default_factory, {} if value is None else value,
                                 f"{path}.", at)
        else:
            kwargs[key] = _coerce(path, value, str(f.type), at)
        check = RANGES.get(path)
        if check is not None and not dataclasses.is_dataclass(kwargs[key]) \
                and not check[0](kwargs[key]):
            raise KeyProblem(at, f"config key '{path}' {check[1]}, got {shown(value)}")
    return cls(**kwargs)


def _deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if value is None and isinstance(out.get(key), Mapping):  # an empty section header
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def yaml_reason(error: yaml.YAMLError) -> str:
    """The parser's reason for `error` on one line, e.g. "expected ',' or ']', but got '<stream
    end>'"; "" when it gives none."""
    reason = getattr(error, "problem", None) or getattr(error, "context", None) or ""
    if isinstance(error, yaml.reader.ReaderError):   # a byte or character YAML does not allow
        char = error.character
        what = f"#x{char:04x}" if isinstance(char, int) else repr(char)
        reason = f"character {what}: {error.reason}"
    return " ".join(str(reason).split())


def yaml_where(error: yaml.YAMLError, text: str) -> str:
    """" at line L, column C" of `error` in `text` (1-based), or "" when it says nowhere."""
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return f" at line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(error, yaml.reader.ReaderError):  # a reader error knows its offset only
        at = min(error.position, len(text))
        line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
        return f" at line {line}, column {column}"
    return ""


def parse_override(text: str) -> dict:
    """`optim.lr=0.05` -> {"optim": {"lr": 0.05}}; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {shown(text)}: expected KEY=VALUE, e.g. --set optim.lr=0.05")
    if "" in (part.strip() for part in key.split(".")):
        raise ConfigError(f"--set {shown(text)}: the key {shown(key)} has an empty part (a dot "
                          "too many or too few); write SECTION.KEY=VALUE, e.g. --set optim.lr=0.05")
    parts = len(key.split("."))
    if parts > KEY_PARTS:
        raise ConfigError(f"--set {shown(text)}: the key has {parts} parts, and gpumlp's keys "
                          f"have at most {KEY_PARTS} (data.augment.shift); write "
                          "SECTION.KEY=VALUE, e.g. --set optim.lr=0.05")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except BadKey as e:
        raise ConfigError(f"--set {shown(text)}: in the value, {e}; {e.fix}") from None
    except yaml.YAMLError as e:
        reason = yaml_reason(e)
        raise ConfigError(f"--set {shown(text)}: the value is not valid YAML"
                          f"{f' ({reason})' if reason else ''}") from None
    nested = _nest(key, value)
    for section in empty_sections(nested):  # a file's empty header is its defaults: not a reset
        raise ConfigError(f"--set {shown(text)}: {section} is a section; give one of its keys, "
                          f"e.g. --set {section}.{SECTIONS[section]}=VALUE")
    return nested


def empty_sections(tree: dict, prefix: str = ""):
    """The dotted paths of the sections `tree` gives as nothing (null or {}), at any depth:
    `--set data={augment: {}}` as well as `--set data.augment=`."""
    for name, value in tree.items():
        path = f"{prefix}{name}"
        if path in SECTIONS and value in (None, {}):
            yield path
        elif isinstance(value, dict):
            yield from empty_sections(value, f"{path}.")


class BadKey(yaml.YAMLError):
    """A mapping key gpumlp cannot take; `fix` says what to do."""
    fix = "write the key as a plain name"


class DuplicateKey(BadKey):
    """A key given twice in one YAML mapping (PyYAML would keep the last one silently)."""
    fix = "keep one of them"


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a mapping with a key twice, or a key that is a list or a
    mapping (`? [1, 2]`), is an error, and that 1e-3 is a number (YAML 1.1
    wants a dot and a sign)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":        # `<<: *anchor`, may be overridden
                continue
            line = key_node.start_mark.line + 1
            key = self.construct_object(key_node, deep=True)
            try:
                twice = key in seen
            except TypeError:                                    # a list or a mapping
                raise BadKey(f"a key that is a {type(key).__name__} (line {line})") from None
            if twice:
                raise DuplicateKey(f"key '{key}' appears twice (line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """`text` read by UniqueKeyLoader; what Python itself refuses (an integer of over 4,300
    digits, nesting too deep to recurse) is a YAMLError too, and so is a value that PyYAML's
    constructors fail on (an explicit tag such as !!bool or !!timestamp on a value it does not
    fit, an impossible date)."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except RecursionError:
        problem = "nested too deep"
    except (ValueError, KeyError, IndexError, AttributeError, TypeError, OverflowError) as e:
        problem = ("an integer too long to read" if "limit" in str(e)
                   else "a value that does not fit its !!tag, or a date that does not exist")
    error = yaml.YAMLError()
    error.problem = problem
    raise error


# Numbers as YAML 1.2 (and Python) read them, not as YAML 1.1 (PyYAML): 1e-3 is a float,
# 0100 is a hundred (not octal 64), 0o17 and 0x1f are octal and hex, and 1:30 (base 60) or
# 0b101 are text, which a number key then refuses. Underscores between digits are allowed.
DIGITS = r"[0-9]+(?:_[0-9]+)*"  # an underscore only between two digits: 60_000, not 2_ or 1__0
YAML12_INT = re.compile(rf"^[-+]?{DIGITS}$|^0o[0-7]+(?:_[0-7]+)*$"
                        r"|^0x[0-9a-fA-F]+(?:_[0-9a-fA-F]+)*$")
YAML12_FLOAT = re.compile(rf"^[-+]?(?:{DIGITS}\.(?:{DIGITS})?|\.{DIGITS})(?:[eE][-+]?[0-9]+)?$"
                          rf"|^[-+]?{DIGITS}[eE][-+]?[0-9]+$"
                          r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")


def construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """A YAML 1.2 integer: decimal (leading zeros and all), 0o octal or 0x hex."""
    text = loader.construct_scalar(node).replace("_", "")
    for prefix, base in (("0o", 8), ("0x", 16)):
        if text.startswith(prefix):
            return int(text[2:], base)
    return int(text, 10)


UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:int", YAML12_INT, list("-+0123456789"))
UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", YAML12_FLOAT,
                                      list("-+0123456789."))
UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", construct_int)


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file; a one-line ConfigError when it is missing or broken."""
    if not str(path).strip():  # Path("") would be ".", the current folder
        raise ConfigError("the config file path is empty; give a YAML file, e.g. "
                          "--config configs/h256.yaml, or leave --config out for the defaults")
    path = Path(path)
    try:
        data = read_at_most(path, MAX_CONFIG_BYTES)  # <(...) and /dev/stdin work; /dev/zero ends
        if data is None:
            raise ConfigError(f"config file {path} holds more than a config's "
                              f"{MAX_CONFIG_BYTES:,} bytes; give a YAML config")
        wide = utf_16_or_32(data)
        if wide:  # Windows PowerShell 5's > and Out-File write UTF-16 (its ASCII, NULs between)
            raise ConfigError(f"config file {path} is {wide} text; save it as UTF-8 (in "
                              "PowerShell: Out-File -Encoding utf8)")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples") from None
    except IsADirectoryError:
        example = (shell_path(path / "config.yaml") if (path / "config.yaml").is_file()
                   else "configs/h256.yaml")
        raise ConfigError(f"config file {path} is a folder, not a file; give a YAML file, "
                          f"e.g. {example}") from None
    except UnicodeDecodeError as e:
        if b"\0" in data:  # binary: no text file holds a NUL byte
            raise ConfigError(f"config file {path} is not text, so no YAML config (a model or "
                              "a checkpoint?); give a YAML file, e.g. configs/h256.yaml") from None
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {data[e.start]:#04x} at "
                          f"offset {e.start}); save it as UTF-8") from None
    except OSError as e:
        why = getattr(e, "strerror", None) or e
        raise ConfigError(f"config file {path} cannot be read: {why}") from None
    try:
        data = load_yaml(text)
    except BadKey as e:
        raise ConfigError(f"config file {path}: {e}; {e.fix}") from None
    except yaml.YAMLError as e:
        where, reason = yaml_where(e, text), yaml_reason(e)
        raise ConfigError(f"config file {path} is not valid YAML{where}"
                          f"{f': {reason}' if reason else ''}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NotAMapping(f"config file {path} must hold a mapping of sections "
                          f"(model, data, train, optim), not a {type(data).__name__}", data)
    return data


class NotAMapping(ConfigError):
    """A YAML file that holds something other than a mapping: `kind` says what, in words."""

    def __init__(self, message: str, data: Any):
        super().__init__(message)
        self.kind = {str: "plain text", list: "a list", int: "a number", float: "a number",
                     bool: "true or false", bytes: "binary data"}.get(
                         type(data), f"a {type(data).__name__}")


def utf_16_or_32(data: bytes) -> str | None:
    """"UTF-16" or "UTF-32" where `data` is text in it (by its byte-order mark, or ASCII text's
    NUL bytes: every second, or three in four), else None."""
    if data.startswith((b"\xff\xfe\0\0", b"\0\0\xfe\xff")):
        return "UTF-32"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    head = data[:64]
    for width, name in ((4, "UTF-32"), (2, "UTF-16")):  # ASCII text: one column of bytes
        head = head[:len(head) - len(head) % width]      # holds it, the others are all NUL
        columns = [head[i::width] for i in range(width)]
        if len(head) >= 2 * width and any(
                0 not in columns[text] and not any(b for c in columns[:text] + columns[text + 1:]
                                                   for b in c)
                for text in (0, width - 1)):
            return name
    return None


def build_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = (),
                 check_together: bool = True, **flags: Any) -> Config:
    """Defaults < YAML file at `path` < `--set` overrides < `flags` (dotted keys, None = unset).
    An error in the merge starts with the file's path or the --set that gave the key (the last
    to give one of its keys). `check_together`: also the checks that read two keys (not for a
    saved config a resume's --set may still fix). One override may be given as a string."""
    if isinstance(overrides, str):  # build_config(path, "model.hidden=16")
        overrides = (overrides,)
    layers = [(f"{path}: ", read_yaml(path))] if path is not None else []
    layers += [(f"--set {shown(text)}: ", parse_override(text)) for text in overrides]
    layers += [(f"--{key.rpartition('.')[2]} {shown(value)}: ", _nest(key, value))  # --seed
               for key, value in flags.items() if value is not None]
    values: dict = {}
    for source, layer in layers:
        try:
            _check_sections(layer)
        except KeyProblem as e:
            raise ConfigError(f"{source}{e}") from None
        values = _deep_merge(values, layer)
    try:
        config = config_from_dict(values)
        return checked_together(config) if check_together else config
    except KeyProblem as e:
        source = next((source for source, layer in reversed(layers)
                       if any(_has(layer, keys) for keys in (e.keys, *e.others))), "")
        raise ConfigError(f"{source}{e}") from None


SMALLEST_NORMAL = {"float32": 2.0 ** -126, "float64": 2.0 ** -1022}  # numpy's finfo(...).tiny


def checked_together(config: Config) -> Config:
    """The checks added after models were saved, and those that read two keys: not in
    config_from_dict, so that every model saved before still loads."""
    hidden = config.model.hidden
    if not isinstance(hidden, int) and len(hidden) > MAX_DEPTH:
        raise KeyProblem(("model", "hidden"), f"config key 'model.hidden' lists {len(hidden)} "
                         f"hidden layers; give at most {MAX_DEPTH}")
    widths = config.model.layer_widths
    largest = max(a * b for a, b in zip(widths, widths[1:]))
    if largest > D * MAX_WIDTH:  # past NumPy's array limit (2^63 bytes) from 2^61 up
        raise KeyProblem(("model", "hidden"),
                         f"config key 'model.hidden' ({shown(list(config.model.hidden_widths))}) "
                         f"makes a weight matrix of {largest:.3g} entries, more than the first "
                         f"layer's largest ({D} x 2^{MAX_WIDTH.bit_length() - 1}); give "
                         "smaller widths")
    optim = config.optim
    tiny = SMALLEST_NORMAL[config.train.dtype]
    for key in ("lr", "eps"):
        value = getattr(optim, key)
        if value < tiny:  # 0, or a subnormal that has lost its digits, in the run's arithmetic
            raise KeyProblem(("optim", key),
                             f"config key 'optim.{key}' ({value:g}) is below the smallest normal "
                             f"{config.train.dtype} number ({tiny:.3g}), where train.dtype "
                             f"{config.train.dtype} computes it as 0 or without its digits; "
                             f"give at least {tiny:.3g}", others=(("train", "dtype"),))
    if optim.name == "sgd" and optim.nesterov and optim.momentum == 0:
        raise KeyProblem(("optim", "nesterov"),
                         "config key 'optim.nesterov' is true with optim.momentum 0, where SGD "
                         "has no momentum to look ahead with (PyTorch refuses it too); set "
                         "optim.nesterov=false (plain SGD), or a momentum, e.g. "
                         "optim.momentum=0.9", others=(("optim", "momentum"),))
    if config.train.dtype == "float32" and as_float32(config.model.dropout) == 1:
        raise KeyProblem(("model", "dropout"),   # the masks compare float32 draws with it
                         f"config key 'model.dropout' ({config.model.dropout!r}) is 1 in "
                         "train.dtype float32, which drops every unit on every step; give a "
                         "lower rate", others=(("train", "dtype"),))
    decay = optim.lr * optim.weight_decay  # the share of each weight one step's decay takes
    if optim.name in ("sgd", "adamw") and decay >= 1:
        raise KeyProblem(("optim", "weight_decay"),
                         f"config key 'optim.weight_decay' ({optim.weight_decay:g}) times "
                         f"optim.lr ({optim.lr:g}) is {decay:g}: each step's decay alone would "
                         "take the whole weight or more, and the net trains to chance or blows "
                         f"up; give optim.weight_decay well below {1 / optim.lr:g} (1/optim.lr), "
                         "e.g. optim.weight_decay=5e-4", others=(("optim", "lr"),))
    if optim.schedule == "cosine" and optim.min_lr > optim.lr:
        raise KeyProblem(("optim", "min_lr"),
                         f"config key 'optim.min_lr' ({optim.min_lr:g}) is above optim.lr "
                         f"({optim.lr:g}): as the cosine schedule's floor it would raise the "
                         "rate; set it at most optim.lr, e.g. optim.min_lr=0",
                         others=(("optim", "lr"), ("optim", "schedule")))
    return config


def _has(values: Any, keys: tuple) -> bool:
    """Whether nested mapping `values` holds the key path `keys`."""
    for key in keys:
        if not isinstance(values, Mapping) or key not in values:
            return False
        values = values[key]
    return True


def _nest(key: str, value: Any) -> dict:
    """`("optim.lr", 0.05)` -> {"optim": {"lr": 0.05}}."""
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """Validate a nested mapping (as saved in config.yaml) into a frozen Config."""
    return _build(Config, values, "")


def config_to_dict(config: Config) -> dict:
    """A plain nested dict (lists, not tuples) for YAML and JSON."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(config))


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
