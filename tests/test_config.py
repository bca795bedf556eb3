"""Config: defaults < YAML file < --set < flags, frozen dataclasses, one clear error per mistake."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gpumlp.config import (Config, build_config, config_from_dict, config_to_dict, dump_config,
                           load_yaml, parse_override, read_yaml)
from gpumlp.errors import ConfigError, shown

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_are_the_design_keys():
    c = build_config()
    assert (c.model.hidden, c.model.activation, c.model.init) == (256, "relu", "he")
    assert (c.data.val_size, c.data.limit, c.data.shuffle) == (0, None, True)
    assert (c.train.epochs, c.train.batch_size, c.train.seed, c.train.dtype) == (10, 128, 0, "float32")
    assert (c.optim.name, c.optim.lr, c.optim.momentum, c.optim.nesterov, c.optim.weight_decay,
            c.optim.schedule) == ("sgd", 0.1, 0.9, False, 0.0, "constant")


def test_config_is_frozen():
    c = build_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.optim.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("name", ["h256.yaml", "smoke.yaml"])
def test_shipped_configs_load_and_round_trip(name):
    c = build_config(CONFIGS / name)
    assert isinstance(c, Config)
    assert config_from_dict(config_to_dict(c)) == c


def test_round_trip_through_yaml_text(tmp_path):
    c = build_config(overrides=["model.hidden=[32, 16]", "optim.name=adamw", "data.limit=100"])
    assert c.model.hidden == (32, 16) and c.model.hidden_widths == (32, 16)
    assert build_config(write(tmp_path, dump_config(c))) == c


def test_precedence_defaults_file_set_flag(tmp_path):
    path = write(tmp_path, "optim: {lr: 0.2, momentum: 0.5}\ntrain: {seed: 1, epochs: 3}\n")
    from_file = build_config(path)
    assert (from_file.optim.lr, from_file.optim.momentum, from_file.train.seed) == (0.2, 0.5, 1)
    assert from_file.optim.name == "sgd"  # untouched keys keep their defaults
    with_set = build_config(path, ["optim.lr=0.3", "train.seed=2"])
    assert (with_set.optim.lr, with_set.optim.momentum, with_set.train.seed) == (0.3, 0.5, 2)
    with_flag = build_config(path, ["optim.lr=0.3", "train.seed=2"], **{"train.seed": 3})
    assert with_flag.train.seed == 3 and with_flag.optim.lr == 0.3 and with_flag.train.epochs == 3
    unset_flag = build_config(path, ["train.seed=2"], **{"train.seed": None})
    assert unset_flag.train.seed == 2
    later_set_wins = build_config(None, ["optim.lr=0.3", "optim.lr=0.4"])
    assert later_set_wins.optim.lr == 0.4


def test_an_error_in_the_file_names_the_file(tmp_path):
    path = write(tmp_path, "model: {activaton: relu}\n")
    expected = "unknown config key 'model.activaton'; did you mean 'model.activation'?"
    assert error_of(build_config, path) == f"{path}: {expected}"
    assert error_of(build_config, path, ["model.activation=gelu"]) == f"{path}: {expected}"
    path = write(tmp_path, "optim: {lr: fast}\n")
    expected = f"{path}: config key 'optim.lr' must be a number, got 'fast'"
    assert error_of(build_config, path, ["optim.momentum=0.5", "train.seed=2"]) == expected
    run = tmp_path / "run"                     # a run's config.yaml, as --resume reads it
    run.mkdir()
    path = write(run, "train: {epochs: 0}\n", "config.yaml")
    assert error_of(build_config, path, ["optim.lr=0.2"]) == (
        f"{path}: config key 'train.epochs' must be >= 1, got 0")


def test_an_error_from_a_set_names_that_set(tmp_path):
    expected = "unknown config key 'model.activaton'; did you mean 'model.activation'?"
    message = error_of(build_config, None, ["model.activaton=relu"])
    assert message == f"--set 'model.activaton=relu': {expected}"
    path = write(tmp_path, "optim: {lr: 0.2}\ntrain: {epochs: 2}\n")
    message = error_of(build_config, path, ["optim.lr=0.3", "optim.momentum=2", "train.seed=1"])
    assert message == ("--set 'optim.momentum=2': config key 'optim.momentum' must be in [0, 1), "
                       "got 2")
    message = error_of(build_config, path, ["optim={lr: 0}"])       # a whole section replaced
    assert message == "--set 'optim={lr: 0}': config key 'optim.lr' must be > 0, got 0"
    message = error_of(build_config, path, ["optim=0.1"])
    assert message == "--set 'optim=0.1': config section 'optim' must be a mapping, got 0.1"
    message = error_of(build_config, path, ["optim.lr=-1", "optim.lr=-2"])   # the last one given
    assert message == "--set 'optim.lr=-2': config key 'optim.lr' must be > 0, got -2"


def test_a_set_may_still_mend_a_file_value_and_errors_past_it_are_its_own(tmp_path):
    path = write(tmp_path, "optim: {lr: fast}\n")
    assert build_config(path, ["optim.lr=0.2"]).optim.lr == 0.2
    message = error_of(build_config, path, ["optim.lr=0.2", "model.activaton=relu"])
    assert message.startswith("--set 'model.activaton=relu': unknown config key 'model.activaton'")


@pytest.mark.parametrize("text, section, got, key", [
    ("optim:\n  - name: adam\n  - lr: 0.001\n", "optim", "[{...}, {...}]", "optim.lr=0.1"),
    ("model: garbage\n", "model", "'garbage'", "model.hidden=8"),
    ("data: {augment: 2}\n", "data.augment", "2", "data.augment.shift=1")])
def test_a_file_section_that_is_not_a_mapping_is_refused_even_under_a_set_of_its_keys(
        tmp_path, text, section, got, key):
    """A later layer's mapping would replace it in the merge: the file's section (adam, lr
    0.001) was lost without a word and the run trained on the defaults."""
    path = write(tmp_path, text)
    assert error_of(build_config, path, [key]) == (
        f"{path}: config section '{section}' must be a mapping, got {got}")


def test_an_error_from_a_flag_names_the_flag(tmp_path):
    path = write(tmp_path, "train: {seed: 1}\n")
    message = error_of(build_config, path, ["train.seed=2"], **{"train.seed": -1})
    assert message == "--seed -1: config key 'train.seed' must be >= 0, got -1"


def test_set_values_are_parsed_as_yaml():
    assert parse_override("optim.lr=0.05") == {"optim": {"lr": 0.05}}
    assert parse_override("model.hidden=[512, 256]") == {"model": {"hidden": [512, 256]}}
    assert parse_override("data.shuffle=false") == {"data": {"shuffle": False}}
    assert parse_override("data.limit=null") == {"data": {"limit": None}}
    assert parse_override(" model.activation = gelu") == {"model": {"activation": "gelu"}}
    assert parse_override("data.augment.shift=2") == {"data": {"augment": {"shift": 2}}}


@pytest.mark.parametrize("text", ["optim.lr", "=0.1", "  =3"])
def test_set_without_key_value_is_an_error(text):
    assert "KEY=VALUE" in error_of(parse_override, text)


def test_set_with_broken_yaml_value_is_an_error_with_the_parsers_reason():
    message = error_of(parse_override, "model.hidden=[1, 2")
    assert message == ("--set 'model.hidden=[1, 2': the value is not valid YAML (expected ',' or "
                       "']', but got '<stream end>')")


def test_set_value_with_a_key_twice_is_an_error():
    message = error_of(parse_override, "optim={lr: 1, lr: 2}")
    assert "--set 'optim={lr: 1, lr: 2}'" in message and "key 'lr' appears twice" in message


@pytest.mark.parametrize("text, key", [("optim..lr=3", "optim..lr"), (".lr=3", ".lr"),
                                       ("optim.=3", "optim."), ("data..augment.shift=1",
                                                                "data..augment.shift")])
def test_an_empty_part_of_a_set_key_is_its_own_error(text, key):
    message = error_of(build_config, None, [text])
    assert message.startswith(f"--set {text!r}: the key {key!r} has an empty part")
    assert "unknown config key" not in message and "e.g. --set optim.lr=0.05" in message


@pytest.mark.parametrize("values, section", [({"optim": {"": 1}}, "'optim'"),
                                            ({"": 1}, "the top level")])
def test_an_empty_key_in_a_file_is_named_as_empty(values, section):
    message = error_of(config_from_dict, values)
    assert message.startswith(f"empty config key under {section}; known keys there: ")


@pytest.mark.parametrize("values, key, hint", [
    ({"optim": {"lrr": 0.1}}, "optim.lrr", "did you mean 'optim.lr'"),
    ({"optimizer": {"lr": 0.1}}, "optimizer", "did you mean 'optim'"),
    ({"model": {"activaton": "relu"}}, "model.activaton", "did you mean 'model.activation'"),
    ({"train": {"zzz": 1}}, "train.zzz", "known keys under 'train': epochs, batch_size"),
    ({"data": {"augment": {"zzz": 1}}}, "data.augment.zzz",
     "known keys under 'data.augment': shift, rotate"),
    ({"zzz": 1}, "zzz", "known keys under the top level: model, data, train, optim"),
])
def test_unknown_key_names_the_path_and_suggests(values, key, hint):
    message = error_of(config_from_dict, values)
    assert f"unknown config key '{key}'" in message and hint in message


@pytest.mark.parametrize("override, message", [
    ("seed=3", "unknown config key 'seed'; did you mean 'train.seed'?"),
    ("train.lr=0.1", "unknown config key 'train.lr'; did you mean 'optim.lr'?"),
    ("model.augment.shift=1", "unknown config key 'model.augment'; did you mean 'data.augment'?"),
    ("data.shift=1", "unknown config key 'data.shift'; did you mean 'data.augment.shift'?"),
    ("augment.rotate=1", "unknown config key 'augment'; did you mean 'data.augment'?"),
    ("optim.sed=1", "unknown config key 'optim.sed'; did you mean 'train.seed'?"),  # close match
    ("hiden=3", "unknown config key 'hiden'; did you mean 'model.hidden'?"),
    ("train.epocs=3", "unknown config key 'train.epocs'; did you mean 'train.epochs'?"),
    ("model.batch_sze=1", "unknown config key 'model.batch_sze'; did you mean "
                          "'train.batch_size'?"),
    # no section's name ('train') and nothing far ('optim.beta2') for a key inside a section:
    ("model.extra=1", "unknown config key 'model.extra'; known keys under 'model': hidden, "
                      "activation, init, dropout, max_norm"),
    # a part of a name: 'warmup' is in warmup_epochs, 'sigma' in elastic_sigma
    ("train.warmup=1", "unknown config key 'train.warmup'; did you mean 'optim.warmup_epochs'?"),
    ("data.augment.sigma=1", "unknown config key 'data.augment.sigma'; did you mean "
                             "'data.augment.elastic_sigma'?"),
    ("augmentation=1", "unknown config key 'augmentation'; did you mean 'data.augment'?"),
])
def test_a_key_in_the_wrong_section_suggests_the_section_it_is_in(override, message):
    assert error_of(build_config, None, [override]) == f"--set {override!r}: {message}"


def test_the_same_key_in_another_section_comes_first_then_a_close_one_in_this_section():
    # 'eps' is optim's, and train's 'epochs' is close to it: both are offered, the exact first
    message = error_of(config_from_dict, {"train": {"eps": 1}})
    assert message == "unknown config key 'train.eps'; did you mean 'optim.eps' or 'train.epochs'?"
    message = error_of(config_from_dict, {"optim": {"epochs": 1}})
    assert message == ("unknown config key 'optim.epochs'; did you mean 'train.epochs' or "
                       "'optim.warmup_epochs'?")
    message = error_of(config_from_dict, {"model": {"limit": 1}})
    assert message == "unknown config key 'model.limit'; did you mean 'data.limit' or 'model.init'?"
    # with no exact key elsewhere, a close key in the section wins over a close one elsewhere:
    # 'epocs' is closer to train's 'epochs' than to optim's 'eps', yet under optim it is 'eps'
    message = error_of(config_from_dict, {"optim": {"epocs": 1}})
    assert message == "unknown config key 'optim.epocs'; did you mean 'optim.eps'?"


def test_the_top_level_is_named_in_words():
    assert error_of(config_from_dict, 3) == "the top level of a config must be a mapping, got 3"
    assert error_of(config_from_dict, {"data": 5}) == ("config section 'data' must be a "
                                                       "mapping, got 5")


@pytest.mark.parametrize("override, key, expected", [
    ("train.epochs=ten", "train.epochs", "an integer"),
    ("train.epochs=2.5", "train.epochs", "an integer"),
    ("train.epochs=true", "train.epochs", "an integer"),
    ("optim.lr=fast", "optim.lr", "a number"),
    ("optim.lr=true", "optim.lr", "a number"),
    ("optim.nesterov=1", "optim.nesterov", "true or false"),
    ("model.activation=3", "model.activation", "a string"),
    ("model.hidden=[64, big]", "model.hidden", "a list of integers"),
    ("model.hidden=64.0", "model.hidden", "an integer"),
    ("train.epochs=", "train.epochs", "must be an integer, got null (an empty value, ~ and null "
                                      "all mean none)"),
    ("model.hidden=null", "model.hidden", "must be an integer or a list of integers, got null"),
    ("optim.name=~", "optim.name", "must be a string, got null"),
    ("optim=0.1", "optim", "must be a mapping"),
    ("optim.lr=.inf", "optim.lr", "a finite number"),
    ("optim.lr=-.inf", "optim.lr", "a finite number"),
    ("model.dropout=.nan", "model.dropout", "a finite number"),
    ("optim.weight_decay=1e999", "optim.weight_decay", "a finite number"),
    ("optim.lr=1" + "0" * 400, "optim.lr", "a finite number"),     # an int float() refuses
])
def test_wrong_type_names_the_key(override, key, expected):
    message = error_of(build_config, None, [override])
    assert f"'{key}'" in message and expected in message


@pytest.mark.parametrize("override, expected", [
    ("model.max_norm=none", "config key 'model.max_norm' must be a number or null, got 'none'"),
    ("model.max_norm=.inf", "config key 'model.max_norm' must be a finite number or null, got inf"),
    ("data.limit=all", "config key 'data.limit' must be an integer or null, got 'all'"),
    ("optim.lr=none", "config key 'optim.lr' must be a number, got 'none'"),
])
def test_a_key_that_may_be_null_says_so_in_a_type_error(override, expected):
    assert error_of(build_config, None, [override]) == f"--set {override!r}: {expected}"


@pytest.mark.parametrize("override, key", [
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.momentum=1.0", "optim.momentum"),
    ("model.hidden=0", "model.hidden"),
    ("model.hidden=[]", "model.hidden"),
    ("model.hidden=[64, 0]", "model.hidden"),
    ("model.activation=swish", "model.activation"),
    ("model.dropout=1", "model.dropout"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.dtype=float16", "train.dtype"),
    ("data.limit=0", "data.limit"),
    ("data.val_size=-1", "data.val_size"),
    ("optim.name=rmsprop", "optim.name"),
    ("optim.schedule=linear", "optim.schedule"),
    ("optim.gamma=0", "optim.gamma"),
    ("train.label_smoothing=1", "train.label_smoothing"),
    ("train.epochs=0", "train.epochs"),
    ("model.hidden=1099511627777", "model.hidden"),          # 2^40 + 1
    ("model.hidden=[64, 9223372036854775808]", "model.hidden"),  # beyond NumPy's shapes
    ("data.augment.elastic_sigma=28.5", "data.augment.elastic_sigma"),
    ("data.augment.elastic_sigma=1e300", "data.augment.elastic_sigma"),
    ("data.augment.elastic_alpha=1001", "data.augment.elastic_alpha"),
])
def test_out_of_range_names_the_key(override, key):
    message = error_of(build_config, None, [override])
    assert message.startswith(f"--set {override!r}: config key '{key}' ")


def test_the_largest_widths_and_elastic_settings_in_range_are_taken():
    c = build_config(None, ["model.hidden=[1099511627776, 1]", "data.augment.elastic_sigma=28",
                            "data.augment.elastic_alpha=1000"])
    assert c.model.hidden_widths == (2 ** 40, 1)
    assert (c.data.augment.elastic_sigma, c.data.augment.elastic_alpha) == (28.0, 1000.0)


@pytest.mark.parametrize("text, value", [("1e-3", 0.001), ("2E+5", 2e5), ("-1e2", -100.0),
                                         ("1_0e1", 100.0), ("0.5", 0.5), (".5e1", 5.0),
                                         ("1.5e3", 1500.0), ("1.e-2", 0.01)])
def test_numbers_with_an_exponent_and_no_dot_are_numbers(tmp_path, text, value):
    # YAML 1.1 (PyYAML) reads 1e-3 as the string '1e-3'; gpumlp reads it as Python does
    assert read_yaml(write(tmp_path, f"optim:\n  lr: {text}\n"))["optim"]["lr"] == value
    assert parse_override(f"optim.lr={text}") == {"optim": {"lr": value}}


@pytest.mark.parametrize("text, value", [("0100", 100), ("08", 8), ("0o17", 15), ("0x1f", 31),
                                         ("1_000", 1000), ("-7", -7), ("007.5", 7.5)])
def test_integers_read_as_yaml_1_2_and_python_read_them_not_as_yaml_1_1(tmp_path, text, value):
    """PyYAML (YAML 1.1) reads 0100 as octal 64 and 1:30 as 90, silently; gpumlp as YAML 1.2:
    leading zeros are decimal, octal needs 0o."""
    assert read_yaml(write(tmp_path, f"data:\n  limit: {text}\n"))["data"]["limit"] == value
    assert parse_override(f"data.limit={text}") == {"data": {"limit": value}}


@pytest.mark.parametrize("text", ["2_", "_2", "1__000", "1_.5", "1._5", "0x_1f", "0o17_"])
def test_an_underscore_not_between_two_digits_is_no_number(text):
    """'2_' was read as 2: only 60_000's underscores, between digits, are a number's."""
    with pytest.raises(ConfigError, match=f"'data.limit' must be an integer or null, got "
                                          f"'{text}'$"):
        build_config(None, [f"data.limit={text}"])
    assert load_yaml(f"x: {text}\n") == {"x": text}


@pytest.mark.parametrize("text, value", [("60_000", 60000), ("1_0.2_5", 10.25), ("0x1_f", 31),
                                         ("1_0e2", 1000.0)])
def test_underscores_between_digits_are_a_numbers(text, value):
    assert load_yaml(f"x: {text}\n") == {"x": value}


@pytest.mark.parametrize("text", ["1:30", "1:30.5", "0b101"])
def test_base_60_and_binary_numbers_are_text_refused_by_a_number_key(text):
    with pytest.raises(ConfigError, match=f"'train.epochs' must be an integer, got '{text}'"):
        build_config(None, [f"train.epochs={text}"])


@pytest.mark.parametrize("text", ['"1e-3"', "'0.5'", '"5"'])
def test_a_quoted_number_is_text_and_the_error_says_drop_the_quotes(text):
    override = f"optim.lr={text}"
    message = error_of(build_config, None, [override])
    assert message.startswith(f"--set {override!r}: config key 'optim.lr' must be a number, got '")
    assert message.endswith("(a number in quotes is text: drop the quotes)")


@pytest.mark.parametrize("text", ["0.1.2", ".", "1..2", "1.2.3e4"])
def test_text_that_only_looks_like_a_number_gets_no_drop_the_quotes_tip(text):
    """It has no quotes to drop: the value itself is wrong."""
    message = error_of(build_config, None, [f"optim.lr={text}"])
    assert message.endswith(f"config key 'optim.lr' must be a number, got '{text}'")


def test_a_key_that_is_a_list_is_one_error_line(tmp_path):
    message = error_of(read_yaml, write(tmp_path, "? [1, 2]\n: 3\n"))
    assert message.endswith("a key that is a list (line 1); write the key as a plain name")
    message = error_of(parse_override, "model={[1]: 2}")
    assert message.endswith("in the value, a key that is a list (line 1); write the key as a "
                            "plain name")


def test_a_value_too_long_or_too_deep_for_python_is_invalid_yaml(tmp_path):
    message = error_of(read_yaml, write(tmp_path, "train:\n  epochs: " + "1" * 5000 + "\n"))
    assert message.endswith("is not valid YAML: an integer too long to read")
    message = error_of(read_yaml, write(tmp_path, "train: " + "[" * 50000 + "]" * 50000))
    assert message.endswith("is not valid YAML: nested too deep")
    message = error_of(parse_override, "train.epochs=" + "1" * 5000)
    assert len(message) < 200 and message.endswith("(an integer too long to read)")


@pytest.mark.parametrize("value", ["!!bool maybe", "!!float", "!!float abc", "!!timestamp x",
                                   "!!int 1e400", "2024-02-30", "!!set [1]"])
def test_a_value_that_does_not_fit_its_tag_is_invalid_yaml(tmp_path, value):
    """PyYAML's constructors raise KeyError, IndexError, AttributeError or ValueError on these;
    each is one line, from --set and from a file alike."""
    unfit = "a value that does not fit its !!tag, or a date that does not exist"
    message = error_of(read_yaml, write(tmp_path, f"optim:\n  lr: {value}\n"))
    assert message.endswith(f"is not valid YAML: {unfit}")
    assert error_of(parse_override, f"optim.lr={value}").endswith(f"({unfit})")


def test_a_config_from_a_pipe_is_read_as_from_a_file(tmp_path):
    import os
    import threading
    pipe = tmp_path / "pipe.yaml"          # as `--config <(...)` or /dev/stdin give it
    os.mkfifo(pipe)
    writer = threading.Thread(target=pipe.write_text, args=("train: {epochs: 3}\n",))
    writer.start()
    assert read_yaml(pipe) == {"train": {"epochs": 3}}
    writer.join()


def test_a_config_over_a_mebibyte_is_refused_after_reading_that_much(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * 2 ** 20 + "\n")
    expected = "holds more than a config's 1,048,576 bytes; give a YAML config"
    assert error_of(read_yaml, path) == f"config file {path} {expected}"
    assert error_of(read_yaml, "/dev/zero") == f"config file /dev/zero {expected}"  # endless
    path.write_text("train: {epochs: 2}\n" + "#" * (2 ** 20 - 19))     # exactly the limit
    assert path.stat().st_size == 2 ** 20 and read_yaml(path)["train"]["epochs"] == 2
    link = tmp_path / "link.yaml"
    link.symlink_to(CONFIGS / "smoke.yaml")  # a link to a config is a config
    assert read_yaml(link)["train"]["epochs"] == 2


def test_a_huge_value_is_shown_cut_short(tmp_path):
    # eight anchors of ten make a list of 10^8 items in 300 bytes of YAML
    lines = ["model:", "  hidden:", "  - &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for name, previous in zip("bcdefgh", "abcdefg"):
        lines.append(f"  - &{name} [{', '.join([f'*{previous}'] * 10)}]")
    path = write(tmp_path, "\n".join(lines) + "\n")
    message = error_of(build_config, path)
    assert message.startswith(f"{path}: config key 'model.hidden' must be an integer or a list of")
    assert len(message) - len(str(path)) < 200
    message = error_of(build_config, None, ["model.activation=" + "x" * 10000])
    assert len(message) < 250                # the --set and the value, each cut short


@pytest.mark.parametrize("value, limit", [("x" * 50, 60), ("x" * 58, 60), ("x" * 59, 60),
                                          ("x" * 80, 60), (list(range(40)), 12),
                                          ({f"k{i}": i for i in range(30)}, 20), (10 ** 70, 60)])
def test_a_shown_value_is_whole_when_it_fits_the_limit_and_cut_to_exactly_the_limit_if_not(
        value, limit):
    from gpumlp.errors import shown

    whole = shown(value, 10 ** 6)
    text = shown(value, limit)
    if len(whole) <= limit:
        assert text == whole
    else:
        assert len(text) == limit and text.endswith("...") and whole.startswith(text[:-3])
    if isinstance(value, str):
        assert whole == ascii(value)


def test_a_shown_string_is_ascii_whatever_it_holds():
    from gpumlp.errors import shown

    text = shown("caf\u00e9 \u20ac \u6587")
    assert text.isascii() and text.startswith("'caf")


def test_ints_are_accepted_for_floats_and_lists_for_hidden():
    c = build_config(None, ["optim.lr=1", "model.hidden=[64]"])
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.model.hidden == 64 and c.model.hidden_widths == (64,)


def test_missing_file(tmp_path):
    message = error_of(build_config, tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "does not exist" in message


@pytest.mark.parametrize("text, key, line", [
    ("optim: {lr: 0.1}\ntrain: {epochs: 2}\noptim: {lr: 0.2}\n", "optim", 3),
    ("optim:\n  lr: 0.1\n  momentum: 0.5\n  lr: 0.3\n", "lr", 4),
])
def test_a_key_given_twice_is_an_error_not_the_last_one_silently(tmp_path, text, key, line):
    message = error_of(build_config, write(tmp_path, text))
    assert f"key '{key}' appears twice (line {line})" in message


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    config = build_config(write(tmp_path, "optim:\n  <<: {lr: 1, momentum: 0.5}\n  lr: 0.2\n"))
    assert (config.optim.lr, config.optim.momentum) == (0.2, 0.5)


@pytest.mark.parametrize("text, where", [
    ("model:\n\thidden: 3\n",
     "at line 2, column 1: found character '\\t' that cannot start any token"),
    ("model: {hidden: 3\n", "at line 2, column 1: expected ',' or '}', but got '<stream end>'"),
])
def test_malformed_yaml_says_where_and_why(tmp_path, text, where):
    path = write(tmp_path, text)
    assert error_of(build_config, path) == f"config file {path} is not valid YAML {where}"


def test_an_unknown_key_with_a_line_break_stays_on_one_line():
    assert error_of(build_config, None, ["mo\ndel.hidden=3"]) == (
        "--set 'mo\\ndel.hidden=3': unknown config key 'mo\\ndel'; did you mean 'model'?")


def test_a_character_yaml_does_not_allow_is_named_with_its_place(tmp_path):
    path = write(tmp_path, "model:\n  hidden: 32\x01\n")
    assert error_of(build_config, path) == (
        f"config file {path} is not valid YAML at line 2, column 13: character #x0001: special "
        "characters are not allowed")
    assert error_of(parse_override, "optim.lr=0.1\x01") == (
        "--set 'optim.lr=0.1\\x01': the value is not valid YAML (character #x0001: special "
        "characters are not allowed)")


def test_a_cosine_floor_check_blames_the_last_source_and_can_be_left_for_a_saved_config(
        tmp_path):
    path = write(tmp_path, "optim: {schedule: cosine, lr: 0.5, min_lr: 0.1}\n")
    message = error_of(build_config, path, ["optim.lr=0.05"])
    assert message.startswith("--set 'optim.lr=0.05': config key 'optim.min_lr' (0.1) is above")
    assert build_config(path, ["optim.lr=0.05", "optim.min_lr=0"]).optim.min_lr == 0
    saved = write(tmp_path, "optim: {schedule: cosine, lr: 0.05, min_lr: 0.1}\n", "old.yaml")
    assert build_config(saved, check_together=False).optim.min_lr == 0.1   # a resume's --set
    assert error_of(build_config, saved).startswith(f"{saved}: config key 'optim.min_lr'")


def test_a_cosine_floor_above_the_rate_is_refused_and_other_schedules_ignore_it():
    message = error_of(build_config, None, ["optim.schedule=cosine", "optim.lr=0.01",
                                            "optim.min_lr=5"])
    assert message == ("--set 'optim.min_lr=5': config key 'optim.min_lr' (5) is above optim.lr "
                       "(0.01): as the cosine schedule's floor it would raise the rate; set it at "
                       "most optim.lr, e.g. optim.min_lr=0")
    assert build_config(None, ["optim.schedule=cosine", "optim.lr=0.01",
                               "optim.min_lr=0.01"]).optim.min_lr == 0.01
    assert build_config(None, ["optim.schedule=constant", "optim.min_lr=5"]).optim.min_lr == 5


def test_nesterov_without_momentum_is_refused_and_adam_ignores_it():
    message = error_of(build_config, None, ["optim.nesterov=true", "optim.momentum=0"])
    assert message == ("--set 'optim.momentum=0': config key 'optim.nesterov' is true with "
                       "optim.momentum 0, where SGD has no momentum to look ahead with (PyTorch "
                       "refuses it too); set optim.nesterov=false (plain SGD), "
                       "or a momentum, e.g. optim.momentum=0.9")
    assert build_config(None, ["optim.nesterov=true", "optim.momentum=0.5"]).optim.nesterov
    assert build_config(None, ["optim.nesterov=false", "optim.momentum=0"]).optim.momentum == 0
    assert build_config(None, ["optim.name=adam", "optim.nesterov=true",
                               "optim.momentum=0"]).optim.name == "adam"   # unused: left alone


@pytest.mark.parametrize("hidden", ["[1, 2097152, 1099511627776]", "[4, 1099511627776, 2048]"])
def test_adjacent_widths_past_numpys_array_limit_are_refused_in_one_line(hidden):
    """Each width is at most 2^40, but two adjacent ones could make a matrix past NumPy's
    limit: a traceback ('array is too big') where the first layer's is the memory line."""
    message = error_of(build_config, None, [f"model.hidden={hidden}"])
    assert "makes a weight matrix of" in message and message.endswith(
        "more than the first layer's largest (784 x 2^40); give smaller widths")
    assert build_config(None, ["model.hidden=[1, 1099511627776]"]).model.hidden[1] == 2 ** 40
    assert build_config(None, ["model.hidden=[784, 1099511627776]"]).model.hidden[0] == 784
    assert "makes a weight matrix of" in error_of(build_config, None,   # just past 784 x 2^40
                                                  ["model.hidden=[785, 1099511627776]"])


