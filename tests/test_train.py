"""The training loop through the library's train(): it learns, it memorises, it is
deterministic to the byte, and its data handling (limit, validation split, inputs) is right."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gpumlp.backend import CPU
from gpumlp.config import build_config
from gpumlp.data import batch_slices, permutation, prepare_data, to_inputs
from gpumlp.errors import ConfigError, GpumlpError
from gpumlp.mnist import Mnist, Split, load_mnist
from gpumlp.model import Params
from gpumlp.npzio import load_npz, save_npz
from gpumlp.train import Interrupted, NumericalError, new_state, train

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
TINY_SMOKE = ["data.limit=null", "data.val_size=50"]  # smoke.yaml, fitted to the 300-example set


def numpy_accuracy(params, images, labels):
    """Accuracy of a relu MLP recomputed in float64 with plain NumPy."""
    Z = images.astype(np.float64) / 255
    for k, (W, b) in enumerate(zip(params.W, params.b)):
        A = Z @ W.astype(np.float64) + b
        Z = np.maximum(A, 0) if k < len(params.W) - 1 else A
    return float((Z.argmax(axis=1) == labels).mean())


def test_overfits_64_random_examples_to_100_percent():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 784), dtype=np.uint8)
    labels = rng.integers(0, 10, 64).astype(np.uint8)  # random labels: only memorising works
    mnist = Mnist(Split(images, labels), Split(images[:16], labels[:16]))
    config = build_config(None, ["model.hidden=64", "train.epochs=30", "train.batch_size=16",
                                 "optim.lr=0.05"])
    result = train(config, CPU, mnist)
    assert numpy_accuracy(result.params, images, labels) == 1.0
    assert result.history[-1]["train_loss"] < 0.05 < result.history[0]["train_loss"]
    assert len(result.history) == 30 and result.summary["steps"] == 30 * 4


def test_learns_the_tiny_dataset(tiny_mnist):
    config = build_config(SMOKE, TINY_SMOKE)
    result = train(config, CPU, tiny_mnist.mnist)
    first, last = result.history[0], result.history[-1]
    assert last["test_accuracy"] > 0.9 and last["val_accuracy"] > 0.9
    assert last["train_loss"] < first["train_loss"]
    assert result.summary["test_accuracy"] == last["test_accuracy"]
    test = tiny_mnist.mnist.test
    assert numpy_accuracy(result.params, test.images, test.labels) == last["test_accuracy"]


def test_same_seed_gives_a_byte_identical_model_npz(tiny_mnist, tmp_path):
    def model_bytes(name, seed):
        config = build_config(SMOKE, TINY_SMOKE, **{"train.seed": seed})
        train(config, CPU, tiny_mnist.mnist, out_dir=tmp_path / name)
        return (tmp_path / name / "model.npz").read_bytes()

    first, again, other = model_bytes("a", 0), model_bytes("b", 0), model_bytes("c", 1)
    assert first == again
    assert first != other
    metrics = [(tmp_path / n / "metrics.jsonl").read_text().splitlines() for n in "ab"]
    assert len(metrics[0]) == 2 and len(metrics[1]) == 2


def test_deeper_net_and_other_optimizers_train(tiny_mnist):
    for overrides in (["model.hidden=[32, 16]", "model.activation=tanh", "model.init=xavier"],
                      ["optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0.01",
                       "optim.schedule=cosine", "optim.warmup_epochs=1", "model.dropout=0.2",
                       "train.label_smoothing=0.1", "model.max_norm=3"]):
        config = build_config(SMOKE, [*TINY_SMOKE, "train.epochs=3", *overrides])
        result = train(config, CPU, tiny_mnist.mnist)
        assert result.history[-1]["test_accuracy"] > 0.8, overrides
        assert len(result.params.W) == len(config.model.hidden_widths) + 1


def test_numerical_blow_up_is_a_clear_error(tiny_mnist):
    config = build_config(SMOKE, [*TINY_SMOKE, "optim.lr=1e12"])
    with pytest.raises(NumericalError, match="lower optim.lr"):
        train(config, CPU, tiny_mnist.mnist)


def test_an_epoch_whose_evaluation_loss_is_nan_is_a_numerical_error(tiny_mnist):
    """lr 1e30 leaves finite weights near 1e28 after one step; their val and test losses are
    NaN, and the epoch ends in an error rather than in a metrics row of NaN."""
    config = build_config(SMOKE, [*TINY_SMOKE, "optim.lr=1e30", "train.batch_size=250"])
    events = []
    with pytest.raises(NumericalError) as info:
        train(config, CPU, tiny_mnist.mnist, on_event=lambda kind, row: events.append(kind))
    assert str(info.value) == ("the evaluation loss became NaN or infinite at the end of epoch 1 "
                               "(step 1: val_loss nan, test_loss nan): the weights are finite "
                               "but too large to use; lower optim.lr")
    assert "epoch" not in events


def test_too_large_val_size_limit_or_batch_is_a_config_error(tiny_mnist):
    with pytest.raises(ConfigError, match="data.val_size"):
        train(build_config(None, ["data.val_size=300"]), CPU, tiny_mnist.mnist)
    with pytest.raises(ConfigError, match="'data.limit' is 301 but MNIST has 300 training "
                                          "images; lower it, or null for all"):
        train(build_config(None, ["data.limit=301"]), CPU, tiny_mnist.mnist)  # not 300 silently
    assert prepare_data(tiny_mnist.mnist, build_config(None, ["data.limit=300"]).data,
                        CPU).train.images.shape == (300, 784)
    assert prepare_data(tiny_mnist.mnist, build_config(None, ["data.limit=301"]).data, CPU,
                        new=False).train.images.shape == (300, 784)   # a resume of an older run
    with pytest.raises(ConfigError, match="train.batch_size"):
        train(build_config(None, ["train.batch_size=301"]), CPU, tiny_mnist.mnist)


def test_a_run_made_before_the_limit_rule_still_resumes(tiny_mnist, tmp_path, monkeypatch):
    """A run with data.limit over the set's size trained on all of it, before that was refused:
    its resume must go on (no --set or edit could lower the limit of the same run)."""
    import gpumlp.train as train_module
    config = build_config(None, ["data.limit=301", "data.val_size=50", "train.batch_size=50",
                                 "train.epochs=1", "model.hidden=8"])
    with monkeypatch.context() as m:              # made by a gpumlp before the rule
        m.setattr(train_module, "prepare_data", lambda *a, **k: prepare_data(*a, new=False))
        train(config, CPU, tiny_mnist.mnist, out_dir=tmp_path / "run")
    longer = build_config(None, ["data.limit=301", "data.val_size=50", "train.batch_size=50",
                                 "train.epochs=2", "model.hidden=8"])
    result = train(longer, CPU, tiny_mnist.mnist, out_dir=tmp_path / "run", resume=True)
    assert len(result.history) == 2
    for name in ("checkpoint.npz", "model.npz", "summary.json"):   # killed before its first
        (tmp_path / "run" / name).unlink()                        # checkpoint: a resume starts
    (tmp_path / "run" / "metrics.jsonl").write_text("")           # it over, a new run
    with pytest.raises(ConfigError, match=r"run/config.yaml: config key 'data.limit' is 301 but "
                                          "MNIST has 300"):      # the file to edit, named
        train(longer, CPU, tiny_mnist.mnist, out_dir=tmp_path / "run", resume=True)
    wide = build_config(None, ["data.val_size=50", "train.batch_size=999", "train.epochs=2",
                               "model.hidden=8"])
    with pytest.raises(ConfigError, match=r"run/config.yaml: config key 'train.batch_size' is "
                                          "999 but the training set has only 250 examples"):
        train(wide, CPU, tiny_mnist.mnist, out_dir=tmp_path / "run", resume=True)
    kept = build_config(None, ["data.val_size=50", "train.batch_size=50", "train.epochs=1",
                               "model.hidden=8"])
    train(kept, CPU, tiny_mnist.mnist, out_dir=tmp_path / "kept")     # with its checkpoint:
    with pytest.raises(GpumlpError) as refused:  # the change is named, not the size it broke
        train(wide, CPU, tiny_mnist.mnist, out_dir=tmp_path / "kept", resume=True)
    assert "config.yaml changes train.batch_size (50 -> 999) since the checkpoint" in str(
        refused.value)
    checkpoint = tmp_path / "kept" / "checkpoint.npz"     # one of before the fixed record:
    arrays = load_npz(checkpoint)                         # nothing says what changed
    record = json.loads(str(arrays["state"]))
    del record["fixed"]
    save_npz(checkpoint, {**arrays, "state": np.array(json.dumps(record))})
    with pytest.raises(ConfigError) as refused:            # lowering it would be refused too
        train(wide, CPU, tiny_mnist.mnist, out_dir=tmp_path / "kept", resume=True)
    assert str(refused.value).endswith(
        "'train.batch_size' is 999 but the training set has only 250 examples; a resume goes "
        "on with the run's value: put config.yaml back as the run had it, or give the data it "
        "trained on")


# --- data handling ----------------------------------------------------------------------------

def test_prepare_data_limits_then_holds_out_the_last_rows(tiny_mnist):
    mnist = tiny_mnist.mnist
    data = prepare_data(mnist, build_config(None, ["data.limit=120", "data.val_size=20"]).data, CPU)
    assert len(data.train) == 100 and len(data.val) == 20 and len(data.test) == 100
    np.testing.assert_array_equal(data.val.images, mnist.train.images[100:120])
    np.testing.assert_array_equal(data.train.labels, mnist.train.labels[:100])
    assert data.train.images.dtype == np.uint8 and data.train.labels.dtype == np.int32
    assert prepare_data(mnist, build_config().data, CPU).val is None


def test_inputs_are_scaled_and_keep_the_dtype():
    images = np.array([[0, 255, 51]], dtype=np.uint8)
    X = to_inputs(images, "unit", "float32")
    assert X.dtype == np.float32
    np.testing.assert_allclose(X, [[0.0, 1.0, 0.2]], rtol=1e-6)
    S = to_inputs(images, "standard", "float64")
    np.testing.assert_allclose(S, (np.array([[0.0, 1.0, 0.2]]) - 0.1307) / 0.3081, rtol=1e-12)


def test_shuffling_is_seeded_and_batches_cover_every_example():
    a, b = (permutation(np.random.default_rng(3), 10, True) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert sorted(a) == list(range(10)) and list(a) != list(range(10))
    np.testing.assert_array_equal(permutation(np.random.default_rng(3), 10, False), np.arange(10))
    slices = batch_slices(10, 4)
    assert [(s.start, s.stop) for s in slices] == [(0, 4), (4, 8), (8, 10)]


@pytest.mark.slow
def test_real_mnist_one_epoch_reaches_90_percent(mnist_dir):
    config = build_config(None, ["model.hidden=64", "train.epochs=1", "data.limit=10000"])
    result = train(config, CPU, load_mnist(mnist_dir))
    assert result.history[0]["test_accuracy"] > 0.90
    assert len(result.history) == 1 and result.summary["steps"] == 79  # ceil(10000 / 128)


def test_the_loop_keeps_its_running_sums_through_a_steps_own_tally(tiny_mnist, monkeypatch):
    """A step that carries `tally` (fast_cuda's, one launch) is given the loop's running loss
    and correct count once a step, and the loop does not add them a second time."""
    import gpumlp.train as train_module
    from gpumlp.step import add_to_sums, make_step

    tallied = []

    class Tallying:
        def __init__(self, step):
            self.step = step

        def __call__(self, *args):
            return self.step(*args)

        def __getattr__(self, name):   # prepare, export, batch, kind: the wrapped step's
            return getattr(self.step, name)

        def tally(self, loss_sum, correct, L, ok, m):
            tallied.append(m)
            add_to_sums(loss_sum, correct, L, ok, m)

    config = build_config(SMOKE, TINY_SMOKE)
    plain = train(config, CPU, tiny_mnist.mnist)
    monkeypatch.setattr(train_module, "make_step", lambda *a: Tallying(make_step(*a)))
    tallying = train(config, CPU, tiny_mnist.mnist)
    assert len(tallied) == plain.summary["steps"] and tallied[0] == config.train.batch_size
    for a, b in zip(plain.history, tallying.history, strict=True):
        assert (a["train_loss"], a["train_accuracy"]) == (b["train_loss"], b["train_accuracy"])


class Recording:
    """The run's own step (fast or generic), recording the (t, lr) the loop gives each call."""

    def __init__(self, step, seen):
        self.step, self.seen = step, seen

    def __call__(self, params, state, X, y, lr, t, masks):
        self.seen.append((t, lr))
        return self.step(params, state, X, y, lr, t, masks)

    def __getattr__(self, name):   # prepare, export, batch, kind: the wrapped step's
        return getattr(self.step, name)


def test_the_loop_gives_step_t_1_to_n_and_the_schedules_lr_across_epochs_and_a_resume(
        tiny_mnist, tmp_path, monkeypatch):
    """Adam's bias corrections need t counted over the whole run, not restarted each epoch;
    the schedule is learning_rate() at the 0-based step, so warm-up starts at lr / warm-up
    steps and cosine ends at its last step. 300 examples in batches of 100: 3 steps an epoch,
    9 in all; the run is stopped after step 5 (mid-epoch 2) and resumed."""
    import gpumlp.train as train_module
    from gpumlp.optim import learning_rate
    from gpumlp.step import make_step

    seen = []
    monkeypatch.setattr(train_module, "make_step", lambda *a: Recording(make_step(*a), seen))
    config = build_config(None, ["model.hidden=8", "train.epochs=3", "train.batch_size=100",
                                 "optim.name=adam", "optim.lr=0.01", "optim.schedule=cosine",
                                 "optim.warmup_epochs=1"])
    out = tmp_path / "run"
    with pytest.raises(train_module.Interrupted):
        train(config, CPU, tiny_mnist.mnist, out_dir=out, should_stop=lambda: len(seen) >= 5)
    assert [t for t, _ in seen] == [1, 2, 3, 4, 5]
    result = train(config, CPU, tiny_mnist.mnist, out_dir=out, resume=True)
    assert result.summary["steps"] == 9
    assert [t for t, _ in seen] == list(range(1, 10))
    expected = [learning_rate(config.optim, step, 3, 9) for step in range(9)]
    assert [lr for _, lr in seen] == pytest.approx(expected, rel=1e-12)
    assert expected[:3] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01])   # warm-up over epoch 1
    assert expected[-1] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))


