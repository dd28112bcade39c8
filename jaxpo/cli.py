"""The `jaxpo` command.

    jaxpo train                                    # the embedded default: tiny model, CPU, minutes
    jaxpo train --config=configs/dpo_tiny.py --config.train.steps=200 --workdir=runs/dpo
    jaxpo eval --workdir=runs/dpo [--config.data.eval_files=heldout.jsonl]
    jaxpo precompute-ref --config=configs/dpo_tiny.py --out=refcache
    jaxpo export --workdir=runs/dpo --out=hf_model [--dtype=bfloat16]
    jaxpo plot --workdir=runs/dpo
    jaxpo --version

Flags are ``--name=value`` (or ``--name value``); ``--config.section.field=value`` overrides one
config field (see ``jaxpo.train.config``). Without ``--config``, a workdir that holds a checkpoint
uses the config stored in it, and otherwise the embedded default. ``python -m jaxpo.train ...``
is ``jaxpo train ...``.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jaxpo

COMMANDS = ("train", "eval", "precompute-ref", "export", "plot")
# Flags each command accepts (besides --config.section.field=value overrides).
FLAGS: dict[str, tuple[str, ...]] = {
    "train": ("config", "workdir", "no_progress"),
    "eval": ("config", "workdir"),
    "precompute-ref": ("config", "out", "workdir"),
    "export": ("config", "workdir", "out", "dtype"),
    "plot": ("workdir", "out"),
}
REQUIRED = {"eval": ("workdir",), "precompute-ref": ("out",), "export": ("workdir", "out"),
            "plot": ("workdir",)}
BOOLEAN = ("no_progress",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


class UsageError(ValueError):
    """A bad command line (exit status 2)."""


def parse_args(command: str, argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``(flags, config overrides)`` of ``argv`` for ``command``.

    >>> parse_args("train", ["--config=c.py", "--config.train.steps=5", "--workdir", "w"])
    ({'config': 'c.py', 'workdir': 'w'}, ['--config.train.steps=5'])
    """
    flags: dict[str, Any] = {}
    overrides: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--config."):
            overrides.append(arg)
            continue
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r} (flags are --name=value)")
        name, sep, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        allowed = FLAGS[command]
        if name not in allowed:
            near = difflib.get_close_matches(name, allowed, n=2, cutoff=0.5)
            hint = f"; did you mean --{near[0].replace('_', '-')}?" if near else ""
            raise UsageError(f"unknown flag --{name}{hint} "
                             f"(known: {', '.join('--' + a.replace('_', '-') for a in allowed)})")
        if name in BOOLEAN:
            flags[name] = value.lower() not in ("false", "0", "no") if sep else True
            continue
        if not sep:
            if not args or args[0].startswith("--"):
                raise UsageError(f"--{name} needs a value")
            value = args.pop(0)
        flags[name] = value
    for name in REQUIRED.get(command, ()):
        if not flags.get(name):
            raise UsageError(f"--{name}=... is required")
    return flags, overrides


def stored_config(workdir: str | None) -> dict[str, Any] | None:
    """The config saved in the newest checkpoint of ``workdir`` (None when there is none)."""
    if not workdir or not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    from jaxpo.train.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir)
    try:
        step = ckpt.latest_step()
        return None if step is None else ckpt.read_json(step, "config")
    finally:
        ckpt.close()


def resolve_config(flags: dict[str, Any], overrides: list[str]):
    """``--config`` file, else the workdir's stored config, else the embedded default; then
    the overrides."""
    from jaxpo.train import config as config_lib

    if flags.get("config"):
        return config_lib.load_config(flags["config"], overrides)
    stored = stored_config(flags.get("workdir"))
    if stored is not None:
        config = config_lib.apply_overrides(config_lib.from_dict(stored), overrides)
        config_lib.check(config)
        return config
    return config_lib.load_config(None, overrides)


# ----------------------------------------------------------------------------- commands