def test_a_section_header_with_its_keys_commented_out_is_the_sections_defaults(tmp_path):
    """'data:' with every key below it commented out was 'must be a mapping, got None'."""
    path = write(tmp_path, "model:\n  hidden: 64\ndata:\n  # limit: 5000\ntrain:\n  epochs: 1\n")
    config = build_config(path, ["optim.lr=0.5"])
    assert config.data == build_config().data and config.model.hidden == 64
    assert build_config(path, ["data.limit=500"]).data.limit == 500     # a --set fills it
    for text in ("data=", "data=null", "optim=~", "data.augment=", "data={}"):  # no reset
        section = text.split("=")[0]
        assert error_of(build_config, path, ["optim.lr=0.5", text]).startswith(
            f"--set {shown(text)}: {section} is a section; give one of its keys, e.g. --set "
            f"{section}.")
    for text in ("data={augment: {}}", "data={augment: }", "data={limit: 500, augment: null}"):
        assert error_of(build_config, path, [text]) == (   # one level down: the same no-op
            f"--set {shown(text)}: data.augment is a section; give one of its keys, e.g. --set "
            "data.augment.shift=VALUE")
    assert build_config(path, ["data={limit: 500}"]).data.limit == 500


@pytest.mark.parametrize("value", [False, 0, "", []])
def test_a_saved_config_with_a_section_that_is_no_mapping_is_refused_not_its_defaults(value):
    """A model.npz's config goes to config_from_dict with no YAML layer before it: only a None
    section is the defaults (an empty header); false, 0, '' or [] are damage, refused."""
    from gpumlp.config import KeyProblem
    with pytest.raises(KeyProblem, match="config section 'data' must be a mapping"):
        config_from_dict({"data": value})
    assert config_from_dict({"data": None}).data == Config().data


