"""The `jaxpo` command.

    jaxpo train                                    # the embedded default: tiny model, CPU, minutes
    jaxpo train --config=configs/dpo_tiny.py --config.train.steps=200 --workdir=runs/dpo
    jaxpo eval --workdir=runs/dpo [--config.data.eval_files=heldout.jsonl]
    jaxpo eval --config.model.path=hf_model --config.data.eval_files=heldout.jsonl
    jaxpo precompute-ref --config=configs/dpo_tiny.py --out=refcache
    jaxpo export --workdir=runs/dpo --out=hf_model [--dtype=bfloat16]
    jaxpo export --workdir=runs/lora --out=adapter [--merge]   # PEFT adapter, or merged weights
    jaxpo plot --workdir=runs/dpo
    jaxpo score --workdir=runs/rm_tiny --in=records.jsonl --out=rewards.jsonl   # reward model
    jaxpo bench quality [--quick] [--out=DIR] [--tasks=sort,add,rise] [--seeds=3]  # objectives
    jaxpo --version

Flags are ``--name=value`` (or ``--name value``); ``--config.section.field=value`` overrides one
config field (see ``jaxpo.config``). Without ``--config``, a workdir that holds a checkpoint
uses the config stored in it, and otherwise the defaults. ``jaxpo train`` with neither a
config, nor own data or model, nor a workdir of another run is the embedded demo
(:mod:`jaxpo.demo`). ``python -m jaxpo ...`` is ``jaxpo ...``.

Exit status: 0 done; 1 a failure (a traceback for errors raised inside a library, a message
for a run stopped on non-finite values); 2 a bad command line, config or input (one line that
names the flag, field, file or line); 130 interrupted (Ctrl-C); 143 (128 + SIGTERM) a run
pre-empted by SIGTERM after saving its checkpoint, so schedulers can tell pre-emption from
completion.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import sys
import sysconfig
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jaxpo
from jaxpo import config as config_lib
from jaxpo import demo, plot
from jaxpo.bench import quality
from jaxpo.data.tokenize import Tokenizer
from jaxpo.models import export_hf
from jaxpo.models.lora import export_peft
from jaxpo.train import inputs, loop, reward_model
from jaxpo.train.checkpoint import Checkpointer

COMMANDS = ("train", "eval", "precompute-ref", "export", "plot", "score", "bench")
# Flags each command accepts (besides --config.section.field=value overrides).
FLAGS: dict[str, tuple[str, ...]] = {
    "train": ("config", "workdir", "no_progress", "sft_steps"),
    "eval": ("config", "workdir", "untrained"),
    "precompute-ref": ("config", "out", "workdir"),
    "export": ("config", "workdir", "out", "dtype", "untrained", "merge"),
    "plot": ("workdir", "out"),
    "bench": ("quick", "out", "workdir", "tasks", "seeds"),
    "score": ("workdir", "model", "in", "out"),
}
REQUIRED = {"precompute-ref": ("out",), "export": ("out",),
            "plot": ("workdir",), "score": ("in", "out")}
BOOLEAN = ("no_progress", "untrained", "merge", "quick")
PREEMPTED = 128 + 15  # exit status of a run stopped by SIGTERM (after saving)
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
        if not arg.startswith("--") and command == "bench" and "benchmark" not in flags:
            flags["benchmark"] = arg  # jaxpo bench <benchmark>
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
    ckpt = Checkpointer(workdir)
    try:
        step = ckpt.latest_step()
        return None if step is None else ckpt.read_json(step, "config")
    finally:
        ckpt.close()


def resolve_config(flags: dict[str, Any], overrides: list[str]) -> config_lib.Config:
    """``--config`` file, else the workdir's stored config, else the defaults; then the
    overrides."""
    if flags.get("config"):
        return config_lib.load_config(flags["config"], overrides)
    stored = stored_config(flags.get("workdir"))
    if stored is not None:
        return config_lib.apply_overrides(config_lib.from_dict(stored), overrides)
    return config_lib.load_config(None, overrides)


def is_demo(flags: dict[str, Any], overrides: list[str]) -> bool:
    """``jaxpo train`` is the embedded demo without ``--config``, own data or own model, on a
    new workdir or one where the demo ran."""
    if flags.get("config"):
        return False
    own = ("--config.data.train_files", "--config.model.path", "--config.model.init_from")
    if any(o.startswith(own) for o in overrides):
        return False
    workdir = flags.get("workdir")
    return (not workdir or not os.path.exists(workdir)
            or os.path.exists(os.path.join(workdir, demo.MARKER))
            or stored_config(workdir) is None and not os.listdir(workdir))


# ----------------------------------------------------------------------------- commands


def new_workdir(base: str) -> str:
    """``base``, or ``base-2``, ``base-3``, ... : the first that does not exist yet."""
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def cmd_train(flags: dict[str, Any], overrides: list[str]) -> int:
    """Trains; with no --config, own data or own model, runs the embedded demo."""
    workdir = flags.get("workdir")
    progress = not flags.get("no_progress", False)
    if is_demo(flags, overrides):
        workdir = workdir or new_workdir(demo.WORKDIR)
        print(f"jaxpo {jaxpo.__version__}: the embedded demo (workdir {workdir})")
        sft_steps = int(flags.get("sft_steps", demo.SFT_STEPS))
        summary = demo.run(workdir, overrides, sft_steps=sft_steps, progress=progress)["summary"]
        return PREEMPTED if summary["preempted"] else 0
    if "sft_steps" in flags:
        raise UsageError("--sft_steps applies to the embedded demo only")
    config = resolve_config(flags, overrides)
    if not workdir:  # a new directory: never silently resume another run
        stem = os.path.splitext(os.path.basename(flags.get("config") or "run"))[0]
        workdir = new_workdir(os.path.join("runs", stem))
        print(f"workdir: {workdir}")
    summary = loop.train(config, workdir, progress=progress)
    plot_path = _try_plot(workdir)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("final", "eval")}))
    for name in ("final", "eval"):
        if summary.get(name):
            print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in summary[name].items()
                                          if isinstance(v, float)))
    if plot_path:
        print(f"plot: {plot_path}")
    return PREEMPTED if summary["preempted"] else 0


def cmd_eval(flags: dict[str, Any], overrides: list[str]) -> int:
    """Prints one JSON object of eval metrics of the checkpoint in --workdir (the untrained
    model with --untrained)."""
    config = resolve_config(flags, overrides)
    metrics = loop.evaluate(config, flags.get("workdir"),
                            untrained=flags.get("untrained", False))
    print(json.dumps(metrics, sort_keys=True))
    return 0


def cmd_precompute_ref(flags: dict[str, Any], overrides: list[str]) -> int:
    """Writes the reference log-probs of the train and eval files to --out."""
    config = resolve_config(flags, overrides)
    info = loop.precompute_reference(config, flags["out"], flags.get("workdir"))
    print(json.dumps(info, sort_keys=True))
    return 0


def cmd_export(flags: dict[str, Any], overrides: list[str]) -> int:
    """Writes the trained policy as a Hugging Face checkpoint (plus tokenizer files); a LoRA
    run's adapters as a PEFT adapter, or with --merge folded into the weights."""
    out = flags["out"]
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out={out} is a file; give a directory to write the model into")
    config = resolve_config(flags, overrides)
    merge = flags.get("merge", False)
    if merge and not config.model.lora.rank:
        raise UsageError("--merge folds LoRA adapters into the weights, but this run has none "
                         "(config.model.lora.rank=0); export without --merge")
    model, step = loop.load_policy(config, flags.get("workdir"),
                                   untrained=flags.get("untrained", False))
    if config.model.lora.rank and not merge:
        files = export_peft(model, out, base_model_name_or_path=config.model.path or None,
                            dtype=flags.get("dtype"))
    else:
        files = ["config.json", *export_hf(model, out, dtype=flags.get("dtype"))]
    tok_dir = inputs.tokenizer_dir(config)
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(tok_dir, name)
        if os.path.exists(src) and not os.path.exists(os.path.join(out, name)):
            shutil.copy(src, os.path.join(out, name))
            copied.append(name)
    if "config.json" in files:
        _record_pad_token(out, tok_dir)
    print(json.dumps({"out": out, "step": step, "files": [*files, *copied]}))
    return 0