# --- seeding, the lr column, stopping, resumed weights -------------------------------------

def test_the_seed_drives_the_init_the_shuffle_and_the_dropout(tiny_mnist):
    base = ["model.hidden=16", "train.epochs=1", "train.batch_size=50"]

    def config(seed, *extra):
        return build_config(None, [*base, *extra], **{"train.seed": seed})

    W1 = [new_state(config(seed), CPU).params.W[0] for seed in (0, 1)]
    assert not np.array_equal(*W1)                                       # the init
    start = new_state(config(0), CPU).params

    def final_W1(seed, *extra):
        init = Params(tuple(w.copy() for w in start.W), tuple(v.copy() for v in start.b))
        return train(config(seed, *extra), CPU, tiny_mnist.mnist, init=init).params.W[0]

    assert not np.array_equal(final_W1(0), final_W1(1))                  # the shuffle alone
    dropout = ["data.shuffle=false", "model.dropout=0.5"]
    assert np.array_equal(final_W1(0, *dropout), final_W1(0, *dropout))
    assert not np.array_equal(final_W1(0, *dropout), final_W1(1, *dropout))  # the masks alone


def test_metrics_lr_is_the_rate_of_each_epochs_last_step(tiny_mnist):
    from gpumlp.optim import learning_rate
    config = build_config(None, ["model.hidden=8", "train.epochs=3", "train.batch_size=100",
                                 "optim.schedule=cosine"])
    result = train(config, CPU, tiny_mnist.mnist)           # 300 examples: 3 steps an epoch
    assert [row["lr"] for row in result.history] == pytest.approx(
        [learning_rate(config.optim, 3 * epoch - 1, 3, 9) for epoch in (1, 2, 3)], rel=1e-12)


