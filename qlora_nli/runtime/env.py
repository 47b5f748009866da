"""The project's environment variables: one prefix, NLI_ (NLI_DATA_MIRROR, NLI_TORCHRUN, ...). The names of earlier
versions (QLORA_NLI_*) still work; each says once per process that it is deprecated."""
import logging
import os

PREFIX = "NLI_"
DEPRECATED_PREFIX = "QLORA_NLI_"
log = logging.getLogger(__name__)
_warned = set()


def get(name, default=None):
    """The value of NLI_<name>, else of the deprecated QLORA_NLI_<name> (with a warning, once), else `default`."""
    new, old = PREFIX + name, DEPRECATED_PREFIX + name
    if new in os.environ:
        return os.environ[new]
    if old in os.environ:
        if old not in _warned and "LOCAL_RANK" not in os.environ:  # the launching process says it, not every rank
            _warned.add(old)
            log.warning("%s is deprecated: set %s instead (the same meaning)", old, new)
        return os.environ[old]
    return default
