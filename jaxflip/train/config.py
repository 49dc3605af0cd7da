"""Deprecated: ``jaxflip.train.train_config`` (the job config) and ``jaxflip.bitflip.BitflipConfig``
(the bitflip settings). This alias stays for one release."""

import warnings

from jaxflip.bitflip.config import BitflipConfig  # noqa: F401
from jaxflip.train.train_config import *  # noqa: F401,F403

warnings.warn("jaxflip.train.config is deprecated: use jaxflip.train.train_config (and jaxflip.bitflip.BitflipConfig)",
              DeprecationWarning, stacklevel=2)