def test_a_stop_asked_in_an_epochs_last_step_stops_at_that_epochs_end(tiny_mnist, tmp_path):
    config = build_config(None, ["model.hidden=8", "train.epochs=3", "train.batch_size=100"])
    steps = []
    with pytest.raises(Interrupted):
        train(config, CPU, tiny_mnist.mnist, out_dir=tmp_path / "run",
              on_event=lambda kind, info: steps.append(info) if kind == "step" else None,
              should_stop=lambda: len(steps) >= 3)          # asked in step 3, epoch 1's last
    assert len(steps) == 3
    position = json.loads(str(load_npz(tmp_path / "run" / "checkpoint.npz")["state"]))["position"]
    assert (position["epoch"], position["step"], position["batch"]) == (1, 3, 0)


@pytest.mark.parametrize("epoch, batch, refused", [
    (1, 0, "their loss on the test set is"),              # an epoch's end: held to the test loss
    (1, 3, "their loss on the first 100 training examples is"),   # mid-epoch: to the probe
    (0, 0, "their loss on the first 100 training examples is"),   # before the first step
])
def test_a_resumed_checkpoint_is_held_to_the_bound_it_met_when_saved(tiny_mnist, monkeypatch,
                                                                     epoch, batch, refused):
    """An epoch-end checkpoint was checked on its evaluation losses only, not on the probe that
    guards a mid-epoch one: a resume that probed it refused checkpoints the run had written."""
    import gpumlp.train as train_module
    from gpumlp.errors import CheckpointError
    from gpumlp.train import Position, check_resumed_weights

    config = build_config(None, ["model.hidden=16", "train.batch_size=25"])
    data = prepare_data(tiny_mnist.mnist, config.data, CPU)
    state = new_state(config, CPU)
    state.pos = Position(epoch=epoch, step=epoch * 10 + batch, batch=batch)
    monkeypatch.setattr(train_module, "probe_loss", lambda *args: (1e3, 100))   # above 230
    if batch or not epoch:
        with pytest.raises(CheckpointError, match=refused):
            check_resumed_weights(state, data, config, "ck.npz")
    else:
        check_resumed_weights(state, data, config, "ck.npz")     # the probe does not count
        state.params.W[0][...] *= np.float32(1e20)
        with pytest.raises(CheckpointError, match=refused):
            check_resumed_weights(state, data, config, "ck.npz")