def test_a_number_beside_a_unicode_space_is_not_said_to_be_in_quotes(tmp_path):
    message = error_of(build_config, write(tmp_path, "optim: {lr: 0.5\u00a0}\n"))
    assert "drop the quotes" not in message and "non-breaking or other Unicode space" in message
    for text in ("inf", "nan", "Infinity", "\uff10.\uff11"):   # float() reads them: no space
        message = error_of(build_config, None, [f"model.max_norm={text}"])
        assert "space" not in message and "quotes" not in message, message
    quoted = error_of(build_config, write(tmp_path, "optim: {lr: '0.5'}\n"))
    assert quoted.endswith("(a number in quotes is text: drop the quotes)")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32",
                                      "utf-32-le"])
def test_a_utf16_or_utf32_config_is_told_to_be_saved_as_utf8(tmp_path, encoding):
    """Windows PowerShell 5 writes UTF-16 with > and Out-File: it was 'not text (a model or a
    checkpoint?)', or, without a byte-order mark, invalid YAML at a NUL character."""
    path = tmp_path / "c.yaml"
    path.write_bytes("optim: {lr: 0.5}\n".encode(encoding))
    message = error_of(build_config, path)
    assert message == (f"config file {path} is {encoding[:6].upper()} text; save it as UTF-8 (in "
                       "PowerShell: Out-File -Encoding utf8)")
    path.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))   # binary: a PNG
    assert "is not text, so no YAML config" in error_of(build_config, path)


