"""``python -m mechfin_utils prepare`` converts the embedded model once (``make setup``); ``which`` says which
model ``"auto"`` picks on this machine."""

from mechfin_utils.core.models import main

raise SystemExit(main())
