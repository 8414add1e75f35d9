"""``python -m gpubackprop``: the ``gpubackprop`` command (gpubackprop.cli)."""

import sys

from .cli import main

sys.exit(main())