def test_a_dropout_that_is_1_in_float32_is_refused():
    """The masks compare float32 draws (below 1) with the rate in float32: 0.99999999 rounds
    to 1 there and dropped every unit, silently; 0.99999995 rounds below 1 and keeps some."""
    message = error_of(build_config, None, ["model.dropout=0.99999999"])
    assert message.endswith("config key 'model.dropout' (0.99999999) is 1 in train.dtype "
                            "float32, which drops every unit on every step; give a lower rate")
    assert build_config(None, ["model.dropout=0.99999999", "train.dtype=float64"]).model.dropout
    assert build_config(None, ["model.dropout=0.99999995"]).model.dropout


def test_a_set_key_deeper_than_any_config_key_is_refused_before_the_merge():
    """Two such --set with a shared path of 1,000 parts overflowed the merge's recursion."""
    key = "optim.lr" + ".a" * 1000
    message = error_of(build_config, None, [f"{key}=1", f"{key}=2"])
    assert "the key has 1002 parts, and gpumlp's keys have at most 3" in message


def test_more_than_100_hidden_layers_are_refused():
    assert len(build_config(None, [f"model.hidden={[8] * 100}"]).model.hidden) == 100
    message = error_of(build_config, None, [f"model.hidden={[8] * 101}"])
    assert message.endswith(": config key 'model.hidden' lists 101 hidden layers; give at most 100")
    deep = config_from_dict({"model": {"hidden": [8] * 101}})   # as a model saved before loads
    assert len(deep.model.hidden) == 101


