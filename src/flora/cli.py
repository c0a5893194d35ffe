"""The ``flora`` command.

``flora fit | validate | test`` is a LightningCLI whose ``model`` section is a method
(a :class:`~flora.methods.FederatedPromptModule` subclass), ``data`` a
:class:`~flora.data.FederatedDataModule` and ``trainer`` the
:class:`~flora.federated.FederatedTrainer`. ``flora prepare`` writes the client shards
of a config's ``data`` section.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from flora.clip.backbone import PretrainedWeightsError
from flora.data.datamodule import FederatedDataModule
from flora.data.errors import FloraDataError
from flora.errors import FloraConfigError, FloraRunError
from flora.federated.checkpoint import CheckpointError
from flora.federated.trainer import FederatedTrainer
from flora.methods.base import FederatedPromptModule

# errors whose message is the whole story: printed as one line, no traceback (FLORA_DEBUG=1 shows it)
_FRIENDLY_ERRORS = (
    FloraDataError,
    FloraConfigError,
    FloraRunError,
    CheckpointError,
    PretrainedWeightsError,
    FloatingPointError,
)
#: every command with its one-line description (``flora``, ``flora -h``, ``flora --help``)
COMMANDS: dict[str, str] = {
    "fit": "federated training of a method (LightningCLI: --config FILE, repeatable; --print_config)",
    "validate": "evaluate every client once from a checkpoint (--ckpt_path last|FILE); writes validate.json",
    "test": "evaluate every client on its test split from a checkpoint (--ckpt_path last|FILE); test.json",
    "prepare": "write the client shards of a config's data section (and report their sizes)",
    "pretrain-tiny": "pretrain the shipped tiny CLIP on the synthetic world (docs/synthetic-world.md)",
    "pretrain-generator": "pretrain CMFL's tiny text-to-image generator (docs/diffusion.md; flora[cmfl])",
    "bench": "regenerate a benchmark document: accuracy | ablation | cmfl | speed | scaling | probe",
    "report": "compare finished runs (folders or globs): tables, mean ± std over seeds, plots (docs/report.md)",
}


def usage() -> str:
    """The text of ``flora --help``: every command and its one-line description."""
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: flora COMMAND [options]    (flora COMMAND --help for a command's options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "docs/cli.md describes the config sections; FLORA_DEBUG=1 shows full tracebacks."]
    return "\n".join(lines)


# what a process sees when another process of the same run died (gloo / nccl)
_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator")


class ConfigFileError(FloraConfigError):
    """A config file that cannot be read or parsed."""


class FloraCLI(LightningCLI):
    """LightningCLI with the federated trainer in place of ``lightning.Trainer``."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=FederatedPromptModule,
            datamodule_class=FederatedDataModule,
            subclass_mode_model=True,
            subclass_mode_data=False,
            trainer_class=FederatedTrainer,  # type: ignore[arg-type]
            save_config_callback=None,
            seed_everything_default=False,
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "flora"},
            args=list(args) if args is not None else None,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "datamodule"},
            "validate": {"model", "datamodule"},
            "test": {"model", "datamodule"},
        }

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(FederatedTrainer, "trainer", instantiate=False, sub_configs=True)
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=True)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=False)

    def _parse_ckpt_path(self) -> None:
        """Never merge a checkpoint's hyperparameters into the config: the config is the user's alone.

        (LightningCLI would read ``hyper_parameters`` from ``--ckpt_path`` and override the
        ``model`` section with them; flora checks a checkpoint against the configured model instead.)
        """

    def instantiate_trainer(self, **kwargs: Any) -> FederatedTrainer:  # type: ignore[override]
        config = dict(self._get(self.config_init, "trainer", default={}))
        config.update(kwargs)
        trainer = FederatedTrainer(**config)
        if self.subcommand is not None:
            trainer.config_text = self._parser(self.subcommand).dump(
                self.config[self.subcommand], skip_none=False
            )
        return trainer


def _method_registry() -> dict[str, type]:
    """Method classes by class name (``--model PromptFL``), from :data:`flora.methods.REGISTRY`."""
    from flora.methods import REGISTRY

    return {cls.__name__: cls for cls in REGISTRY.values()}


def _resolve_class(path: str) -> type | None:
    registry = _method_registry()
    if path in registry:
        return registry[path]
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        return None
    try:
        obj = getattr(importlib.import_module(module_name), attr, None)
    except ImportError:
        return None
    return obj if isinstance(obj, type) else None