def test_train_called_wrongly_from_python_says_what_to_pass(tiny_mnist, tmp_path):
    config = build_config(None, ["model.hidden=8", "train.epochs=1"])
    with pytest.raises(TypeError, match="takes a gpumlp.backend.Backend .* not str and Mnist"):
        train(config, "cpu", tiny_mnist.mnist)
    with pytest.raises(TypeError, match="not Backend and PosixPath"):
        train(config, CPU, tmp_path)
    with pytest.raises(TypeError, match=r"resume=True\) needs out_dir"):
        train(config, CPU, tiny_mnist.mnist, resume=True)


def test_evaluate_adds_the_batch_losses_in_float64(tiny_mnist):
    """Each batch's float32 L * m is added to a float64 sum, as the training loop adds its
    steps' (a float32 sum of many batches drifts in its last digits)."""
    from gpumlp.activations import ACTIVATIONS
    from gpumlp.model import forward, loss_and_dA2
    from gpumlp.train import evaluate

    config = build_config(None, ["model.hidden=16", "train.eval_batch_size=3"])
    data = prepare_data(tiny_mnist.mnist, config.data, CPU)
    params = new_state(config, CPU).params
    split, total = data.test, 0.0
    for sl in batch_slices(len(split), 3):                        # 100 rows, 3 at a time
        X = to_inputs(split.images[sl], "unit", "float32")
        L, _ = loss_and_dA2(forward(params, X, ACTIVATIONS["relu"]).A[-1], split.labels[sl])
        assert L.dtype == np.float32
        total += float(L * np.float32(sl.stop - sl.start))        # float64 sum, in order
    assert evaluate(params, split, config)[0] == total / len(split)