@pytest.mark.parametrize("text, kind", [("- 1\n- 2\n", "list"), ("just words\n", "str"), ("3\n", "int")])
def test_non_mapping_yaml_is_an_error(tmp_path, text, kind):
    message = error_of(build_config, write(tmp_path, text))
    assert "must hold a mapping" in message and kind in message


def test_empty_file_means_defaults(tmp_path):
    assert read_yaml(write(tmp_path, "# nothing\n")) == {}
    assert build_config(write(tmp_path, "")) == build_config()


def test_a_folder_is_not_a_config_file(tmp_path):
    assert error_of(build_config, tmp_path).startswith(f"config file {tmp_path} is a folder, not")


def test_a_config_that_cannot_be_read_says_why_in_one_line(tmp_path):
    """An OSError other than a missing file or a folder (here ELOOP, as EACCES for a user who
    may not read it): the path and the system's reason, no traceback."""
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    assert error_of(build_config, loop) == (f"config file {loop} cannot be read: Too many "
                                            "levels of symbolic links")


def test_an_empty_config_path_is_an_error_not_the_current_folder():
    message = error_of(build_config, "")
    assert message.startswith("the config file path is empty; ") and "folder" not in message


def test_one_override_may_be_a_string_and_a_binary_file_is_no_config(tmp_path):
    assert build_config(None, "model.hidden=16").model.hidden == 16   # not 'm', 'o', ...
    model = tmp_path / "model.npz"
    model.write_bytes(b"PK\x03\x04\xbb\xff binary")
    model.write_bytes(b"PK\x03\x04\x00\xbb\xff binary")
    assert error_of(read_yaml, model) == (f"config file {model} is not text, so no YAML config "
                                          "(a model or a checkpoint?); give a YAML file, e.g. "
                                          "configs/h256.yaml")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("# caf\u00e9\ntrain:\n  epochs: 2\n".encode("latin-1"))
    assert error_of(read_yaml, latin) == (f"config file {latin} is not UTF-8 text (byte 0xe9 at "
                                          "offset 5); save it as UTF-8")


