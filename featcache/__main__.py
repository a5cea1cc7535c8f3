"""``python -m featcache``."""

from featcache.cli import main

main()