@pytest.mark.parametrize("slot", ["velocity", "scale"])
def test_a_checkpoints_guard_refuses_a_nan_optimizer_state_with_finite_weights(slot):
    """A resume refuses a checkpoint whose optimizer state is not finite (as damaged), so the
    guard before a checkpoint or a metrics row refuses it too, not only NaN weights."""
    from gpumlp.train import check_finite
    state = new_state(build_config(None, "model.hidden=8"), CPU)
    check_finite(state)                                   # a fresh state passes
    if slot == "velocity":
        state.opt.m[2][0, 0] = np.nan
    else:
        state.opt = state.opt._replace(scale=np.array([np.inf]))
    with pytest.raises(NumericalError, match=r"^the optimizer's state became NaN or infinite"):
        check_finite(state)


def test_an_epochs_train_loss_and_accuracy_weigh_each_steps_loss_by_its_rows(tiny_mnist,
                                                                            monkeypatch):
    """train_loss is sum(L * m) / n over the epoch's steps, train_accuracy sum(correct) / n:
    300 examples in batches of 128, so the last step's 44 rows must count 44 times, not 128
    (nor once)."""
    import gpumlp.train as train_module
    from gpumlp.step import make_step

    steps = []

    class Recording:
        def __init__(self, step):
            self.step = step

        def __call__(self, params, state, X, y, lr, t, masks):
            L, ok = self.step(params, state, X, y, lr, t, masks)
            steps.append((float(L), int(ok), X.shape[0]))
            return L, ok

        def __getattr__(self, name):   # prepare, export, batch, kind: the wrapped step's
            return getattr(self.step, name)

    monkeypatch.setattr(train_module, "make_step", lambda *a: Recording(make_step(*a)))
    config = build_config(None, ["model.hidden=16", "train.epochs=1", "train.batch_size=128"])
    row = train(config, CPU, tiny_mnist.mnist).history[0]
    assert [m for _, _, m in steps] == [128, 128, 44]
    assert row["train_loss"] == pytest.approx(sum(L * m for L, _, m in steps) / 300, rel=1e-6)
    assert row["train_accuracy"] == sum(ok for _, ok, _ in steps) / 300


