"""``python -m llmstream``: the same as the ``llmstream`` command."""

import sys

from ._cli import main

sys.exit(main())