def _record_pad_token(out: str, tok_dir: str) -> None:
    """Writes the tokenizer's padding token id into ``<out>/config.json`` when the model
    config has none: transformers' ``*ForSequenceClassification`` finds each row's last token
    from it and refuses batches of more than one row without it."""
    path = os.path.join(out, "config.json")
    with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    if hf.get("pad_token_id") is not None or not os.path.exists(
            os.path.join(tok_dir, "tokenizer.json")):
        return
    tok = Tokenizer.from_dir(tok_dir)
    pad = tok.specials.get("pad_token")
    pad_id = tok.token_id(pad) if pad else None
    if pad_id is None:
        return
    hf["pad_token_id"] = pad_id
    with open(path, "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")


def cmd_plot(flags: dict[str, Any], overrides: list[str]) -> int:
    """Writes PNG curves of <workdir>/metrics.jsonl."""
    if overrides:
        raise UsageError("jaxpo plot takes no --config.* overrides")
    print(plot.plot_metrics(flags["workdir"], flags.get("out")))
    return 0


def cmd_score(flags: dict[str, Any], overrides: list[str]) -> int:
    """Writes --in's records with their rewards under a reward model (a run's --workdir or an
    exported --model directory) to --out."""
    if overrides:
        raise UsageError("jaxpo score takes no --config.* overrides (the model's own are used)")
    given = [flags[k] for k in ("workdir", "model") if flags.get(k)]
    if len(given) != 1:
        raise UsageError("give one of --workdir=RUN (a reward-model run) or --model=DIR "
                         "(an exported reward model)")
    if os.path.isdir(flags["out"]):
        raise UsageError(f"--out={flags['out']} is a directory; give the JSONL file to write")
    scorer = reward_model.load_scorer(given[0])
    print(json.dumps(reward_model.score_file(scorer, flags["in"], flags["out"])))
    return 0