def test_init_weights_equal_to_the_seeds_own_give_the_run_without_init(tiny_mnist):
    """Guards new_state's promise that --init weights are drawn over all the same: the host
    generator then shuffles as in a run without --init, so a run from its own initial weights is
    that run, bit for bit (skipping the draw would shift every epoch's order)."""
    config = build_config(None, ["model.hidden=16", "train.epochs=2", "train.batch_size=50"])
    start = new_state(config, CPU).params
    init = Params(tuple(w.copy() for w in start.W), tuple(v.copy() for v in start.b))
    plain = train(config, CPU, tiny_mnist.mnist)
    from_init = train(config, CPU, tiny_mnist.mnist, init=init)
    for a, b in zip(plain.params.W + plain.params.b, from_init.params.W + from_init.params.b):
        np.testing.assert_array_equal(a, b)


def test_each_epoch_draws_a_new_order_of_the_training_set(tiny_mnist, monkeypatch):
    """Guards the shuffle per epoch: every epoch visits each example once, in an order of its
    own (an epoch's order kept into the next would repeat it); data.shuffle=false keeps 0..n-1."""
    import gpumlp.train as train_module

    def orders(*extra):
        seen = []

        def recording(step, split, idx, *args):
            seen.append(np.asarray(idx).copy())
            return batch_inputs(step, split, idx, *args)

        batch_inputs = train_module.batch_inputs
        monkeypatch.setattr(train_module, "batch_inputs", recording)
        train(build_config(None, ["model.hidden=8", "train.epochs=3", "train.batch_size=100",
                                  *extra]), CPU, tiny_mnist.mnist)
        monkeypatch.setattr(train_module, "batch_inputs", batch_inputs)
        return [np.concatenate(seen[i:i + 3]) for i in (0, 3, 6)]       # 3 steps an epoch

    shuffled = orders()
    assert all(sorted(order) == list(range(300)) for order in shuffled)
    assert len({order.tobytes() for order in shuffled}) == 3
    assert all(np.array_equal(order, np.arange(300)) for order in orders("data.shuffle=false"))