@pytest.mark.parametrize("key", ["lr", "eps"])
def test_a_rate_or_eps_below_the_dtypes_smallest_normal_number_is_refused(key):
    """1e-46 is 0 in float32: an lr of it trained nothing and exited 0, an eps of it made Adam
    divide 0 by 0 (with advice to lower the lr). Fine in float64, whose floor is lower."""
    message = error_of(build_config, None, [f"optim.{key}=1e-46"])
    assert message == (f"--set 'optim.{key}=1e-46': config key 'optim.{key}' (1e-46) is below "
                       "the smallest normal float32 number (1.18e-38), where train.dtype "
                       "float32 computes it as 0 or without its digits; give at least 1.18e-38")
    assert getattr(build_config(None, [f"optim.{key}=1.2e-38"]).optim, key) == 1.2e-38
    config = build_config(None, [f"optim.{key}=1e-46", "train.dtype=float64"])
    assert getattr(config.optim, key) == 1e-46


# (key, values just inside its range, values just outside): every numeric key of RANGES
RANGE_EDGES = [
    ("model.dropout", [0, 0.999], [-0.001, 1]),
    ("model.max_norm", [None, 1e-9], [0, -1]),
    ("data.val_size", [0], [-1]),
    ("data.limit", [None, 1], [0]),
    ("data.augment.shift", [0, 14], [-0.001, 14.001]),
    ("data.augment.rotate", [0, 180], [-0.001, 180.001]),
    ("data.augment.scale", [0, 0.999], [-0.001, 1]),
    ("data.augment.elastic_alpha", [0, 1000], [-0.001, 1000.001]),
    ("data.augment.elastic_sigma", [1e-9, 28], [0, 28.001]),
    ("train.epochs", [1], [0]),
    ("train.batch_size", [1], [0]),
    ("train.seed", [0], [-1]),
    ("train.eval_batch_size", [1], [0]),
    ("train.checkpoint_every", [0], [-1]),
    ("train.label_smoothing", [0, 0.999], [-0.001, 1]),
    ("optim.lr", [1e-9], [0]),
    ("optim.momentum", [0, 0.999], [-0.001, 1]),
    ("optim.weight_decay", [0], [-1e-9]),
    ("optim.beta1", [0, 0.999], [-0.001, 1]),
    ("optim.beta2", [0, 0.999], [-0.001, 1]),
    ("optim.eps", [1e-9], [0]),
    ("optim.warmup_epochs", [0], [-0.001]),
    ("optim.step_epochs", [1e-9], [0]),
    ("optim.gamma", [1e-9, 1], [0, 1.001]),
    ("optim.min_lr", [0], [-1e-9]),
]


