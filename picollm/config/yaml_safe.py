"""YAML reading that a hostile or odd file cannot turn into a hang, a flood or a raw decode error.

A config is a few hundred bytes of YAML; the limits below are orders of magnitude above any real one:
the file size, and the size of the document once every alias is expanded (a 1 KB "billion laughs"
file of nested aliases expands to 10^9 nodes; PyYAML shares them, but validation and error messages
walk the expansion). The expanded size is counted on the composed node graph with memoisation, so a
bomb is refused in milliseconds, before anything is constructed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from picollm.errors import ConfigError

MAX_FILE_BYTES = 1 << 20  # 1 MiB
MAX_NODES = 100_000  # scalars, sequences and mappings after alias expansion


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise ConfigError("a recursive YAML alias (an anchor used inside itself)")
    active.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            total += _expanded_size(child, memo, active)
            if total > MAX_NODES:
                break
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            total += _expanded_size(k, memo, active) + _expanded_size(v, memo, active)
            if total > MAX_NODES:
                break
    active.discard(key)
    memo[key] = total
    return total


def load_text(text: str, what: str) -> Any:
    """`yaml.safe_load(text)` with the expansion limit; ConfigError naming `what` if it is exceeded."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, {}, set())
        except RecursionError:
            raise ConfigError(f"{what}: YAML nested too deeply") from None
        except ConfigError as e:
            raise ConfigError(f"{what}: {e}") from None
        if size > MAX_NODES:
            raise ConfigError(f"{what}: YAML expands to more than {MAX_NODES:,} nodes (aliases of aliases?); refused")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_text(path: Path) -> str:
    """The file as UTF-8 text; ConfigError with the byte offset if it is not, or if it is too large."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes, more than a config may have ({MAX_FILE_BYTES:,})")
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