def test_a_stop_asked_in_the_last_epochs_last_step_ends_the_run_not_interrupts_it(tiny_mnist,
                                                                                 tmp_path):
    """Guards the end of the loop: a Ctrl-C that lands in the run's very last step leaves no
    step to save a checkpoint for, so the run ends as finished (model.npz, summary.json) rather
    than as interrupted with a resume to do."""
    config = build_config(None, ["model.hidden=8", "train.epochs=2", "train.batch_size=100"])
    steps = []
    result = train(config, CPU, tiny_mnist.mnist, out_dir=tmp_path / "run",
                   on_event=lambda kind, info: steps.append(info) if kind == "step" else None,
                   should_stop=lambda: len(steps) >= 6)             # asked in step 6, the last
    assert result.summary["steps"] == 6 and len(result.history) == 2
    assert (tmp_path / "run" / "model.npz").is_file()
    assert (tmp_path / "run" / "summary.json").is_file()


def test_a_resumed_epoch_counts_the_seconds_spent_before_the_stop(tiny_mnist, tmp_path):
    """Guards the epoch's clock across a resume: the seconds a mid-epoch checkpoint records are
    part of that epoch's `seconds` (and samples_per_second), not dropped by the resume."""
    from gpumlp.npzio import save_npz

    config = build_config(None, ["model.hidden=8", "train.epochs=1", "train.batch_size=100"])
    steps, out = [], tmp_path / "run"
    with pytest.raises(Interrupted):
        train(config, CPU, tiny_mnist.mnist, out_dir=out, should_stop=lambda: len(steps) >= 1,
              on_event=lambda kind, info: steps.append(info) if kind == "step" else None)
    arrays = load_npz(out / "checkpoint.npz")
    record = json.loads(str(arrays["state"]))
    record["position"]["seconds"] = 1000.0        # as if the first step had taken that long
    save_npz(out / "checkpoint.npz", {**arrays, "state": np.array(json.dumps(record))})
    row = train(config, CPU, tiny_mnist.mnist, out_dir=out, resume=True).history[0]
    assert 1000 <= row["seconds"] < 1100


def test_test_and_val_loss_are_against_the_true_labels_under_label_smoothing(tiny_mnist):
    """decisions.md: with train.label_smoothing the epoch's val_loss and test_loss are the plain
    cross-entropy against the true labels (computed after the epoch), not the smoothed objective
    train_loss is: the same weights evaluate to the same loss whatever the smoothing."""
    from gpumlp.activations import ACTIVATIONS
    from gpumlp.model import forward, loss_and_dA2
    from gpumlp.train import evaluate

    config = build_config(None, ["model.hidden=16", "train.label_smoothing=0.2"])
    split = prepare_data(tiny_mnist.mnist, config.data, CPU).test
    params = new_state(config, CPU).params
    loss, _ = evaluate(params, split, config)
    A2 = forward(params, to_inputs(split.images, "unit", "float32"), ACTIVATIONS["relu"]).A[-1]
    plain, smoothed = (float(loss_and_dA2(A2, split.labels, a)[0]) for a in (0.0, 0.2))
    assert abs(smoothed - plain) > 1e-3 * plain            # the two differ here, and the loss
    assert loss == pytest.approx(plain, rel=1e-5)          # is the plain one