@pytest.mark.parametrize("key, inside, outside", RANGE_EDGES, ids=[e[0] for e in RANGE_EDGES])
def test_each_range_takes_its_edges_and_refuses_just_past_them(key, inside, outside):
    """Guards the bounds of every numeric key (a `<` for a `<=`, a missing check): the value on
    each edge of the range is taken, one just past it is refused naming the key, in a saved
    config (config_from_dict, as a model's is read) as in a --set."""
    def nested(value):
        values = value
        for part in reversed(key.split(".")):
            values = {part: values}
        return values

    for value in inside:
        got = config_from_dict(nested(value))
        for part in key.split("."):
            got = getattr(got, part)
        assert got == value
    for value in outside:
        assert error_of(config_from_dict, nested(value)).startswith(f"config key '{key}' ")
        assert error_of(build_config, None, [f"{key}={value}"]).startswith(
            f"--set '{key}={value}': config key '{key}' ")


@pytest.mark.parametrize("value", ["' inf'", "' nan'", "'1_000 '", "'\t1e-3x'"])
def test_an_ascii_space_beside_a_word_number_gets_no_unicode_space_tip(value):
    """The tip about a non-breaking or other Unicode space only where one is."""
    message = error_of(build_config, None, [f"optim.lr={value}"])
    assert "must be a number" in message and "Unicode space" not in message
