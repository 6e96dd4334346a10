"""`python -m helpers.dpo`: preference-tune a fine-tuned model (helpers.dpo.cli)."""

import sys

from helpers.dpo.cli import main

sys.exit(main())