# smoke.yaml on the tiny set at lr 1, 9 steps an epoch: the weights after steps 5 and 6 have a
# loss of 615 and 380 on the first 100 training examples (above 230), which then falls back
SPIKE = [*TINY_SMOKE, "optim.lr=1", "train.batch_size=30"]


def test_a_loss_spike_skips_the_mid_epoch_checkpoints_in_it_and_the_run_trains_on(tiny_mnist,
                                                                                   tmp_path):
    """A fast-diverging run's loss rises far above MAX_PROBE_LOSS for a few steps and falls
    back: a mid-epoch checkpoint due then was refused with an error ending the run, so the run
    failed with train.checkpoint_every 1 and finished with 0. Now it is skipped (the last good
    one stays), said in a "skipped" event, and the two runs end the same."""
    runs, skipped = {}, []
    for every in (0, 1):
        config = build_config(SMOKE, [*SPIKE, f"train.checkpoint_every={every}"])
        runs[every] = train(config, CPU, tiny_mnist.mnist, out_dir=tmp_path / str(every),
                            on_event=lambda kind, info: skipped.append(info)
                            if kind == "skipped" else None)
    probe = "their loss on the first 100 training examples was {}, above 230"
    kept = str(tmp_path / "1" / "checkpoint.npz")                  # step 4's, each time
    assert skipped == [{"step": step, "epoch": 1, "probe": probe.format(loss), "saved_step": 4,
                        "checkpoint": kept} for step, loss in ((5, 615), (6, 380))]
    for before, after in zip(runs[0].params.W + runs[0].params.b,
                             runs[1].params.W + runs[1].params.b):
        assert before.tobytes() == after.tobytes()
    assert [{**row, "seconds": 0, "samples_per_second": 0} for row in runs[0].history] == \
        [{**row, "seconds": 0, "samples_per_second": 0} for row in runs[1].history]


@pytest.mark.parametrize("every, saved", [(0, None), (2, 4)])
def test_a_stop_in_a_loss_spike_keeps_the_last_good_checkpoint_and_writes_none(tiny_mnist,
                                                                               tmp_path, every,
                                                                               saved):
    """Ctrl-C after step 5, whose weights are too large to checkpoint: StoppedUnsaved naming
    the last good checkpoint (step 4's with train.checkpoint_every 2), or none; before, the run
    ended in a NumericalError that advised a lower optim.lr."""
    import gpumlp.train as train_module

    config = build_config(SMOKE, [*SPIKE, f"train.checkpoint_every={every}"])
    steps, out = [], tmp_path / "run"
    with pytest.raises(GpumlpError) as info:
        train(config, CPU, tiny_mnist.mnist, out_dir=out, should_stop=lambda: len(steps) >= 5,
              on_event=lambda kind, info: steps.append(info) if kind == "step" else None)
    assert isinstance(info.value, train_module.StoppedUnsaved), info.value
    skipped = info.value.skipped
    assert (skipped.step, skipped.saved_step) == (5, saved)
    assert (skipped.checkpoint is None) == (saved is None)
    if saved is None:
        assert str(info.value).endswith("(their loss on the first 100 training examples was 615, "
                                        "above 230); no checkpoint was written yet, so there is "
                                        "nothing to resume: start over")
        assert not (out / "checkpoint.npz").exists()
    else:
        state = json.loads(str(load_npz(out / "checkpoint.npz")["state"]))
        assert state["position"]["step"] == 4