def _requested_method(argv: Sequence[str]) -> str | None:
    """The model class_path that the configs and overrides in ``argv`` ask for (last one wins)."""
    found: str | None = None
    args = list(argv)
    for i, arg in enumerate(args):
        value = None
        if arg in ("--config", "-c") and i + 1 < len(args):
            try:
                with open(args[i + 1]) as fh:
                    cfg = yaml.safe_load(fh) or {}
            except OSError:
                continue
            except yaml.YAMLError as err:
                raise ConfigFileError(f"config {args[i + 1]} is not valid YAML: {_one_line(err)}") from None
            model = cfg.get("model") if isinstance(cfg, dict) else None
            if isinstance(model, dict):
                value = model.get("class_path")
            elif isinstance(model, str):
                value = model
        elif arg.startswith("--model=") or arg.startswith("--model.class_path="):
            value = arg.split("=", 1)[1]
        elif arg in ("--model", "--model.class_path") and i + 1 < len(args):
            value = args[i + 1]
        if value:
            found = value
    return found


def _check_method(argv: Sequence[str]) -> str | None:
    """A one-line error if the requested method class does not exist (or is not a flora method)."""
    requested = _requested_method(argv)
    if requested is None or requested.strip().startswith("{"):
        return None
    cls = _resolve_class(requested)
    if cls is None or not issubclass(cls, FederatedPromptModule):
        known = ", ".join(sorted(_method_registry()))
        what = "is not a flora method" if cls is not None else "not found"
        return f"unknown method class {requested!r} ({what}); available: {known}"
    return None


def _config_files(argv: Sequence[str]) -> list[str]:
    """The config files named by ``--config`` / ``-c`` in ``argv``, in order."""
    args = list(argv)
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _check_data_section(argv: Sequence[str]) -> str | None:
    """A one-line error if configs are given but none of them (nor an override) has a ``data`` section.

    A method file such as ``configs/synthetic/flora.yaml`` holds only ``model:`` and is composed
    with a data/trainer file given before it; alone it would fall back to the default data root.
    """
    if any(a in ("-h", "--help", "--print_config") or a.startswith("--print_config=") for a in argv):
        return None
    files = _config_files(argv)
    if not files or any(a == "--data" or a.startswith(("--data.", "--data=")) for a in argv):
        return None
    for path in files:
        try:
            with open(path) as fh:
                cfg = yaml.safe_load(fh)
        except (OSError, yaml.YAMLError):
            return None  # the parser reports it
        if not isinstance(cfg, dict) or "data" in cfg:
            return None
    return (
        f"no `data` section in {', '.join(files)}: a method file holds only the model; give the "
        "data/trainer config before it, e.g. "
        "`flora fit --config configs/synthetic/base.yaml --config configs/synthetic/flora.yaml`"
    )


def prepare_main(argv: Sequence[str]) -> int:
    """``flora prepare --config cfg.yaml``: write the client shards and manifest of the ``data`` section."""
    parser = ArgumentParser(
        prog="flora prepare", description="Write per-client webdataset shards and a manifest."
    )
    parser.add_argument(
        "-c", "--config", action=ActionConfigFile, help="a flora config (only `data` is used)"
    )
    parser.add_class_arguments(FederatedDataModule, "data")
    for ignored in ("model", "trainer"):
        parser.add_argument(f"--{ignored}", type=Any, default=None, help="ignored by prepare")
    parser.add_argument("--seed_everything", type=Any, default=None, help="ignored by prepare")
    cfg = parser.parse_args(list(argv))
    dm: FederatedDataModule = parser.instantiate_classes(cfg).data
    dm.prepare_data()
    dm.setup()
    manifest = dm.manifest or {}
    sizes = [c["num_train"] for c in manifest.get("clients", [])]
    print(
        f"flora prepare: {dm.root} has {dm.num_clients} clients x {dm.num_classes} classes; "
        f"train samples per client min {min(sizes)} / max {max(sizes)} / total {sum(sizes)}"
    )
    if missing := dm.num_clients - len(dm.evaluable_clients):
        print(
            f"flora prepare: warning: {missing} of {dm.num_clients} clients have no test samples; they train, "
            "and evaluation leaves them out (reported as clients_without_test)",
            file=sys.stderr,
        )
    return 0


def _pretrain_options(argv: Sequence[str], command: str, doc: str | None, output: str, config: type) -> Any:
    """Parse ``flora <command> [--output PATH] [--pretrain.<option> ...] [--progress BOOL]``."""
    parser = ArgumentParser(prog=f"flora {command}", description=doc)
    parser.add_argument("--output", type=str, default=output, help="where the weights are written")
    parser.add_class_arguments(config, "pretrain")
    parser.add_argument("--progress", type=bool, default=True)
    return parser.instantiate_classes(parser.parse_args(list(argv)))


