"""``python -m mechfin_utils.tooling.bench`` (``make bench``): see :mod:`mechfin_utils.tooling.bench.command`."""

from mechfin_utils.tooling.bench.command import main

raise SystemExit(main())