def cmd_bench(flags: dict[str, Any], overrides: list[str]) -> int:
    """Runs ``jaxpo bench quality``: every objective on every data shape of tasks with a known
    reward; prints the Markdown table and writes it with the JSON and PNG to --out."""
    if overrides:
        raise UsageError("jaxpo bench takes no --config.* overrides")
    if flags.get("benchmark") != "quality":
        got = f" (got {flags['benchmark']!r})" if flags.get("benchmark") else ""
        raise UsageError(f"jaxpo bench needs the benchmark to run: quality{got}")
    settings = quality.settings_from_flags(quick=flags.get("quick", False),
                                           tasks=flags.get("tasks"), seeds=flags.get("seeds"))
    out = flags.get("out") or new_workdir(os.path.join("runs", "bench_quality"))
    results = quality.run(out, settings, workdir=flags.get("workdir"))
    print(quality.markdown(results))
    print(f"results: {os.path.join(out, quality.NAME)}.{{json,md,png}}")
    return 0


def _try_plot(workdir: str) -> str | None:
    try:
        return plot.plot_metrics(workdir)
    except (OSError, ValueError) as e:
        print(f"(no plot: {e})")
        return None


HANDLERS: dict[str, Callable[[dict[str, Any], list[str]], int]] = {
    "train": cmd_train, "eval": cmd_eval, "precompute-ref": cmd_precompute_ref,
    "export": cmd_export, "plot": cmd_plot, "score": cmd_score,
    "bench": cmd_bench,
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
    except loop.NonFiniteError as e:
        print(f"jaxpo {command}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Checkpoints appear atomically when complete: an interrupted save leaves none behind.
        print(f"jaxpo {command}: interrupted; a rerun resumes from the newest complete "
              "checkpoint", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, KeyError) as e:
        if os.environ.get("JAXPO_DEBUG") or not _raised_by_jaxpo(e):
            raise  # a bug, or an error inside a library: keep the traceback (exit 1)
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"jaxpo {command}: error: {message}", file=sys.stderr)
        return 2


def _raised_by_jaxpo(error: BaseException) -> bool:
    """Whether ``error`` was raised by jaxpo's own code (a message for the user: a bad flag,
    config field, file or record), not inside JAX or another library (a bug to report)."""
    if isinstance(error, UsageError):
        return True
    stdlib = sysconfig.get_paths()["stdlib"] + os.sep
    frames = [os.path.abspath(f.filename) for f in traceback.extract_tb(error.__traceback__)]
    frames = [f for f in frames if not f.startswith(stdlib)]  # open(), os.makedirs(), ...
    package = os.path.dirname(os.path.abspath(jaxpo.__file__))
    return bool(frames) and frames[-1].startswith(package + os.sep)


if __name__ == "__main__":
    sys.exit(main())