def pretrain_main(argv: Sequence[str]) -> int:
    """``flora pretrain-tiny``: pretrain the tiny CLIP on the synthetic world (writes fp16 safetensors)."""
    from flora.pretrain import PretrainConfig, pretrain_tiny

    output = "runs/pretrain/flora-tiny.safetensors"
    cfg = _pretrain_options(argv, "pretrain-tiny", pretrain_main.__doc__, output, PretrainConfig)
    report = pretrain_tiny(cfg.output, cfg.pretrain, progress=cfg.progress)
    print(
        f"flora pretrain-tiny: wrote {report['output']} ({report['size_mb']:.1f} MiB, sha256 {report['sha256'][:16]}) "
        f"in {report['render_s'] + report['train_s']:.0f} s (rendering {report['render_s']:.0f} s); "
        f"final loss {report['final_loss']:.3f}"
    )
    return 0


def pretrain_generator_main(argv: Sequence[str]) -> int:
    """``flora pretrain-generator``: train the tiny text-to-image generator CMFL uses offline (a diffusers folder)."""
    from flora.diffusion import require_extra
    from flora.pretrain.generator import GeneratorPretrainConfig, pretrain_generator

    output, doc = "runs/pretrain/flora-tiny-generator", pretrain_generator_main.__doc__
    cfg = _pretrain_options(argv, "pretrain-generator", doc, output, GeneratorPretrainConfig)
    require_extra("flora pretrain-generator")
    r = pretrain_generator(cfg.output, cfg.pretrain, progress=cfg.progress)
    print(
        f"flora pretrain-generator: wrote {r['output']} ({r['size_mb']:.1f} MiB, {r['parameters']:,} parameters, "
        f"tensors sha256 {r['sha256'][:16]}) in {r['render_s'] + r['train_s']:.0f} s; "
        f"CLIP zero-shot on generated images {r['generated_acc']:.1f} % (colour {r['generated_color_acc']:.1f} %, "
        f"shape {r['generated_shape_acc']:.1f} %; real photos {r.get('real_acc', float('nan')):.1f} %, "
        f"chance {r['chance']:.1f} %)"
    )
    return 0


def bench_main(argv: Sequence[str]) -> int:
    """``flora bench accuracy | ablation | cmfl | speed | scaling | probe``: regenerate one of the benchmark documents in docs/."""
    from jsonargparse import CLI

    from flora.bench import run_ablation, run_accuracy, run_cmfl, run_scaling, run_speed
    from flora.probe import run_probe

    commands = {
        "accuracy": run_accuracy,
        "ablation": run_ablation,
        "cmfl": run_cmfl,
        "speed": run_speed,
        "scaling": run_scaling,
    }
    CLI(
        {**commands, "probe": run_probe},
        args=list(argv),
        as_positional=False,
    )
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _rank() -> int:
    """This process's global rank in a multi-process run (0 otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for key in ("RANK", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _friendly_cause(err: BaseException) -> BaseException | None:
    """``err`` or the error it wraps (jsonargparse wraps errors raised while building a nested class)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, _FRIENDLY_ERRORS):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _report(err: BaseException) -> int:
    """Print ``err`` as one line; in a multi-process run, say which rank and stay quiet where rank 0 speaks."""
    rank = _rank()
    if getattr(err, "flora_raised_on_all_ranks", False):
        return 1  # the process where it happened prints it
    where = f" (rank {rank})" if rank else ""
    print(f"flora: error{where}: {_one_line(err)}", file=sys.stderr, flush=True)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("FLORA_DEBUG", "") not in ("", "0")
    # the per-process "Initializing distributed" banner would come before a run's own output and errors
    logging.getLogger("lightning.fabric.utilities.distributed").setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    try:
        if argv and argv[0] == "prepare":
            return prepare_main(argv[1:])
        if argv and argv[0] == "pretrain-tiny":
            return pretrain_main(argv[1:])
        if argv and argv[0] == "pretrain-generator":
            return pretrain_generator_main(argv[1:])
        if argv and argv[0] == "bench":
            return bench_main(argv[1:])
        if argv and argv[0] == "report":
            from flora.report import report_main

            return report_main(argv[1:])
        if argv and argv[0] in ("fit", "validate", "test"):
            problem = _check_method(argv[1:]) or _check_data_section(argv[1:])
            if problem:
                print(f"flora: error: {problem}", file=sys.stderr)
                return 2
        FloraCLI(args=None if from_sys else argv)
        return 0
    except Exception as err:
        if debug:
            raise
        friendly = _friendly_cause(err)
        if friendly is not None:
            return _report(friendly)
        if not (isinstance(err, RuntimeError) and any(s in str(err) for s in _PEER_FAILURE)):
            raise
        # another process of this run failed first and printed its own error
        print(
            f"flora: error (rank {_rank()}): stopped because another process of this run failed "
            "(its error is printed above)",
            file=sys.stderr,
            flush=True,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
