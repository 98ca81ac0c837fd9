"""The options of `viommu inject` and the inject-event arguments they stand for, in one
table: the command turns options into arguments, and a test's reproduce.sh turns the
arguments a test injected back into options."""

from __future__ import annotations

import argparse
from typing import Any

# inject-event argument -> (option, argparse dest), for options that take a value
VALUE_OPTIONS = {
    "ssid": ("--ssid", "ssid"),
    "address": ("--addr", "addr"),
    "access": ("--access", "access"),
    "ipa": ("--ipa", "ipa"),
    "fetch-addr": ("--fetch-addr", "fetch_addr"),
    "count": ("--count", "count"),
    "class": ("--class", "event_class"),
    "span": ("--span", "span"),
}
FLAG_OPTIONS = ("privileged", "s2", "stall", "force")  # argument = dest, option --NAME
# Python keyword arguments cannot hold a '-': Machine.inject(fetch_addr=...) means this.
ALIASES = {"fetch_addr": "fetch-addr"}


def fields_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The inject-event arguments the parsed options ask for."""
    fields = {name: getattr(args, dest) for name, (_, dest) in VALUE_OPTIONS.items()
              if getattr(args, dest) is not None}
    fields.update({flag: True for flag in FLAG_OPTIONS if getattr(args, flag)})
    return fields


def options_from_fields(fields: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """(`viommu inject` options for these inject-event arguments, the arguments no option
    expresses)."""
    options: list[str] = []
    rest: dict[str, Any] = {}
    for key, value in fields.items():
        name = ALIASES.get(key, key)
        if name in VALUE_OPTIONS and value is not None:
            text = hex(value) if isinstance(value, int) and name not in ("count", "span") \
                else str(value)
            options += [VALUE_OPTIONS[name][0], text]
        elif name in FLAG_OPTIONS and isinstance(value, bool):
            options += [f"--{name}"] if value else []
        else:
            rest[key] = value
    return options, rest
