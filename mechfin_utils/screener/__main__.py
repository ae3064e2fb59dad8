"""``python -m mechfin_utils.screener evaluate PAIRS.csv`` (and ``train``, ``compare``): see
:mod:`mechfin_utils.screener.training`."""

from mechfin_utils.screener.training import main

raise SystemExit(main())