def cmd_train(flags: dict[str, Any], overrides: list[str]) -> int:
    """Trains; with no --config on a new workdir, runs the embedded default."""
    from jaxpo.train import default, loop

    workdir = flags.get("workdir")
    progress = not flags.get("no_progress", False)
    embedded = not flags.get("config") and (
        stored_config(workdir) is None
        or os.path.exists(os.path.join(workdir, "before_after.json")))
    config = resolve_config(flags, overrides)
    # The before/after showcase needs the bundled task: own data or model make it a plain run.
    embedded = embedded and not config.data.train_files and not config.model.path
    if embedded:
        workdir = workdir or default.new_workdir()
        print(f"jaxpo {jaxpo.__version__}: the embedded default run (workdir {workdir})")
        default.run(config, workdir, progress=progress)
        return 0
    if not workdir:
        stem = os.path.splitext(os.path.basename(flags.get("config") or "run"))[0]
        workdir = os.path.join("runs", stem)
    summary = loop.train(config, workdir, progress=progress)
    plot_path = _try_plot(workdir)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("final", "eval")}))
    for name in ("final", "eval"):
        if summary.get(name):
            print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in summary[name].items()
                                          if isinstance(v, float)))
    if plot_path:
        print(f"plot: {plot_path}")
    return 0


def cmd_eval(flags: dict[str, Any], overrides: list[str]) -> int:
    """Prints one JSON object of eval metrics (checkpoint in --workdir, else untrained)."""
    from jaxpo.train import loop

    config = resolve_config(flags, overrides)
    metrics = loop.evaluate(config, flags["workdir"])
    print(json.dumps(metrics, sort_keys=True))
    return 0


def cmd_precompute_ref(flags: dict[str, Any], overrides: list[str]) -> int:
    """Writes the reference log-probs of the train and eval files to --out."""
    from jaxpo.train import loop

    config = resolve_config(flags, overrides)
    info = loop.precompute_reference(config, flags["out"], flags.get("workdir"))
    print(json.dumps(info, sort_keys=True))
    return 0


def cmd_export(flags: dict[str, Any], overrides: list[str]) -> int:
    """Writes the trained policy as a Hugging Face checkpoint (plus tokenizer files)."""
    from jaxpo.models import export_hf
    from jaxpo.train import inputs, loop

    config = resolve_config(flags, overrides)
    model, step = loop.load_policy(config, flags["workdir"])
    out = flags["out"]
    files = export_hf(model, out, dtype=flags.get("dtype"))
    tok_dir = inputs.tokenizer_dir(config)
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(tok_dir, name)
        if os.path.exists(src) and not os.path.exists(os.path.join(out, name)):
            shutil.copy(src, os.path.join(out, name))
            copied.append(name)
    print(json.dumps({"out": out, "step": step, "files": ["config.json", *files, *copied]}))
    return 0


def cmd_plot(flags: dict[str, Any], overrides: list[str]) -> int:
    """Writes PNG curves of <workdir>/metrics.jsonl."""
    from jaxpo import plot

    if overrides:
        raise UsageError("jaxpo plot takes no --config.* overrides")
    print(plot.plot_metrics(flags["workdir"], flags.get("out")))
    return 0


def _try_plot(workdir: str) -> str | None:
    from jaxpo import plot

    try:
        return plot.plot_metrics(workdir)
    except (OSError, ValueError) as e:
        print(f"(no plot: {e})")
        return None


HANDLERS: dict[str, Callable[[dict[str, Any], list[str]], int]] = {
    "train": cmd_train, "eval": cmd_eval, "precompute-ref": cmd_precompute_ref,
    "export": cmd_export, "plot": cmd_plot,
}


def usage() -> str:
    return __doc__.split("\n\n")[1].rstrip()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``jaxpo <command> [flags]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage:\n" + usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"jaxpo {jaxpo.__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        near = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        print(f"jaxpo: unknown command {command!r}{hint} (commands: {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print("usage:\n" + usage())
        return 0
    try:
        flags, overrides = parse_args(command, rest)
        return HANDLERS[command](flags, overrides)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
        if os.environ.get("JAXPO_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"jaxpo {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
