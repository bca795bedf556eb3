"""What the CLI shows while training: a progress bar on a terminal, plain lines in a log."""

from __future__ import annotations

import sys

import click

from .errors import one_line


def format_epoch(row: dict) -> str:
    parts = [f"epoch {row['epoch']:>3}", f"train_loss {row['train_loss']:.4f}",
             f"train_acc {row['train_accuracy']:.4f}"]
    if "val_loss" in row:
        parts += [f"val_loss {row['val_loss']:.4f}", f"val_acc {row['val_accuracy']:.4f}"]
    parts += [f"test_loss {row['test_loss']:.4f}", f"test_acc {row['test_accuracy']:.4f}",
              f"lr {row['lr']:.4g}", f"{row['seconds']:.2f}s",
              f"{row['samples_per_second']:,.0f} samples/s"]
    return "  ".join(parts)


def resuming(info: dict) -> str:
    """" (resuming ...)": where a resumed run goes on, for its start line; "" for a new run."""
    if info.get("batch"):  # stopped inside an epoch
        return (f" (resuming epoch {info['epoch'] + 1} after batch {info['batch']} of "
                f"{info['batches']})")
    if info.get("restored") and info["epoch"]:
        return f" (resuming after epoch {info['epoch']})"
    return ""


def skipped_warning(info: dict) -> str:
    """What a mid-epoch checkpoint skipped (train.Skipped's fields) says, once per run."""
    kept = (f"the last good checkpoint is {info['checkpoint']} (step {info['saved_step']})"
            if info["checkpoint"] else "no checkpoint was written yet")
    return (f"skipped the checkpoint at step {info['step']}: its weights were too large to go "
            f"on from ({info['probe']}); training on, as such a spike can fall back (a NaN or "
            f"infinite loss of a step still ends the run); {kept} (later skips are not "
            "reported)")


class Reporter:
    """An `on_event` handler: a tqdm bar per epoch on a terminal, one line per epoch unless
    quiet."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.bar = None
        self.use_bar = not quiet and self.stream.isatty()
        self.skipped = False  # a checkpoint skipped was told

    def __call__(self, kind: str, info: dict) -> None:
        try:
            self.report(kind, info)
        except OSError:  # stderr is gone (`2>&1 | head -1` stopped reading): train on, unshown
            self.close()
            self.quiet, self.use_bar = True, False

    def report(self, kind: str, info: dict) -> None:
        # said even when quiet, and only when there is something left to train
        if kind == "start" and info.get("unchecked") and info["epoch"] < info["epochs"]:
            click.echo("Warning: the checkpoint comes from a gpumlp that did not record the "
                       "config its steps ran with, so edits to config.yaml since cannot be "
                       "checked; training on with config.yaml as it is", err=True)
        if kind == "start" and info.get("stale") and info["epoch"] < info["epochs"]:
            click.echo(f"Warning: {one_line(info['stale'])}", err=True)  # a folder name's \n
        if kind == "start" and info.get("warmup") and info["epoch"] < info["epochs"]:
            click.echo(f"Warning: {info['warmup']}", err=True)
        if kind == "skipped" and not self.skipped:  # the first only: a spike may last steps
            self.skipped = True
            self.close()
            click.echo(f"Warning: {one_line(skipped_warning(info))}", err=True)
        if kind == "put_back":  # before the error that ended the run
            self.close()
            click.echo(f"put back what this run was to replace in {info['folder']}, as it "
                       "was (this run ended before its first checkpoint)", err=True)
        if self.quiet:
            return
        if kind == "start":
            self.start(info)
        elif kind == "step" and self.use_bar:
            if self.bar is None:
                from tqdm import tqdm
                self.bar = tqdm(total=info["batches"], initial=info["batch"] - 1,
                                desc=f"epoch {info['epoch']}", unit="batch", leave=False,
                                file=self.stream)
            self.bar.update(1)
        elif kind == "epoch":
            self.close()
            click.echo(format_epoch(info), err=True)

    def start(self, info: dict) -> None:
        """The line before training: what it runs on and for how long, or, for a finished run
        resumed, that there is nothing to train."""
        epochs = f"{info['epochs']} epoch" + ("s" if info["epochs"] != 1 else "")
        if info["epoch"] >= info["epochs"]:
            click.echo(f"nothing to train: the run has done its {epochs}; writing its results "
                       "(to train longer, resume with --set train.epochs=N)", err=True)
            return
        if info.get("removed"):
            click.echo(f"replacing the run there: removed its {', '.join(info['removed'])} "
                       "(made from the old model)", err=True)
        batches = f"{info['batches']:,} batch" + ("es" if info["batches"] != 1 else "")
        click.echo(f"training on {info['device']}: {info['n_train']:,} examples, "
                   f"{batches} per epoch, {epochs}{resuming(info)}", err=True)

    def close(self) -> None:
        if self.bar is not None:
            bar, self.bar = self.bar, None
            try:
                bar.close()
            except OSError:
                pass
