"""YAML read safely: parsed to nodes first, so that a file whose aliases expand past `MAX_NODES`, a key given
twice or a self-referencing alias is refused with one line before any value is built."""
import logging

import yaml

from qlora_nli.runtime.errors import ParamsError, shorten

log = logging.getLogger(__name__)


# Expanded size of params.yaml in YAML nodes (keys, values, list items, an alias counted as what it stands for). The
# committed file has about 100; the bound stops a file whose aliases multiply it (an "alias bomb") before it is built.
MAX_NODES = 10_000
_MERGE = "tag:yaml.org,2002:merge"


def _expanded_size(node, sizes, limit):
    """Nodes of `node` with every alias expanded, computed once per shared node; stops above `limit`."""
    key = id(node)
    if key in sizes:
        if sizes[key] is None:  # reached again while its own size is being computed
            raise ParamsError("refers to itself")
        return sizes[key]
    sizes[key] = None
    children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, limit)
        if total > limit:
            break
    sizes[key] = total
    return total


def _no_duplicate_keys(loader, node, path, name=""):
    """Refuse a key given twice in one mapping (YAML would keep only the last, silently)."""
    if isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            _no_duplicate_keys(loader, child, path, f"{name}[{i}]")
    if not isinstance(node, yaml.MappingNode):
        return
    seen = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE:  # `<<: *base` merges on purpose, and keys written beside it override the base
            continue
        key = loader.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
        dotted = f"{name}.{key}" if name else str(key)
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: check_params reports it
            first = None
        if first is not None:
            raise ParamsError(f"{path} line {line}: {shorten(dotted, 60)} is given a second time (first at line "
                              f"{first}); YAML would silently keep only the last, so delete one of them or merge "
                              f"the two")
        if key is not None and first is None:
            try:
                seen[key] = line
            except TypeError:
                pass
        _no_duplicate_keys(loader, value_node, path, dotted)


def _read_yaml(text, path):
    """The YAML document of `text`, refusing what safe_load would accept silently or build forever: a key given twice
    in a mapping, aliases that expand it beyond MAX_NODES or refer to themselves."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, {}, MAX_NODES)
        except ParamsError:
            raise ParamsError(f"{path}: a YAML alias (*name) refers to the value that holds it, which expands "
                              f"forever; write the value out instead of the alias")
        if size > MAX_NODES:
            raise ParamsError(f"{path}: its YAML aliases (*name) expand it to more than {MAX_NODES:,} values (the "
                              f"pipeline's params are about 100); write the values out instead of repeating aliases")
        _no_duplicate_keys(loader, node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()
