"""The flags of ``granet train``, derived from the declarations of the run settings
(``experiment.config.RunSettings``) and the sparsifier options (``granet.Algorithm``), and the
tables of docs/cli.md made from the same declarations: no flag, help text or default is written
here by hand."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import granet
from granet.algorithm import OPTION, Option
from granet.experiment.config import EXPERIMENT_DEFAULTS, SETTINGS, SPARSIFIER_KEYS, Setting
from granet.experiment.tables import markdown_table

Flag = tuple[str, dict[str, Any]]  # a flag and its keywords for ``add_argument``


def choices_metavar(values: Sequence[str]) -> str:
    return "{" + ",".join(values) + "}"


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(text: str, default: str) -> str:
    return f"{text} (default: {default})".replace("%", "%%")  # argparse formats help with %


# ------------------------------------------------------------------------- the run settings
def setting_default(setting: Setting, value: Any = None, given: bool = False) -> str:
    """How ``--help`` and docs/cli.md show a setting's default (``value`` where ``given``: a
    command's own default, such as a plasticity study's base run)."""
    value = value if given else setting.default
    if value is None:
        return setting.null
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(_shown, value)) or "none"
    return _shown(value)


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def setting_flag(setting: Setting, defaults: Mapping[str, Any] | None = None) -> Flag:
    """The flag of a run setting, from its declaration; ``defaults``: the command's own
    defaults, where they differ from the setting's, shown in the help."""
    defaults = defaults or {}
    shown = setting_default(setting, defaults.get(setting.name), setting.name in defaults)
    kwargs: dict[str, Any] = {"help": _help(setting.help, shown)}
    if setting.kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif setting.kind is not str:
        kwargs["type"] = setting.kind
    if setting.choices:
        kwargs["metavar"] = choices_metavar(setting.choices)
    elif setting.metavar:
        kwargs["metavar"] = setting.metavar
    if setting.many:
        kwargs["nargs"] = setting.nargs
    return flag_name(setting.name), kwargs


def setting_flags(
    defaults: Mapping[str, Any] | None = None, skip: Sequence[str] = ()
) -> list[Flag]:
    """The flags of the run settings, but those named in ``skip``."""
    return [setting_flag(s, defaults) for s in SETTINGS if s.name not in skip]


def settings_table() -> str:
    """The markdown table of the run settings' flags, as ``docs/cli.md`` shows it."""
    rows = []
    for setting in SETTINGS:
        flag = flag_name(setting.name)
        if setting.metavar:
            flag += f" {setting.metavar}" + ("..." if setting.many else "")
        flags = f"`{flag}` / `--no-{flag[2:]}`" if setting.kind is bool else f"`{flag}`"
        rows.append([flags, setting_default(setting), setting.help + _listed(setting.choices)])
    return "\n".join(markdown_table(["flag", "default", "meaning"], rows))


def _listed(choices: Sequence[str] | None) -> str:
    return f" (`{'`, `'.join(choices)}`)" if choices else ""


# ------------------------------------------------------------------- the sparsifier options
def method_defaults(name: str) -> str:
    """Each method's own default for option ``name``, e.g. ``granet 0.5, gmp 0, rigl/set/snfs/
    static the final sparsity``."""
    by_value: dict[Any, list[str]] = {}
    for method, cls in granet.METHODS.items():
        value = cls.defaults[name]
        by_value.setdefault(value, []).append(method)
    shown = (
        "the final sparsity"
        if v is None and name == "init_sparsity"
        else f"{v:g}"
        if isinstance(v, float)
        else str(v)
        for v in by_value
    )
    return ", ".join(f"{'/'.join(ms)} {v}" for ms, v in zip(by_value.values(), shown))


def _default_text(option: Option) -> str:
    if option.name in EXPERIMENT_DEFAULTS:
        return EXPERIMENT_DEFAULTS[option.name][1]
    if option.method:
        return "the method's own: " + method_defaults(option.name)
    if option.kind is bool:
        return "on" if option.default else "off"
    if option.default is None:
        return "none"
    return f"{option.default}"


def option_flag(option: Option) -> Flag:
    """The ``granet train`` flag of a sparsifier option, from its declaration."""
    kwargs: dict[str, Any] = {"help": _help(option.help, _default_text(option))}
    if option.kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif option.choices:
        kwargs["metavar"] = choices_metavar(option.choices)
    else:
        kwargs["type"] = option.kind
    return flag_name(option.name), kwargs


def options_table() -> str:
    """The markdown table of the sparse-training flags, as ``docs/cli.md`` shows it."""
    rows = []
    for key in SPARSIFIER_KEYS:
        if key == "seed":
            continue
        option = OPTION[key]
        flag, _ = option_flag(option)
        flags = f"`{flag}` / `--no-{flag[2:]}`" if option.kind is bool else f"`{flag}`"
        rows.append([flags, _default_text(option), option.help + _listed(option.choices)])
    return "\n".join(markdown_table(["flag", "default", "meaning"], rows))


def sparsifier_flags(skip: Sequence[str] = ()) -> list[Flag]:
    """The flags of the sparsifier options (``seed`` is the run's), but those named in ``skip``."""
    return [option_flag(OPTION[k]) for k in SPARSIFIER_KEYS if k != "seed" and k not in skip]
