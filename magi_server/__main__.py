"""``python -m magi_server`` is ``magi-server``."""
from magi_server.tools.cli import main

raise SystemExit(main())
